"""End-to-end tunnels through the relay: real sockets, real mTLS, real clients."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from tests.conftest import (
    CP_HOST,
    RAW_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    RelayProcess,
    relay_config,
    require_tool,
)


def connect_via(
    relay: RelayProcess, target: str, version: str = "HTTP/1.1", extra: bytes = b""
) -> tuple[socket.socket, bytes]:
    """Send a CONNECT head (plus ``extra`` in the same packet); return the socket
    and everything received up to the end of the response head."""
    sock = socket.create_connection(relay.proxy, timeout=WAIT)
    sock.sendall(f"CONNECT {target} {version}\r\nHost: {target}\r\n\r\n".encode() + extra)
    return sock, read_head(sock)


def open_tunnel(relay: RelayProcess, target: str = f"{RAW_HOST}:443") -> socket.socket:
    """A CONNECT that must succeed; returns the tunnel's socket."""
    sock, head = connect_via(relay, target)
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
    return sock


def read_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


class AcceptCount(list[int]):
    """``[n]``: connections a tcp_peer accepted; ``wait_for`` blocks until n is reached."""

    def __init__(self) -> None:
        super().__init__([0])
        self.cond = threading.Condition()

    def bump(self) -> None:
        with self.cond:
            self[0] += 1
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self[0] >= n, timeout)


@contextmanager
def tcp_peer(handler: Callable[[socket.socket], None]) -> Iterator[tuple[int, AcceptCount]]:
    """A plain TCP server on loopback running ``handler`` per connection in a
    thread; yields (port, accept_count_box)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(WAIT)
    accepted = AcceptCount()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve() -> None:
        while not stop.is_set():
            r, _, _ = select.select([srv], [], [], 0.05)
            if not r:
                continue
            conn, _ = srv.accept()
            accepted.bump()
            conn.settimeout(WAIT)
            t = threading.Thread(target=_run, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    def _run(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            handler(conn)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        loop.join(WAIT)
        srv.close()
        for t in threads:
            t.join(WAIT)


# --- mTLS end to end ---------------------------------------------------------------


def test_curl_mtls_fingerprints_match(
    relay: RelayProcess, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    curl = require_tool("curl")
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "--proxy",
            relay.proxy_url,
            "--cacert",
            str(certs.ca_file),
            "--cert",
            str(certs.client_cert),
            "--key",
            str(certs.client_key),
            f"https://{CP_HOST}/whoami",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=True,
    )
    assert json.loads(out.stdout)["client_cert_sha256"] == certs.client_sha256
    event = relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)
    assert event["target"] == f"{CP_HOST}:443" and event["reason"] == "konnect"
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["bytes_up"] > 0 and closed["bytes_down"] > 0


def test_openssl_s_client_http10_without_host(relay: RelayProcess, certs: Certs) -> None:
    openssl = require_tool("openssl")
    proxy = f"{relay.proxy[0]}:{relay.proxy[1]}"
    proc = subprocess.run(
        [
            openssl,
            "s_client",
            "-proxy",
            proxy,
            "-connect",
            f"{CP_HOST}:443",
            "-servername",
            CP_HOST,
            "-CAfile",
            str(certs.ca_file),
            "-verify_return_error",
            "-cert",
            str(certs.client_cert),
            "-key",
            str(certs.client_key),
            "-quiet",
        ],
        input=f"GET /whoami HTTP/1.1\r\nHost: {CP_HOST}\r\nConnection: close\r\n\r\n",
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )
    assert certs.client_sha256 in proc.stdout, proc.stderr
    # openssl sends "CONNECT host:443 HTTP/1.0" with no Host header.
    relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)


def test_websocket_session_through_proxy(relay: RelayProcess, certs: Certs) -> None:
    from websockets.asyncio.client import connect

    async def session() -> list[str]:
        replies = []
        async with connect(
            f"wss://{CP_HOST}/v1/outlet",
            proxy=relay.proxy_url,
            ssl=certs.client_context(),
            ping_interval=0.05,
            open_timeout=WAIT,
        ) as ws:
            for i in range(5):
                await ws.send(f"ping-{i}")
                replies.append(await asyncio.wait_for(ws.recv(), WAIT))
            latency = await asyncio.wait_for(await ws.ping(), WAIT)
            assert latency >= 0
        return replies

    replies = asyncio.run(session())
    assert replies == [f"{certs.client_sha256}:ping-{i}" for i in range(5)]


def test_clienthello_in_same_packet_as_head(relay: RelayProcess, certs: Certs) -> None:
    """The ClientHello rides in the CONNECT packet; the relay must forward it."""
    ctx = certs.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=CP_HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock, head = connect_via(relay, f"{CP_HOST}:443", extra=hello)
    with sock:
        status, _, rest = head.partition(b"\r\n\r\n")
        assert status == b"HTTP/1.1 200 Connection established"
        incoming.write(rest)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "relay closed during handshake"
                incoming.write(data)
        tls.write(f"GET /whoami HTTP/1.1\r\nHost: {CP_HOST}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        body = b""
        while b"client_cert_sha256" not in body:
            data = sock.recv(65536)
            assert data
            incoming.write(data)
            try:
                body += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    assert certs.client_sha256.encode() in body


# --- exact response, early bytes, refusals -------------------------------------------


def test_200_is_exact_and_nothing_more(start_relay: Callable[..., RelayProcess]) -> None:
    def greet(conn: socket.socket) -> None:
        conn.sendall(b"server-speaks-first")
        conn.recv(1)

    with tcp_peer(greet) as (port, _):
        relay = start_relay(relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}))
        sock, head = connect_via(relay, f"{RAW_HOST}:443", version="HTTP/1.0")
        with sock:
            data = head + recv_exactly(sock, len(b"server-speaks-first") - (len(head) - 39))
        assert data == b"HTTP/1.1 200 Connection established\r\n\r\nserver-speaks-first"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET http://cloud.konghq.com/ HTTP/1.1\r\nHost: cloud.konghq.com\r\n\r\n", 405),
        (b"CONNECT evil.com:443 HTTP/1.1\r\n\r\n", 403),
        (b"CONNECT cloud.konghq.com.evil.com:443 HTTP/1.1\r\n\r\n", 403),
        (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n", 403),
        (b"CONNECT cloud.konghq.com:8443 HTTP/1.1\r\n\r\n", 403),
        (b"CONNECT user@cloud.konghq.com:443 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT cloud.konghq.com HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT cloud.konghq.com:443 HTTP/1.1\nHost: x\n\n", 400),
        (b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431),
    ],
)
def test_refusals_dial_nothing(
    start_relay: Callable[..., RelayProcess], head: bytes, status: int
) -> None:
    with tcp_peer(lambda c: None) as (port, accepted):
        static = {
            name: f"127.0.0.1:{port}"
            for name in (
                "evil.com",
                "cloud.konghq.com",
                "cloud.konghq.com.evil.com",
                "cloud.konghq.com:8443",
            )
        }
        relay = start_relay(relay_config(resolver={"static": static}))
        with socket.create_connection(relay.proxy, timeout=WAIT) as sock:
            sock.sendall(head)
            reply = recv_all(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
        body = reply.partition(b"\r\n\r\n")[2]
        assert body.startswith(f"{status} ".encode()) and body.endswith(b"\n")
        assert body.count(b"\n") == 1
        if status == 405:
            assert b"\r\nAllow: CONNECT\r\n" in reply
        event = relay.wait_event(lambda e: e["event"] == "request")
        assert event["allowed"] is False and event["status"] == status
        assert accepted[0] == 0


def test_denied_body_names_host(relay: RelayProcess) -> None:
    sock, head = connect_via(relay, "evil.com:443")
    with sock:
        reply = head + recv_all(sock)
    assert reply.endswith(b"\r\n\r\n403 host not in Konnect allowlist: evil.com:443\n")
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="not_allowlisted"}'] == 1


def test_head_timeout_408(start_relay: Callable[..., RelayProcess]) -> None:
    relay = start_relay(relay_config(limits={"head_timeout": 0.3}))
    with socket.create_connection(relay.proxy, timeout=WAIT) as sock:
        sock.sendall(b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_connect_refused_502(start_relay: Callable[..., RelayProcess]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, not listening: connect is refused
        relay = start_relay(
            relay_config(resolver={"static": {CP_HOST: f"127.0.0.1:{closed_port}"}})
        )
        sock, head = connect_via(relay, f"{CP_HOST}:443")
        with sock:
            reply = head + recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"connection refused" in reply
    samples = relay.metrics()
    assert (
        samples['konnect_relay_upstream_connect_failures_total{egress="direct",reason="refused"}']
        == 1
    )


def test_private_address_refused_without_allow_private(
    start_relay: Callable[..., RelayProcess],
) -> None:
    with tcp_peer(lambda c: None) as (port, accepted):
        cfg = relay_config(
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}, "allow_private": False}
        )
        relay = start_relay(cfg)
        sock, head = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            reply = head + recv_all(sock)
        assert reply.startswith(b"HTTP/1.1 403 ")
        assert b"loopback" in reply
        assert accepted[0] == 0


# --- half-close, backpressure ----------------------------------------------------------


def test_half_close_client_first(start_relay: Callable[..., RelayProcess]) -> None:
    """Client sends, then EOF; the destination still answers after reading EOF."""

    def upper_after_eof(conn: socket.socket) -> None:
        data = recv_all(conn)
        conn.sendall(data.upper())

    with tcp_peer(upper_after_eof) as (port, _):
        relay = start_relay(relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}))
        sock, head = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            assert head.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"hello" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"HELLO" * 1000
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["reason"] == "client_eof"
    assert closed["bytes_up"] == 5000 and closed["bytes_down"] == 5000


def test_half_close_upstream_first(start_relay: Callable[..., RelayProcess]) -> None:
    """The destination sends and EOFs; the client can still send, and it arrives."""
    received: list[bytes] = []

    def speak_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))

    with tcp_peer(speak_then_listen) as (port, _):
        relay = start_relay(relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}))
        sock, head = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            rest = head.partition(b"\r\n\r\n")[2]
            assert rest + recv_all(sock) == b"banner"  # EOF forwarded to the client
            sock.sendall(b"late data")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert received == [b"late data"]
    assert closed["reason"] == "upstream_eof"


def test_stalled_peer_bounds_memory(start_relay: Callable[..., RelayProcess]) -> None:
    """A destination that never reads while the client floods: the relay stops
    reading the client instead of buffering."""
    release = threading.Event()

    def stall(conn: socket.socket) -> None:
        release.wait(WAIT * 3)

    with tcp_peer(stall) as (port, _):
        relay = start_relay(relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}))
        sock = open_tunnel(relay)
        rss_before = relay.rss_kib()
        sent = 0
        chunk = b"x" * 65536
        sock.setblocking(False)
        limit = 512 * 1024 * 1024
        while sent < limit:
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                break  # the relay stopped reading: backpressure reached the client
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
        rss_after = relay.rss_kib()
        release.set()
        sock.close()
    assert sent < limit, "the relay kept reading from the client"
    # Kernel socket buffers hold most of `sent`; the relay's own buffering is
    # bounded by its high-water mark (256 KiB) plus one read chunk.
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after, sent)


# --- metrics -------------------------------------------------------------------------


def test_byte_counters_live_and_reconnects(start_relay: Callable[..., RelayProcess]) -> None:
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    with tcp_peer(echo) as (port, _):
        relay = start_relay(relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}))
        sock = open_tunnel(relay)
        sock.sendall(b"a" * 100_000)
        assert recv_exactly(sock, 100_000) == b"a" * 100_000
        samples = relay.metrics()
        host = f'host="{RAW_HOST}"'
        assert (
            samples[f'konnect_relay_tunnel_bytes_total{{direction="upstream",{host}}}'] == 100_000
        )
        assert (
            samples[f'konnect_relay_tunnel_bytes_total{{direction="downstream",{host}}}'] == 100_000
        )
        assert samples[f"konnect_relay_tunnels_active{{{host}}}"] == 1
        status, body = relay.get("/tunnels")
        assert status == 200
        (entry,) = json.loads(body)
        assert entry["host"] == RAW_HOST and entry["bytes_up"] == 100_000
        assert set(entry) >= {
            "id",
            "client",
            "host",
            "port",
            "egress",
            "opened_at",
            "bytes_up",
            "bytes_down",
            "last_activity",
        }
        # Two concurrent tunnels from one client are not reconnects...
        sock2, _ = connect_via(relay, f"{RAW_HOST}:443")
        assert relay.metrics().get(f"konnect_relay_tunnel_reconnects_total{{{host}}}", 0) == 0
        sock.close()
        relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        # ...a new one after one closed is.
        sock3, head3 = connect_via(relay, f"{RAW_HOST}:443")
        assert head3.startswith(b"HTTP/1.1 200 ")
        samples = relay.metrics()
        assert samples[f"konnect_relay_tunnel_reconnects_total{{{host}}}"] == 1
        assert samples[f"konnect_relay_tunnels_opened_total{{{host}}}"] == 3
        sock2.close()
        sock3.close()


def test_idle_timeout_closes(start_relay: Callable[..., RelayProcess]) -> None:
    with tcp_peer(lambda c: c.recv(1)) as (port, _):
        relay = start_relay(
            relay_config(
                resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}, limits={"idle_timeout": 0.4}
            )
        )
        sock = open_tunnel(relay)
        with sock:
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert sock.recv(1) == b""
    assert closed["reason"] == "idle_timeout"
    assert 0.4 <= closed["duration_s"] < 2.0


# --- lifecycle ------------------------------------------------------------------------


def test_drain_on_sigterm(start_relay: Callable[..., RelayProcess]) -> None:
    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    with tcp_peer(echo) as (port, _):
        relay = start_relay(
            relay_config(
                resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}, limits={"drain_timeout": 1.5}
            )
        )
        sock = open_tunnel(relay)
        assert relay.get("/readyz")[0] == 200
        relay.proc.terminate()
        relay.wait_event(lambda e: e["event"] == "draining")
        assert relay.get("/readyz")[0] == 503
        with pytest.raises(OSError):
            socket.create_connection(relay.proxy, timeout=WAIT).close()
        sock.sendall(b"still flowing")  # the live tunnel keeps working while draining
        assert recv_exactly(sock, 13) == b"still flowing"
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        assert closed["reason"] == "drain"
        assert relay.proc.wait(WAIT) == 0
        sock.close()
