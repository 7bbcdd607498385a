"""uvloop-bare: the least a Python CONNECT relay on uvloop does per tunnel.

A benchmark reference, not a product: bench/run.py runs it next to the relay
to show the floor of the architecture (one Python process, uvloop,
asyncio.Protocol callbacks) on the same machine in the same run. It has no
policy, no allowlist, no name lookup, no log and no metrics; it ignores the
CONNECT target and always dials the one upstream given on the command line.
Bytes go through user space (``data_received`` -> ``transport.write``), not
through splice(2).

Per tunnel: read the request head up to its blank line (within MAX_HEAD),
dial the upstream, answer 200, forward what the client sent behind the head,
then relay each direction until both have sent EOF or one side is gone.

    python bench/bare_relay.py --port P --upstream H:P

prints ``{"port": P, "pid": N}`` once listening (``--port 0``: the bound
port) and runs until stdin closes or SIGTERM, like ``loadgen refrelay``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import cast

import uvloop

# A Kong CONNECT head is < 200 bytes; the same bound as loadgen refrelay.
MAX_HEAD = 8 * 1024
# The same listen backlog as the relay (relay/server.py LISTEN_BACKLOG).
LISTEN_BACKLOG = 1024
LISTEN_HOST = "127.0.0.1"
OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class Pipe(asyncio.Protocol):
    """One socket of a tunnel: what it reads goes to its peer's socket.

    Flow control is symmetric: when this socket's write buffer is full, the
    peer stops being read until it drains, so memory stays bounded.
    """

    __slots__ = ("eof", "peer", "transport")
    transport: asyncio.Transport  # the client's at once, the upstream's once connected
    peer: Pipe  # set by Upstream, which links the two

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        if transport is not None:
            self.transport = transport
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # Half-close: this direction is done, the other one may still run.
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof:
            self.transport.close()
            peer.close()
        elif not peer.is_closing() and peer.can_write_eof():
            # write_eof on a closed uvloop transport is not safe, hence the guard.
            peer.write_eof()
        return True  # keep the socket open: its write side may still be in use

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer.transport
        if not peer.is_closing():
            peer.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        # A socket that has sent EOF is not read again (uvloop would restart it).
        if not self.peer.eof:
            self.peer.transport.resume_reading()


class Upstream(Pipe):
    """The upstream socket; once connected it opens the tunnel."""

    __slots__ = ("rest",)

    def __init__(self, client: Pipe, rest: bytes) -> None:
        super().__init__()
        self.peer = client
        client.peer = self
        self.rest = rest  # what the client sent behind its head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Done here rather than after create_connection returns, so nothing
        # the upstream sends can reach the client before the 200.
        self.transport = upstream = cast(asyncio.Transport, transport)
        client = self.peer.transport
        if client.is_closing():
            upstream.close()
            return
        client.set_protocol(self.peer)
        client.write(OK)
        if self.rest:
            upstream.write(self.rest)
            self.rest = b""
        client.resume_reading()


class Head(asyncio.Protocol):
    """A new client connection until its request head is complete."""

    __slots__ = ("buf", "relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buf = self.buf
        start = max(0, len(buf) - 3)  # the blank line may straddle two reads
        buf += data
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) >= MAX_HEAD:
                transport.close()
            return
        end += 4
        if end > MAX_HEAD or not buf.startswith(b"CONNECT "):
            transport.close()
            return
        transport.pause_reading()  # nothing more is read until the tunnel is open
        self.relay.dial(transport, bytes(buf[end:]))


class Relay:
    """The listener's shared state: the fixed upstream and the dial tasks."""

    __slots__ = ("host", "loop", "port", "tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        self.loop = loop
        self.host = host
        self.port = port
        self.tasks: set[asyncio.Task[None]] = set()

    def dial(self, client: asyncio.Transport, rest: bytes) -> None:
        task = self.loop.create_task(self._dial(client, rest))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _dial(self, client: asyncio.Transport, rest: bytes) -> None:
        try:
            await self.loop.create_connection(
                lambda: Upstream(Pipe(client), rest), self.host, self.port
            )
        except OSError:
            client.close()


class StdinWatch(asyncio.Protocol):
    """Calls ``stop`` when stdin closes; what is written to it is ignored."""

    __slots__ = ("stop",)

    def __init__(self, stop: Callable[[], None]) -> None:
        self.stop = stop

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop()


async def serve(port: int, upstream_host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(loop, upstream_host, upstream_port)
    server = await loop.create_server(
        lambda: Head(relay), LISTEN_HOST, port, backlog=LISTEN_BACKLOG
    )
    stopped: asyncio.Future[None] = loop.create_future()

    def stop() -> None:
        if not stopped.done():
            stopped.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        stdin, _ = await loop.connect_read_pipe(lambda: StdinWatch(stop), sys.stdin)
    except ValueError:
        stdin = None  # a regular file: nothing to watch, SIGTERM stops it
    bound = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": bound, "pid": os.getpid()}), flush=True)
    try:
        await stopped
    finally:
        server.close()
        if stdin is not None:
            stdin.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    p.add_argument("--upstream", required=True, help="H:P every tunnel dials")
    args = p.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--upstream: want HOST:PORT, got {args.upstream!r}")
    args.upstream_host = host.strip("[]")
    args.upstream_port = int(port)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uvloop.run(serve(args.port, args.upstream_host, args.upstream_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
