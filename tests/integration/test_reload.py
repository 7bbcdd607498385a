"""Hot reload of a running relay subprocess: SIGHUP and ``konnect-relay reload``.

A reload must never cost a tunnel that stays allowed: an invalid file leaves
the old config running (every error logged, ``config_reloads_total{result="error"}``
counted); a valid one swaps the policy, closes the tunnels it now denies with
reason ``policy_revoked`` (unless ``reload.close_revoked: false``), rebinds
listeners whose address changed and re-reads TLS files, while tunnels already
up keep carrying bytes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    RAW_HOST,
    WAIT,
    Certs,
    RelayProcess,
    free_port,
    relay_config,
)
from tests.integration.test_tunnels import connect_via, read_head, recv_exactly, tcp_peer

KEEP_HOST = "keep.example.test"  # a second plain-bytes host that stays allowed
CP_KEEP = "dp-keep.eu.cp0.konghq.com"  # covered by the test server cert's wildcard
CP_DROP = "dp-drop.eu.cp0.konghq.com"
RELAY_NAME = "relay.test"  # the name on the TLS listener's certificate
# A reload on loopback takes milliseconds; waiting longer for its outcome line
# only slows down the tests that expect a reload_failed that never comes.
RELOAD_WAIT = 3.0


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``pred`` (bounded): for state that no event announces, e.g. a closed fd."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


class RelayCtl(RelayProcess):
    """The relay subprocess with the extra ``run`` options these tests need:
    ``--pid-file`` (for ``konnect-relay reload``) and a lowered RLIMIT_NOFILE
    (through ``prlimit``, which execs the relay: the pid stays the relay's)."""

    def __init__(
        self,
        config: dict[str, Any],
        tmp: Path,
        *,
        pid_file: bool = True,
        nofile: int | None = None,
    ) -> None:
        self.config_path = tmp / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.pid_file = tmp / "relay.pid"
        argv = [sys.executable, "-m", "relay", "run", "--config", str(self.config_path)]
        if pid_file:
            argv += ["--pid-file", str(self.pid_file)]
        if nofile is not None:
            argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first = self.wait_event(lambda e: e["event"] == "listening")
        host, _, port = first["proxy"][0].rpartition(":")
        self.proxy = (host.strip("[]"), int(port))
        self.proxy_url = f"http://{first['proxy'][0]}"
        self.admin = first["admin"]
        if pid_file:
            # The pid file is written just after the "listening" line.
            wait_until(self.pid_file.exists, what="pid file")
        # Descriptors at rest, before any client: the fault tests' baseline.
        self.start_fds = self.open_fds()

    def rewrite(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)

    def sighup(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)

    def reload_command(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "reload", "--pid-file", str(self.pid_file), *extra],
            capture_output=True,
            text=True,
            timeout=WAIT * 2,
        )

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)


@pytest.fixture
def start_ctl(tmp_path: Path) -> Iterator[Callable[..., RelayCtl]]:
    started: list[RelayCtl] = []

    def start(config: dict[str, Any], **kwargs: Any) -> RelayCtl:
        sub = tmp_path / f"ctl{len(started)}"
        sub.mkdir()
        relay = RelayCtl(config, sub, **kwargs)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def echo_handler(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def echoes(sock: socket.socket, payload: bytes) -> bool:
    """Send ``payload`` through a tunnel to an echo peer and compare what comes back."""
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def tunnel_to(address: tuple[str, int], target: str) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT)
    try:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = read_head(sock)
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
    except BaseException:
        sock.close()
        raise
    return sock


def is_dead(sock: socket.socket) -> bool:
    """True once the relay closed the tunnel: EOF or reset."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def slow_acceptor() -> Iterator[tuple[int, socket.socket]]:
    """A loopback listener whose accept queue is full: a connect to it hangs (the
    kernel drops the SYNs). Accepting the queued filler frees the queue, and the
    hanging connect completes at its next SYN retransmission (about 1 s)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)  # Linux queues backlog + 1 = one connection
    port = srv.getsockname()[1]
    filler = socket.socket()
    filler.setblocking(False)
    with suppress(BlockingIOError):
        filler.connect(("127.0.0.1", port))
    try:
        yield port, srv
    finally:
        filler.close()
        srv.close()


def start_dial(relay: RelayCtl, base: int) -> socket.socket:
    """A CONNECT whose dial is in progress: the relay holds the client's socket
    and its own connecting socket."""
    sock = socket.create_connection(relay.proxy, timeout=WAIT)
    sock.sendall(f"CONNECT {RAW_HOST}:443 HTTP/1.1\r\nHost: {RAW_HOST}:443\r\n\r\n".encode())
    wait_until(lambda: relay.open_fds() == base + 2, what="relay dialling")
    assert relay.metrics()["konnect_relay_pending_requests{}"] == 0
    return sock


RELOADERS = ["sighup", "reload-command"]


def trigger(relay: RelayCtl, how: str) -> None:
    if how == "sighup":
        relay.sighup()
    else:
        done = relay.reload_command()
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"reload: sent SIGHUP to {relay.proc.pid}")


# --- invalid config ------------------------------------------------------------------

BAD_CONFIG = """\
listen: [{address: "nope"}]
admin: {address: "127.0.0.1:0"}
allow: ["*.*.example"]
limits: {idle_timeout: 0}
bogus: 1
"""
BAD_ERRORS = ("listen.0.address: ", "allow.0: ", "limits.idle_timeout: must be > 0", "bogus: ")


@pytest.mark.parametrize("how", RELOADERS)
def test_invalid_config_keeps_old_running(start_ctl: Callable[..., RelayCtl], how: str) -> None:
    with tcp_peer(echo_handler) as (port, _):
        cfg = relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}})
        relay = start_ctl(cfg)
        with tunnel_to(relay.proxy, f"{RAW_HOST}:443") as sock:
            assert echoes(sock, b"before")
            relay.rewrite(BAD_CONFIG)
            trigger(relay, how)
            failed = relay.wait_event(lambda e: e["event"] == "reload_failed")
            assert failed["config"] == str(relay.config_path)
            assert len(failed["errors"]) == len(BAD_ERRORS), failed["errors"]
            for prefix, line in zip(BAD_ERRORS, failed["errors"], strict=True):
                assert line.startswith(prefix), (prefix, line)
            assert echoes(sock, b"after" * 1000)
            # The old listener and the old policy still serve new tunnels.
            with tunnel_to(relay.proxy, f"{RAW_HOST}:443") as again:
                assert echoes(again, b"new")
            assert relay.get("/readyz")[0] == 200
            samples = relay.metrics()
            assert samples['konnect_relay_config_reloads_total{result="error"}'] == 1
            assert samples.get('konnect_relay_config_reloads_total{result="ok"}', 0) == 0
            assert samples[f'konnect_relay_tunnels_active{{host="{RAW_HOST}"}}'] == 1
    assert not any(e["event"] == "reloaded" for e in relay.seen)


def test_reload_command_refuses_invalid_file(start_ctl: Callable[..., RelayCtl]) -> None:
    """``reload --config FILE`` validates first and does not signal on errors."""
    relay = start_ctl(relay_config())
    bad = relay.config_path.with_name("bad.yaml")
    bad.write_text(BAD_CONFIG)
    done = relay.reload_command("--config", str(bad))
    assert done.returncode == 1
    for prefix in BAD_ERRORS:
        assert f"  {prefix}" in done.stderr, done.stderr
    # A valid file is signalled; the relay re-reads its own --config file.
    done = relay.reload_command("--config", str(relay.config_path))
    assert done.returncode == 0, done.stderr
    relay.wait_event(lambda e: e["event"] == "reloaded")
    samples = relay.metrics()
    assert samples['konnect_relay_config_reloads_total{result="ok"}'] == 1
    assert samples.get('konnect_relay_config_reloads_total{result="error"}', 0) == 0


# --- policy changes -------------------------------------------------------------------


@pytest.mark.parametrize("how", RELOADERS)
@pytest.mark.parametrize("close_revoked", [True, False], ids=["close-revoked", "keep-revoked"])
def test_removed_host_revokes_live_tunnels(
    start_ctl: Callable[..., RelayCtl], how: str, close_revoked: bool
) -> None:
    with tcp_peer(echo_handler) as (port, _):
        static = {RAW_HOST: f"127.0.0.1:{port}", KEEP_HOST: f"127.0.0.1:{port}"}
        cfg = relay_config(allow=[RAW_HOST, KEEP_HOST], resolver={"static": static})
        relay = start_ctl(cfg)
        dropped = tunnel_to(relay.proxy, f"{RAW_HOST}:443")
        kept = tunnel_to(relay.proxy, f"{KEEP_HOST}:443")
        with dropped, kept:
            assert echoes(dropped, b"d" * 1000) and echoes(kept, b"k" * 1000)
            cfg["allow"] = [KEEP_HOST]
            cfg["reload"] = {"close_revoked": close_revoked}
            relay.rewrite(cfg)
            trigger(relay, how)
            reloaded = relay.wait_event(lambda e: e["event"] == "reloaded")
            assert reloaded["revoked"] == (1 if close_revoked else 0)
            if close_revoked:
                closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
                assert closed["reason"] == "policy_revoked"
                assert closed["target"] == f"{RAW_HOST}:443"
                assert is_dead(dropped)
            else:
                assert echoes(dropped, b"still allowed to finish" * 100)
            assert echoes(kept, b"still flowing" * 1000)
            # New tunnels follow the new policy at once.
            sock, head = connect_via(relay, f"{RAW_HOST}:443")
            sock.close()
            assert head.startswith(b"HTTP/1.1 403 "), head
            samples = relay.metrics()
            revoked = (
                f'konnect_relay_tunnels_closed_total{{host="{RAW_HOST}",reason="policy_revoked"}}'
            )
            assert samples.get(revoked, 0) == (1 if close_revoked else 0)
            assert samples[f'konnect_relay_tunnels_active{{host="{KEEP_HOST}"}}'] == 1
            assert samples['konnect_relay_config_reloads_total{result="ok"}'] == 1


def test_dial_in_flight_during_reload_follows_new_policy(
    start_ctl: Callable[..., RelayCtl],
) -> None:
    """A CONNECT admitted just before a reload that revokes its host must not end
    up as a live tunnel once the dial completes."""
    with slow_acceptor() as (port, srv):
        cfg = relay_config(
            allow=[RAW_HOST, KEEP_HOST],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
            limits={"connect_timeout": 8},
        )
        relay = start_ctl(cfg)
        with start_dial(relay, relay.start_fds) as sock:
            cfg["allow"] = [KEEP_HOST]
            relay.rewrite(cfg)
            relay.sighup()
            relay.wait_event(lambda e: e["event"] == "reloaded")
            srv.accept()[0].close()  # the filler: the relay's dial gets through now
            event = relay.wait_event(lambda e: e["event"] == "request")
            if event["status"] == 200:
                closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed", timeout=2)
                assert closed["reason"] == "policy_revoked"
                assert is_dead(sock)
            else:
                assert event["status"] == 403, event


def tls_echo(certs: Certs) -> Callable[[socket.socket], None]:
    """A fake control plane: TLS with a required client certificate, then echo."""
    ctx = certs.server_context()

    def handler(conn: socket.socket) -> None:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)

    return handler


def mtls_tunnel(relay: RelayProcess, host: str, certs: Certs) -> ssl.SSLSocket:
    sock = tunnel_to(relay.proxy, f"{host}:443")
    return certs.client_context().wrap_socket(sock, server_hostname=host)


def test_pinned_control_planes_revoke_other_prefixes(
    start_ctl: Callable[..., RelayCtl], certs: Certs
) -> None:
    """Pinning konnect.control_planes closes the mTLS sessions of other prefixes;
    the pinned one keeps its session (the same TLS connection, no reconnect)."""
    with tcp_peer(tls_echo(certs)) as (port, accepted):
        static = {CP_KEEP: f"127.0.0.1:{port}", CP_DROP: f"127.0.0.1:{port}"}
        cfg = relay_config(resolver={"static": static})
        relay = start_ctl(cfg)
        keep = mtls_tunnel(relay, CP_KEEP, certs)
        drop = mtls_tunnel(relay, CP_DROP, certs)
        with keep, drop:
            assert echoes(keep, b"outlet") and echoes(drop, b"outlet")
            cfg["konnect"] = {"control_planes": ["dp-keep"]}
            relay.rewrite(cfg)
            relay.sighup()
            assert relay.wait_event(lambda e: e["event"] == "reloaded")["revoked"] == 1
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert (closed["target"], closed["reason"]) == (f"{CP_DROP}:443", "policy_revoked")
            with pytest.raises((ssl.SSLError, OSError)):
                if drop.recv(1) == b"":
                    raise ConnectionResetError("EOF")
            for i in range(20):
                assert echoes(keep, f"heartbeat {i}".encode() * 50)
        assert accepted[0] == 2


# --- listeners --------------------------------------------------------------------------


def test_changed_listen_address_rebinds(start_ctl: Callable[..., RelayCtl]) -> None:
    old_port, new_port = free_port(), free_port()
    with tcp_peer(echo_handler) as (port, _):
        cfg = relay_config(
            listen=[{"address": f"127.0.0.1:{old_port}"}],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
        )
        relay = start_ctl(cfg)
        assert relay.proxy == ("127.0.0.1", old_port)
        with tunnel_to(relay.proxy, f"{RAW_HOST}:443") as live:
            assert echoes(live, b"on the old listener")
            cfg["listen"] = [{"address": f"127.0.0.1:{new_port}"}]
            relay.rewrite(cfg)
            relay.sighup()
            relay.wait_event(lambda e: e["event"] == "reloaded")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
            with tunnel_to(("127.0.0.1", new_port), f"{RAW_HOST}:443") as fresh:
                assert echoes(fresh, b"on the new listener")
            assert echoes(live, b"old tunnel still up" * 1000)


def test_reload_to_busy_address_keeps_old_listener(start_ctl: Callable[..., RelayCtl]) -> None:
    """A listen address that cannot be bound is a failed reload: the relay
    keeps serving on its old listener and counts the error."""
    old_port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        busy = squatter.getsockname()[1]
        cfg = relay_config(listen=[{"address": f"127.0.0.1:{old_port}"}])
        relay = start_ctl(cfg)
        cfg["listen"] = [{"address": f"127.0.0.1:{busy}"}]
        relay.rewrite(cfg)
        relay.sighup()
        failed = relay.wait_event(
            lambda e: e["event"] in ("reload_failed", "reloaded"), timeout=RELOAD_WAIT
        )
        assert failed["event"] == "reload_failed", failed
        assert any(str(busy) in line for line in failed["errors"]), failed
        socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
        assert relay.metric('konnect_relay_config_reloads_total{result="error"}') == 1


def write_cert(certs: Certs, cert: Path, key: Path) -> str:
    """Issue a fresh certificate for RELAY_NAME into cert/key; return its SHA-256."""
    issued = certs.ca.issue_cert(RELAY_NAME)
    pem = issued.cert_chain_pems[0].bytes()
    key.write_bytes(issued.private_key_pem.bytes())
    cert.write_bytes(pem)
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def served_cert(address: tuple[str, int], certs: Certs) -> tuple[ssl.SSLSocket, str]:
    """A TLS connection to the relay's listener and the fingerprint it served."""
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    tls = ctx.wrap_socket(
        socket.create_connection(address, timeout=WAIT), server_hostname=RELAY_NAME
    )
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return tls, hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("paths", ["same-paths", "new-paths"])
def test_tls_listener_cert_rotation(
    start_ctl: Callable[..., RelayCtl], certs: Certs, tmp_path: Path, paths: str
) -> None:
    """New handshakes get the new certificate; TLS tunnels already up keep working.
    With the same paths the files are re-read in place; with new paths the
    listener's spec changed and it is rebound on the same port."""
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    first = write_cert(certs, cert, key)
    address = ("127.0.0.1", free_port())
    with tcp_peer(echo_handler) as (port, _):
        cfg = relay_config(
            listen=[
                {
                    "address": f"{address[0]}:{address[1]}",
                    "tls": {"cert": str(cert), "key": str(key)},
                }
            ],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
        )
        relay = start_ctl(cfg)
        live, seen = served_cert(address, certs)
        assert seen == first
        with live:
            live.sendall(f"CONNECT {RAW_HOST}:443 HTTP/1.1\r\n\r\n".encode())
            assert read_head(live).startswith(b"HTTP/1.1 200 ")
            assert echoes(live, b"inside TLS to the relay")
            if paths == "new-paths":
                cert, key = tmp_path / "rotated.pem", tmp_path / "rotated.key"
                cfg["listen"][0]["tls"] = {"cert": str(cert), "key": str(key)}
                relay.rewrite(cfg)
            second = write_cert(certs, cert, key)
            assert second != first
            relay.sighup()
            relay.wait_event(lambda e: e["event"] == "reloaded")
            fresh, seen = served_cert(address, certs)
            fresh.close()
            assert seen == second
            assert echoes(live, b"old session, old certificate" * 500)


def test_unreadable_tls_files_fail_the_reload(
    start_ctl: Callable[..., RelayCtl], certs: Certs, tmp_path: Path
) -> None:
    """A TLS file that cannot be loaded is a reload error like a bad YAML key:
    the old certificate keeps being served."""
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    first = write_cert(certs, cert, key)
    address = ("127.0.0.1", free_port())
    cfg = relay_config(
        listen=[
            {"address": f"{address[0]}:{address[1]}", "tls": {"cert": str(cert), "key": str(key)}}
        ]
    )
    relay = start_ctl(cfg)
    # A rotation caught half-way: the new certificate, the old key.
    issued = certs.ca.issue_cert(RELAY_NAME)
    cert.write_bytes(issued.cert_chain_pems[0].bytes())
    relay.sighup()
    failed = relay.wait_event(
        lambda e: e["event"] in ("reload_failed", "reloaded"), timeout=RELOAD_WAIT
    )
    assert failed["event"] == "reload_failed", failed
    tls, seen = served_cert(address, certs)
    tls.close()
    assert seen == first
    assert relay.metric('konnect_relay_config_reloads_total{result="error"}') == 1
