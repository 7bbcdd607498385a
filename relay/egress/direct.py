"""Direct egress: resolve (static map or DNS), check, and connect with Happy
Eyeballs (RFC 8305) across the checked addresses."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from relay.egress import DialDone, Dialer, DialError, Dialing, Dialled, classify
from relay.resolver import Endpoint, ResolveError, Resolver
from relay.tasks import TaskSet

# RFC 8305 §5: "Connection Attempt Delay" recommended default 250 ms.
CONNECTION_ATTEMPT_DELAY = 0.25

T = TypeVar("T")


class _Attempt(asyncio.Protocol):
    """Holds one Happy Eyeballs attempt's connection until it wins or loses."""

    __slots__ = ("buf", "eof", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data  # at most one read: reading is paused

    def eof_received(self) -> bool:
        self.eof = True
        return True


async def connect_one(
    endpoint: Endpoint, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Transport:
    """One TCP connection with ``protocol`` attached. The event loop's own
    connect (no Python socket object, no second address parse) is several
    times cheaper than sock_connect followed by create_connection(sock=)."""
    loop = loop or asyncio.get_running_loop()
    transport, _ = await loop.create_connection(lambda: protocol, endpoint.address, endpoint.port)
    return transport


async def connect_sock(endpoint: Endpoint) -> socket.socket:
    """One connected non-blocking socket (for callers that wrap it themselves)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        await loop.sock_connect(sock, endpoint.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _race(
    endpoints: list[Endpoint],
    attempt: Callable[[Endpoint], Awaitable[T]],
    discard: Callable[[T], object],
    delay: float,
) -> tuple[T, Endpoint]:
    """RFC 8305 §5: start an attempt per endpoint, each ``delay`` after the
    previous one or as soon as it failed; the first success wins, every other
    attempt is cancelled and whatever it produced is discarded."""
    if len(endpoints) == 1:
        try:
            return await attempt(endpoints[0]), endpoints[0]
        except OSError as exc:
            raise classify(exc, str(endpoints[0])) from None
    spawned = TaskSet()
    attempts: dict[asyncio.Task[T], Endpoint] = {}
    errors: list[DialError] = []
    queue = list(endpoints)
    try:
        while queue or attempts:
            if queue:
                endpoint = queue.pop(0)
                attempts[spawned.spawn(attempt(endpoint))] = endpoint  # type: ignore[arg-type]
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
                discard(await task)
    first = errors[0]
    raise DialError(first.reason, "; ".join(e.detail for e in errors))


async def happy_eyeballs(
    endpoints: list[Endpoint], delay: float = CONNECTION_ATTEMPT_DELAY
) -> tuple[socket.socket, Endpoint]:
    """Happy Eyeballs returning a connected socket."""
    return await _race(endpoints, connect_sock, socket.socket.close, delay)


async def connect_transport(
    endpoints: list[Endpoint],
    protocol: asyncio.Protocol,
    delay: float = CONNECTION_ATTEMPT_DELAY,
    loop: asyncio.AbstractEventLoop | None = None,
) -> tuple[asyncio.Transport, Endpoint]:
    """Happy Eyeballs returning a transport with ``protocol`` attached."""
    if len(endpoints) == 1:  # the common case: no race, no holder, no hand-over
        endpoint = endpoints[0]
        try:
            return await connect_one(endpoint, protocol, loop), endpoint
        except OSError as exc:
            raise classify(exc, str(endpoint)) from None
    holders: dict[Endpoint, _Attempt] = {}

    def attempt(endpoint: Endpoint) -> Awaitable[asyncio.Transport]:
        holders[endpoint] = _Attempt()
        return connect_one(endpoint, holders[endpoint])

    transport, endpoint = await _race(endpoints, attempt, _abort, delay)
    return _hand_over(transport, holders[endpoint], protocol), endpoint


def _abort(transport: asyncio.Transport) -> None:
    transport.abort()


def _hand_over(
    transport: asyncio.Transport, holder: _Attempt, protocol: asyncio.Protocol
) -> asyncio.Transport:
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if holder.buf:
        protocol.data_received(holder.buf)
    if holder.eof:
        protocol.eof_received()
    transport.resume_reading()
    return transport


class Connecting:
    """One connect through the event loop's ``create_connection``, stepped on the
    futures that coroutine awaits, as a task would step it, but without a task,
    its registration and the coroutine frames of ``dial`` around it: the direct
    dialer's common case, one checked address known without a lookup.
    ``cancel()`` cancels the future being awaited; the coroutine then closes
    what it opened and raises CancelledError, which ``done`` receives."""

    __slots__ = ("_coro", "_done", "_endpoint", "_finished", "_loop", "_waiting")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint: Endpoint,
        protocol: asyncio.Protocol,
        done: DialDone,
    ) -> None:
        self._loop = loop
        self._endpoint = endpoint
        self._done = done
        self._finished = False
        self._waiting: asyncio.Future[Any] | None = None
        self._coro = loop.create_connection(lambda: protocol, endpoint.address, endpoint.port)
        self._step()

    def _step(self, _awaited: object = None) -> None:
        if self._finished:
            return  # cancelled between steps
        self._waiting = None
        try:
            awaited = self._coro.send(None)
        except StopIteration as stop:
            endpoint = self._endpoint
            dialled = Dialled(
                stop.value[0], str(endpoint), keepalive=True, would_deny=endpoint.would_deny
            )
            self._finish(dialled, None)
        except OSError as exc:
            self._finish(None, classify(exc, str(self._endpoint)))
        except BaseException as exc:  # CancelledError once cancelled
            self._finish(None, exc)
        else:
            if awaited is None:  # a bare yield: step again on the next iteration
                self._loop.call_soon(self._step)
            else:
                self._waiting = awaited
                awaited.add_done_callback(self._step)

    def _finish(self, dialled: Dialled | None, exc: BaseException | None) -> None:
        self._finished = True
        self._done(dialled, exc)

    def cancel(self) -> bool:
        if self._finished:
            return False
        if self._waiting is not None:
            self._waiting.cancel()  # its callback steps the coroutine into CancelledError
        else:
            self._coro.close()  # between steps: nothing is open yet
            self._finish(None, asyncio.CancelledError())
        return True

    def done(self) -> bool:
        return self._finished


class DirectDialer(Dialer):
    """Connects from this host to the destination's checked addresses."""

    name = "direct"

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    def dial_now(
        self, host: str, port: int, protocol: asyncio.Protocol, done: DialDone
    ) -> Dialing | None:
        try:
            endpoints = self.resolver.resolve_now(host, port)
        except ResolveError:
            return None  # dial() gives the answer
        if endpoints is None or len(endpoints) != 1 or self.loop is None:
            return None  # a lookup to wait for, or addresses to race
        return Connecting(self.loop, endpoints[0], protocol, done)

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        try:
            endpoints = await self.resolver.resolve(host, port)
        except ResolveError as exc:
            raise DialError(exc.reason, exc.detail, exc.status) from None
        transport, endpoint = await connect_transport(
            endpoints, protocol, CONNECTION_ATTEMPT_DELAY, self.loop
        )
        # TCP keepalive (a dead peer behind a NAT is noticed even on a silent
        # tunnel) is set later, by the server's sweep (Relay._sweep).
        # TCP_NODELAY, which tunnels of TLS records want, is set by the event
        # loop itself on every TCP transport, uvloop and asyncio alike.
        return Dialled(transport, str(endpoint), keepalive=True, would_deny=endpoint.would_deny)
