"""Direct egress: resolve (static map or DNS), check, and connect with Happy
Eyeballs (RFC 8305) across the checked addresses."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from relay.egress import Dialer, DialError, Dialled, classify
from relay.resolver import Endpoint, ResolveError, Resolver

# RFC 8305 §5: "Connection Attempt Delay" recommended default 250 ms.
CONNECTION_ATTEMPT_DELAY = 0.25


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY (tunnels carry TLS records, latency matters) and keepalive
    (a dead peer behind a NAT is noticed even on a silent tunnel)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def connect_one(endpoint: Endpoint) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        tune(sock)
        await loop.sock_connect(sock, endpoint.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def happy_eyeballs(
    endpoints: list[Endpoint], delay: float = CONNECTION_ATTEMPT_DELAY
) -> tuple[socket.socket, Endpoint]:
    """Start an attempt per endpoint, each ``delay`` after the previous one or as
    soon as it failed; the first success wins and every other attempt is
    cancelled and its socket closed."""
    if len(endpoints) == 1:
        try:
            return await connect_one(endpoints[0]), endpoints[0]
        except OSError as exc:
            raise classify(exc, str(endpoints[0])) from None
    loop = asyncio.get_running_loop()
    attempts: dict[asyncio.Task[socket.socket], Endpoint] = {}
    errors: list[DialError] = []
    queue = list(endpoints)
    try:
        while queue or attempts:
            if queue:
                endpoint = queue.pop(0)
                attempts[loop.create_task(connect_one(endpoint))] = endpoint
            done, _ = await asyncio.wait(
                attempts, timeout=delay if queue else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                endpoint = attempts.pop(task)
                failure = task.exception()
                if failure is None:
                    return task.result(), endpoint
                if not isinstance(failure, OSError):
                    raise failure
                errors.append(classify(failure, str(endpoint)))
    finally:
        for task in attempts:
            task.cancel()
        for task in attempts:
            with contextlib.suppress(BaseException):
                (await task).close()
    first = errors[0]
    raise DialError(first.reason, "; ".join(e.detail for e in errors))


class DirectDialer(Dialer):
    """Connects from this host to the destination's checked addresses."""

    name = "direct"

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        try:
            endpoints = await self.resolver.resolve(host, port)
        except ResolveError as exc:
            raise DialError(exc.reason, exc.detail, exc.status) from None
        sock, endpoint = await happy_eyeballs(endpoints)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        return Dialled(transport, str(endpoint))
