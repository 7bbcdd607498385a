"""The relay in-process: ``ClientConnection`` and the server driven through a
fake transport and a fake dialer (as uvicorn's protocol tests and httpcore's
mock backend do), so the protocol's phases, answers, drain and the tunnel book
are tested without a subprocess or a socket."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from relay import config
from relay import server as server_module
from relay.connection import ClientConnection, Phase
from relay.egress import Dialer, Dialled
from relay.listeners import Listener
from relay.log import EventLog
from relay.server import Relay
from relay.tunnel import Tunnel

ALLOWED = "raw.example.test"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class FakeTransport(asyncio.Transport):
    """Records what is written; closes when told; delivers nothing by itself."""

    def __init__(self, peer: tuple[str, int] = ("10.9.8.7", 40001)) -> None:
        super().__init__()
        self.peer = peer
        self.written = bytearray()
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None
        self.lost_on_close = True  # call connection_lost when closed

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self.aborted = True
        self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lost_on_close and self.protocol is not None:
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class FakeDialer(Dialer):
    """Connects to a FakeTransport at once, or never (``hang``)."""

    name = "direct"

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.upstreams: list[FakeTransport] = []

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        if self.hang:
            await asyncio.Event().wait()
        upstream = FakeTransport(("192.0.2.10", port))
        upstream.set_protocol(protocol)
        protocol.connection_made(upstream)
        self.upstreams.append(upstream)
        return Dialled(upstream, f"192.0.2.10:{port}")


def make_relay(dialer: FakeDialer, **overrides: Any) -> tuple[Relay, io.StringIO]:
    data: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": None},
        "allow": [ALLOWED],
        "resolver": {"allow_private": True},
        **overrides,
    }
    out = io.StringIO()
    relay = Relay(config.build(data), EventLog(out))
    relay.dialers = {"direct": dialer}
    return relay, out


def connect(relay: Relay, head: bytes) -> tuple[ClientConnection, FakeTransport]:
    spec = relay.settings.specs[0]
    conn = ClientConnection(relay, Listener(spec))
    client = FakeTransport()
    client.set_protocol(conn)
    conn.connection_made(client)
    if head:
        conn.data_received(head)
    return conn, client


def events(relay: Relay, out: io.StringIO) -> list[dict[str, Any]]:
    relay.log.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def run(test: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 10))


async def settle() -> None:
    """Let the tasks and callbacks the last step scheduled run."""
    for _ in range(5):
        await asyncio.sleep(0)


def head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def test_an_allowed_connect_is_dialled_answered_and_pumped() -> None:
    async def main() -> None:
        dialer = FakeDialer()
        relay, out = make_relay(dialer)
        conn, client = connect(relay, head(f"{ALLOWED}:443") + b"early")
        assert conn.phase is Phase.DIALING
        await settle()
        assert bytes(client.written) == ESTABLISHED
        assert conn.phase is Phase.CLOSED  # handed to the tunnel
        [upstream] = dialer.upstreams
        assert bytes(upstream.written) == b"early"
        [tunnel] = relay.book.tunnels.values()
        client.get_protocol().data_received(b"up")  # type: ignore[attr-defined]
        upstream.get_protocol().data_received(b"down")  # type: ignore[attr-defined]
        assert bytes(upstream.written) == b"earlyup"
        assert bytes(client.written) == ESTABLISHED + b"down"
        assert (tunnel.bytes_up, tunnel.bytes_down) == (7, 4)
        request = next(e for e in events(relay, out) if e["event"] == "request")
        assert (request["status"], request["reason"], request["identity"]) == (
            200,
            "allow_rule",
            "10.9.8.7",
        )

    run(main)


def test_a_refused_target_gets_its_answer_and_a_lingering_close() -> None:
    async def main() -> None:
        relay, out = make_relay(FakeDialer())
        conn, client = connect(relay, head("evil.example.com:443"))
        assert client.written.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert client.eof_written and not client.closed
        assert conn.phase is Phase.LINGERING
        conn.data_received(b"ignored")  # the rest of what it sends is dropped
        assert conn.eof_received() is False  # and its EOF ends the connection
        [request] = [e for e in events(relay, out) if e["event"] == "request"]
        assert request["reason"] == "not_allowlisted"
        assert relay.metrics.requests_denied.labels("not_allowlisted")._value.get() == 1

    run(main)


def test_a_head_that_never_ends_gets_408() -> None:
    async def main() -> None:
        relay, _out = make_relay(FakeDialer(), limits={"head_timeout": 0.05})
        conn, client = connect(relay, b"CONNECT raw.exa")
        assert conn.phase is Phase.HEAD and conn in relay.pending
        assert conn.deadline is not None
        await asyncio.sleep(0.1)  # the head deadline itself is what is tested
        assert client.written.startswith(b"HTTP/1.1 408 ")
        assert conn not in relay.pending

    run(main)


def test_a_dial_past_the_connect_timeout_gets_504_and_leaves_nothing() -> None:
    async def main() -> None:
        relay, _out = make_relay(FakeDialer(hang=True), limits={"connect_timeout": 0.05})
        conn, client = connect(relay, head(f"{ALLOWED}:443"))
        assert conn.phase is Phase.DIALING
        await asyncio.sleep(0.1)  # the connect deadline itself is what is tested
        await settle()
        assert client.written.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
        assert relay.connector.dialing == 0 and not relay.book.per_client
        assert not relay.tasks

    run(main)


def test_a_client_that_leaves_while_dialling_cancels_the_dial() -> None:
    async def main() -> None:
        relay, out = make_relay(FakeDialer(hang=True))
        conn, _client = connect(relay, head(f"{ALLOWED}:443"))
        await settle()
        conn.connection_lost(ConnectionResetError())
        await settle()
        assert relay.connector.dialing == 0 and not relay.tasks
        request = [e for e in events(relay, out) if e["event"] == "request"]
        assert [r["reason"] for r in request] == ["client_gone"]

    run(main)


def test_eof_while_dialling_is_forwarded_once_the_tunnel_is_up() -> None:
    async def main() -> None:
        gate = asyncio.Event()

        class Slow(FakeDialer):
            async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
                await gate.wait()
                return await super().dial(host, port, protocol)

        dialer = Slow()
        relay, _ = make_relay(dialer)
        conn, _client = connect(relay, head(f"{ALLOWED}:443"))
        assert conn.eof_received() is True  # a half-close, kept for the tunnel
        gate.set()
        await settle()
        assert dialer.upstreams[0].eof_written

    run(main)


def test_drain_has_one_deadline_and_always_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dial that hangs and a tunnel whose transports never report their close:
    drain gives both one drain_timeout together, aborts, waits its linger and
    stops even then (it used to wait the full timeout twice and, when the linger
    ran out, never stop)."""
    monkeypatch.setattr(server_module, "CLOSE_LINGER", 0.05)

    async def main() -> None:
        dialer = FakeDialer()
        relay, out = make_relay(dialer, limits={"drain_timeout": 0.2})
        connect(relay, head(f"{ALLOWED}:443"))
        await settle()
        for upstream in dialer.upstreams:
            upstream.lost_on_close = False
        [tunnel] = relay.book.tunnels.values()
        tunnel.client_side.transport.lost_on_close = False  # type: ignore[union-attr]
        dialer.hang = True
        connect(relay, head(f"{ALLOWED}:443"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await relay.drain()
        took = loop.time() - started
        assert relay.stopped.is_set()
        assert took < 0.2 * 2  # one deadline for dials and tunnels, not one each
        names = [e["event"] for e in events(relay, out)]
        assert "drain_incomplete" in names and names[-1] == "stopped"

    run(main)


def test_the_tunnels_view_changes_nothing() -> None:
    async def main() -> None:
        relay, _ = make_relay(FakeDialer())
        tunnel = Tunnel("c", "h.example", 443, "direct", relay.book.closed, "l")
        relay.book.opened(tunnel)
        tunnel.client_side.nbytes = 10
        before = (tunnel.seen_bytes, tunnel.last_activity)
        view = relay.book.snapshot()
        assert view[0]["bytes_up"] == 10
        assert (tunnel.seen_bytes, tunnel.last_activity) == before

    run(main)
