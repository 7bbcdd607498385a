"""Fault injection against the relay subprocess, with real sockets only.

Each test breaks something (a peer resets, stops reading, half-closes; a client
aborts mid-dial; DNS fails or stays silent; the process runs out of file
descriptors; a tunnel idles; thousands of tunnels come and go) and then checks
that nothing is left behind: the relay's open fd count is back at its baseline,
``/tunnels`` is empty, and no request head, dial or tunnel is still counted
(``konnect_relay_pending_requests`` and ``konnect_relay_tunnels_active`` are 0).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tests.support.helpers import (
    ESTABLISHED,
    ROOT,
    abort,
    connect_head,
    connect_reply,
    connect_via,
    echo,
    echoes,
    flood,
    is_dead,
    nofile_prefix,
    open_tunnel,
    recv_all,
    recv_exactly,
    slow_acceptor,
    start_dial,
    tcp_peer,
)
from tests.support.relay import (
    RAW_HOST,
    WAIT,
    RelayProcess,
    StartRelay,
    peer_config,
    relay_config,
    wait_until,
)

MiB = 1024 * 1024
# The relay's own buffering per direction is one write buffer (256 KiB high
# water) plus a read chunk; everything else a flood sends sits in kernel
# socket buffers. 8 MiB leaves room for allocator noise.
FLOOD_RSS_BOUND_KIB = 8 * 1024
WAVES, WAVE_SIZE = 10, 500
# Growth after the first wave (pools, caches and the allocator are warm by then)
# across the nine that follow.
WAVES_RSS_BOUND_KIB = 16 * 1024


def active_tunnels(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("konnect_relay_tunnels_active{"))


def assert_clean(relay: RelayProcess, baseline: int) -> None:
    """Nothing left behind: fds, tunnels, pending heads (and, when the relay
    serves it, its own task set)."""
    wait_until(lambda: relay.open_fds() == baseline, what=f"relay fd count back at {baseline}")
    status, body = relay.get("/tunnels")
    assert status == 200 and json.loads(body) == []
    samples = relay.metrics()
    assert samples["konnect_relay_pending_requests{}"] == 0
    assert active_tunnels(samples) == 0
    status, body = relay.get("/debug/tasks")
    assert status == 200, body
    tasks = json.loads(body)
    assert tasks["relay_tasks"] == 0 and tasks["dialing"] == 0, body


def baseline(relay: RelayProcess) -> int:
    """The relay's fd count at rest: as it started, once earlier connections
    (a warm-up, admin requests) are fully closed."""
    assert_clean(relay, relay.start_fds)
    return relay.start_fds


# --- peers misbehaving mid-stream ---------------------------------------------------------


def test_upstream_resets_mid_stream(start_relay: StartRelay) -> None:
    def reset_after_64k(conn: socket.socket) -> None:
        got = recv_exactly(conn, 64 * 1024)
        conn.sendall(got[:1000])
        abort(conn)

    with tcp_peer(reset_after_64k) as (port, _):
        relay = start_relay(peer_config(port))
        base = baseline(relay)
        with open_tunnel(relay) as sock:
            sock.sendall(b"r" * 64 * 1024)
            received = b""
            with suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
            assert received == b"r" * len(received)  # a prefix, never foreign bytes
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert closed["reason"] == "upstream_reset"  # who ended it, not "error"
            assert closed["bytes_up"] == 64 * 1024
    assert_clean(relay, base)
    samples = relay.metrics()
    series = f'konnect_relay_tunnels_closed_total{{host="{RAW_HOST}",reason="upstream_reset"}}'
    assert samples[series] == 1


@pytest.mark.parametrize("peer_ends", ["peer-closes", "peer-hangs"])
def test_upstream_stops_reading_while_client_floods(
    start_relay: StartRelay, peer_ends: str
) -> None:
    """Backpressure bounds the relay's memory; afterwards the tunnel ends either
    because the peer closes (unread data: a reset) or through the idle timeout
    once no byte moves."""
    release = threading.Event()

    def stall(conn: socket.socket) -> None:
        release.wait(WAIT * 3)
        if peer_ends == "peer-closes":
            conn.close()

    idle = 2.0 if peer_ends == "peer-hangs" else 600
    with tcp_peer(stall) as (port, _):
        relay = start_relay(peer_config(port, limits={"idle_timeout": idle, "drain_timeout": 2}))
        base = baseline(relay)
        sock = open_tunnel(relay)
        rss_before = relay.rss_kib()
        limit = 256 * MiB
        # closed_ok: the idle timeout may already have ended it (a very slow machine).
        sent = flood(sock, limit, stall=0.3, closed_ok=True)
        rss_after = relay.rss_kib()
        assert sent < limit, "the relay kept reading from the client"
        assert rss_after - rss_before < FLOOD_RSS_BOUND_KIB, (rss_before, rss_after, sent)
        sock.close()
        if peer_ends == "peer-closes":
            release.set()
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        release.set()
    # peer-closes: it closes with the flood unread, so its kernel resets the connection
    expected = "idle_timeout" if peer_ends == "peer-hangs" else "upstream_reset"
    assert closed["reason"] == expected, closed
    assert closed["bytes_up"] <= sent
    assert_clean(relay, base)


@pytest.mark.parametrize("first", ["upstream", "client"])
def test_half_close_then_a_mebibyte_the_other_way(start_relay: StartRelay, first: str) -> None:
    """One side sends EOF; the other keeps sending 1 MiB, which arrives intact;
    then the tunnel closes and nothing is left behind."""
    payload = bytes(range(256)) * 4096
    digest = hashlib.sha256(payload).hexdigest()
    seen: list[str] = []

    def upstream_first(conn: socket.socket) -> None:
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        seen.append(hashlib.sha256(recv_all(conn)).hexdigest())

    def client_first(conn: socket.socket) -> None:
        seen.append(recv_all(conn).decode())
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)

    handler = upstream_first if first == "upstream" else client_first
    with tcp_peer(handler) as (port, _):
        relay = start_relay(peer_config(port))
        base = baseline(relay)
        sock, head = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            status, _, early = head.partition(b"\r\n\r\n")
            assert status == b"HTTP/1.1 200 Connection established"
            if first == "upstream":
                assert early + recv_all(sock) == b"bye"  # may share the 200's packet
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(1) == b""
            else:
                sock.sendall(b"bye")
                sock.shutdown(socket.SHUT_WR)
                assert hashlib.sha256(recv_all(sock)).hexdigest() == digest
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert seen == ([digest] if first == "upstream" else ["bye"])
    assert closed["reason"] == f"{first}_eof"
    big = "bytes_up" if first == "upstream" else "bytes_down"
    assert closed[big] == len(payload)
    assert_clean(relay, base)


# --- a client that gives up while the relay dials --------------------------------------


def test_client_abort_while_dialling_leaves_nothing(start_relay: StartRelay) -> None:
    with slow_acceptor() as (port, _):
        relay = start_relay(peer_config(port, limits={"connect_timeout": 1.5}))
        base = baseline(relay)
        abort(start_dial(relay, base))
        event = relay.wait_event(lambda e: e["event"] == "request")
        assert event["reason"] in ("client_gone", "timeout"), event
        assert_clean(relay, base)
    samples = relay.metrics()
    assert samples.get(f'konnect_relay_tunnels_opened_total{{host="{RAW_HOST}"}}', 0) == 0


def test_client_abort_cancels_the_dial_at_once(start_relay: StartRelay) -> None:
    with slow_acceptor() as (port, _):
        relay = start_relay(peer_config(port, limits={"connect_timeout": 8}))
        base = baseline(relay)
        abort(start_dial(relay, base))
        event = relay.wait_event(lambda e: e["event"] == "request", timeout=2)
        assert event["reason"] == "client_gone"
        assert_clean(relay, base)


# --- DNS ---------------------------------------------------------------------------------


@contextmanager
def fake_dns() -> Iterator[tuple[int, list[str]]]:
    """A UDP DNS server on loopback for names under ``test.``; its mode (a
    one-item list) is "nxdomain", "servfail", "silent" (never answers) or
    "answer" (A 127.0.0.1, TTL 0)."""
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    mode = ["answer"]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.05)
            if not ready:
                continue
            data, addr = sock.recvfrom(4096)
            if mode[0] == "silent":
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            if mode[0] == "nxdomain":
                reply.set_rcode(dns.rcode.NXDOMAIN)
                # An SOA with a zero minimum: not negatively cached (RFC 2308 §5),
                # so the server's recovery is seen at once.
                soa = dns.rrset.from_text("test.", 0, "IN", "SOA", "ns.test. h.test. 1 0 0 0 0")
                reply.authority.append(soa)
            elif mode[0] == "servfail":
                reply.set_rcode(dns.rcode.SERVFAIL)
            elif question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", "127.0.0.1"))
            sock.sendto(reply.to_wire(), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], mode
    finally:
        stop.set()
        thread.join(WAIT)
        sock.close()


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("nxdomain", 502, "dns_failure"),
        ("servfail", 502, "dns_failure"),
        ("silent", 504, "dns_timeout"),
    ],
)
def test_dns_failure_and_timeout(
    start_relay: StartRelay, mode: str, status: int, reason: str
) -> None:
    """RAW_HOST maps (resolver.static) to a name only the fake DNS server knows;
    after the failure the server recovers and so does the relay."""
    with fake_dns() as (dns_port, dns_mode), tcp_peer(echo) as (port, _):
        cfg = relay_config(
            resolver={
                "static": {RAW_HOST: f"echo.internal.test:{port}"},
                "nameservers": [f"127.0.0.1:{dns_port}"],
                "timeout": 0.5,
            }
        )
        relay = start_relay(cfg)
        with open_tunnel(relay) as sock:
            assert echoes(sock, b"warm-up")
        relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        base = baseline(relay)
        dns_mode[0] = mode
        reply = connect_reply(relay, f"{RAW_HOST}:443")
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply
        event = relay.wait_event(lambda e: e["event"] == "request" and e["status"] == status)
        assert event["reason"] == reason
        assert_clean(relay, base)
        dns_mode[0] = "answer"
        with open_tunnel(relay) as sock:
            assert echoes(sock, b"recovered")
        relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        assert_clean(relay, base)
    samples = relay.metrics()
    assert samples[f'konnect_relay_requests_denied_total{{reason="{reason}"}}'] == 1


# --- file descriptor exhaustion -----------------------------------------------------------


NOFILE = 120  # the relay answers 503 once 2 x tunnels + FD_RESERVE (64) reaches it


def test_fd_limit_503_then_recovery(start_relay: StartRelay) -> None:
    with tcp_peer(echo) as (port, _):
        relay = start_relay(peer_config(port), prefix=nofile_prefix(NOFILE))
        base = baseline(relay)
        tunnels: list[socket.socket] = []
        try:
            refused = b""
            for _ in range(NOFILE):
                sock, head = connect_via(relay, f"{RAW_HOST}:443")
                if not head.startswith(b"HTTP/1.1 200 "):
                    # Refused before its head was read: the close may reset.
                    with sock, suppress(ConnectionResetError):
                        refused = head + recv_all(sock)
                    refused = refused or head
                    break
                tunnels.append(sock)
            assert refused.startswith(b"HTTP/1.1 503 "), refused
            assert b"open-file limit" in refused
            assert len(tunnels) == (NOFILE - 64) // 2
            for sock in tunnels:  # every tunnel admitted before the limit still works
                assert echoes(sock, b"alive")
            for sock in tunnels[:5]:
                sock.close()
            for _ in range(5):
                relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            with open_tunnel(relay) as again:
                assert echoes(again, b"recovered")
        finally:
            for sock in tunnels:
                sock.close()
        wait_until(lambda: not json.loads(relay.get("/tunnels")[1]), what="tunnels closed")
        assert_clean(relay, base)
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="fd_limit"}'] == 1


def test_real_emfile_is_survived(start_relay: StartRelay) -> None:
    """Descriptors the relay does not count (admin connections) exhaust the
    process for real: accept() fails with EMFILE. A CONNECT then is closed at
    once (not left hanging), and the relay serves again as soon as fds free up."""
    with tcp_peer(echo) as (port, _):
        relay = start_relay(peer_config(port), prefix=nofile_prefix(NOFILE))
        base = baseline(relay)
        host, _, admin_port = relay.admin.rpartition(":")
        hogs: list[socket.socket] = []
        try:
            for _ in range(NOFILE):
                hogs.append(socket.create_connection((host, int(admin_port)), timeout=WAIT))
                if relay.open_fds() >= NOFILE:
                    break
            wait_until(lambda: relay.open_fds() == NOFILE, what="relay at its fd limit")
            with socket.create_connection(relay.proxy, timeout=WAIT) as sock:
                sock.sendall(f"CONNECT {RAW_HOST}:443 HTTP/1.1\r\n\r\n".encode())
                with suppress(ConnectionResetError):
                    assert recv_all(sock) == b""
        finally:
            for sock in hogs:
                sock.close()
        wait_until(lambda: relay.open_fds() == base, what="admin connections closed")
        with open_tunnel(relay) as sock:
            assert echoes(sock, b"serving again")
        relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        assert_clean(relay, base)
        assert relay.proc.poll() is None


# --- idle timeout ------------------------------------------------------------------------


def test_idle_timeout_leaves_nothing(start_relay: StartRelay) -> None:
    with tcp_peer(echo) as (port, _):
        relay = start_relay(peer_config(port, limits={"idle_timeout": 0.5}))
        base = baseline(relay)
        with open_tunnel(relay) as sock:
            assert echoes(sock, b"then silence")
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert is_dead(sock)
    assert closed["reason"] == "idle_timeout"
    assert_clean(relay, base)


# --- thousands of tunnels in waves ----------------------------------------------------------


async def _echo_server() -> asyncio.Server:
    async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(echo_stream, "127.0.0.1", 0, backlog=WAVE_SIZE * 2)


async def _one_tunnel(proxy: tuple[str, int], n: int) -> bool:
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        writer.write(connect_head(f"{RAW_HOST}:443"))
        if await reader.readuntil(b"\r\n\r\n") != ESTABLISHED:
            return False
        payload = f"tunnel {n} ".encode() * 40
        writer.write(payload)
        return await reader.readexactly(len(payload)) == payload
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


def test_5000_tunnels_in_waves(start_relay: StartRelay) -> None:
    async def run() -> list[int]:
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        relay = start_relay(peer_config(port))
        base = await asyncio.to_thread(baseline, relay)
        opened_key = f'konnect_relay_tunnels_opened_total{{host="{RAW_HOST}"}}'
        rss = []
        try:
            for wave in range(WAVES):
                ok = await asyncio.wait_for(
                    asyncio.gather(
                        *(_one_tunnel(relay.proxy, wave * WAVE_SIZE + i) for i in range(WAVE_SIZE))
                    ),
                    WAIT * 3,
                )
                assert all(ok), f"wave {wave}: {ok.count(False)} tunnels failed"
                await asyncio.to_thread(assert_clean, relay, base)
                rss.append(relay.rss_kib())
            samples = await asyncio.to_thread(relay.metrics)
        finally:
            server.close()
            await server.wait_closed()
        assert samples[opened_key] == WAVES * WAVE_SIZE
        closed = f'konnect_relay_tunnels_closed_total{{host="{RAW_HOST}",reason="client_eof"}}'
        assert samples[closed] == WAVES * WAVE_SIZE
        return rss

    rss = asyncio.run(run())
    growth = rss[-1] - rss[0]
    print(f"relay RSS after each wave (KiB): {rss}; growth after wave 1: {growth} KiB")
    assert growth < WAVES_RSS_BOUND_KIB, rss


# --- the soak script, tiny ------------------------------------------------------------------


def test_soak_smoke(tmp_path: Path) -> None:
    """bench/soak.py end to end at a tiny size: every tunnel held, every byte checked."""
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak.py"),
            "--data-planes",
            "3",
            "--duration",
            "4",
            "--ramp",
            "0.5",
            "--sample-interval",
            "1",
            "--telemetry-interval",
            "0.1",
            "0.3",
            "--ping-interval",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["tunnels"]["target"] == 9
    assert report["tunnels"]["held_min_after_ramp"] == 9
    assert report["reconnects"] == 0
    assert report["corrupted_bytes"] == 0
    assert report["messages"]["echoed"] > 20
    assert report["bytes"]["up"] > 0 and report["bytes"]["up"] == report["bytes"]["down"]
    assert report["pings"]["answered"] >= 9
    assert len(report["samples"]) >= 3
    assert all(s["relay_fds"] > 0 and s["relay_rss_kib"] > 0 for s in report["samples"])
    assert "| tunnels held" in done.stdout
