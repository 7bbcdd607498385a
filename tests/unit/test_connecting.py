"""relay.egress.direct.Connecting: a connect driven by callbacks, no task.

Real loopback sockets on uvloop: a listener that accepts, a port nothing
listens on, and a listener whose accept queue is full (a connect that stays
in progress), so success, refusal and cancellation are the kernel's own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from relay.egress import DialError, Dialled
from relay.egress.direct import Connecting
from relay.resolver import Endpoint
from relay.tunnel import Pending

pytestmark = pytest.mark.timeout(20)


def run(test: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 10))


class Outcome:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.calls: list[tuple[Dialled | None, BaseException | None]] = []
        self.event = asyncio.Event()

    def __call__(self, dialled: Dialled | None, exc: BaseException | None) -> None:
        self.calls.append((dialled, exc))
        self.event.set()

    async def wait(self) -> tuple[Dialled | None, BaseException | None]:
        await asyncio.wait_for(self.event.wait(), 5)
        assert len(self.calls) == 1
        return self.calls[0]


def endpoint(port: int) -> Endpoint:
    return Endpoint(socket.AF_INET, "127.0.0.1", port)


def test_a_connect_hands_over_a_transport_with_the_protocol_attached() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Queue[Any] = asyncio.Queue()
        server = await asyncio.start_server(
            lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        pending, done = Pending(), Outcome(loop)
        attempt = Connecting(loop, endpoint(port), pending, done)
        dialled, exc = await done.wait()
        assert exc is None and isinstance(dialled, Dialled) and attempt.done()
        assert dialled.peer == f"127.0.0.1:{port}" and dialled.keepalive
        assert pending.transport is dialled.transport
        _reader, writer = await asyncio.wait_for(accepted.get(), 5)
        writer.write(b"hello")  # the protocol attached is the one given
        await writer.drain()
        for _ in range(100):
            if pending.buf:
                break
            await asyncio.sleep(0.01)
        assert pending.buf == b"hello"
        assert attempt.cancel() is False  # finished: nothing to cancel
        dialled.transport.close()
        writer.close()
        server.close()

    run(main)


def test_a_refused_connect_is_a_dial_error_naming_the_address() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: refused
            done = Outcome(loop)
            Connecting(loop, endpoint(port), Pending(), done)
            dialled, exc = await done.wait()
        assert dialled is None and isinstance(exc, DialError)
        assert exc.reason == "refused" and f"127.0.0.1:{port}" in exc.detail

    run(main)


def test_cancel_while_connecting_reports_cancelled_once_and_leaves_no_socket() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        # A listener that never accepts, its backlog filled: further connects
        # stay in SYN_SENT, in progress until cancelled.
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        fillers = []
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        pending, done = Pending(), Outcome(loop)
        attempt = Connecting(loop, endpoint(port), pending, done)
        await asyncio.sleep(0.05)
        if attempt.done():  # the kernel accepted it after all: nothing to test here
            pytest.skip("the kernel completed the connect despite the full backlog")
        assert attempt.cancel() is True
        dialled, exc = await done.wait()
        assert dialled is None and isinstance(exc, asyncio.CancelledError)
        assert attempt.done() and attempt.cancel() is False
        await asyncio.sleep(0.05)
        assert len(done.calls) == 1  # reported once
        assert pending.transport is None  # never connected, nothing left open
        for f in fillers:
            f.close()
        lsock.close()

    run(main)
