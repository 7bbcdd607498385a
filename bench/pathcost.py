"""The relay's own CPU per tunnel on its setup path, without sockets.

The benchmark (run.py) measures what a client sees through real sockets; on a
shared 2-core VM its per-tunnel CPU figure moves by 10 % from one run to the
next, more than most single changes to the setup path are worth. This tool
measures only the relay's Python work per tunnel, with the system calls taken
out, so a change can be weighed in seconds:

- the relay of the benchmark's config (default config, the Konnect allowlist,
  policy, TLS/SNI check, both log lines, metrics, limits), in-process on uvloop;
- every tunnel goes through the real objects: ClientConnection, the head
  machine, admission, the connector, the resolver, the direct dialer's
  connect path, the tunnel, the ClientHello check and the tunnel book;
- only the transports are fakes (no system call): the event loop's
  ``create_connection`` is replaced by a fake that hands the protocol a fake
  transport on the next loop iteration, as a loopback connect completes;
- the same traffic as the benchmark's setup figure, in rounds of 64 tunnels:
  CONNECT, 200, a TLS ClientHello naming the host plus a 64-byte request, a
  64-byte reply, EOF from both sides, close.

Prints µs of CPU per tunnel (best of --runs; process time, so other processes
on the machine count less than in wall time), Python calls per tunnel
(``sys.setprofile`` over one round) and bytecodes per tunnel (``sys.settrace``
opcode events over one round; ``--by-module`` says where they go). The count
does not move with the machine's load, so it weighs a change exactly (give or
take the log's once-a-second date formatting, when a second turns over inside
the round). The real figure through sockets is the benchmark's; this one says
where the relay's own part of it goes.

    .venv/bin/python bench/pathcost.py [--tunnels 20000] [--runs 5] [--json] [--by-module]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from relay import config
from relay.connection import ClientConnection
from relay.listeners import Listener
from relay.log import EventLog
from relay.server import Relay

HOST = "bench.eu.cp0.konghq.com"
RELAY_DIR = str(Path(__file__).resolve().parent.parent / "relay") + "/"
ROUND = 64  # tunnels in flight at once, as the benchmark's c=64
PAYLOAD = b"x" * 64


class FakeTransport(asyncio.Transport):
    """A transport with no socket: writes are counted, close ends it soon."""

    __slots__ = ("closed", "loop", "peer", "protocol", "reading", "written")

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int]) -> None:
        self.loop = loop
        self.peer = peer
        self.written = 0
        self.closed = False
        self.reading = True
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def write_eof(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

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
        return self.protocol  # type: ignore[no-any-return]

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


# uvloop's TCP transport class name: the splice check (sockets.plain_tcp) looks
# at it, and the real path takes that branch.
FakeTransport.__name__ = "TCPTransport"


class FakeConnectLoop(uvloop.Loop):  # type: ignore[misc,name-defined]
    """uvloop, with a connect that opens a FakeTransport instead of a socket."""

    async def create_connection(  # type: ignore[override]
        self, protocol_factory: Any, host: str, port: int, **kwargs: Any
    ) -> tuple[FakeTransport, asyncio.Protocol]:
        connected = self.create_future()
        self.call_soon(connected.set_result, None)
        await connected
        protocol = protocol_factory()
        upstream = FakeTransport(self, (host, port))
        upstream.set_protocol(protocol)
        protocol.connection_made(upstream)
        return upstream, protocol


def client_hello(host: str) -> bytes:
    """A real TLS ClientHello naming ``host``, as a client's first flight."""
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def make_relay() -> Relay:
    data: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": None},
        "resolver": {"static": {f"{HOST}:443": "127.0.0.1:9"}, "allow_private": True},
    }
    return Relay(config.build(data), EventLog(io.StringIO()))


async def one_round(relay: Relay, listener: Listener, head: bytes, first: bytes) -> None:
    loop = relay.loop
    clients = []
    for i in range(ROUND):
        conn = ClientConnection(relay, listener)
        client = FakeTransport(loop, ("127.0.0.1", 40000 + i))
        client.set_protocol(conn)
        conn.connection_made(client)
        conn.data_received(head)
        clients.append(client)
    for _ in range(3):  # the dials: connected on the next iteration, then the 200
        await asyncio.sleep(0)
    for client in clients:
        client.protocol.data_received(first)  # the ClientHello check, then the tunnel
    for tunnel in list(relay.book.tunnels.values()):
        upstream = tunnel.upstream_side
        upstream.data_received(PAYLOAD)
        tunnel.client_side.eof_received()
        upstream.eof_received()
    await asyncio.sleep(0)  # connection_lost of both sides
    await asyncio.sleep(0)


def _module(filename: str) -> str | None:
    """Who a frame's bytecodes count for: a relay module by its path in the
    package, ``(generated)`` for code without a file (dataclass ``__init__``),
    ``(stdlib)`` for the rest; None for this harness, whose fakes stand in for
    uvloop's transports (C code, no bytecodes)."""
    if filename == __file__:
        return None
    if filename.startswith(RELAY_DIR):
        return "relay/" + filename[len(RELAY_DIR) :]
    return "(generated)" if filename.startswith("<") else "(stdlib)"


async def count_bytecodes(
    relay: Relay, listener: Listener, head: bytes, first: bytes
) -> collections.Counter[str]:
    """Bytecodes CPython executes for one round, by module (sys.settrace with
    opcode events). Unlike time, the count does not move with the machine's
    load: the same code gives the same count, so a change to the setup path
    can be weighed exactly."""
    counts: collections.Counter[str] = collections.Counter()
    modules: dict[str, str | None] = {}

    def trace(frame: Any, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        module = modules.get(filename, "")
        if module == "":
            module = modules[filename] = _module(filename)
        if module is None:
            return None
        if event == "call":
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
        elif event == "opcode":
            counts[module] += 1
        return trace

    sys.settrace(trace)
    try:
        await one_round(relay, listener, head, first)
    finally:
        sys.settrace(None)
    return counts


async def measure(tunnels: int, runs: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    relay = make_relay()
    relay.loop = loop
    for dialer in relay.dialers.values():
        await dialer.start()
    listener = Listener(relay.settings.specs[0])
    head = f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode()
    first = client_hello(HOST) + PAYLOAD
    rounds = max(1, tunnels // ROUND)
    for _ in range(20):  # warm-up: caches, metric series
        await one_round(relay, listener, head, first)
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        for _ in range(rounds):
            await one_round(relay, listener, head, first)
        best = min(best, (time.process_time() - t0) / (rounds * ROUND))
    if relay.book.tunnels or relay.pending:
        raise SystemExit(f"leak: {len(relay.book.tunnels)} tunnels, {len(relay.pending)} pending")
    calls = 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    await one_round(relay, listener, head, first)
    sys.setprofile(None)
    by_module = await count_bytecodes(relay, listener, head, first)
    relay.log.flush()
    lines = relay.log.stream.getvalue().count("\n")  # type: ignore[attr-defined]
    return {
        "us_per_tunnel": round(best * 1e6, 2),
        "calls_per_tunnel": round(calls / ROUND, 1),
        "bytecodes_per_tunnel": round(sum(by_module.values()) / ROUND, 1),
        "bytecodes_by_module": {m: round(n / ROUND, 1) for m, n in by_module.most_common()},
        "tunnels_per_run": rounds * ROUND,
        "runs": runs,
        "log_lines": lines,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tunnels", type=int, default=20000, help="tunnels per run")
    p.add_argument("--runs", type=int, default=5, help="runs; the best is reported")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument("--by-module", action="store_true", help="bytecodes per tunnel by module")
    args = p.parse_args(argv)
    with asyncio.Runner(loop_factory=FakeConnectLoop) as runner:
        result = runner.run(measure(args.tunnels, args.runs))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['us_per_tunnel']:.1f} µs of relay CPU per tunnel (best of {args.runs} runs"
            f" of {result['tunnels_per_run']}), {result['calls_per_tunnel']:.0f} Python calls"
            f" per tunnel, {result['bytecodes_per_tunnel']:.0f} bytecodes per tunnel,"
            " no system calls"
        )
        if args.by_module:
            for module, n in result["bytecodes_by_module"].items():
                print(f"{n:8.1f}  {module}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
