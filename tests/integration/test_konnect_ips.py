"""resolver.konnect_ips end to end: a local HTTPS server (trustme) serves Kong's
ingress address document; the relay fetches it through its egress (direct,
squid, sshd), pins Konnect names to it in both modes, keeps the old list on
every bad document, survives a restart offline from its cache file, and with
workers fetches once for all of them. Plus the presets command."""

from __future__ import annotations

import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.konnect import TABLE
from tests.support.helpers import (
    MemoryTLS,
    connect_reply,
    echo,
    echoes,
    open_tunnel,
    relay_cli,
    tcp_peer,
    whoami_over,
    write_config,
)
from tests.support.peers import Squid, Sshd
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    relay_config,
    wait_until,
)

IPS_HOST = "ip-addresses.origin.konghq.com"
CP_TARGET = f"{CP_HOST}:443"
# 127.0.0.1 (where the fake control plane listens) is inside the first list
# and outside the second.
PINNED = {"ingressIPs": {"eu": ["127.0.0.1/32", "192.0.2.0/24"], "us": ["198.51.100.0/24"]}}
UNPINNED = {"ingressIPs": {"eu": ["192.0.2.0/24"], "us": ["198.51.100.0/24"]}}


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    chunked: bool = False
    trickle: float = 0.0  # seconds between single bytes of the body
    length: int | None = None  # Content-Length to announce (default: the body's)


@dataclass
class DocServer:
    """HTTPS on 127.0.0.1 serving ``routes``; counts the requests per path."""

    port: int = 0
    routes: dict[str, Reply] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    httpd: ThreadingHTTPServer | None = None

    def serve(self, path: str, doc: Any) -> str:
        self.routes[path] = Reply(body=json.dumps(doc).encode())
        return self.url(path)

    def url(self, path: str) -> str:
        return f"https://{IPS_HOST}{path}"


def start_doc_server(cert: trustme.LeafCert) -> DocServer:
    state = DocServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            reply = state.routes.get(self.path, Reply(status=404, body=b"not found\n"))
            try:
                self.send_response(reply.status)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    length = reply.length if reply.length is not None else len(reply.body)
                    self.send_header("Content-Length", str(length))
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if reply.trickle:
                    deadline = time.monotonic() + WAIT
                    for i in range(len(reply.body)):
                        if time.monotonic() > deadline:
                            return
                        self.wfile.write(reply.body[i : i + 1])
                        self.wfile.flush()
                        time.sleep(reply.trickle)  # the slow peer under test
                elif reply.chunked:
                    step = 64 * 1024
                    for i in range(0, len(reply.body), step):
                        part = reply.body[i : i + step]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # the relay hung up on a body it refused

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.port = httpd.server_address[1]
    state.httpd = httpd
    return state


@pytest.fixture(scope="module")
def docs(certs: Certs) -> Iterator[DocServer]:
    server = start_doc_server(certs.ca.issue_cert(IPS_HOST))
    yield server
    assert server.httpd is not None
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture(scope="module")
def wrong_name_docs(certs: Certs) -> Iterator[DocServer]:
    server = start_doc_server(certs.ca.issue_cert("someone-else.example.test"))
    yield server
    assert server.httpd is not None
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def path(request: pytest.FixtureRequest) -> str:
    """A path of its own per test, so hit counts and routes never mix."""
    return f"/{request.node.name}/ip-addresses.json".replace("[", "-").replace("]", "")


def ips_config(
    docs: DocServer,
    certs: Certs,
    cp: FakeControlPlane,
    url: str,
    raw_port: int | None = None,
    **konnect_ips: Any,
) -> dict[str, Any]:
    static = {CP_HOST: f"127.0.0.1:{cp.port}", IPS_HOST: f"127.0.0.1:{docs.port}"}
    if raw_port is not None:
        static[RAW_HOST] = f"127.0.0.1:{raw_port}"
    return relay_config(
        konnect={"regions": ["eu", "us"]},
        resolver={
            "static": static,
            "konnect_ips": {
                "enabled": True,
                "url": url,
                "ca_file": str(certs.ca_file),
                "refresh": "6h",
                **konnect_ips,
            },
        },
    )


def updated(relay: RelayProcess, **match: Any) -> dict[str, Any]:
    return relay.wait_event(
        lambda e: (
            e["event"] == "konnect_ips_updated" and all(e.get(k) == v for k, v in match.items())
        )
    )


def failed(relay: RelayProcess) -> dict[str, Any]:
    return relay.wait_event(lambda e: e["event"] == "konnect_ips_refresh_failed")


def reconfigure(relay: RelayProcess, cfg: dict[str, Any], **konnect_ips: Any) -> None:
    cfg["resolver"]["konnect_ips"].update(konnect_ips)
    relay.rewrite(cfg)
    relay.sighup()
    relay.wait_event(lambda e: e["event"] == "reloaded")


def whoami(relay: RelayProcess, certs: Certs) -> str:
    return whoami_over(open_tunnel(relay, CP_TARGET), certs)


# === pinning =================================================================================


def test_pins_konnect_names_and_a_refresh_spares_live_tunnels(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    with tcp_peer(echo) as (raw_port, _):
        cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED), raw_port)
        relay = start_relay(cfg)
        event = updated(relay, source=docs.url(path))
        assert event["prefixes"] == 3
        assert event["regions"] == {"eu": 2, "us": 1}
        assert event["added"] == ["127.0.0.1/32", "192.0.2.0/24", "198.51.100.0/24"]
        m = relay.metrics()
        assert m["konnect_relay_konnect_ips_prefixes{}"] == 3
        assert m['konnect_relay_konnect_ips_refreshes_total{result="ok"}'] == 1
        assert 0 <= m["konnect_relay_konnect_ips_age_seconds{}"] < 60
        assert whoami(relay, certs) == certs.client_sha256

        # A tunnel that is up (handshake done) when the list shrinks.
        live = open_tunnel(relay, CP_TARGET)
        tls = MemoryTLS(certs.client_context(), CP_HOST)
        live.sendall(tls.hello())
        tls.finish_handshake(live)

        # A changed url takes effect on SIGHUP: fetched at once.
        reconfigure(relay, cfg, url=docs.serve(f"{path}.2", UNPINNED))
        event = updated(relay, source=docs.url(f"{path}.2"))
        assert event["removed"] == ["127.0.0.1/32"]
        assert event["added"] == []

        with live:
            assert certs.client_sha256.encode() in tls.whoami(live)  # still up
        reply = connect_reply(relay, CP_TARGET)
        assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n"), reply
        assert b"outside Konnect's published ingress prefixes" in reply
        refusal = relay.wait_event(lambda e: e["event"] == "request" and e["status"] == 403)
        assert refusal["reason"] == "address_not_pinned"
        assert relay.sample("konnect_relay_requests_denied_total", reason="address_not_pinned") == 1
        # Names outside the Konnect table are not pinned by Kong's list.
        with open_tunnel(relay, f"{RAW_HOST}:443") as sock:
            assert echoes(sock)
        assert relay.sample("konnect_relay_konnect_ips_prefixes") == 2
        assert (docs.hits[path], docs.hits[f"{path}.2"]) == (1, 1)


def test_report_mode_lets_unpinned_addresses_through_marked_then_enforce(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, UNPINNED), mode="report")
    relay = start_relay(cfg)
    updated(relay)
    assert whoami(relay, certs) == certs.client_sha256
    event = relay.wait_event(lambda e: e["event"] == "request" and e["status"] == 200)
    assert event["would_deny"] is True
    assert event["would_deny_reason"] == "address_not_pinned"
    assert "outside Konnect's published ingress prefixes" in event["would_deny_detail"]
    assert relay.sample("konnect_relay_requests_would_deny_total", reason="address_not_pinned") == 1
    # mode changes on SIGHUP, no restart, no new fetch
    reconfigure(relay, cfg, mode="enforce")
    reply = connect_reply(relay, CP_TARGET)
    assert reply.startswith(b"HTTP/1.1 403 "), reply
    assert docs.hits[path] == 1


def test_allowed_cidrs_add_to_the_published_prefixes(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, UNPINNED))
    cfg["resolver"]["allowed_cidrs"] = ["127.0.0.0/8"]
    relay = start_relay(cfg)
    updated(relay)
    assert whoami(relay, certs) == certs.client_sha256


# === bad documents ===========================================================================

TEN_MIB = b'{"ingressIPs": {"eu": ["' + b"1" * (10 * 1024 * 1024) + b'"]}}'
BAD: dict[str, tuple[Reply, str, str]] = {
    # id: (reply, log reason, a piece of the detail)
    "not-json": (Reply(body=b"<html>maintenance</html>"), "invalid", "not JSON"),
    "no-ingress": (Reply(body=b'{"egressIPs": {}}'), "invalid", "no ingressIPs"),
    "region-missing": (
        Reply(body=json.dumps({"ingressIPs": {"us": ["198.51.100.0/24"]}}).encode()),
        "invalid",
        'no entry for configured region "eu"',
    ),
    "not-an-address": (
        Reply(body=json.dumps({"ingressIPs": {"eu": ["eu.konghq.com"], "us": []}}).encode()),
        "invalid",
        "is not an IP address or prefix",
    ),
    "slash-0": (
        Reply(body=json.dumps({"ingressIPs": {"eu": ["0.0.0.0/0"], "us": ["::/0"]}}).encode()),
        "invalid",
        "shorter than /8",
    ),
    "slash-4": (
        Reply(
            body=json.dumps({"ingressIPs": {"eu": ["16.0.0.0/4"], "us": ["1.0.0.0/8"]}}).encode()
        ),
        "invalid",
        "shorter than /8",
    ),
    "10MiB": (Reply(body=TEN_MIB), "too_large", f"Content-Length {len(TEN_MIB)} is over 1048576"),
    "10MiB-chunked": (Reply(body=TEN_MIB, chunked=True), "too_large", "body is over 1048576"),
    "trickle": (Reply(body=json.dumps(PINNED).encode(), trickle=0.2), "timeout", "not fetched"),
    "404": (Reply(status=404, body=b"gone"), "http_status", "HTTP 404"),
    "500": (Reply(status=500, body=b"oops"), "http_status", "HTTP 500"),
}


@pytest.mark.parametrize("bad", [*BAD, "wrong-name", "untrusted-ca"])
def test_a_bad_document_keeps_the_old_list(
    start_relay: StartRelay,
    docs: DocServer,
    wrong_name_docs: DocServer,
    certs: Certs,
    fake_cp: FakeControlPlane,
    path: str,
    bad: str,
    tmp_path: Path,
) -> None:
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED), timeout=2)
    relay = start_relay(cfg)
    updated(relay)
    change: dict[str, Any] = {"url": docs.url(f"{path}.bad")}
    if bad in BAD:
        reply, reason, detail = BAD[bad]
        docs.routes[f"{path}.bad"] = reply
    elif bad == "wrong-name":
        wrong_name_docs.serve(f"{path}.bad", PINNED)
        cfg["resolver"]["static"][IPS_HOST] = f"127.0.0.1:{wrong_name_docs.port}"
        reason, detail = "tls", "certificate verify failed: Hostname mismatch"
    else:
        docs.serve(f"{path}.bad", PINNED)
        stranger = tmp_path / "stranger-ca.pem"
        stranger.write_bytes(trustme.CA().cert_pem.bytes())
        change["ca_file"] = str(stranger)
        reason, detail = "tls", "certificate verify failed: unable to get local issuer"
    reconfigure(relay, cfg, **change)
    event = failed(relay)
    assert event["reason"] == reason, event
    assert detail in event["detail"], event
    assert event["keeping"] == 3
    if reason == "invalid":
        assert event["path"].startswith("$"), event
    m = relay.metrics()
    assert m['konnect_relay_konnect_ips_refreshes_total{result="error"}'] >= 1
    assert m['konnect_relay_konnect_ips_refreshes_total{result="ok"}'] == 1
    assert m["konnect_relay_konnect_ips_prefixes{}"] == 3
    # the old list still pins: 127.0.0.1 is inside it
    assert whoami(relay, certs) == certs.client_sha256
    assert not any(e["event"] == "konnect_ips_updated" for e in relay.drain())


def test_no_list_refuses_konnect_dials_until_a_fetch_succeeds(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    docs.routes[path] = Reply(status=503, body=b"later")
    relay = start_relay(ips_config(docs, certs, fake_cp, docs.url(path)))
    assert failed(relay)["reason"] == "http_status"
    reply = connect_reply(relay, CP_TARGET)
    assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply
    assert b"has not been fetched yet" in reply
    assert relay.metrics()["konnect_relay_konnect_ips_age_seconds{}"] == float("inf")
    refusal = relay.wait_event(lambda e: e["event"] == "request" and e["status"] == 503)
    assert refusal["reason"] == "konnect_ips_unavailable"
    docs.serve(path, PINNED)  # retried with backoff (about 1 s, then 2 s), not after 6 h
    updated(relay)
    assert whoami(relay, certs) == certs.client_sha256


def test_restart_offline_keeps_pinning_from_the_cache_file(
    start_relay: StartRelay,
    docs: DocServer,
    certs: Certs,
    fake_cp: FakeControlPlane,
    path: str,
    tmp_path: Path,
) -> None:
    cache = tmp_path / "konnect-ips.json"
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED), cache_file=str(cache))
    first = start_relay(cfg)
    updated(first)
    assert json.loads(cache.read_bytes()) == PINNED
    first.stop()
    docs.routes[path] = Reply(status=500, body=b"offline")  # the way out is gone
    again = start_relay(cfg)
    assert updated(again)["source"] == f"cache_file {cache}"
    assert failed(again)["reason"] == "http_status"
    assert whoami(again, certs) == certs.client_sha256
    m = again.metrics()
    assert m["konnect_relay_konnect_ips_prefixes{}"] == 3
    assert 0 <= m["konnect_relay_konnect_ips_age_seconds{}"] < 600
    assert json.loads(cache.read_bytes()) == PINNED  # a failed fetch leaves the cache alone


def test_cache_file_only_mode_rereads_on_sigusr1(
    start_relay: StartRelay,
    docs: DocServer,
    certs: Certs,
    fake_cp: FakeControlPlane,
    tmp_path: Path,
) -> None:
    cache = tmp_path / "list.json"
    cache.write_text(json.dumps(UNPINNED))
    cfg = ips_config(docs, certs, fake_cp, docs.url("/never"), cache_file=str(cache), fetch=False)
    relay = start_relay(cfg)
    updated(relay, source=f"cache_file {cache}")
    assert connect_reply(relay, CP_TARGET).startswith(b"HTTP/1.1 403 ")
    cache.write_text(json.dumps(PINNED))
    relay.proc.send_signal(signal.SIGUSR1)
    assert updated(relay)["added"] == ["127.0.0.1/32"]
    assert whoami(relay, certs) == certs.client_sha256
    assert "/never" not in docs.hits


# === through the egress ======================================================================


def test_fetched_through_a_parent_proxy(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    squid = Squid()
    try:
        squid.start()
        cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED))
        cfg["egress"] = {"mode": "http_proxy", "http_proxy": {"url": squid.url()}}
        relay = start_relay(cfg)
        updated(relay)
        note = relay.wait_event(lambda e: e["event"] == "konnect_ips_not_applied")
        assert note["egress"] == "http_proxy"
        wait_until(lambda: f"CONNECT 127.0.0.1:{docs.port}" in squid.access_log(), what="squid log")
        assert docs.hits[path] == 1
    finally:
        squid.cleanup()


def test_fetched_through_an_ssh_bastion_and_pinned_there(
    start_relay: StartRelay,
    docs: DocServer,
    certs: Certs,
    fake_cp: FakeControlPlane,
    path: str,
    tmp_path: Path,
) -> None:
    bastion = Sshd(tmp_path)
    try:
        bastion.start()
        cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED))
        cfg["egress"] = {"mode": "ssh", "ssh": bastion.egress(resolve="local")}
        relay = start_relay(cfg)
        updated(relay)
        assert whoami(relay, certs) == certs.client_sha256
        reconfigure(relay, cfg, url=docs.serve(f"{path}.2", UNPINNED))
        updated(relay, source=docs.url(f"{path}.2"))
        assert connect_reply(relay, CP_TARGET).startswith(b"HTTP/1.1 403 ")
        assert not any(e["event"] == "konnect_ips_not_applied" for e in relay.drain())
    finally:
        bastion.stop()


# === workers =================================================================================


def test_workers_share_one_fetch(
    start_relay: StartRelay, docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str
) -> None:
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, PINNED))
    cfg["workers"] = 2
    relay = start_relay(cfg)
    updated(relay, source=docs.url(path))  # the supervisor's line (no "worker")
    for _ in range(6):
        assert whoami(relay, certs) == certs.client_sha256
    assert docs.hits[path] == 1
    assert relay.sample("konnect_relay_konnect_ips_prefixes") == 3

    reconfigure(relay, cfg, url=docs.serve(f"{path}.2", UNPINNED))
    for worker in (0, 1):
        relay.wait_event(
            lambda e, w=worker: (
                e["event"] == "konnect_ips_updated"
                and e.get("worker") == w
                and e.get("removed") == ["127.0.0.1/32"]
            )
        )
    for _ in range(6):
        assert connect_reply(relay, CP_TARGET).startswith(b"HTTP/1.1 403 ")
    assert docs.hits[f"{path}.2"] == 1
    assert relay.sample("konnect_relay_konnect_ips_prefixes") == 2


# === commands ================================================================================


def test_doctor_shows_the_list_and_each_address(
    docs: DocServer, certs: Certs, fake_cp: FakeControlPlane, path: str, tmp_path: Path
) -> None:
    cfg = ips_config(docs, certs, fake_cp, docs.serve(path, UNPINNED))
    config_file = write_config(tmp_path, cfg)
    proc = relay_cli(
        "doctor", "--config", str(config_file), "--cafile", str(certs.ca_file), CP_HOST
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"konnect_ips: 2 prefixes (eu 1, us 1) from {docs.url(path)}" in proc.stdout
    assert "mode enforce" in proc.stdout
    assert "address outside konnect_ips" in proc.stdout
    assert "127.0.0.1:" in proc.stdout and "(outside konnect_ips)" in proc.stdout

    docs.serve(path, PINNED)
    proc = relay_cli(
        "doctor", "--config", str(config_file), "--cafile", str(certs.ca_file), CP_HOST
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "konnect_ips: 3 prefixes" in proc.stdout
    assert "(outside konnect_ips)" not in proc.stdout


def test_presets_json_round_trips_the_table(tmp_path: Path) -> None:
    proc = relay_cli("presets", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rows = {(p["pattern"], p["product"], p["purpose"], p["legacy"]) for p in out["presets"]}
    assert rows == {(r.pattern, r.product, r.purpose, r.legacy) for r in TABLE}
    assert all(p["ports"] == [443] for p in out["presets"])
    assert {p["region"] for p in out["presets"] if "{region}" in p["pattern"]} == {
        "au",
        "eu",
        "me",
        "in",
        "sg",
        "us",
    }

    narrow = write_config(
        tmp_path,
        {"konnect": {"products": ["event-gateway"], "regions": ["us"]}, "deny": ["x.konghq.com"]},
    )
    proc = relay_cli("presets", "--config", str(narrow), "--format", "json")
    out = json.loads(proc.stdout)
    assert [p["rule"] for p in out["presets"]] == [
        "konnect:cloud.konghq.com",
        "konnect:global.api.konghq.com",
        "konnect:us.control-plane.konghq.com",
        "konnect:us.telemetry.konghq.com",
    ]
    assert out["deny"] == ["x.konghq.com:443"]
    text = relay_cli("presets", "--config", str(narrow)).stdout
    assert "konnect:us.telemetry.konghq.com" in text and "event-gateway" in text
    assert "deny:x.konghq.com:443" in text


@pytest.mark.parametrize(
    ("host", "rule"),
    [
        ("us.control-plane.konghq.com", "konnect:us.control-plane.konghq.com"),
        ("us.telemetry.konghq.com", "konnect:us.telemetry.konghq.com"),
        ("us.identity.konghq.com", "konnect:us.identity.konghq.com"),
        ("as1.us.identity.konghq.com", "konnect:{id}.us.identity.konghq.com"),
        ("us.kic.api.konghq.com", "konnect:us.kic.api.konghq.com"),
    ],
)
def test_policy_command_allows_the_current_hostnames(host: str, rule: str, tmp_path: Path) -> None:
    proc = relay_cli("policy", f"{host}:443")
    assert proc.returncode == 0, proc.stdout
    assert f"rule:   {rule}" in proc.stdout
    off = write_config(tmp_path, {"konnect": {"products": ["mesh"]}})
    proc = relay_cli("policy", f"{host}:443", "--config", str(off))
    assert proc.returncode == 1, proc.stdout
    assert "is not in konnect.products" in proc.stdout
