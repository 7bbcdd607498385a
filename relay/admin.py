"""The admin listener: a small HTTP/1.1 server with a dispatch table.

GET and HEAD, one request per connection, on the event loop of whoever serves
it, so what a handler shows is current to the moment of the request and read
without locks. It knows nothing of what it serves: the relay and the
supervisor each hand it their table of ``path -> handler``; the handlers live
with what they show (the tunnel book, the metrics, the supervisor's workers).
Every handler only reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from relay.tasks import TaskSet

# Admin requests are tiny; anything bigger is not a scraper or a probe.
MAX_ADMIN_HEAD = 8 * 1024
ADMIN_READ_TIMEOUT = 5.0

# Every admin answer, the status page's included: its script, style and data
# come from this origin only; nothing may frame it, no other origin is reached.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_REASONS = {
    200: "OK",
    202: "Accepted",
    401: "Unauthorized",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    503: "Service Unavailable",
}


Query = Mapping[str, str]  # the request's query parameters (the last of each name)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain"


def text(status: int, body: str) -> Reply:
    return Reply(status, body.encode())


def json_reply(value: object) -> Reply:
    return Reply(200, json.dumps(value, indent=1).encode(), "application/json")


Handler = Callable[[Query], Awaitable[Reply]]
Action = Callable[[str, str], Awaitable[Reply]]


def filtered(
    entries: list[dict[str, object]], query: Query, keys: tuple[str, ...]
) -> list[dict[str, object]]:
    """The entries whose fields contain each given filter's value (``?host=cp0``,
    ``?client=10.0.0.7``, ``?state=no_telemetry``); ``client`` also matches
    ``identity``. Filters not in ``keys`` are ignored."""
    wanted = [(k, v) for k, v in query.items() if k in keys and v]

    def match(entry: dict[str, object], key: str, value: str) -> bool:
        field = entry.get(key, entry.get("identity") if key == "client" else None)
        return value == field if key == "state" else value in str(field or "")

    return [e for e in entries if all(match(e, k, v) for k, v in wanted)]


def http_response(status: int, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        f"Content-Security-Policy: {CSP}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


class AdminServer:
    """Serves ``routes`` (path -> handler); handlers get the query parameters."""

    def __init__(self, routes: Mapping[str, Handler], action: Action | None = None) -> None:
        self.routes = dict(routes)
        self.action = action  # POST: (path, Authorization header) -> reply
        self.tasks = TaskSet()
        self.server: asyncio.Server | None = None

    async def answer(self, method: str, path: str, authorization: str = "") -> bytes:
        if method == "POST" and self.action is not None:
            reply = await self.action(path.partition("?")[0], authorization)
            return http_response(reply.status, reply.body, reply.content_type)
        if method not in ("GET", "HEAD"):
            return http_response(405, b"method not allowed\n", "text/plain")
        route, _, query = path.partition("?")
        handler = self.routes.get(route)
        if handler is None:
            reply = text(404, "not found\n")
        else:
            reply = await handler(dict(urllib.parse.parse_qsl(query)))
        return http_response(reply.status, reply.body, reply.content_type, method == "HEAD")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request head (bounded in size and time), answer, close."""
        try:
            async with asyncio.timeout(ADMIN_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_ADMIN_HEAD:
                raise ValueError
            lines = head.decode("ascii").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise ValueError
            authorization = next(
                (
                    line.partition(":")[2].strip()
                    for line in lines[1:]
                    if line.partition(":")[0].strip().lower() == "authorization"
                ),
                "",
            )
            writer.write(await self.answer(parts[0], parts[1], authorization))
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

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.spawn(self.handle(reader, writer))

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> str:
        """Listen on TCP (on ``sock``, a predecessor's listening socket, when
        given); the bound ``host:port``."""
        from relay.hostport import hostport

        if sock is not None:
            self.server = await asyncio.start_server(
                self._connected, sock=sock, limit=MAX_ADMIN_HEAD
            )
        else:
            self.server = await asyncio.start_server(
                self._connected, host, port, limit=MAX_ADMIN_HEAD
            )
        name = self.server.sockets[0].getsockname()
        return hostport(name[0], name[1])

    async def start_unix(self, path: str) -> str:
        """A worker's admin endpoint, on a Unix socket its supervisor queries."""
        self.server = await asyncio.start_unix_server(self._connected, path, limit=MAX_ADMIN_HEAD)
        return path

    def hand_over(self) -> socket.socket | None:
        """Stop accepting; a duplicate of the listening socket (a TCP one) for
        a successor, or to take back with start(sock=...)."""
        if self.server is None or not self.server.sockets:
            return None
        sock = self.server.sockets[0]
        if sock.family == socket.AF_UNIX:
            return None
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        self.server.close()
        self.server = None
        return dup

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.tasks.cancel()
