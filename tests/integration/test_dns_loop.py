"""``resolver.nameservers`` and the loop guard against a real DNS server.

dnsmasq (Debian's dnsmasq-base), started here on loopback, plays the DMZ's
split-horizon DNS: it answers Konnect names with the relay's own address, the
way the records that send data planes to an SNI listener do. The relay must
ask only the servers it is given, honour their TTLs, report NXDOMAIN, refusals
and silence with bounded reasons, and refuse to dial any address it listens on
(reason ``loop``) in whatever form the address comes back.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import connect_reply, connect_via, handshake_error, recv_all, silent_udp
from tests.support.peers import Process, find_binary
from tests.support.relay import (
    CP_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    free_port,
    relay_config,
)

ZONE = "eu.cp0.konghq.com"
LOOP = f"loop.{ZONE}"  # -> 127.0.0.1: the relay itself on its own ports
MAPPED = f"mapped.{ZONE}"  # -> ::ffff:127.0.0.1 (AAAA only): the same, IPv4-mapped
ZERO = f"zero.{ZONE}"  # -> 0.0.0.0: connect() to it reaches this host
OK = f"ok.{ZONE}"  # -> 127.0.0.1, TTL 0: the fake control plane on its port
CACHED = f"cached.{ZONE}"  # -> 127.0.0.1, TTL 300
PARTIAL = "dp-test.eu.tp0.konghq.com"  # A answered, AAAA refused (outside the zone)
MISSING = f"missing.{ZONE}"  # NXDOMAIN
REFUSED = f"other.{ZONE}"  # REFUSED: dnsmasq has no upstream to ask
SENTINEL = f"sentinel.{ZONE}"  # queried by the test to flush dnsmasq's log


class Dnsmasq(Process):
    """dnsmasq in the foreground on 127.0.0.1, UDP and TCP on a free port, with
    no upstream, no /etc/hosts, no config file, and every query logged."""

    ready = re.compile(r"started, version")

    def __init__(self, tmp: Path) -> None:
        super().__init__("dnsmasq")
        self.binary = find_binary("dnsmasq")
        self.port = free_port()
        self.tmp = tmp

    def argv(self) -> list[str]:
        # dnsmasq drops root for "nobody" by default; staying the current user
        # needs no privilege and keeps the pid file writable.
        user = pwd.getpwuid(os.geteuid()).pw_name
        return [
            self.binary,
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--user={user}",
            f"--pid-file={self.tmp / 'dnsmasq.pid'}",
            "--log-facility=-",
            "--log-queries",
            # host-record answers the other family with NODATA, as a real
            # zone does. (--local plus --address answers it with NXDOMAIN,
            # which a resolver rightly caches for every type of the name.)
            f"--host-record={LOOP},127.0.0.1",
            f"--host-record={MAPPED},::ffff:127.0.0.1",
            f"--host-record={ZERO},0.0.0.0",
            f"--host-record={OK},127.0.0.1",
            f"--host-record={CACHED},127.0.0.1,300",
            f"--host-record={SENTINEL},127.0.0.1",
            f"--address=/{PARTIAL}/127.0.0.1",
            f"--address=/{MISSING}/",
        ]

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queries(self, name: str, qtype: str = "A") -> int:
        """How many ``qtype`` queries for ``name`` dnsmasq has answered so far.
        A query of our own for a sentinel name goes last: once its log line is
        read, every earlier line is too."""
        import dns.nameserver
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", self.port)]
        resolver.lifetime = WAIT
        seen = sum(f"query[A] {SENTINEL} " in line for line in self.lines)
        resolver.resolve(SENTINEL, "A")
        while sum(f"query[A] {SENTINEL} " in line for line in self.lines) < seen + 1:
            line = self._queue.get(timeout=WAIT)
            assert line is not None, "dnsmasq exited"
        return sum(f"query[{qtype}] {name} " in line for line in self.lines)


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"))
    server.start()
    yield server
    server.stop()


def dns_config(
    nameservers: list[str], listen: list[dict[str, Any]], ports: list[int], **overrides: Any
) -> dict[str, Any]:
    return relay_config(
        listen=listen,
        konnect={"ports": [443, *ports]},
        resolver={"nameservers": nameservers, "timeout": 2, "static": {}},
        **overrides,
    )


class Relay2:
    """A relay with a CONNECT listener and an SNI listener on known ports."""

    def __init__(self, relay: RelayProcess, connect_port: int, sni_port: int) -> None:
        self.relay = relay
        self.connect_port = connect_port
        self.sni_port = sni_port


@pytest.fixture
def dns_relay(start_relay: StartRelay, dnsmasq: Dnsmasq, fake_cp: FakeControlPlane) -> Relay2:
    connect_port, sni_port = free_port(), free_port()
    listen = [
        {"address": f"127.0.0.1:{connect_port}"},
        {"address": f"127.0.0.1:{sni_port}", "mode": "sni"},
    ]
    cfg = dns_config([dnsmasq.nameserver], listen, [connect_port, sni_port, fake_cp.port])
    return Relay2(start_relay(cfg), connect_port, sni_port)


def refused_reply(relay: RelayProcess, target: str) -> tuple[bytes, dict[str, Any]]:
    reply = connect_reply(relay, target)
    return reply, relay.wait_event(lambda e: e["event"] == "request")


def ask_silent_nameserver(
    start_relay: StartRelay, connect_timeout: float, resolver_timeout: float
) -> tuple[bytes, dict[str, Any]]:
    """A CONNECT to CP_HOST through a relay whose only nameserver never answers."""
    with silent_udp() as port:
        cfg = dns_config(
            [f"127.0.0.1:{port}"],
            [{"address": "127.0.0.1:0"}],
            [],
            limits={"connect_timeout": connect_timeout},
        )
        cfg["resolver"]["timeout"] = resolver_timeout
        return refused_reply(start_relay(cfg), f"{CP_HOST}:443")


# --- lookups go to the configured servers ---------------------------------------------


def test_name_resolved_by_nameserver_reaches_control_plane(
    dns_relay: Relay2, dnsmasq: Dnsmasq, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    """ok.eu.cp0.konghq.com exists only in dnsmasq: reaching the fake control
    plane through it proves the relay asked dnsmasq, and mTLS passes through."""
    relay = dns_relay.relay
    before = dnsmasq.queries(OK)
    target = f"{OK}:{fake_cp.port}"
    sock, head = connect_via(relay, target)
    with sock:
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
        with certs.client_context().wrap_socket(sock, server_hostname=OK) as tls:
            tls.sendall(f"GET /whoami HTTP/1.1\r\nHost: {OK}\r\nConnection: close\r\n\r\n".encode())
            body = recv_all(tls)
    assert certs.client_sha256.encode() in body
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["status"] == 200 and event["upstream"] == f"127.0.0.1:{fake_cp.port}"
    assert dnsmasq.queries(OK) == before + 1


def test_one_family_refused_other_answered(
    dns_relay: Relay2, dnsmasq: Dnsmasq, fake_cp: FakeControlPlane
) -> None:
    """AAAA refused (no upstream for that zone) while A answers: the A record is used."""
    sock, head = connect_via(dns_relay.relay, f"{PARTIAL}:{fake_cp.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert dnsmasq.queries(PARTIAL, "AAAA") >= 1


def test_ttl_respected_by_cache(
    dns_relay: Relay2, dnsmasq: Dnsmasq, fake_cp: FakeControlPlane
) -> None:
    """A 300 s record is asked for once; a TTL-0 record on every tunnel."""
    relay = dns_relay.relay
    before = {name: dnsmasq.queries(name) for name in (CACHED, OK)}
    for name in (CACHED, CACHED, OK, OK):
        sock, head = connect_via(relay, f"{name}:{fake_cp.port}")
        sock.close()
        assert head.startswith(b"HTTP/1.1 200 "), head
    assert dnsmasq.queries(CACHED) - before[CACHED] == 1
    assert dnsmasq.queries(OK) - before[OK] == 2


@pytest.mark.parametrize(
    ("name", "detail"),
    [(MISSING, b"no such name"), (REFUSED, b"REFUSED")],
    ids=["nxdomain", "refused"],
)
def test_lookup_failure_502(dns_relay: Relay2, name: str, detail: bytes) -> None:
    reply, event = refused_reply(dns_relay.relay, f"{name}:443")
    assert reply.startswith(b"HTTP/1.1 502 "), reply
    assert detail in reply, reply
    assert event["reason"] == "dns_failure"


def test_nameserver_silent_504(start_relay: StartRelay, tmp_path: Path) -> None:
    """A nameserver that never answers (a bound UDP port nobody reads) ends in
    504 dns_timeout after resolver.timeout, well before connect_timeout."""
    reply, event = ask_silent_nameserver(start_relay, connect_timeout=4, resolver_timeout=0.3)
    assert reply.startswith(b"HTTP/1.1 504 "), reply
    assert event["reason"] == "dns_timeout" and event["dial_ms"] < 2000


def test_nameserver_stopped(start_relay: StartRelay, tmp_path: Path) -> None:
    """dnsmasq answers, then stops: lookups time out (the port is closed; the
    ICMP errors are not an answer) and the relay says so."""
    server = Dnsmasq(tmp_path)
    server.start()
    try:
        cfg = dns_config([server.nameserver], [{"address": "127.0.0.1:0"}], [])
        cfg["resolver"]["timeout"] = 0.3
        relay = start_relay(cfg)
        reply, event = refused_reply(relay, f"{MISSING}:443")
        assert reply.startswith(b"HTTP/1.1 502 ") and event["reason"] == "dns_failure"
    finally:
        server.stop()
    reply, event = refused_reply(relay, f"{LOOP}:443")
    assert reply.startswith(b"HTTP/1.1 504 "), reply
    assert event["reason"] == "dns_timeout"


def test_silent_nameserver_with_default_timeouts_is_dns_timeout(
    start_relay: StartRelay,
) -> None:
    # Equal timeouts, as the defaults are.
    reply, event = ask_silent_nameserver(start_relay, connect_timeout=0.5, resolver_timeout=0.5)
    assert event["reason"] == "dns_timeout", (event, reply[:80])


# --- the loop guard -------------------------------------------------------------------


def test_connect_loop_refused(dns_relay: Relay2) -> None:
    relay = dns_relay.relay
    reply, event = refused_reply(relay, f"{LOOP}:{dns_relay.connect_port}")
    assert reply.startswith(b"HTTP/1.1 403 "), reply
    assert b"an address this relay listens on" in reply
    assert event["reason"] == "loop" and event["target"] == f"{LOOP}:{dns_relay.connect_port}"
    samples = relay.metrics()
    assert samples['konnect_relay_requests_denied_total{reason="loop"}'] == 1
    # Nothing dialled: the relay saw exactly one client, this test.
    assert sum(v for k, v in samples.items() if "tunnels_opened_total" in k) == 0


def test_connect_to_other_own_listener_refused(dns_relay: Relay2) -> None:
    """A CONNECT listener's client asking for the SNI listener's port is a loop too."""
    reply, event = refused_reply(dns_relay.relay, f"{LOOP}:{dns_relay.sni_port}")
    assert reply.startswith(b"HTTP/1.1 403 ") and event["reason"] == "loop"


def test_sni_loop_refused(dns_relay: Relay2) -> None:
    """The DMZ's mistake: split-horizon records reach the relay's own lookups.
    The SNI listener refuses instead of dialling itself."""
    error = str(handshake_error(("127.0.0.1", dns_relay.sni_port), LOOP))
    assert "ACCESS_DENIED" in error, error
    relay = dns_relay.relay
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["reason"] == "loop" and event["target"] == f"{LOOP}:{dns_relay.sni_port}"
    assert relay.metrics()['konnect_relay_requests_denied_total{reason="loop"}'] == 1


def test_loop_port_mismatch_is_not_a_loop(dns_relay: Relay2, fake_cp: FakeControlPlane) -> None:
    """Same address, another port: not a loop (the fake control plane answers)."""
    sock, head = connect_via(dns_relay.relay, f"{LOOP}:{fake_cp.port}")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200 "), head


@pytest.mark.parametrize("name", [MAPPED, ZERO], ids=["v4-mapped", "unspecified"])
@pytest.mark.parametrize("mode", ["connect", "sni"])
def test_loop_in_other_address_forms(
    start_relay: StartRelay, dnsmasq: Dnsmasq, name: str, mode: str
) -> None:
    """::ffff:127.0.0.1 and 0.0.0.0 reach a listener on 127.0.0.1 just as well.
    max_tunnels bounds the chain of self-dials an SNI listener would otherwise
    build (each hop reads the same hello and dials again)."""
    connect_port, sni_port = free_port(), free_port()
    listen = [
        {"address": f"127.0.0.1:{connect_port}"},
        {"address": f"127.0.0.1:{sni_port}", "mode": "sni"},
    ]
    cfg = dns_config(
        [dnsmasq.nameserver], listen, [connect_port, sni_port], limits={"max_tunnels": 4}
    )
    relay = start_relay(cfg)
    if mode == "connect":
        reply, event = refused_reply(relay, f"{name}:{connect_port}")
        assert reply.startswith(b"HTTP/1.1 403 "), reply
    else:
        error = str(handshake_error(("127.0.0.1", sni_port), name))
        assert "ACCESS_DENIED" in error, error
        event = relay.wait_event(lambda e: e["event"] == "request" and e["reason"] == "loop")
    assert event["reason"] == "loop"
    samples = relay.metrics()
    assert sum(v for k, v in samples.items() if "tunnels_opened_total" in k) == 0
