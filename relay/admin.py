"""The admin listener: /metrics, /healthz, /readyz, /tunnels.

A deliberately small HTTP/1.1 server (GET and HEAD, one request per
connection) on the relay's own event loop, so /tunnels and the byte counters
are read without locks and are current to the moment of the request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from relay.server import Relay

# Admin requests are tiny; anything bigger is not a scraper or a probe.
MAX_ADMIN_HEAD = 8 * 1024
ADMIN_READ_TIMEOUT = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    503: "Service Unavailable",
}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def tunnels_json(relay: Relay) -> list[dict[str, object]]:
    """The live tunnels, as /tunnels returns them."""
    now = time.monotonic()
    mono_to_wall = time.time() - now
    for t in relay.tunnels.values():
        t.idle_for(now)  # refreshes last_activity from the byte counters
    return [
        {
            "id": t.id,
            "client": t.client,
            "host": t.host,
            "port": t.port,
            "egress": t.egress,
            "listener": t.listener,
            "opened_at": _iso(t.opened_at),
            "bytes_up": t.bytes_up,
            "bytes_down": t.bytes_down,
            "last_activity": _iso(t.last_activity + mono_to_wall),
        }
        for t in relay.tunnels.values()
    ]


def http_response(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def route(relay: Relay, method: str, path: str) -> bytes:
    head_only = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return http_response(405, b"method not allowed\n", "text/plain")
    path = path.split("?", 1)[0]
    if path == "/metrics":
        relay.fold_all()
        return http_response(
            200, generate_latest(relay.metrics.registry), CONTENT_TYPE_LATEST, head_only
        )
    if path == "/healthz":
        return http_response(200, b"ok\n", "text/plain", head_only)
    if path == "/readyz":
        if relay.draining:
            return http_response(503, b"draining\n", "text/plain", head_only)
        return http_response(200, b"ready\n", "text/plain", head_only)
    if path == "/debug/tasks":
        # For leak checks: what the relay holds besides its tunnels.
        body = json.dumps(
            {
                "relay_tasks": len(relay.tasks),
                "loop_tasks": len(asyncio.all_tasks(relay.loop)),
                "dialing": relay.dialing,
                "pending_heads": len(relay.pending),
                "tunnels": len(relay.tunnels),
            }
        ).encode()
        return http_response(200, body, "application/json", head_only)
    if path == "/tunnels":
        body = json.dumps(tunnels_json(relay), indent=1).encode()
        return http_response(200, body, "application/json", head_only)
    return http_response(404, b"not found\n", "text/plain", head_only)


Route = Callable[[str, str], Awaitable[bytes]]


async def handle_request(
    route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read one request head (bounded in size and time), answer with
    ``route(method, path)``, close. Shared by the relay and the supervisor."""
    try:
        async with asyncio.timeout(ADMIN_READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_ADMIN_HEAD:
            raise ValueError
        parts = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError
        writer.write(await route(parts[0], parts[1]))
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.write(http_response(408, b"incomplete request\n", "text/plain"))
    except (ValueError, UnicodeDecodeError):
        writer.write(http_response(400, b"bad request\n", "text/plain"))
    except ConnectionError:
        pass
    try:
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _connected(relay: Relay) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
    tasks: set[asyncio.Task[None]] = set()

    async def answer(method: str, path: str) -> bytes:
        return route(relay, method, path)

    def client_connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = relay.loop.create_task(handle_request(answer, reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return client_connected


async def start_admin(relay: Relay, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(_connected(relay), host, port, limit=MAX_ADMIN_HEAD)


async def start_admin_unix(relay: Relay, path: str) -> asyncio.Server:
    """A worker's admin endpoint, on a Unix socket its supervisor queries."""
    return await asyncio.start_unix_server(_connected(relay), path, limit=MAX_ADMIN_HEAD)
