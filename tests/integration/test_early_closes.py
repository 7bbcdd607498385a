"""Connections that end before a complete head leave a count and a line.

A TCP health check, a scanner, a client that gives up in the middle of its
head, a TLS client whose handshake fails: none of them has a request, so none
gets a ``request`` line; each is counted in
``konnect_relay_early_closes_total{listener,phase}`` and logged as an
``early_close`` line (rate-limited per listener and phase)."""

from __future__ import annotations

import json
import socket
import ssl
import struct
from typing import Any

import pytest

from tests.support.helpers import dial, tls_listen
from tests.support.relay import Certs, ListenerCerts, RelayProcess, StartRelay, relay_config

pytestmark = pytest.mark.timeout(60)

EARLY = "konnect_relay_early_closes_total"


def events(relay: RelayProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, list(relay.lines)) if e["event"] == kind]


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that aborts."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_partial_head_then_close_is_counted_and_logged_with_the_client(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(relay_config())
    sock = dial(relay.proxy)
    client = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.sendall(b"CONNECT ra")
    relay.wait_sample("konnect_relay_pending_requests", 1)
    sock.close()
    line = relay.wait_event(lambda e: e["event"] == "early_close")
    assert line["phase"] == "head" and line["client"] == client
    assert line["listener"] == "127.0.0.1:0"  # a listen entry's name defaults to its address
    assert line["bytes"] == 10 and line["suppressed"] == 0
    assert "closed before a complete request head (10 bytes)" in line["detail"]
    relay.wait_sample(EARLY, 1, listener=line["listener"], phase="head")
    assert events(relay, "request") == []


def test_probes_and_resets_are_all_counted_but_logged_once_per_interval(
    start_relay: StartRelay,
) -> None:
    relay = start_relay(relay_config())
    for _ in range(5):  # a TCP health check: connect, close, no byte
        dial(relay.proxy).close()
    sock = dial(relay.proxy)
    sock.sendall(b"CONNECT raw.example.test:443 HTTP/1.1\r\n")
    relay.wait_sample("konnect_relay_pending_requests", 1)
    reset(sock)
    listener = relay.wait_event(lambda e: e["event"] == "early_close")["listener"]
    relay.wait_sample(EARLY, 6, listener=listener, phase="head")
    lines = events(relay, "early_close")
    assert len(lines) == 1, lines  # the other five within LOG_INTERVAL are only counted
    assert relay.sample("konnect_relay_pending_requests") == 0


def test_a_complete_head_is_not_an_early_close(start_relay: StartRelay) -> None:
    relay = start_relay(relay_config())
    with dial(relay.proxy) as sock:
        sock.sendall(b"CONNECT evil.example.com:443 HTTP/1.1\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 403 ")
    relay.wait_event(lambda e: e["event"] == "request")
    assert relay.sample(EARLY, listener="127.0.0.1:0", phase="head") == 0
    assert events(relay, "early_close") == []


def test_a_failed_tls_handshake_is_an_early_close_of_its_listener(
    start_relay: StartRelay, certs: Certs, listener_certs: ListenerCerts
) -> None:
    """A client that rejects the relay's certificate (as Kong does when its
    trust store lacks the relay's CA) ends during the handshake."""
    relay = start_relay(
        relay_config(listen=[tls_listen(listener_certs)], limits={"head_timeout": 1.0})
    )
    ctx = ssl.create_default_context()  # the system store: does not trust the test CA
    with dial(relay.proxy) as raw, pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw, server_hostname="localhost")
    line = relay.wait_event(lambda e: e["event"] == "early_close")
    assert line["phase"] == "tls_handshake"
    assert "TLS handshake failed or not complete within 1 s" in line["detail"]
    relay.wait_sample(EARLY, 1, listener=line["listener"], phase="tls_handshake")
