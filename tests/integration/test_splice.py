"""The zero-copy bulk path (relay/splice.py) end to end.

A tunnel between plain TCP sockets moves to splice once a direction carries
``splice.SWITCH_AFTER`` bytes; every test here pushes more than that first and
checks that the relay really holds pipes (``/proc/PID/fd``), then checks what
the transport path guarantees: every byte arrives in order (SHA-256 over
hundreds of MB), half-close both ways, bounded memory under a stalled peer,
counters current while the tunnel lives, idle timeout, abort and reset with
every descriptor given back, TLS listeners left on the transport path.

The last tests run a Tunnel in this process on uvloop, between real TCP
sockets, for what a subprocess cannot show: the hand-over while a write buffer
still holds bytes, the copying fallback (no pipe to be had, or a kernel that
refuses to splice), and ``close(abort=True)`` reporting exactly once.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import select
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from relay import splice
from relay.tunnel import DRAINING, Pending, Tunnel
from tests.support.relay import RAW_HOST, WAIT, Certs, RelayProcess, relay_config

MiB = 1024 * 1024
BULK = 200 * MiB  # per direction in the big transfer
PAST_SWITCH = 2 * splice.SWITCH_AFTER  # enough to be spliced for sure
CHUNK = 256 * 1024
# RSS the relay may gain while a peer stalls: the pipes are kernel memory, the
# relay itself holds nothing per byte in splice mode.
STALL_RSS_BOUND_KIB = 8 * 1024
# CPU the relay may burn while a spliced tunnel sits idle for the idle timeout:
# a descriptor left registered with epoll after the hand-over would spin.
IDLE_CPU_BOUND_S = 0.25


# --- helpers ------------------------------------------------------------------


@contextmanager
def tcp_peer(handler: Callable[[socket.socket], None]) -> Iterator[tuple[int, None]]:
    """A TCP server on loopback running ``handler`` in a thread per connection."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def run(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            conn.settimeout(WAIT * 3)
            handler(conn)

    def serve() -> None:
        while not stop.is_set():
            if select.select([srv], [], [], 0.05)[0]:
                thread = threading.Thread(target=run, args=(srv.accept()[0],), daemon=True)
                threads.append(thread)
                thread.start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield srv.getsockname()[1], None
    finally:
        stop.set()
        acceptor.join(WAIT)
        srv.close()
        for thread in threads:
            thread.join(WAIT)


def open_tunnel(relay: RelayProcess) -> socket.socket:
    """A CONNECT to RAW_HOST:443 that must succeed; the tunnel's socket."""
    sock = socket.create_connection(relay.proxy, timeout=WAIT)
    target = f"{RAW_HOST}:443"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)  # one at a time: nothing after the head is consumed
        assert byte, head
        head += byte
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(CHUNK, n - len(out)))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def stream(seed: int, n: int) -> Iterator[bytes]:
    """n deterministic pseudo-random bytes in CHUNK pieces (no two chunks alike,
    so a lost, doubled or reordered chunk changes the digest)."""
    rng = random.Random(seed)
    while n > 0:
        size = min(CHUNK, n)
        yield rng.randbytes(size)
        n -= size


def digest_of(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for chunk in stream(seed, n):
        h.update(chunk)
    return h.hexdigest()


def send_stream(sock: socket.socket, seed: int, n: int) -> None:
    for chunk in stream(seed, n):
        sock.sendall(chunk)


def send_then_eof(sock: socket.socket, seed: int, n: int) -> None:
    send_stream(sock, seed, n)
    sock.shutdown(socket.SHUT_WR)


def recv_digest(
    sock: socket.socket, at: int = 0, probe: Callable[[], None] | None = None
) -> tuple[str, int]:
    """SHA-256 and length of what arrives until EOF; ``probe`` runs once when
    ``at`` bytes have arrived (a look at the relay mid-transfer)."""
    h = hashlib.sha256()
    got = 0
    while chunk := sock.recv(CHUNK):
        h.update(chunk)
        got += len(chunk)
        if probe is not None and got >= at:
            probe()
            probe = None
    return h.hexdigest(), got


def fd_kinds(pid: int) -> tuple[int, int]:
    """(all descriptors, pipe descriptors) of a process."""
    total = pipes = 0
    base = Path(f"/proc/{pid}/fd")
    for name in os.listdir(base):
        try:
            target = os.readlink(base / name)
        except FileNotFoundError:
            continue  # closed while we looked
        total += 1
        pipes += target.startswith("pipe:")
    return total, pipes


def pipe_count(pid: int) -> int:
    return fd_kinds(pid)[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(pred: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


@contextmanager
def raw_relay(
    start_relay: Callable[..., RelayProcess],
    handler: Callable[[socket.socket], None],
    **limits: Any,
) -> Iterator[RelayProcess]:
    with tcp_peer(handler) as (port, _):
        cfg = relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}})
        if limits:
            cfg["limits"] = {**cfg["limits"], **limits}
        yield start_relay(cfg)


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- through the relay subprocess ----------------------------------------------


def test_bulk_both_ways_is_spliced_and_intact(start_relay: Callable[..., RelayProcess]) -> None:
    seen: dict[str, tuple[str, int]] = {}

    def peer(conn: socket.socket) -> None:
        sender = threading.Thread(target=send_then_eof, args=(conn, 2, BULK))
        sender.start()
        seen["up"] = recv_digest(conn)
        sender.join(WAIT * 3)

    with raw_relay(start_relay, peer) as relay:
        base_fds, base_pipes = fd_kinds(relay.proc.pid)
        sock = open_tunnel(relay)
        sock.settimeout(WAIT * 3)
        sender = threading.Thread(target=send_then_eof, args=(sock, 1, BULK))
        sender.start()
        mid: list[int] = []
        down = recv_digest(sock, 32 * MiB, lambda: mid.append(pipe_count(relay.proc.pid)))
        sender.join(WAIT * 3)
        sock.close()
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed", timeout=WAIT * 3)
        wait_until(lambda: fd_kinds(relay.proc.pid) == (base_fds, base_pipes), "fds at baseline")
    assert mid[0] - base_pipes >= 2, "no pipe while 200 MB moved each way"
    assert down == (digest_of(2, BULK), BULK)
    assert seen["up"] == (digest_of(1, BULK), BULK)
    assert closed["bytes_up"] == BULK and closed["bytes_down"] == BULK
    assert closed["reason"] in ("client_eof", "upstream_eof")


def test_half_close_client_first_spliced(start_relay: Callable[..., RelayProcess]) -> None:
    """The client's EOF reaches the destination after all its bytes; the
    destination then still answers, and the tunnel closes after that."""
    seen: dict[str, tuple[str, int]] = {}

    def peer(conn: socket.socket) -> None:
        first = recv_exactly(conn, PAST_SWITCH)
        conn.sendall(b"k")
        seen["up"] = recv_digest(conn)  # until the forwarded EOF
        seen["first"] = (hashlib.sha256(first).hexdigest(), len(first))
        send_stream(conn, 4, 3 * MiB)

    with raw_relay(start_relay, peer) as relay:
        base_pipes = pipe_count(relay.proc.pid)
        with open_tunnel(relay) as sock:
            send_stream(sock, 3, PAST_SWITCH)
            assert sock.recv(1) == b"k"
            spliced = pipe_count(relay.proc.pid) - base_pipes
            sock.sendall(b"tail" * 1000)
            sock.shutdown(socket.SHUT_WR)
            down = recv_digest(sock)
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert spliced >= 2
    assert seen["first"] == (digest_of(3, PAST_SWITCH), PAST_SWITCH)
    assert seen["up"] == (hashlib.sha256(b"tail" * 1000).hexdigest(), 4000)
    assert down == (digest_of(4, 3 * MiB), 3 * MiB)
    assert closed["reason"] == "client_eof"
    assert closed["bytes_up"] == PAST_SWITCH + 4000 and closed["bytes_down"] == 1 + 3 * MiB


def test_half_close_upstream_first_spliced(start_relay: Callable[..., RelayProcess]) -> None:
    """The destination's EOF reaches the client after all its bytes; the client
    can still send, and what it sends arrives."""
    seen: dict[str, tuple[str, int]] = {}

    def peer(conn: socket.socket) -> None:
        send_stream(conn, 5, PAST_SWITCH)
        assert conn.recv(1) == b"g"
        conn.shutdown(socket.SHUT_WR)
        seen["up"] = recv_digest(conn)

    with raw_relay(start_relay, peer) as relay:
        base_pipes = pipe_count(relay.proc.pid)
        with open_tunnel(relay) as sock:
            got = recv_exactly(sock, PAST_SWITCH)
            spliced = pipe_count(relay.proc.pid) - base_pipes
            sock.sendall(b"g")
            assert sock.recv(1) == b""  # the destination's EOF, forwarded
            send_stream(sock, 6, 3 * MiB)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert spliced >= 2
    assert hashlib.sha256(got).hexdigest() == digest_of(5, PAST_SWITCH)
    assert seen["up"] == (digest_of(6, 3 * MiB), 3 * MiB)
    assert closed["reason"] == "upstream_eof"
    assert closed["bytes_up"] == 1 + 3 * MiB and closed["bytes_down"] == PAST_SWITCH


def test_stalled_peer_bounds_memory_spliced(start_relay: Callable[..., RelayProcess]) -> None:
    """A destination that stops reading once the tunnel is spliced: the relay
    stops reading the client (the pipe is full) instead of holding more."""
    release = threading.Event()

    def peer(conn: socket.socket) -> None:
        recv_exactly(conn, PAST_SWITCH)
        conn.sendall(b"k")
        release.wait(WAIT * 3)

    with raw_relay(start_relay, peer) as relay:
        base_pipes = pipe_count(relay.proc.pid)
        sock = open_tunnel(relay)
        send_stream(sock, 7, PAST_SWITCH)
        assert sock.recv(1) == b"k"
        spliced = pipe_count(relay.proc.pid) - base_pipes
        rss_before = relay.rss_kib()
        sent, limit = 0, 512 * MiB
        chunk = b"x" * 65536
        sock.setblocking(False)
        while sent < limit:
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                break  # the relay stopped reading: backpressure reached the client
            with suppress(BlockingIOError):
                sent += sock.send(chunk)
        rss_after = relay.rss_kib()
        # Stalled both ways now: the relay must sleep, not poll a full pipe.
        cpu_before = cpu_seconds(relay.proc.pid)
        select.select([sock], [], [], 0.5)
        cpu_stalled = cpu_seconds(relay.proc.pid) - cpu_before
        release.set()
        sock.close()
    assert spliced >= 2
    assert sent < limit, "the relay kept reading from the client"
    assert cpu_stalled < IDLE_CPU_BOUND_S, cpu_stalled
    assert rss_after - rss_before < STALL_RSS_BOUND_KIB, (rss_before, rss_after, sent)


def test_counters_current_while_spliced(start_relay: Callable[..., RelayProcess]) -> None:
    up, down = 8 * MiB, 5 * MiB
    done = threading.Event()

    def peer(conn: socket.socket) -> None:
        recv_exactly(conn, up)
        conn.sendall(b"k")
        send_stream(conn, 9, down)
        done.wait(WAIT * 3)

    host = f'host="{RAW_HOST}"'
    with raw_relay(start_relay, peer) as relay:
        base_pipes = pipe_count(relay.proc.pid)
        sock = open_tunnel(relay)
        send_stream(sock, 8, up)
        assert sock.recv(1) == b"k"
        spliced = pipe_count(relay.proc.pid) - base_pipes
        mid = relay.metrics()
        assert recv_exactly(sock, down) == b"".join(stream(9, down))
        after = relay.metrics()
        status, body = relay.get("/tunnels")
        done.set()
        sock.close()
    assert spliced >= 2
    assert mid[f'konnect_relay_tunnel_bytes_total{{direction="upstream",{host}}}'] == up
    assert after[f'konnect_relay_tunnel_bytes_total{{direction="downstream",{host}}}'] == 1 + down
    assert after[f"konnect_relay_tunnels_active{{{host}}}"] == 1
    assert status == 200
    (entry,) = yaml.safe_load(body)
    assert entry["bytes_up"] == up and entry["bytes_down"] == 1 + down


def test_idle_timeout_after_bulk(start_relay: Callable[..., RelayProcess]) -> None:
    """A spliced tunnel that goes quiet is closed by the idle timeout, the relay
    stays idle meanwhile (no descriptor left spinning in epoll after the
    hand-over), and every descriptor is given back."""

    def peer(conn: socket.socket) -> None:
        recv_exactly(conn, PAST_SWITCH)
        conn.sendall(b"k")
        recv_digest(conn)

    with raw_relay(start_relay, peer, idle_timeout=1.0) as relay:
        pid = relay.proc.pid
        base = fd_kinds(pid)
        with open_tunnel(relay) as sock:
            send_stream(sock, 10, PAST_SWITCH)
            assert sock.recv(1) == b"k"
            spliced = pipe_count(pid) - base[1]
            cpu_before = cpu_seconds(pid)
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            cpu_idle = cpu_seconds(pid) - cpu_before
            assert sock.recv(1) == b""
        wait_until(lambda: fd_kinds(pid) == base, "fds at baseline")
    assert spliced >= 2
    assert closed["reason"] == "idle_timeout"
    assert 1.0 <= closed["duration_s"] < 4.0
    assert cpu_idle < IDLE_CPU_BOUND_S, cpu_idle


def endless(conn: socket.socket) -> None:
    """A destination that sends until the connection breaks."""
    with suppress(OSError):
        for chunk in stream(11, 1 << 40):
            conn.sendall(chunk)


def test_policy_revoked_mid_transfer_aborts_and_frees_fds(
    start_relay: Callable[..., RelayProcess],
) -> None:
    """close(abort=True) on a spliced tunnel (here from a reload that revokes
    its host) closes both sockets at once and gives every descriptor back."""
    with tcp_peer(endless) as (port, _):
        cfg = relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}})
        relay = start_relay(cfg)
        pid = relay.proc.pid
        base = fd_kinds(pid)
        sock = open_tunnel(relay)
        recv_exactly(sock, 8 * MiB)
        spliced = pipe_count(pid) - base[1]
        relay.config_path.write_text(yaml.safe_dump({**cfg, "allow": []}))
        os.kill(pid, signal.SIGHUP)
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        with suppress(ConnectionResetError):
            recv_digest(sock)  # the rest, up to the relay's FIN (or reset)
        sock.close()
        wait_until(lambda: fd_kinds(pid) == base, "fds at baseline")
    assert spliced >= 2
    assert closed["reason"] == "policy_revoked"


def send_then_reset(conn: socket.socket) -> None:
    """A destination that sends 8 MiB, and resets the connection once the
    client says so (after it has looked at the relay mid-transfer)."""
    send_stream(conn, 13, 8 * MiB)
    assert conn.recv(1) == b"r"
    reset(conn)


@pytest.mark.parametrize("who", ["client", "upstream"])
def test_reset_mid_transfer(start_relay: Callable[..., RelayProcess], who: str) -> None:
    """A reset on either side of a spliced tunnel closes it with the reason
    naming that side (client_reset, upstream_reset; as on the transport path),
    and every descriptor is given back."""
    with raw_relay(start_relay, endless if who == "client" else send_then_reset) as relay:
        pid = relay.proc.pid
        base = fd_kinds(pid)
        sock = open_tunnel(relay)
        recv_exactly(sock, 4 * MiB)
        spliced = pipe_count(pid) - base[1]
        if who == "client":
            reset(sock)
        else:
            sock.sendall(b"r")
            with suppress(ConnectionResetError):
                recv_digest(sock)
            sock.close()
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        wait_until(lambda: fd_kinds(pid) == base, "fds at baseline")
        samples = relay.metrics()
    assert spliced >= 2
    assert closed["reason"] == f"{who}_reset"
    assert samples[f'konnect_relay_tunnels_active{{host="{RAW_HOST}"}}'] == 0


def test_tls_listener_stays_on_transports(
    start_relay: Callable[..., RelayProcess], certs: Certs, tmp_path: Path
) -> None:
    """Bytes inside the relay's own TLS cannot be spliced: the tunnel keeps its
    transports (no pipe) and carries bulk data intact."""
    cert = certs.ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "listener.pem")
    cert.private_key_pem.write_to_path(tmp_path / "listener.key")
    listen = {
        "address": "127.0.0.1:0",
        "tls": {"cert": str(tmp_path / "listener.pem"), "key": str(tmp_path / "listener.key")},
    }

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(CHUNK):
            conn.sendall(data)

    n = 4 * MiB
    with tcp_peer(echo) as (port, _):
        relay = start_relay(
            relay_config(listen=[listen], resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}})
        )
        base_pipes = pipe_count(relay.proc.pid)
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        raw = socket.create_connection(relay.proxy, timeout=WAIT)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            target = f"{RAW_HOST}:443"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 200 ")
            # One thread, in lock-step: an SSL object must not be read and
            # written from two threads at once.
            mid: list[int] = []
            h = hashlib.sha256()
            for i, chunk in enumerate(stream(12, n)):
                sock.sendall(chunk)
                echoed = recv_exactly(sock, len(chunk))
                assert len(echoed) == len(chunk)
                h.update(echoed)
                if i == 12:
                    mid.append(pipe_count(relay.proc.pid))
    assert h.hexdigest() == digest_of(12, n)
    assert mid == [base_pipes]


# --- in process: a Tunnel on uvloop between real TCP sockets -------------------


class Local:
    """A Tunnel on a uvloop loop in a thread, between two TCP connections whose
    far ends (``client`` and ``dest``) the test drives with blocking sockets."""

    def __init__(self, dest_rcvbuf: int = 0, relay_sndbuf: int = 0) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.closed: list[Tunnel] = []
        lc = socket.create_server(("127.0.0.1", 0))
        ld = socket.create_server(("127.0.0.1", 0))
        if dest_rcvbuf:
            ld.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, dest_rcvbuf)
        with lc, ld:
            self.tunnel = self.call(self._start(lc.getsockname(), ld.getsockname(), relay_sndbuf))
            self.client = lc.accept()[0]
            self.dest = ld.accept()[0]
        for sock in (self.client, self.dest):
            sock.settimeout(WAIT)

    async def _start(self, caddr: Any, daddr: Any, sndbuf: int) -> Tunnel:
        loop = asyncio.get_running_loop()
        client, _ = await loop.create_connection(asyncio.Protocol, *caddr)
        client.pause_reading()  # as the server does once the request head is read
        pending = Pending()
        upstream, _ = await loop.create_connection(lambda: pending, *daddr)
        if sndbuf:
            upstream.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf
            )
        tunnel = Tunnel("test", RAW_HOST, 443, "direct", self.closed.append)
        tunnel.start(client, upstream, b"", pending)
        return tunnel

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def wrapper() -> Any:
            return fn()

        return self.call(wrapper())

    def close(self) -> None:
        for sock in (self.client, self.dest):
            sock.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def local() -> Iterator[Callable[..., Local]]:
    made: list[Local] = []

    def make(**kwargs: int) -> Local:
        made.append(Local(**kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()


def both_ways(t: Local, up: int, down: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """``up`` bytes client -> dest and ``down`` bytes dest -> client at once,
    each followed by a half-close; the digests each far end received."""
    seen: dict[str, tuple[str, int]] = {}

    def dest() -> None:
        sender = threading.Thread(target=send_then_eof, args=(t.dest, 21, down))
        sender.start()
        seen["up"] = recv_digest(t.dest)
        sender.join(WAIT)

    peer = threading.Thread(target=dest)
    peer.start()
    send_stream(t.client, 20, up)
    t.client.shutdown(socket.SHUT_WR)
    got = recv_digest(t.client)
    peer.join(WAIT)
    return seen["up"], got


def test_copy_fallback_without_pipes(
    local: Callable[..., Local], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pipe to be had (the pipe budget is spent): the switched tunnel copies
    through a bounded buffer, with the same guarantees."""
    monkeypatch.setattr(splice, "MAX_PIPE_FDS", 0)
    t = local()
    before = fd_kinds(os.getpid())[1]
    up, down = both_ways(t, 20 * MiB, 20 * MiB)
    assert up == (digest_of(20, 20 * MiB), 20 * MiB)
    assert down == (digest_of(21, 20 * MiB), 20 * MiB)
    wait_until(lambda: len(t.closed) == 1, "on_closed")
    tunnel = t.closed[0]
    assert tunnel.link is not None and tunnel.link.closed
    assert fd_kinds(os.getpid())[1] == before
    assert tunnel.bytes_up == tunnel.bytes_down == 20 * MiB
    assert tunnel.close_reason in ("client_eof", "upstream_eof")


def test_kernel_refusing_splice_falls_back(
    local: Callable[..., Local], monkeypatch: pytest.MonkeyPatch
) -> None:
    """splice() failing with EINVAL (a kernel or sandbox without it for
    sockets): the pump copies instead, and later tunnels stay on transports."""

    def refuse(*args: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(splice, "_splice", refuse)
    monkeypatch.setattr(splice._state, "works", True)  # restored after the test
    t = local()
    up, down = both_ways(t, 8 * MiB, 8 * MiB)
    assert up == (digest_of(20, 8 * MiB), 8 * MiB)
    assert down == (digest_of(21, 8 * MiB), 8 * MiB)
    wait_until(lambda: len(t.closed) == 1, "on_closed")
    assert t.closed[0].link is not None
    assert not splice.available()
    later = local()
    assert later.tunnel.switch_at > 1 << 40  # never switches
    up, _ = both_ways(later, 4 * MiB, 0)
    assert up == (digest_of(20, 4 * MiB), 4 * MiB)
    assert later.tunnel.link is None


def test_hand_over_waits_for_buffered_bytes(
    local: Callable[..., Local], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch comes while the upstream transport still buffers bytes for a
    destination that is not reading: the tunnel pauses, waits for the buffer
    to drain, then hands over; nothing is lost or reordered."""
    monkeypatch.setattr(splice, "SWITCH_AFTER", 64 * 1024)
    t = local(dest_rcvbuf=4096, relay_sndbuf=4096)
    n = 4 * MiB
    sender = threading.Thread(target=send_stream, args=(t.client, 22, n))
    sender.start()
    wait_until(lambda: t.tunnel.switch_at == DRAINING, "draining")
    assert t.tunnel.link is None
    got = recv_digest_n(t.dest, n)
    sender.join(WAIT)
    assert got == digest_of(22, n)
    assert t.tunnel.link is not None
    assert t.tunnel.bytes_up == n


def recv_digest_n(sock: socket.socket, n: int) -> str:
    h = hashlib.sha256()
    got = 0
    while got < n:
        chunk = sock.recv(min(CHUNK, n - got))
        assert chunk, got
        h.update(chunk)
        got += len(chunk)
    return h.hexdigest()


def test_abort_while_spliced_reports_once(local: Callable[..., Local]) -> None:
    t = local()
    before = fd_kinds(os.getpid())
    send_stream(t.client, 23, PAST_SWITCH)
    assert recv_digest_n(t.dest, PAST_SWITCH) == digest_of(23, PAST_SWITCH)
    assert t.tunnel.link is not None
    t.run(lambda: t.tunnel.close("drain", abort=True))
    t.run(lambda: t.tunnel.close("idle_timeout", abort=True))
    t.run(lambda: None)  # one more loop pass: on_closed was scheduled by then
    assert t.client.recv(1) == b"" and t.dest.recv(1) == b""
    assert t.closed == [t.tunnel]
    assert t.tunnel.close_reason == "drain"
    # The tunnel's two sockets and its pipe are gone; only the test's own
    # far ends remain, as before.
    assert fd_kinds(os.getpid())[0] <= before[0] - 2


def test_quiet_direction_gives_its_pipe_back(
    local: Callable[..., Local], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spliced tunnel that went quiet holds no pipe after the sweep; the next
    bytes open a new one and arrive intact."""
    monkeypatch.setattr(splice, "PIPE_IDLE", 0.0)
    t = local()
    before = fd_kinds(os.getpid())[1]
    send_stream(t.client, 24, PAST_SWITCH)
    assert recv_digest_n(t.dest, PAST_SWITCH) == digest_of(24, PAST_SWITCH)
    assert t.tunnel.link is not None
    assert fd_kinds(os.getpid())[1] == before + 2  # the upstream direction's pipe
    t.run(lambda: t.tunnel.idle_for(time.monotonic()))  # notes the counters
    t.run(lambda: t.tunnel.idle_for(time.monotonic()))  # unchanged: release
    assert fd_kinds(os.getpid())[1] == before
    assert splice.pipe_fds() == 0
    send_stream(t.client, 25, PAST_SWITCH)
    assert recv_digest_n(t.dest, PAST_SWITCH) == digest_of(25, PAST_SWITCH)
    assert fd_kinds(os.getpid())[1] == before + 2
    assert t.tunnel.bytes_up == 2 * PAST_SWITCH
