"""The Happy Eyeballs dialer (relay.egress.direct.happy_eyeballs) on real loopback
sockets under uvloop: a refused first address hands over at once, a hanging
first address hands over after the Connection Attempt Delay, every failure is
named, and no attempt leaves a socket open, even when the dial is cancelled."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import uvloop

from relay.egress import DialError
from relay.egress.direct import CONNECTION_ATTEMPT_DELAY, connect_transport, happy_eyeballs
from relay.resolver import Endpoint
from tests.support.relay import WAIT

V4, V6 = int(socket.AF_INET), int(socket.AF_INET6)
LOOPBACK = {V4: "127.0.0.1", V6: "::1"}
# A loopback connect completes in microseconds; one that has not completed
# after this long is not going to (its SYN was dropped).
HANG_PROBE = 0.3
# A full accept queue with backlog 0 holds one or two connections; this bounds
# the filling loop whatever the kernel does.
MAX_FILL = 16


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def open_sockets() -> set[tuple[str, str]]:
    """This process's socket descriptors as (fd, "socket:[inode]"). Compared as
    sets, so a descriptor closed meanwhile by another thread cannot hide a leak."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used
        if link.startswith("socket:"):
            out.add((fd, link))
    return out


def endpoint(sock: socket.socket) -> Endpoint:
    address, port = sock.getsockname()[:2]
    return Endpoint(sock.family, address, port)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


@pytest.fixture
def listening(stack: ExitStack) -> Callable[[int], Endpoint]:
    """A listening socket on loopback (never accepting: the kernel completes the
    handshake, which is all a dialer sees)."""

    def make(family: int) -> Endpoint:
        srv = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        srv.bind((LOOPBACK[family], 0))
        srv.listen(16)
        return endpoint(srv)

    return make


@pytest.fixture
def refusing(stack: ExitStack) -> Callable[[int], Endpoint]:
    """A bound port nobody listens on: a connect is refused at once (RST)."""

    def make(family: int) -> Endpoint:
        sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        sock.bind((LOOPBACK[family], 0))
        return endpoint(sock)

    return make


@pytest.fixture
def hanging(stack: ExitStack) -> Callable[[int], Endpoint]:
    """A loopback address whose connects hang: a listener with backlog 0 whose
    accept queue is filled with connections nobody accepts, so the kernel drops
    further SYNs. Skips if this kernel answers them anyway."""

    def make(family: int) -> Endpoint:
        srv = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        srv.bind((LOOPBACK[family], 0))
        srv.listen(0)
        target = endpoint(srv)
        for _ in range(MAX_FILL):
            client = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            client.setblocking(False)
            client.connect_ex(target.sockaddr)
            _, writable, _ = select.select([], [client], [], HANG_PROBE)
            if not writable:
                return target  # the queue is full: this SYN went unanswered
        pytest.skip(f"connects to a full accept queue do not hang here ({MAX_FILL} tried)")

    return make


# --- (a) refused first address -------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(V6, V4), (V4, V6), (V4, V4)])
def test_refused_first_hands_over_at_once(
    refusing: Callable[[int], Endpoint],
    listening: Callable[[int], Endpoint],
    first: int,
    second: int,
) -> None:
    bad, good = refusing(first), listening(second)
    before = open_sockets()

    async def dial() -> tuple[Endpoint, float]:
        started = time.monotonic()
        # A long delay: only the refusal itself may start the second attempt.
        async with asyncio.timeout(WAIT):
            sock, winner = await happy_eyeballs([bad, good], delay=WAIT)
        elapsed = time.monotonic() - started
        assert sock.getpeername()[:2] == good.sockaddr
        sock.close()
        return winner, elapsed

    winner, elapsed = run(dial())
    assert winner == good
    assert elapsed < WAIT / 4, f"second attempt waited {elapsed:.3f} s after a refusal"
    assert not open_sockets() - before


def test_first_listening_wins_without_second_attempt(
    listening: Callable[[int], Endpoint], refusing: Callable[[int], Endpoint]
) -> None:
    good, other = listening(V6), refusing(V4)
    before = open_sockets()

    async def dial() -> Endpoint:
        sock, winner = await happy_eyeballs([good, other], delay=WAIT)
        sock.close()
        return winner

    assert run(dial()) == good
    assert not open_sockets() - before


def test_simultaneous_successes_close_the_losers(
    listening: Callable[[int], Endpoint],
) -> None:
    """With no delay every attempt starts at once and several may complete in the
    same round; only the winner may stay open."""
    endpoints = [listening(V4 if i % 2 else V6) for i in range(6)]
    before = open_sockets()

    async def dial() -> int:
        base = open_sockets()
        async with asyncio.timeout(WAIT):
            sock, winner = await happy_eyeballs(endpoints, delay=0)
        assert winner in endpoints
        with sock:
            return len(open_sockets() - base)

    assert run(dial()) == 1, "a losing attempt's socket is still open"
    assert not open_sockets() - before


# --- (b) hanging first address -------------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [(V4, V6), (V6, V4)])
def test_hanging_first_loses_after_attempt_delay(
    hanging: Callable[[int], Endpoint],
    listening: Callable[[int], Endpoint],
    first: int,
    second: int,
) -> None:
    slow, good = hanging(first), listening(second)
    before = open_sockets()

    async def dial() -> tuple[Endpoint, float]:
        started = time.monotonic()
        async with asyncio.timeout(WAIT):
            sock, winner = await happy_eyeballs([slow, good])
        elapsed = time.monotonic() - started
        sock.close()
        return winner, elapsed

    winner, elapsed = run(dial())
    assert winner == good
    assert CONNECTION_ATTEMPT_DELAY <= elapsed < CONNECTION_ATTEMPT_DELAY + 1.0, elapsed
    assert not open_sockets() - before, "the abandoned attempt's socket was left open"


def test_hanging_endpoint_really_hangs(hanging: Callable[[int], Endpoint]) -> None:
    """The premise of the test above: alone, the hanging address never connects."""
    slow = hanging(V4)
    before = open_sockets()

    async def dial() -> None:
        async with asyncio.timeout(HANG_PROBE):
            await happy_eyeballs([slow])

    with pytest.raises(TimeoutError):
        run(dial())
    assert not open_sockets() - before


# --- (c) every address refused -------------------------------------------------------


def test_all_refused_names_every_address(refusing: Callable[[int], Endpoint]) -> None:
    endpoints = [refusing(V6), refusing(V4), refusing(V6), refusing(V4)]
    before = open_sockets()

    async def dial() -> None:
        await happy_eyeballs(endpoints, delay=WAIT)

    started = time.monotonic()
    with pytest.raises(DialError) as info:
        run(dial())
    assert time.monotonic() - started < WAIT / 4
    err = info.value
    assert err.reason == "refused"
    assert err.status == 502
    parts = err.detail.split("; ")
    assert parts == [f"connection refused by {e}" for e in endpoints]
    assert "[::1]:" in err.detail and "127.0.0.1:" in err.detail
    assert not open_sockets() - before


def test_single_refused_address(refusing: Callable[[int], Endpoint]) -> None:
    bad = refusing(V6)

    with pytest.raises(DialError) as info:
        run(happy_eyeballs([bad]))
    assert info.value.reason == "refused"
    assert info.value.detail == f"connection refused by {bad}"


def test_refused_and_hanging_is_a_timeout_not_a_refusal(
    refusing: Callable[[int], Endpoint], hanging: Callable[[int], Endpoint]
) -> None:
    """One refusal must not end the dial while another attempt may still succeed."""
    bad, slow = refusing(V6), hanging(V4)

    async def dial() -> None:
        async with asyncio.timeout(CONNECTION_ATTEMPT_DELAY * 3):
            await happy_eyeballs([bad, slow])

    with pytest.raises(TimeoutError):
        run(dial())


# --- (d) cancellation ----------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_cancelled_dial_leaves_no_socket(hanging: Callable[[int], Endpoint], attempts: int) -> None:
    """Cancelled while ``attempts`` connects are in flight: every socket closed."""
    slow = [hanging(V4 if i % 2 == 0 else V6) for i in range(attempts)]
    delay = 0.05
    before = open_sockets()
    seen: list[int] = []

    async def dial() -> None:
        # Count the sockets open mid-dial, to show the attempts were in flight.
        def count() -> None:
            seen.append(len(open_sockets() - before))

        asyncio.get_running_loop().call_later(delay * attempts + HANG_PROBE / 2, count)
        async with asyncio.timeout(delay * attempts + HANG_PROBE):
            await happy_eyeballs(slow, delay=delay)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        run(dial())
    # Cancellation is prompt: nothing waits for the hanging connects to give up.
    assert time.monotonic() - started < delay * attempts + HANG_PROBE + 1.0
    assert seen and seen[0] >= attempts
    assert not open_sockets() - before


def test_cancel_after_refusals_leaves_no_socket(
    refusing: Callable[[int], Endpoint], hanging: Callable[[int], Endpoint]
) -> None:
    endpoints = [refusing(V4), hanging(V6), refusing(V6), hanging(V4)]
    before = open_sockets()

    async def dial() -> None:
        async with asyncio.timeout(HANG_PROBE * 2):
            await happy_eyeballs(endpoints, delay=0.02)

    with pytest.raises(TimeoutError):
        run(dial())
    assert not open_sockets() - before


# --- connect_transport: the variant the direct dialer uses ---------------------------


class _Recorder(asyncio.Protocol):
    """The protocol handed over to the winner: records what it is given."""

    def __init__(self) -> None:
        self.made: list[asyncio.BaseTransport] = []
        self.data = b""
        self.got: asyncio.Event | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.got is not None:
            self.got.set()


def test_transport_variant_hands_over_to_the_winner(
    stack: ExitStack,
    refusing: Callable[[int], Endpoint],
    hanging: Callable[[int], Endpoint],
) -> None:
    """Refused, hanging, then a server that speaks first: the protocol ends up on
    the third connection exactly once, receives the server's first bytes, and no
    other attempt's socket stays open."""
    srv = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
    good = endpoint(srv)
    endpoints = [refusing(V4), hanging(V4), good]
    before = open_sockets()
    protocol = _Recorder()

    async def dial() -> tuple[str, float]:
        loop = asyncio.get_running_loop()
        protocol.got = asyncio.Event()
        started = time.monotonic()
        accepted = loop.run_in_executor(None, srv.accept)
        transport, winner = await connect_transport(endpoints, protocol, delay=0.05)
        conn, _ = await accepted
        conn.sendall(b"greeting")
        await asyncio.wait_for(protocol.got.wait(), WAIT)
        elapsed = time.monotonic() - started
        transport.close()
        conn.close()
        await asyncio.sleep(0)
        return str(winner), elapsed

    winner, elapsed = run(dial())
    assert winner == str(good)
    assert protocol.data == b"greeting"
    assert len(protocol.made) == 1
    assert elapsed < WAIT
    assert open_sockets() <= before


def test_transport_variant_names_every_failure(refusing: Callable[[int], Endpoint]) -> None:
    endpoints = [refusing(V4), refusing(V6)]
    with pytest.raises(DialError) as info:
        run(connect_transport(endpoints, _Recorder(), delay=0.01))
    assert info.value.reason == "refused"
    for e in endpoints:
        assert str(e) in info.value.detail
