"""SNI listeners end to end: the relay reads the server_name of a ClientHello,
applies the Konnect policy to it on the listener's port, dials, and relays the
client's own TLS (the hello included) unchanged.

Real clients (curl --connect-to, openssl s_client -servername, a websockets
session, Python's ssl in memory BIOs) speak to an SNI listener on loopback; the
fake control plane demands a client certificate and reports the fingerprint it
saw, which proves the mTLS session is the client's, end to end. Every refusal
(no SNI, not TLS, a denied name, a slow hello, a failed dial, a loop) is checked
to close the connection without dialling anything.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import tlspeek
from tests.support.helpers import (
    WHOAMI,
    MemoryTLS,
    curl_whoami,
    handshake_error,
    outlet_echoes,
    recv_all,
    relay_cli,
    s_client,
    s_client_whoami,
    split_records,
    tcp_peer,
    write_config,
)
from tests.support.relay import (
    CP_HOST,
    TP_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    free_port,
    relay_config,
)

SNI_LISTENER = "dmz-sni"
TLS_ALERT = 21  # RFC 8446 §5.1 ContentType.alert
# The refusal reasons a hello the peek rejects may be logged with.
PEEK_REASONS = {"not_tls", "malformed", "too_large", "not_client_hello"}


def sni_config(sni_port: int, static: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A relay with a CONNECT listener (first, so RelayProcess.proxy is it) and an
    SNI listener on ``sni_port``. An SNI target takes the listener's port, so
    that port joins konnect.ports."""
    cfg = relay_config(
        listen=[
            {"address": "127.0.0.1:0"},
            {"address": f"127.0.0.1:{sni_port}", "mode": "sni", "name": SNI_LISTENER},
        ],
        konnect={"ports": [443, sni_port]},
        resolver={"static": static},
        **overrides,
    )
    return cfg


class SNIRelay:
    def __init__(self, relay: RelayProcess, port: int) -> None:
        self.relay = relay
        self.port = port
        self.address = ("127.0.0.1", port)


@pytest.fixture
def sni_relay(start_relay: StartRelay, fake_cp: FakeControlPlane) -> SNIRelay:
    """An SNI listener whose Konnect names lead to the fake control plane."""
    port = free_port()
    target = f"127.0.0.1:{fake_cp.port}"
    relay = start_relay(sni_config(port, {CP_HOST: target, TP_HOST: target}))
    return SNIRelay(relay, port)


@pytest.fixture
def dead_peer() -> Iterator[tuple[int, list[int]]]:
    """A TCP peer that must never be dialled: yields (port, accept_count_box)."""
    with tcp_peer(lambda c: None) as peer:
        yield peer


def requests(relay: RelayProcess) -> list[dict[str, Any]]:
    """Every ``request`` event logged so far (waits for none)."""
    return [e for e in relay.drain() if e["event"] == "request"]


# --- real clients end to end -------------------------------------------------------


def test_curl_connect_to_sni_listener(sni_relay: SNIRelay, certs: Certs) -> None:
    relay, port = sni_relay.relay, sni_relay.port
    connect_to = f"{CP_HOST}:443:127.0.0.1:{port}"
    out = curl_whoami(certs, "--fail", "--connect-to", connect_to, check=True)
    assert json.loads(out.stdout)["client_cert_sha256"] == certs.client_sha256
    event = relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)
    assert event["target"] == f"{CP_HOST}:{port}" and event["reason"] == "konnect"
    assert event["egress"] == "direct" and event["allowed"] is True
    assert event["listener"] == SNI_LISTENER
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["target"] == f"{CP_HOST}:{port}" and closed["listener"] == SNI_LISTENER
    assert closed["bytes_up"] > 0 and closed["bytes_down"] > 0
    samples = relay.metrics()
    host = f'host="{CP_HOST}"'
    assert samples[f"konnect_relay_tunnels_opened_total{{{host}}}"] == 1
    assert samples[f"konnect_relay_tunnels_active{{{host}}}"] == 0
    up = samples[f'konnect_relay_tunnel_bytes_total{{direction="upstream",{host}}}']
    down = samples[f'konnect_relay_tunnel_bytes_total{{direction="downstream",{host}}}']
    assert (up, down) == (closed["bytes_up"], closed["bytes_down"])


def test_openssl_s_client_servername(sni_relay: SNIRelay, certs: Certs) -> None:
    proc = s_client_whoami(
        certs,
        "-connect",
        f"127.0.0.1:{sni_relay.port}",
        "-servername",
        CP_HOST,
        "-verify_hostname",
        CP_HOST,
    )
    assert certs.client_sha256 in proc.stdout, proc.stderr
    event = sni_relay.relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 200 and event["target"] == f"{CP_HOST}:{sni_relay.port}"


def test_websocket_session_holds(
    sni_relay: SNIRelay, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    """A /v1/outlet WebSocket over a socket pre-connected to the SNI listener:
    messages and pings flow, and /tunnels names the listener while it lives."""
    from websockets.asyncio.client import connect

    relay = sni_relay.relay

    async def session() -> tuple[list[str | bytes], list[dict[str, Any]]]:
        sock = socket.create_connection(sni_relay.address, timeout=WAIT)
        async with connect(
            f"wss://{CP_HOST}/v1/outlet",
            sock=sock,
            ssl=certs.client_context(),
            ping_interval=0.05,
            open_timeout=WAIT,
        ) as ws:
            replies = await outlet_echoes(ws)
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(None, relay.get, "/tunnels")
            assert status == 200
            # A ping after the scrape: the tunnel outlives the admin request.
            await asyncio.wait_for(await ws.ping(), WAIT)
        return replies, json.loads(body)

    replies, tunnels = asyncio.run(session())
    assert replies == [f"{certs.client_sha256}:ping-{i}" for i in range(5)]
    (entry,) = tunnels
    assert entry["listener"] == SNI_LISTENER
    assert entry["host"] == CP_HOST and entry["port"] == sni_relay.port
    assert entry["egress"] == "direct" and entry["bytes_up"] > 0 and entry["bytes_down"] > 0
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["target"] == f"{CP_HOST}:{sni_relay.port}"
    assert closed["tunnel"] == entry["id"]


def test_hello_in_one_byte_segments(sni_relay: SNIRelay, certs: Certs) -> None:
    """A ClientHello sent one byte per segment (TCP_NODELAY) is reassembled,
    forwarded unchanged, and the mTLS session completes."""
    client = MemoryTLS(certs.client_context(), CP_HOST)
    hello = client.hello()
    with socket.create_connection(sni_relay.address, timeout=WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(hello)):
            sock.sendall(hello[i : i + 1])
        client.finish_handshake(sock)
        body = client.whoami(sock)
    assert certs.client_sha256.encode() in body
    relay = sni_relay.relay
    assert relay.wait_event(lambda e: e["event"] == "request")["status"] == 200
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["bytes_up"] > len(hello)


def test_tls_record_fragmented_hello(sni_relay: SNIRelay, certs: Certs) -> None:
    """A hello split over several TLS records (legal, RFC 8446 §5.1) is read and
    relayed as sent: the server reassembles the same bytes."""
    client = MemoryTLS(certs.client_context(), CP_HOST)
    records = split_records(client.hello())
    with socket.create_connection(sni_relay.address, timeout=WAIT) as sock:
        sock.sendall(records)
        client.finish_handshake(sock)
        reply = client.whoami(sock)
    assert certs.client_sha256.encode() in reply


def test_records_after_hello_in_same_segment(sni_relay: SNIRelay, certs: Certs) -> None:
    """Bytes after the hello in the same segment (here the middlebox-compatibility
    change_cipher_spec record, RFC 8446 §D.4) are relayed too, in order."""
    client = MemoryTLS(certs.client_context(), CP_HOST)
    ccs = b"\x14\x03\x03\x00\x01\x01"
    hello = client.hello()
    with socket.create_connection(sni_relay.address, timeout=WAIT) as sock:
        sock.sendall(hello + ccs)
        client.finish_handshake(sock)
        body = client.whoami(sock)
    assert certs.client_sha256.encode() in body
    closed = sni_relay.relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["bytes_up"] > len(hello) + len(ccs)


def test_behind_proxy_protocol_load_balancer(
    start_relay: StartRelay, fake_cp: FakeControlPlane, certs: Certs
) -> None:
    """An SNI listener behind a TCP load balancer: the PROXY v1 header comes
    first, the hello right after it in the same segment; the client address
    logged is the one the header carries."""
    port = free_port()
    cfg = sni_config(port, {CP_HOST: f"127.0.0.1:{fake_cp.port}"})
    cfg["listen"][1].update(proxy_protocol=True, trusted_proxies=["127.0.0.1/32"])
    relay = start_relay(cfg)
    client = MemoryTLS(certs.client_context(), CP_HOST)
    header = f"PROXY TCP4 192.0.2.7 127.0.0.1 40000 {port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(header + client.hello())
        client.finish_handshake(sock)
        body = client.whoami(sock)
    assert certs.client_sha256.encode() in body
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 200 and event["client"] == "192.0.2.7:40000"
    assert event["identity"] == "192.0.2.7"


# --- refusals: closed, nothing dialled ------------------------------------------------


@pytest.mark.parametrize("client", ["python", "openssl"])
def test_no_sni_unrecognized_name(
    start_relay: StartRelay, dead_peer: tuple[int, list[int]], client: str
) -> None:
    peer_port, accepted = dead_peer
    port = free_port()
    relay = start_relay(sni_config(port, {CP_HOST: f"127.0.0.1:{peer_port}"}))
    if client == "python":
        # Python sends no server_name for server_hostname=None.
        error = handshake_error(("127.0.0.1", port), None)
        assert "UNRECOGNIZED_NAME" in str(error), error
    else:
        proc = s_client("-connect", f"127.0.0.1:{port}", "-noservername")
        assert proc.returncode != 0
        assert "unrecognized name" in proc.stderr or "alert number 112" in proc.stderr, proc.stderr
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["allowed"] is False and event["reason"] == "no_sni"
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="no_sni"}'] == 1
    assert accepted[0] == 0


@pytest.mark.parametrize(
    "first",
    [
        # Not a ClientHello at all.
        pytest.param(b"GET / HTTP/1.1\r\nHost: " + CP_HOST.encode() + b"\r\n\r\n", id="http"),
        pytest.param(b"CONNECT " + CP_HOST.encode() + b":443 HTTP/1.1\r\n\r\n", id="connect"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="ssh"),
        # A handshake record, not a hello.
        pytest.param(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", id="server-hello"),
        # Malformed hellos. A handshake record announcing a 40000-byte hello:
        # beyond MAX_CLIENT_HELLO.
        pytest.param(b"\x16\x03\x01\x40\x00\x01\x00\x9c\x40" + b"\x00" * 200, id="too-large"),
        # A record of 2^14 + 1 bytes (RFC 8446 §5.1 caps it at 2^14).
        pytest.param(b"\x16\x03\x01\x40\x01\x01" + b"\x00" * 200, id="record-too-long"),
        # A hello whose length fields run past its record.
        pytest.param(
            b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\xff\xff", id="truncated-fields"
        ),
    ],
)
def test_not_a_hello_or_malformed_closed(
    start_relay: StartRelay, dead_peer: tuple[int, list[int]], first: bytes
) -> None:
    peer_port, accepted = dead_peer
    port = free_port()
    relay = start_relay(sni_config(port, {CP_HOST: f"127.0.0.1:{peer_port}"}))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(first)
        reply = recv_all(sock)
    # Nothing an HTTP or SSH client could mistake for an answer.
    assert reply == b"" or reply[0] == TLS_ALERT, reply
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["allowed"] is False and event["reason"] in PEEK_REASONS
    if not first.startswith(b"\x16"):
        assert event["reason"] == "not_tls"
    assert accepted[0] == 0


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("evil.com", "not_allowlisted"),
        ("cloud.konghq.com.evil.com", "not_allowlisted"),
        ("dp-test.eu.cp0.konghq.com.evil.com", "not_allowlisted"),
        (TP_HOST, "deny_rule"),
    ],
)
def test_denied_name_access_denied(
    start_relay: StartRelay,
    dead_peer: tuple[int, list[int]],
    name: str,
    reason: str,
) -> None:
    peer_port, accepted = dead_peer
    port = free_port()
    relay = start_relay(
        sni_config(port, {name: f"127.0.0.1:{peer_port}"}, deny=[f"{TP_HOST}:{port}"])
    )
    error = handshake_error(("127.0.0.1", port), name)
    assert "ACCESS_DENIED" in str(error), error
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["allowed"] is False and event["status"] == 403
    assert event["reason"] == reason and event["target"] == f"{name}:{port}"
    assert relay.metrics()[f'konnect_relay_requests_denied_total{{reason="{reason}"}}'] == 1
    assert accepted[0] == 0


def test_slow_hello_head_timeout(
    start_relay: StartRelay,
    dead_peer: tuple[int, list[int]],
    certs: Certs,
) -> None:
    peer_port, accepted = dead_peer
    port = free_port()
    relay = start_relay(
        sni_config(port, {CP_HOST: f"127.0.0.1:{peer_port}"}, limits={"head_timeout": 0.3})
    )
    hello = MemoryTLS(certs.client_context(), CP_HOST).hello()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(hello[: len(hello) // 2])
        reply = recv_all(sock)
    assert reply == b"" or reply[0] == TLS_ALERT, reply
    assert reply == tlspeek.ALERT_ACCESS_DENIED  # as the README says
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["allowed"] is False and event["reason"] == "head_timeout"
    assert accepted[0] == 0


def test_dial_failure_internal_error(start_relay: StartRelay, certs: Certs) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connect is refused
        port = free_port()
        relay = start_relay(sni_config(port, {CP_HOST: f"127.0.0.1:{closed.getsockname()[1]}"}))
        error = handshake_error(("127.0.0.1", port), CP_HOST)
    assert "INTERNAL_ERROR" in str(error), error
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 502 and event["reason"] == "refused"


def test_static_map_to_own_listener_is_a_loop(
    start_relay: StartRelay,
) -> None:
    """A name that leads back to the SNI listener itself is refused (reason loop)
    instead of the relay dialling itself, which would read the same hello again
    and dial again, without end."""
    port = free_port()
    relay = start_relay(sni_config(port, {CP_HOST: f"127.0.0.1:{port}"}))
    error = handshake_error(("127.0.0.1", port), CP_HOST)
    assert "ACCESS_DENIED" in str(error), error
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 403 and event["reason"] == "loop"
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="loop"}'] == 1
    assert samples.get(f'konnect_relay_tunnels_opened_total{{host="{CP_HOST}"}}', 0) == 0
    assert [e["reason"] for e in requests(relay)] == []  # no second (inner) request


# --- logs name the listener -------------------------------------------------------------


def test_log_lines_name_the_listener(sni_relay: SNIRelay, certs: Certs) -> None:
    error = handshake_error(sni_relay.address, "evil.com")
    assert "ACCESS_DENIED" in str(error)
    client = MemoryTLS(certs.client_context(), CP_HOST)
    with socket.create_connection(sni_relay.address, timeout=WAIT) as sock:
        sock.sendall(client.hello())
        client.finish_handshake(sock)
        client.whoami(sock)
    relay = sni_relay.relay
    denied = relay.wait_event(lambda e: e["event"] == "request" and not e["allowed"])
    allowed = relay.wait_event(lambda e: e["event"] == "request" and e["allowed"])
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert [denied.get("listener"), allowed.get("listener"), closed.get("listener")] == [
        SNI_LISTENER
    ] * 3


# --- the policy command ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [
        (f"{CP_HOST}:443", 0),
        (f"{CP_HOST}:{{port}}", 0),
        (f"{TP_HOST}:{{port}}", 0),
        ("evil.com:{port}", 1),
        (f"{CP_HOST}:8443", 1),
    ],
)
def test_policy_command_for_sni_targets(tmp_path: Path, target: str, code: int) -> None:
    """The decision an SNI listener makes for server_name S on port P is the
    one ``konnect-relay policy S:P`` prints."""
    port = free_port()
    path = write_config(tmp_path, sni_config(port, {}))
    target = target.format(port=port)
    proc = relay_cli("policy", target, "--config", str(path), timeout=WAIT * 2)
    assert proc.returncode == code, proc.stdout + proc.stderr
    verdict = "allow" if code == 0 else "deny"
    assert proc.stdout.startswith(f"{verdict} {target}\n"), proc.stdout


def test_target_port_behind_port_translation(
    start_relay: StartRelay, fake_cp: FakeControlPlane, certs: Certs
) -> None:
    """An SNI listener bound on a high port (as behind a Service mapping 443 to
    it) dials the Konnect name on listen[].target_port, not on its own port."""
    port = free_port()
    cfg = relay_config(
        listen=[
            {"address": "127.0.0.1:0"},
            {"address": f"127.0.0.1:{port}", "mode": "sni", "target_port": 443},
        ],
        resolver={"static": {f"{CP_HOST}:443": f"127.0.0.1:{fake_cp.port}"}},
    )
    relay = start_relay(cfg)
    ctx = certs.client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw,
        ctx.wrap_socket(raw, server_hostname=CP_HOST) as tls,
    ):
        tls.sendall(WHOAMI.encode())
        body = recv_all(tls)
    assert certs.client_sha256.encode() in body
    event = relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)
    assert event["target"] == f"{CP_HOST}:443"
