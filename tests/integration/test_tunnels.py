"""End-to-end tunnels through the relay: real sockets, real mTLS, real clients."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading

import pytest

# Some test modules import connect_via, open_tunnel, recv_all, recv_exactly and
# tcp_peer from here; their home is tests.helpers.
from tests.support.helpers import (
    MemoryTLS,
    connect_reply,
    connect_via,
    curl_whoami,
    echo,
    flood,
    hold,
    open_tunnel,
    outlet_echoes,
    recv_all,
    recv_exactly,
    s_client_whoami,
    tcp_peer,
)
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    peer_config,
    relay_config,
    wait_until,
)

# --- mTLS end to end ---------------------------------------------------------------


def test_curl_mtls_fingerprints_match(
    relay: RelayProcess, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    out = curl_whoami(certs, "--fail", "--proxy", relay.proxy_url, check=True)
    assert json.loads(out.stdout)["client_cert_sha256"] == certs.client_sha256
    event = relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)
    assert event["target"] == f"{CP_HOST}:443" and event["reason"] == "konnect"
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["bytes_up"] > 0 and closed["bytes_down"] > 0


def test_openssl_s_client_http10_without_host(relay: RelayProcess, certs: Certs) -> None:
    proxy = f"{relay.proxy[0]}:{relay.proxy[1]}"
    # openssl sends "CONNECT host:443 HTTP/1.0" with no Host header.
    proc = s_client_whoami(
        certs, "-proxy", proxy, "-connect", f"{CP_HOST}:443", "-servername", CP_HOST
    )
    assert certs.client_sha256 in proc.stdout, proc.stderr
    relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)


def test_websocket_session_through_proxy(relay: RelayProcess, certs: Certs) -> None:
    from websockets.asyncio.client import connect

    async def session() -> list[str | bytes]:
        async with connect(
            f"wss://{CP_HOST}/v1/outlet",
            proxy=relay.proxy_url,
            ssl=certs.client_context(),
            ping_interval=0.05,
            open_timeout=WAIT,
        ) as ws:
            return await outlet_echoes(ws)

    replies = asyncio.run(session())
    assert replies == [f"{certs.client_sha256}:ping-{i}" for i in range(5)]


def test_clienthello_in_same_packet_as_head(relay: RelayProcess, certs: Certs) -> None:
    """The ClientHello rides in the CONNECT packet; the relay must forward it."""
    client = MemoryTLS(certs.client_context(), CP_HOST)
    sock, head = connect_via(relay, f"{CP_HOST}:443", extra=client.hello())
    with sock:
        status, _, rest = head.partition(b"\r\n\r\n")
        assert status == b"HTTP/1.1 200 Connection established"
        client.incoming.write(rest)
        client.finish_handshake(sock)
        body = client.whoami(sock)
    assert certs.client_sha256.encode() in body


# --- exact response, early bytes, refusals -------------------------------------------


def test_200_is_exact_and_nothing_more(start_relay: StartRelay) -> None:
    def greet(conn: socket.socket) -> None:
        conn.sendall(b"server-speaks-first")
        conn.recv(1)

    with tcp_peer(greet) as (port, _):
        relay = start_relay(peer_config(port))
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
def test_refusals_dial_nothing(start_relay: StartRelay, head: bytes, status: int) -> None:
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
    reply = connect_reply(relay, "evil.com:443")
    assert reply.endswith(b"\r\n\r\n403 host not in Konnect allowlist: evil.com:443\n")
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="not_allowlisted"}'] == 1


def test_head_timeout_408(start_relay: StartRelay) -> None:
    relay = start_relay(relay_config(limits={"head_timeout": 0.3}))
    with socket.create_connection(relay.proxy, timeout=WAIT) as sock:
        sock.sendall(b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\n")
        reply = recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_connect_refused_502(start_relay: StartRelay) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, not listening: connect is refused
        relay = start_relay(
            relay_config(resolver={"static": {CP_HOST: f"127.0.0.1:{closed_port}"}})
        )
        reply = connect_reply(relay, f"{CP_HOST}:443")
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"connection refused" in reply
    samples = relay.metrics()
    assert (
        samples['konnect_relay_upstream_connect_failures_total{egress="direct",reason="refused"}']
        == 1
    )


def test_private_address_refused_without_allow_private(
    start_relay: StartRelay,
) -> None:
    with tcp_peer(lambda c: None) as (port, accepted):
        cfg = relay_config(
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}, "allow_private": False}
        )
        relay = start_relay(cfg)
        reply = connect_reply(relay, f"{RAW_HOST}:443")
        assert reply.startswith(b"HTTP/1.1 403 ")
        assert b"loopback" in reply
        assert accepted[0] == 0


# --- half-close, backpressure ----------------------------------------------------------


def test_half_close_client_first(start_relay: StartRelay) -> None:
    """Client sends, then EOF; the destination still answers after reading EOF."""

    def upper_after_eof(conn: socket.socket) -> None:
        data = recv_all(conn)
        conn.sendall(data.upper())

    with tcp_peer(upper_after_eof) as (port, _):
        relay = start_relay(peer_config(port))
        sock, head = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            assert head.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"hello" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"HELLO" * 1000
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["reason"] == "client_eof"
    assert closed["bytes_up"] == 5000 and closed["bytes_down"] == 5000


def test_half_close_upstream_first(start_relay: StartRelay) -> None:
    """The destination sends and EOFs; the client can still send, and it arrives."""
    received: list[bytes] = []

    def speak_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        received.append(recv_all(conn))

    with tcp_peer(speak_then_listen) as (port, _):
        relay = start_relay(peer_config(port))
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


def test_stalled_peer_bounds_memory(start_relay: StartRelay) -> None:
    """A destination that never reads while the client floods: the relay stops
    reading the client instead of buffering."""
    release = threading.Event()

    def stall(conn: socket.socket) -> None:
        release.wait(WAIT * 3)

    with tcp_peer(stall) as (port, _):
        relay = start_relay(peer_config(port))
        sock = open_tunnel(relay)
        rss_before = relay.rss_kib()
        limit = 512 * 1024 * 1024
        sent = flood(sock, limit, stall=0.5)
        rss_after = relay.rss_kib()
        release.set()
        sock.close()
    assert sent < limit, "the relay kept reading from the client"
    # Kernel socket buffers hold most of `sent`; the relay's own buffering is
    # bounded by its high-water mark (256 KiB) plus one read chunk.
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after, sent)


# --- metrics -------------------------------------------------------------------------


def test_byte_counters_live_and_reconnects(start_relay: StartRelay) -> None:
    with tcp_peer(echo) as (port, _):
        relay = start_relay(peer_config(port))
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


def test_idle_timeout_closes(start_relay: StartRelay) -> None:
    with tcp_peer(hold) as (port, _):
        relay = start_relay(peer_config(port, limits={"idle_timeout": 0.4}))
        sock = open_tunnel(relay)
        with sock:
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert sock.recv(1) == b""
    assert closed["reason"] == "idle_timeout"
    assert 0.4 <= closed["duration_s"] < 2.0


def keepalive_timers(filter_: str) -> list[str]:
    """``ss`` lines of established TCP sockets matching ``filter_`` that have a
    keepalive timer armed (the kernel arms it for SO_KEEPALIVE sockets)."""
    out = subprocess.run(
        ["ss", "-Htno", "state", "established", filter_],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if "timer:(keepalive" in line]


def test_keepalive_on_both_connections_of_a_live_tunnel(start_relay: StartRelay) -> None:
    """The client's connection inherits SO_KEEPALIVE from the listener; the
    upstream one gets it from the first sweep the tunnel lives through."""
    with tcp_peer(hold) as (port, _):
        relay = start_relay(peer_config(port, limits={"idle_timeout": 2.0}))  # sweep: 0.5 s
        with open_tunnel(relay) as sock:
            client_port = sock.getsockname()[1]
            assert keepalive_timers(f"dport = :{relay.proxy[1]} or sport = :{relay.proxy[1]}")
            # The relay's side of the upstream connection (destination port: the
            # peer's); the peer's own socket (source port) never asked for it.
            wait_until(
                lambda: bool(keepalive_timers(f"dport = :{port}")),
                timeout=5,
                what="keepalive on the upstream connection",
            )
            assert not keepalive_timers(f"sport = :{port}")
            assert not keepalive_timers(f"sport = :{client_port}")


# --- lifecycle ------------------------------------------------------------------------


def test_drain_on_sigterm(start_relay: StartRelay) -> None:
    with tcp_peer(echo) as (port, _):
        relay = start_relay(peer_config(port, limits={"drain_timeout": 1.5}))
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
