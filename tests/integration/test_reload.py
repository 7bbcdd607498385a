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
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.helpers import (
    connect_via,
    echo,
    echoes,
    is_dead,
    open_tunnel,
    read_head,
    slow_acceptor,
    start_dial,
    tcp_peer,
)
from tests.support.relay import (
    RAW_HOST,
    WAIT,
    Certs,
    ListenerCerts,
    RelayProcess,
    StartRelay,
    cert_sha256,
    free_port,
    peer_config,
    relay_config,
)

KEEP_HOST = "keep.example.test"  # a second plain-bytes host that stays allowed
CP_KEEP = "dp-keep.eu.cp0.konghq.com"  # covered by the test server cert's wildcard
CP_DROP = "dp-drop.eu.cp0.konghq.com"
RELAY_NAME = "relay.test"  # the name on the TLS listener's certificate
# A reload on loopback takes milliseconds; waiting longer for its outcome line
# only slows down the tests that expect a reload_failed that never comes.
RELOAD_WAIT = 3.0


RELOADERS = ["sighup", "reload-command"]


def trigger(relay: RelayProcess, how: str) -> None:
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
def test_invalid_config_keeps_old_running(start_relay: StartRelay, how: str) -> None:
    with tcp_peer(echo) as (port, _):
        cfg = peer_config(port)
        relay = start_relay(cfg, pid_file=True)
        with open_tunnel(relay) as sock:
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
            with open_tunnel(relay) as again:
                assert echoes(again, b"new")
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")  # the relay saw it go
            assert relay.get("/readyz")[0] == 200
            samples = relay.metrics()
            assert samples['konnect_relay_config_reloads_total{result="error"}'] == 1
            assert samples.get('konnect_relay_config_reloads_total{result="ok"}', 0) == 0
            assert samples[f'konnect_relay_tunnels_active{{host="{RAW_HOST}"}}'] == 1
    assert not any(e["event"] == "reloaded" for e in relay.seen)


def test_reload_command_refuses_invalid_file(start_relay: StartRelay) -> None:
    """``reload --config FILE`` validates first and does not signal on errors."""
    relay = start_relay(relay_config(), pid_file=True)
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
    start_relay: StartRelay, how: str, close_revoked: bool
) -> None:
    with tcp_peer(echo) as (port, _):
        static = {RAW_HOST: f"127.0.0.1:{port}", KEEP_HOST: f"127.0.0.1:{port}"}
        cfg = relay_config(allow=[RAW_HOST, KEEP_HOST], resolver={"static": static})
        relay = start_relay(cfg, pid_file=True)
        dropped = open_tunnel(relay)
        kept = open_tunnel(relay, f"{KEEP_HOST}:443")
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
    start_relay: StartRelay,
) -> None:
    """A CONNECT admitted just before a reload that revokes its host must not end
    up as a live tunnel once the dial completes."""
    with slow_acceptor() as (port, srv):
        cfg = relay_config(
            allow=[RAW_HOST, KEEP_HOST],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
            limits={"connect_timeout": 8},
        )
        relay = start_relay(cfg)
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
            echo(tls)

    return handler


def mtls_tunnel(relay: RelayProcess, host: str, certs: Certs) -> ssl.SSLSocket:
    sock = open_tunnel(relay, f"{host}:443")
    return certs.client_context().wrap_socket(sock, server_hostname=host)


def test_pinned_control_planes_revoke_other_prefixes(start_relay: StartRelay, certs: Certs) -> None:
    """Pinning konnect.control_planes closes the mTLS sessions of other prefixes;
    the pinned one keeps its session (the same TLS connection, no reconnect)."""
    with tcp_peer(tls_echo(certs)) as (port, accepted):
        static = {CP_KEEP: f"127.0.0.1:{port}", CP_DROP: f"127.0.0.1:{port}"}
        cfg = relay_config(resolver={"static": static})
        relay = start_relay(cfg)
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


def test_changed_listen_address_rebinds(start_relay: StartRelay) -> None:
    old_port, new_port = free_port(), free_port()
    with tcp_peer(echo) as (port, _):
        cfg = relay_config(
            listen=[{"address": f"127.0.0.1:{old_port}"}],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
        )
        relay = start_relay(cfg)
        assert relay.proxy == ("127.0.0.1", old_port)
        with open_tunnel(relay) as live:
            assert echoes(live, b"on the old listener")
            cfg["listen"] = [{"address": f"127.0.0.1:{new_port}"}]
            relay.rewrite(cfg)
            relay.sighup()
            relay.wait_event(lambda e: e["event"] == "reloaded")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
            with open_tunnel(("127.0.0.1", new_port)) as fresh:
                assert echoes(fresh, b"on the new listener")
            assert echoes(live, b"old tunnel still up" * 1000)


def test_reload_to_busy_address_keeps_old_listener(start_relay: StartRelay) -> None:
    """A listen address that cannot be bound is a failed reload: the relay
    keeps serving on its old listener and counts the error."""
    old_port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        busy = squatter.getsockname()[1]
        cfg = relay_config(listen=[{"address": f"127.0.0.1:{old_port}"}])
        relay = start_relay(cfg)
        cfg["listen"] = [{"address": f"127.0.0.1:{busy}"}]
        relay.rewrite(cfg)
        relay.sighup()
        failed = relay.wait_event(
            lambda e: e["event"] in ("reload_failed", "reloaded"), timeout=RELOAD_WAIT
        )
        assert failed["event"] == "reload_failed", failed
        assert any(str(busy) in line for line in failed["errors"]), failed
        socket.create_connection(("127.0.0.1", old_port), timeout=WAIT).close()
        assert relay.sample("konnect_relay_config_reloads_total", result="error") == 1


def write_cert(certs: Certs, cert: Path, key: Path) -> str:
    """Issue a fresh certificate for RELAY_NAME into cert/key; return its SHA-256."""
    issued = certs.ca.issue_cert(RELAY_NAME)
    pem = issued.cert_chain_pems[0].bytes()
    key.write_bytes(issued.private_key_pem.bytes())
    cert.write_bytes(pem)
    return cert_sha256(pem)


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
    start_relay: StartRelay, certs: Certs, tmp_path: Path, paths: str
) -> None:
    """New handshakes get the new certificate; TLS tunnels already up keep working.
    With the same paths the files are re-read in place; with new paths the
    listener's spec changed and it is rebound on the same port."""
    cert, key = tmp_path / "relay.pem", tmp_path / "relay.key"
    first = write_cert(certs, cert, key)
    address = ("127.0.0.1", free_port())
    with tcp_peer(echo) as (port, _):
        cfg = relay_config(
            listen=[
                {
                    "address": f"{address[0]}:{address[1]}",
                    "tls": {"cert": str(cert), "key": str(key)},
                }
            ],
            resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}},
        )
        relay = start_relay(cfg)
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
    start_relay: StartRelay, certs: Certs, tmp_path: Path
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
    relay = start_relay(cfg)
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
    assert relay.sample("konnect_relay_config_reloads_total", result="error") == 1


def test_a_reload_is_all_or_nothing_even_when_files_change_during_it(
    certs: Certs, listener_certs: ListenerCerts, tmp_path: Path
) -> None:
    """A reload reads every TLS file once, before it changes anything. Here the
    certificate is overwritten while the reload waits for a new SSH egress to
    connect (a bastion that accepts and never answers): the reload completes
    with what it read, and new handshakes keep working. (It used to read the
    files again after the swap, fail half-way and leave the relay between two
    configs.)"""
    import asyncio
    import io

    import uvloop
    import yaml

    from relay import config
    from relay.log import EventLog
    from relay.server import Relay

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(listener_certs.cert.read_bytes())
    key.write_bytes(listener_certs.key.read_bytes())
    (tmp_path / "known_hosts").write_text("")
    base = {
        "listen": [{"address": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key)}}],
        "admin": {"address": None},
        "allow": ["a.example.test"],
        "resolver": {"allow_private": True},
        "limits": {"drain_timeout": 0},
    }

    async def main() -> None:
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen()
        hole.setblocking(False)
        loop = asyncio.get_running_loop()
        relay = Relay(config.build(base), EventLog(io.StringIO()))
        await relay.start()
        changed = {
            **base,
            "allow": ["b.example.test"],
            "egress": {
                "mode": "direct",
                "ssh": {
                    "host": "127.0.0.1",
                    "port": hole.getsockname()[1],
                    "username": "relay",
                    "known_hosts": str(tmp_path / "known_hosts"),
                    "connect_timeout": 2,
                },
                "routes": [{"match": ["*.unused.example.test"], "via": "ssh"}],
            },
        }
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump(changed))
        reload = asyncio.ensure_future(relay.reload(str(path)))
        accepted, _ = await asyncio.wait_for(loop.sock_accept(hole), WAIT)
        cert.write_text("not a certificate any more\n")  # while the reload waits
        assert await asyncio.wait_for(reload, WAIT) is True
        assert relay.admission.decide(None, None, "127.0.0.1", "b.example.test", 443).via
        port = relay.listeners.slots[0].listener.port
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object") is not None
        writer.close()
        accepted.close()
        hole.close()
        await relay.drain()

    uvloop.run(asyncio.wait_for(main(), WAIT * 2))
