"""``konnect-relay doctor`` run as a subprocess against the fake control plane
(real sockets, real TLS, names mapped through ``resolver.static``), plus the
pure parts: the host list, target parsing, the table and the progress line."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509

from relay import config, doctor
from relay.egress import Dialer, Dialled
from relay.egress.direct import DirectDialer
from relay.resolver import resolver_for
from tests.support.helpers import parse_table, relay_cli, silent_udp, write_config
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    TP_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    LoopThread,
    free_port,
    merge_config,
    relay_config,
)

KONNECT = {"regions": ["eu"], "control_planes": ["dp-test"]}
EXPIRY = re.compile(r"^(\d{4}-\d{2}-\d{2}) \((\d+) d\)$")


# --- running the command --------------------------------------------------------


@dataclass
class Run:
    rc: int
    out: str
    err: str
    rows: dict[str, dict[str, str]] = field(default_factory=dict)


def run_doctor(tmp_path: Path, cfg: dict[str, Any], *args: str) -> Run:
    proc = relay_cli("doctor", "--config", str(write_config(tmp_path, cfg)), *args)
    rows = parse_table(proc.stdout) if proc.stdout.startswith("HOST") else {}
    return Run(proc.returncode, proc.stdout, proc.stderr, rows)


def doctor_config(static: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """The test config with Konnect scoped to eu/dp-test and ``static`` mapped;
    mapping overrides are merged one level deep, like relay_config does."""
    return merge_config(relay_config(konnect=KONNECT, resolver={"static": static}), **overrides)


def cert_expiry(certs: Certs) -> str:
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    return f"{cert.not_valid_after_utc:%Y-%m-%d}"


# --- peers that misbehave --------------------------------------------------------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts TCP (the kernel completes the handshake) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=4) as sock:
        yield sock.getsockname()[1]


class _AnswersHTTP(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.close()


@pytest.fixture
def http_port(loop_thread: LoopThread) -> Iterator[int]:
    """Answers a ClientHello with an HTTP error, like a plain HTTP port would."""

    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_AnswersHTTP, "127.0.0.1", 0)

    server = loop_thread.run(start())
    yield server.sockets[0].getsockname()[1]
    server.close()


class _NXDomain(asyncio.DatagramProtocol):
    """Answers every DNS query "no such name" (RFC 1035 §4.1.1: QR=1, RD, RA, RCODE=3)."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        end = 12  # the question: labels up to the root, then QTYPE and QCLASS
        while data[end]:
            end += 1 + data[end]
        question = data[12 : end + 5]
        self.transport.sendto(data[:2] + b"\x81\x83\x00\x01" + bytes(6) + question, addr)


@pytest.fixture
def nxdomain_ns(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> asyncio.DatagramTransport:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            _NXDomain, local_addr=("127.0.0.1", 0)
        )
        return transport

    transport = loop_thread.run(start())
    yield transport.get_extra_info("sockname")[1]
    loop_thread.loop.call_soon_threadsafe(transport.close)


@pytest.fixture
def silent_ns() -> Iterator[int]:
    """A DNS server that never answers."""
    with silent_udp() as port:
        yield port


@dataclass
class Sink:
    """What a TLS server saw from the doctor after the handshake."""

    port: int
    thread: threading.Thread
    handshake: bool = False
    data: bytes = b""
    close_notify: bool | None = None


@pytest.fixture
def tls_sink(certs: Certs) -> Iterator[Sink]:
    """One TLS connection (no client certificate asked): after the handshake,
    read until the peer is done. ``suppress_ragged_eofs=False`` tells a
    close_notify (recv returns b"") from a bare TCP close (SSLEOFError)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(WAIT)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(WAIT)
        with ctx.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
            sink.handshake = True
            try:
                while chunk := tls.recv(4096):
                    sink.data += chunk
                sink.close_notify = True
            except ssl.SSLEOFError:
                sink.close_notify = False

    sink = Sink(listener.getsockname()[1], threading.Thread(target=serve, daemon=True))
    sink.thread.start()
    yield sink
    sink.thread.join(WAIT)
    listener.close()


# --- the command against the fake control plane ------------------------------------


def test_configured_hosts_are_listed_and_checked(
    tmp_path: Path, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    cp = f"127.0.0.1:{fake_cp.port}"
    closed = f"127.0.0.1:{free_port()}"
    static = {
        CP_HOST: cp,
        TP_HOST: cp,
        "cloud.konghq.com": cp,  # the fake CP's certificate does not name it
        "eu.api.konghq.com": closed,
        "global.api.konghq.com": closed,
    }
    run = run_doctor(tmp_path, doctor_config(static), "--cafile", str(certs.ca_file))
    assert run.rc == 1, run.out + run.err
    assert run.out.splitlines()[0].split() == [
        "HOST",
        "ADDRESSES",
        "CONNECT",
        "TLS",
        "CERT",
        "EXPIRES",
        "VERDICT",
    ]
    assert list(run.rows) == [
        CP_HOST,
        TP_HOST,
        "eu.api.konghq.com",
        "cloud.konghq.com",
        "global.api.konghq.com",
    ]
    for host in (CP_HOST, TP_HOST):
        row = run.rows[host]
        assert row["VERDICT"] == "ok"
        assert row["ADDRESSES"] == cp
        assert row["TLS"] == "TLSv1.3"
        assert re.fullmatch(r"\d+\.\d ms", row["CONNECT"])
        match = EXPIRY.match(row["CERT EXPIRES"])
        assert match is not None and match[1] == cert_expiry(certs)
    assert run.rows["cloud.konghq.com"]["VERDICT"] == "hostname mismatch"
    for host in ("eu.api.konghq.com", "global.api.konghq.com"):
        assert run.rows[host]["VERDICT"] == "connection refused"
        assert run.rows[host]["TLS"] == "-"
    assert "2 of 5 ok through egress direct" in run.out
    assert "checking 5/5 ..." in run.err
    assert "note:" not in run.out


def test_named_hosts_all_ok_exit_zero(
    tmp_path: Path, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    cp = f"127.0.0.1:{fake_cp.port}"
    cfg = doctor_config({CP_HOST: cp, TP_HOST: cp})
    run = run_doctor(tmp_path, cfg, "--cafile", str(certs.ca_file), CP_HOST, f"{TP_HOST}:443")
    assert run.rc == 0, run.out + run.err
    assert list(run.rows) == [CP_HOST, TP_HOST]
    assert all(row["VERDICT"] == "ok" for row in run.rows.values())
    assert "details:" not in run.out
    assert f"2 of 2 ok through egress direct; certificates verified against {certs.ca_file}" in (
        run.out
    )


def test_without_control_planes_only_the_fixed_hosts_and_a_note(tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    names = ["eu.api.konghq.com", "cloud.konghq.com", "global.api.konghq.com"]
    cfg = relay_config(
        konnect={"regions": ["eu"]}, resolver={"static": dict.fromkeys(names, closed)}
    )
    run = run_doctor(tmp_path, cfg)
    assert run.rc == 1
    assert list(run.rows) == names
    assert "note: konnect.control_planes is empty" in run.out


@pytest.mark.parametrize(
    ("target", "static", "extra", "use_ca", "verdict", "detail"),
    [
        pytest.param(
            CP_HOST, {CP_HOST: "CLOSED"}, {}, True, "connection refused", "refused by", id="refused"
        ),
        pytest.param(
            "example.com:443",
            {},
            {},
            True,
            "denied by policy: not_allowlisted",
            "host not in Konnect allowlist: example.com:443",
            id="not-allowlisted",
        ),
        pytest.param(
            "other.eu.cp0.konghq.com",
            {},
            {},
            True,
            "denied by policy: not_allowlisted",
            'control plane prefix "other" is not in konnect.control_planes',
            id="unknown-prefix",
        ),
        pytest.param(
            f"{CP_HOST}:8443",
            {},
            {},
            True,
            "denied by policy: port_not_allowed",
            "port 8443 is not in konnect.ports",
            id="port",
        ),
        pytest.param(
            CP_HOST,
            {CP_HOST: "CP"},
            {},
            False,
            "certificate verify failed: ",  # the rest depends on the chain the server sends
            "verified against the system CAs",
            id="wrong-ca",
        ),
        pytest.param(
            "cloud.konghq.com",
            {"cloud.konghq.com": "CP"},
            {},
            True,
            "hostname mismatch",
            "certificate is not valid for 'cloud.konghq.com'",
            id="hostname-mismatch",
        ),
        pytest.param(
            CP_HOST,
            {CP_HOST: "CP"},
            {"resolver": {"allow_private": False}},
            True,
            "non-public address refused",
            "127.0.0.1 (loopback)",
            id="private-address",
        ),
        pytest.param(
            CP_HOST,
            {CP_HOST: "CP"},
            {"egress": {"mode": "direct", "routes": [{"match": [CP_HOST], "via": "deny"}]}},
            True,
            "denied by egress.routes",
            "egress.routes refuse",
            id="route-deny",
        ),
        pytest.param(
            RAW_HOST,  # allowed by the test config
            {},
            {"resolver": {"nameservers": ["NXDOMAIN"]}},
            True,
            "DNS failure: no such name",
            "",
            id="nxdomain",
        ),
        pytest.param(
            RAW_HOST,
            {},
            {"resolver": {"nameservers": ["SILENT_NS"], "timeout": 0.3}},
            True,
            "DNS timeout",
            "",  # the resolver's 0.3 s or the doctor's 0.5 s, whichever fires first
            id="dns-timeout",
        ),
        pytest.param(
            CP_HOST,
            {CP_HOST: "HTTP"},
            {},
            True,
            "not TLS",
            "b'HTTP/1.1 400 Bad Request",
            id="not-tls",
        ),
        pytest.param(
            CP_HOST,
            {CP_HOST: "SILENT"},
            {},
            True,
            "timeout",
            "no TLS handshake within 0.5 s after connecting",
            id="tls-timeout",
        ),
    ],
)
def test_failures_name_their_cause(
    tmp_path: Path,
    certs: Certs,
    fake_cp: FakeControlPlane,
    http_port: int,
    silent_port: int,
    nxdomain_ns: int,
    silent_ns: int,
    target: str,
    static: dict[str, str],
    extra: dict[str, Any],
    use_ca: bool,
    verdict: str,
    detail: str,
) -> None:
    ports = {
        "CP": fake_cp.port,
        "CLOSED": free_port(),
        "HTTP": http_port,
        "SILENT": silent_port,
        "NXDOMAIN": nxdomain_ns,
        "SILENT_NS": silent_ns,
    }
    static = {k: f"127.0.0.1:{ports[v]}" for k, v in static.items()}
    if "nameservers" in extra.get("resolver", {}):
        names = extra["resolver"]["nameservers"]
        extra = {
            "resolver": {
                **extra["resolver"],
                "nameservers": [f"127.0.0.1:{ports[n]}" for n in names],
            }
        }
    args = ["--timeout", "0.5", target]
    if use_ca:
        args += ["--cafile", str(certs.ca_file)]
    run = run_doctor(tmp_path, doctor_config(static, **extra), *args)
    assert run.rc == 1, run.out + run.err
    (row,) = run.rows.values()
    assert row["VERDICT"].startswith(verdict), row
    assert row["TLS"] == "-" and row["CERT EXPIRES"] == "-"
    assert detail in run.out.partition("details:")[2]
    assert "0 of 1 ok" in run.out
    assert "checking 1/1 ..." in run.err


def test_handshake_then_close_notify_and_nothing_else(
    tmp_path: Path, certs: Certs, tls_sink: Sink
) -> None:
    cfg = doctor_config({CP_HOST: f"127.0.0.1:{tls_sink.port}"})
    run = run_doctor(tmp_path, cfg, "--cafile", str(certs.ca_file), CP_HOST)
    assert run.rc == 0, run.out + run.err
    tls_sink.thread.join(WAIT)
    assert tls_sink.handshake
    assert tls_sink.data == b""
    assert tls_sink.close_notify is True


def test_report_mode_checks_a_denied_host_and_says_so(
    tmp_path: Path, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    cfg = doctor_config(
        {CP_HOST: f"127.0.0.1:{fake_cp.port}"},
        konnect={"regions": ["eu"], "control_planes": ["someone-else"]},
        policy_mode="report",
    )
    run = run_doctor(tmp_path, cfg, "--cafile", str(certs.ca_file), CP_HOST)
    assert run.rc == 0, run.out + run.err
    assert run.rows[CP_HOST]["VERDICT"] == "ok"
    assert "policy_mode is report" in run.out and "not_allowlisted" in run.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.konghq.com:99999"], "port must be in 1..65535"),
        (["--cafile", "/nonexistent/ca.pem"], "--cafile /nonexistent/ca.pem: cannot load"),
        (["--timeout", "0"], "--timeout must be > 0"),
    ],
)
def test_unusable_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    run = run_doctor(tmp_path, relay_config(konnect=KONNECT), *args)
    assert run.rc == 2
    assert message in run.err
    assert run.out == ""


# --- over a transport that is not one of uvloop's (an SSH channel, say) --------


class _Wrapped(asyncio.Transport):
    """Forwards to a uvloop transport without being one, as the SSH egress's
    channel transport does; uvloop's start_tls refuses such a transport."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self.inner = inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(data)

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class _Forward(asyncio.Protocol):
    def __init__(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol
        self.outer: _Wrapped | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.outer = _Wrapped(transport)  # type: ignore[arg-type]
        self.protocol.connection_made(self.outer)

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)


class _WrappingDialer(Dialer):
    name = "wrapped"

    def __init__(self, inner: Dialer) -> None:
        self.inner = inner

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        forward = _Forward(protocol)
        dialled = await self.inner.dial(host, port, forward)
        assert forward.outer is not None
        return Dialled(forward.outer, dialled.peer, dialled.leftover)


def test_handshake_over_a_transport_uvloop_start_tls_refuses(
    certs: Certs, fake_cp: FakeControlPlane
) -> None:
    settings = config.build(doctor_config({CP_HOST: f"127.0.0.1:{fake_cp.port}"}))
    context, trusted = doctor.tls_context(str(certs.ca_file))

    async def main() -> tuple[list[doctor.Check], str]:
        resolver = resolver_for(settings)
        dialer = _WrappingDialer(DirectDialer(resolver))
        checker = doctor.Doctor(
            settings, resolver, {"direct": dialer}, context, trusted, WAIT, WAIT
        )
        checks = await doctor.check_all(checker, [(CP_HOST, 443)])
        dialled = await dialer.dial(CP_HOST, 443, asyncio.Protocol())
        try:
            await asyncio.get_running_loop().start_tls(
                dialled.transport, asyncio.Protocol(), context, server_hostname=CP_HOST
            )
        except TypeError as exc:
            refused = str(exc)
        else:
            refused = ""
        finally:
            dialled.transport.close()
        return checks, refused

    (check,), refused = uvloop.run(main())
    assert (check.verdict, check.tls_version) == ("ok", "TLSv1.3"), check
    assert "is not supported by start_tls()" in refused


# --- pure parts -------------------------------------------------------------------
