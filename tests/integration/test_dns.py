"""DNS failure and DNS timeout end to end through the relay subprocess, without
a packet leaving the machine.

The relay runs in a private mount namespace whose /etc/resolv.conf names a
loopback address, so the system resolver (glibc, through the event loop's
getaddrinfo) asks only a server the test controls: nothing at all (failure:
the query is refused with ICMP port unreachable) or a UDP socket that never
answers (timeout). ``resolver.static`` maps the Konnect name to another name,
so the relay must resolve it.

The nameserver is a random address in 127.0.0.0/8 rather than 127.0.0.1, so
two test runs on one machine (or a local DNS cache on 127.0.0.1:53) cannot
answer each other's queries.
"""

from __future__ import annotations

import ipaddress
import random
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import connect_reply
from tests.support.relay import CP_HOST, WAIT, RelayProcess, StartRelay, relay_config

UPSTREAM_NAME = "upstream.test"  # RFC 6761: never delegated, not in /etc/hosts
DNS_PORT = 53
DNS_TIMEOUT = 2  # resolv.conf "options timeout:", seconds
CONNECT_TIMEOUT = 0.5  # the relay's limits.connect_timeout in the timeout test


def in_namespace(resolv_conf: Path) -> list[str]:
    """A command prefix: run the command in a private mount namespace whose
    /etc/resolv.conf is ``resolv_conf`` (the shell execs it: the pid stays its own)."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"',
        "sh",
        str(resolv_conf),
    ]


def namespace_works(resolv_conf: Path) -> str | None:
    """None if a private mount namespace can show ``resolv_conf`` as
    /etc/resolv.conf here; otherwise why not."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare or mount is not installed"
    probe = subprocess.run(
        [*in_namespace(resolv_conf), "cat", "/etc/resolv.conf"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    if probe.returncode != 0 or probe.stdout != resolv_conf.read_text():
        return f"cannot bind-mount /etc/resolv.conf in a mount namespace: {probe.stderr.strip()}"
    return None


@pytest.fixture
def nameserver() -> str:
    """A loopback address where nothing is bound on port 53 (UDP or TCP)."""
    rng = random.Random()
    for _ in range(8):
        address = str(ipaddress.IPv4Address("127.0.0.0") + rng.randrange(2, 2**24 - 1))
        free = True
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind((address, DNS_PORT))
                except OSError:
                    free = False
        if free:
            return address
    pytest.skip(f"port {DNS_PORT} is taken on every loopback address tried")


@pytest.fixture
def namespaced_relay(
    tmp_path: Path, nameserver: str, start_relay: StartRelay
) -> Callable[[dict[str, Any]], RelayProcess]:
    """Start relays whose system resolver asks only ``nameserver``."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(f"nameserver {nameserver}\noptions timeout:{DNS_TIMEOUT} attempts:1\n")
    reason = namespace_works(resolv_conf)
    if reason is not None:
        pytest.skip(reason)
    return lambda config: start_relay(config, prefix=in_namespace(resolv_conf))


def connect_and_read(relay: RelayProcess, target: str) -> tuple[bytes, float]:
    """Send a CONNECT, read the whole answer (the relay closes after an error)."""
    started = time.monotonic()
    reply = connect_reply(relay, target)
    return reply, time.monotonic() - started


def test_dns_failure_is_502(
    namespaced_relay: Callable[[dict[str, Any]], RelayProcess], nameserver: str
) -> None:
    relay = namespaced_relay(relay_config(resolver={"static": {CP_HOST: f"{UPSTREAM_NAME}:443"}}))
    reply, elapsed = connect_and_read(relay, f"{CP_HOST}:443")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), reply
    assert body.startswith(f"502 DNS lookup of {UPSTREAM_NAME} failed".encode()), body
    # EAI_AGAIN: the query was refused (ICMP port unreachable from the loopback
    # nameserver); an answer from a real server would have been NXDOMAIN.
    assert b"Temporary failure in name resolution" in body, body
    assert elapsed < DNS_TIMEOUT, "a refused query must fail at once, not time out"
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 502
    assert event["reason"] == "dns_failure"
    assert event["target"] == f"{CP_HOST}:443"
    assert event["allowed"] is False
    failures = 'konnect_relay_upstream_connect_failures_total{egress="direct",reason="%s"}'
    assert relay.metrics()[failures % "dns_failure"] == 1


def test_dns_timeout_is_504(
    namespaced_relay: Callable[[dict[str, Any]], RelayProcess], nameserver: str
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        try:
            silent.bind((nameserver, DNS_PORT))
        except OSError as exc:
            pytest.skip(f"cannot bind {nameserver}:{DNS_PORT}/udp: {exc}")
        relay = namespaced_relay(
            relay_config(
                resolver={"static": {CP_HOST: f"{UPSTREAM_NAME}:443"}},
                limits={"connect_timeout": CONNECT_TIMEOUT, "drain_timeout": 0.5},
            )
        )
        reply, elapsed = connect_and_read(relay, f"{CP_HOST}:443")
        # The query reached the test's silent server, and nothing else.
        readable, _, _ = select.select([silent], [], [], WAIT)
        assert readable, "the relay's resolver never asked the test nameserver"
        query, _ = silent.recvfrom(4096)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504 "), reply
    assert b"timed out" in body, body
    assert UPSTREAM_NAME.split(".")[0].encode() in query  # the name, in DNS label form
    # The relay's own connect_timeout fired, not the resolver's 2 s.
    assert CONNECT_TIMEOUT <= elapsed < DNS_TIMEOUT, elapsed
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 504
    assert event["reason"] == "timeout"
    assert event["dial_ms"] >= CONNECT_TIMEOUT * 1000
    failures = 'konnect_relay_upstream_connect_failures_total{egress="direct",reason="%s"}'
    assert relay.metrics()[failures % "timeout"] == 1
