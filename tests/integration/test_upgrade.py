"""konnect-relay upgrade: a successor takes the listeners and the tunnels;
no tunnel closes, no byte is lost, no CONNECT fails, and a successor that
fails at any step leaves every tunnel with the relay that was running."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import (
    NotifySocket,
    connect_via,
    curl_whoami,
    echo,
    open_tunnel,
    recv_all,
    recv_exactly,
    tcp_peer,
    tls_listen,
)
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    TP_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    ListenerCerts,
    RelayProcess,
    StartRelay,
    peer_config,
    relay_config,
    wait_until,
)

FAULT_ENV = "KONNECT_RELAY_HANDOVER_FAULT_FILE"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def current_pid(relay: RelayProcess) -> int:
    return int(relay.pid_file.read_text().strip())


def upgrade(relay: RelayProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "upgrade", "--pid-file", str(relay.pid_file), *extra],
        capture_output=True,
        text=True,
        timeout=WAIT * 4,
    )


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def upgradable(start_relay: StartRelay, tmp_path: Path) -> Iterator[Any]:
    """``start(config)``: a relay with a pid file and a fault file its
    successors read; every successor still running is stopped at the end."""
    fault = tmp_path / "fault"
    started: list[RelayProcess] = []

    def start(config: dict[str, Any]) -> RelayProcess:
        relay = start_relay(config, pid_file=True, env={**os.environ, FAULT_ENV: str(fault)})
        relay.fault = fault  # type: ignore[attr-defined]
        started.append(relay)
        return relay

    yield start
    for relay in started:
        try:
            pid = current_pid(relay)
        except (OSError, ValueError):
            continue
        if pid != relay.proc.pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda p=pid: not alive(p), timeout=WAIT * 2, what="successor stopped")


def echo_tunnels(relay: RelayProcess, n: int) -> list[socket.socket]:
    socks = [open_tunnel(relay) for _ in range(n)]
    for i, sock in enumerate(socks):
        sock.sendall(b"before-%d" % i)
        assert recv_exactly(sock, len(b"before-%d" % i)) == b"before-%d" % i
    return socks


def assert_echo(socks: list[socket.socket], tag: bytes) -> None:
    for i, sock in enumerate(socks):
        payload = tag + b"-%d" % i
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload


def by_id(relay: RelayProcess) -> dict[int, dict[str, Any]]:
    return {t["id"]: t for t in json.loads(relay.get("/tunnels")[1])}


# --- a successful upgrade ----------------------------------------------------------


def test_websocket_over_mtls_carries_on_across_upgrade(
    upgradable: Any, fake_cp: FakeControlPlane, certs: Certs
) -> None:
    """One WebSocket session over mTLS exchanges messages before, during and
    after the upgrade; its tunnel keeps id, opened_at and bytes; counters go on
    from the predecessor's totals; the predecessor exits; the successor holds
    its baseline descriptors plus the tunnel's two."""
    from websockets.asyncio.client import connect

    target = f"127.0.0.1:{fake_cp.port}"
    relay = upgradable(relay_config(resolver={"static": {CP_HOST: target, TP_HOST: target}}))
    baseline = relay.start_fds
    outcome: dict[str, Any] = {}

    async def session() -> list[str]:
        replies = []
        async with connect(
            f"wss://{CP_HOST}/v1/outlet",
            proxy=relay.proxy_url,
            ssl=certs.client_context(),
            ping_interval=None,
            open_timeout=WAIT,
        ) as ws:
            for i in range(3):
                await ws.send(f"before-{i}")
                replies.append(await asyncio.wait_for(ws.recv(), WAIT))
            outcome["before"] = by_id(relay)
            outcome["metrics"] = relay.metrics()
            done = asyncio.get_running_loop().run_in_executor(None, upgrade, relay)
            i = 0
            while not done.done():  # messages keep flowing while it runs
                await ws.send(f"during-{i}")
                replies.append(await asyncio.wait_for(ws.recv(), WAIT))
                i += 1
            outcome["upgrade"] = await done
            outcome["during"] = i
            for i in range(3):
                await ws.send(f"after-{i}")
                replies.append(await asyncio.wait_for(ws.recv(), WAIT))
            outcome["after"] = by_id(relay)
            # The predecessor exits by itself; the successor holds its
            # baseline descriptors and the tunnel's two sockets.
            outcome["exit"] = relay.proc.wait(WAIT)
            successor = current_pid(relay)
            wait_until(lambda: fds_of(successor) == baseline + 2, what="successor's descriptors")
        return replies

    replies = asyncio.run(session())
    result = outcome["upgrade"]
    assert result.returncode == 0, result.stderr
    assert all(r.startswith(f"{certs.client_sha256}:") for r in replies)
    assert [r.split(":", 1)[1] for r in replies][-3:] == ["after-0", "after-1", "after-2"]
    assert outcome["during"] >= 1
    successor = current_pid(relay)
    assert successor != relay.proc.pid
    assert outcome["exit"] == 0
    ((tid, before),) = outcome["before"].items()
    after = outcome["after"][tid]
    assert after["opened_at"] == before["opened_at"]
    assert after["bytes_up"] > before["bytes_up"] and after["bytes_down"] > before["bytes_down"]
    handed = relay.wait_event(lambda e: e["event"] == "handed_over")
    upgraded = relay.wait_event(lambda e: e["event"] == "upgraded")
    assert handed["moved"] == upgraded["moved"] == 1 and handed["stayed"] == 0
    assert upgraded["handover_s"] < WAIT
    # Counters continue: nothing the predecessor counted is lost.
    now = relay.metrics()
    for key, value in outcome["metrics"].items():
        if key.startswith(("konnect_relay_tunnels_opened", "konnect_relay_tunnel_bytes")):
            assert now[key] >= value, key
    os.kill(current_pid(relay), signal.SIGTERM)  # its tunnel_closed line: the bytes of both
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["tunnel"] == tid and closed["bytes_up"] >= after["bytes_up"]


def test_connects_during_upgrade_all_succeed(
    upgradable: Any, fake_cp: FakeControlPlane, certs: Certs
) -> None:
    """curl through the relay, one request after another, while the upgrade
    runs: every one succeeds (bounded: at most 200 requests)."""
    target = f"127.0.0.1:{fake_cp.port}"
    relay = upgradable(relay_config(resolver={"static": {CP_HOST: target}}))
    results: list[subprocess.CompletedProcess[str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set() and len(results) < 200:
            results.append(curl_whoami(certs, "--proxy", relay.proxy_url))

    worker = threading.Thread(target=load)
    worker.start()
    wait_until(lambda: len(results) >= 3, what="first requests")
    started = len(results)
    outcome = upgrade(relay)
    finished = len(results)
    wait_until(lambda: len(results) >= finished + 3, what="requests after the upgrade")
    stop.set()
    worker.join(WAIT * 2)
    assert outcome.returncode == 0, outcome.stderr
    assert finished - started >= 2  # requests overlapped the upgrade
    failed = [r for r in results if r.returncode != 0 or certs.client_sha256 not in r.stdout]
    assert failed == []


def test_spliced_bulk_stream_moves_without_losing_a_byte(upgradable: Any) -> None:
    """A bulk stream both ways (on the in-kernel splice path after 1 MiB) runs
    while the relay upgrades: every byte arrives, in order (SHA-256 of what
    was sent equals that of what came back), and the counters agree."""
    chunk = os.urandom(256 * 1024)
    upgraded = threading.Event()
    sent = hashlib.sha256()
    got = hashlib.sha256()
    totals = {"sent": 0, "got": 0}
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port))
        sock = open_tunnel(relay)
        sock.settimeout(WAIT)

        def send() -> None:
            # Until the upgrade is over and 8 MiB more went through; at most 1 GiB.
            extra = 0
            while extra < 8 << 20 and totals["sent"] < 1 << 30:
                sock.sendall(chunk)
                sent.update(chunk)
                totals["sent"] += len(chunk)
                if upgraded.is_set():
                    extra += len(chunk)
            sock.shutdown(socket.SHUT_WR)

        def receive() -> None:
            while data := sock.recv(1 << 20):
                got.update(data)
                totals["got"] += len(data)

        threads = [threading.Thread(target=send), threading.Thread(target=receive)]
        for thread in threads:
            thread.start()
        wait_until(lambda: totals["got"] >= 4 << 20, what="a bulk stream")
        outcome = upgrade(relay)
        upgraded.set()
        for thread in threads:
            thread.join(WAIT * 3)
        sock.close()
        assert outcome.returncode == 0, outcome.stderr
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert totals["got"] == totals["sent"] > 12 << 20
    assert got.hexdigest() == sent.hexdigest()
    assert closed["bytes_up"] == closed["bytes_down"] == totals["sent"]
    assert relay.wait_event(lambda e: e["event"] == "upgraded")["moved"] == 1
    assert relay.wait_event(lambda e: e["event"] == "handed_over")["spliced"] == 1


def test_half_closed_tunnel_stays_half_closed(upgradable: Any) -> None:
    """The client ended its side before the upgrade; the destination, which
    saw that EOF, keeps sending after it, and the client gets every byte."""
    got_eof = threading.Event()
    go = threading.Event()

    def answer_later(conn: socket.socket) -> None:
        assert recv_all(conn) == b"question"
        got_eof.set()
        go.wait(WAIT)
        conn.sendall(b"answer" * 1000)

    with tcp_peer(answer_later) as (port, _):
        relay = upgradable(peer_config(port))
        sock, _ = connect_via(relay, f"{RAW_HOST}:443")
        with sock:
            sock.sendall(b"question")
            sock.shutdown(socket.SHUT_WR)
            assert got_eof.wait(WAIT)
            outcome = upgrade(relay)
            assert outcome.returncode == 0, outcome.stderr
            go.set()
            assert recv_all(sock) == b"answer" * 1000
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["reason"] == "client_eof"
    assert closed["bytes_up"] == len(b"question") and closed["bytes_down"] == 6000
    upgraded = relay.wait_event(lambda e: e["event"] == "upgraded")
    assert upgraded["moved"] == 1


def test_idle_timer_moves_with_the_tunnel(upgradable: Any) -> None:
    """A tunnel idle before the upgrade keeps its last activity; the successor
    closes it idle_timeout after that, not idle_timeout after the upgrade."""
    idle = 4.0
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port, limits={"idle_timeout": idle, "drain_timeout": 2}))
        sock = open_tunnel(relay)
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        last_byte = time.monotonic()
        wait_until(lambda: time.monotonic() - last_byte >= idle * 0.75, what="3/4 of idle_timeout")
        ((tid, before),) = by_id(relay).items()
        outcome = upgrade(relay)
        assert outcome.returncode == 0, outcome.stderr
        moved = datetime.fromisoformat(by_id(relay)[tid]["last_activity"])
        shift = moved - datetime.fromisoformat(before["last_activity"])
        assert abs(shift.total_seconds()) < 0.002
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed", timeout=idle * 2)
        closed_after = time.monotonic() - last_byte
        sock.close()
    assert closed["reason"] == "idle_timeout" and closed["tunnel"] == tid
    # The sweep runs every idle/4 s and notices bytes up to a period late:
    # on time within two periods (a timer restarted by the upgrade would fire
    # at 0.75 idle + idle at the earliest).
    assert idle <= closed_after < idle * 1.5 + 0.25


def test_tls_listener_tunnel_drains_in_predecessor_while_plain_ones_move(
    upgradable: Any, listener_certs: ListenerCerts, certs: Certs
) -> None:
    import ssl

    with tcp_peer(echo) as (port, _):
        cfg = peer_config(port)
        cfg["listen"] = [{"address": "127.0.0.1:0"}, tls_listen(listener_certs)]
        cfg["limits"] = {"drain_timeout": WAIT}
        relay = upgradable(cfg)
        plain = echo_tunnels(relay, 3)
        ctx = ssl.create_default_context(cafile=str(certs.ca_file))
        raw = socket.create_connection(relay_tls_address(relay), timeout=WAIT)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(f"CONNECT {RAW_HOST}:443 HTTP/1.1\r\nHost: {RAW_HOST}:443\r\n\r\n".encode())
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
        tls.sendall(b"tls-before")
        assert recv_exactly(tls, 10) == b"tls-before"
        outcome = upgrade(relay)
        assert outcome.returncode == 0, outcome.stderr
        handed = relay.wait_event(lambda e: e["event"] == "handed_over")
        assert handed["moved"] == 3 and handed["stayed"] == 1
        assert handed["stayed_by"] == {"not_plain_tcp": 1}
        assert_echo(plain, b"after")  # in the successor
        tls.sendall(b"tls-after!")  # still in the predecessor, which drains
        assert recv_exactly(tls, 10) == b"tls-after!"
        assert relay.proc.poll() is None
        tls.close()
        assert relay.proc.wait(WAIT) == 0  # empty: it exits
        for sock in plain:
            sock.close()


def relay_tls_address(relay: RelayProcess) -> tuple[str, int]:
    """The second listener's address, from the first ``listening`` line."""
    for line in relay.lines:
        record = json.loads(line)
        if record.get("event") == "listening":
            host, _, port = record["proxy"][1].rpartition(":")
            return host, int(port)
    raise AssertionError("no listening line")


def test_systemd_follows_the_successor(upgradable: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """sd_notify: READY=1 from the relay; after the upgrade MAINPID=<successor>
    and READY=1 from the successor (NotifyAccess=all); the predecessor, which
    drains in the background, never says STOPPING=1."""
    notify = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    try:
        with tcp_peer(echo) as (port, _):
            relay = upgradable(peer_config(port))
            assert notify.recv() == ("READY=1", relay.proc.pid)
            socks = echo_tunnels(relay, 2)
            outcome = upgrade(relay)
            assert outcome.returncode == 0, outcome.stderr
            successor = current_pid(relay)
            assert notify.recv() == (f"MAINPID={successor}\nREADY=1", successor)
            assert relay.proc.wait(WAIT) == 0
            assert_echo(socks, b"after")
            os.kill(successor, signal.SIGTERM)
            assert notify.recv() == ("STOPPING=1", successor)
            for sock in socks:
                sock.close()
    finally:
        notify.close()


# --- failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "step"),
    [
        ("hello", "hello"),
        ("listeners", "listeners"),
        ("accepting", "tunnels"),
        ("tunnels", "tunnels"),
        ("stall", "tunnels"),
        ("done", "done"),
    ],
)
def test_failing_successor_loses_nothing(upgradable: Any, fault: str, step: str) -> None:
    """The successor dies (or stalls) at a step: the upgrade exits 1 naming
    it, the running relay keeps every tunnel and listener and its pid file,
    and the next upgrade succeeds."""
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port, limits={"upgrade_timeout": 2, "drain_timeout": 2}))
        socks = echo_tunnels(relay, 150)  # more than one batch
        before = by_id(relay)
        relay.fault.write_text(fault)
        outcome = upgrade(relay)
        assert outcome.returncode == 1
        assert f"failed at step {step}" in outcome.stderr, outcome.stderr
        failed = relay.wait_event(lambda e: e["event"] == "upgrade_failed")
        assert failed["step"] == step
        assert current_pid(relay) == relay.proc.pid and relay.proc.poll() is None
        assert_echo(socks, b"after-failure")
        assert by_id(relay).keys() == before.keys()
        extra = open_tunnel(relay)  # still accepting
        assert_echo([extra], b"new")
        relay.fault.unlink()
        outcome = upgrade(relay)
        assert outcome.returncode == 0, outcome.stderr
        assert_echo([*socks, extra], b"after-upgrade")
        assert by_id(relay).keys() == {*before.keys(), *by_id(relay).keys()}
        for sock in [*socks, extra]:
            sock.close()


def test_sigterm_during_an_upgrade_cancels_it_then_drains(upgradable: Any) -> None:
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port))
        socks = echo_tunnels(relay, 3)
        relay.fault.write_text("stall")
        result: list[subprocess.CompletedProcess[str]] = []
        command = threading.Thread(target=lambda: result.append(upgrade(relay)))
        command.start()
        started = relay.wait_event(lambda e: e["event"] == "upgrading")
        relay.proc.send_signal(signal.SIGTERM)
        failed = relay.wait_event(lambda e: e["event"] == "upgrade_failed")
        assert "the relay is stopping" in failed["cause"]
        assert failed["tunnels"] == 3
        assert relay.proc.wait(WAIT) == 0
        command.join(WAIT * 2)
        assert result[0].returncode == 1
        assert not alive(failed["successor"])  # killed, not left behind
        for sock in socks:
            sock.close()
    assert started["tunnels"] == 3


def test_invalid_config_fails_the_upgrade_with_every_error(upgradable: Any) -> None:
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port))
        socks = echo_tunnels(relay, 2)
        relay.rewrite({"listen": [{"address": "127.0.0.1:0"}], "limits": {"idle_timeout": 0}})
        outcome = upgrade(relay)
        assert outcome.returncode == 1
        assert "limits.idle_timeout" in outcome.stderr, outcome.stderr
        assert relay.proc.poll() is None
        assert_echo(socks, b"still")
        for sock in socks:
            sock.close()


def test_predecessor_killed_midway_successor_keeps_what_was_passed(upgradable: Any) -> None:
    """The predecessor dies after the first batch: those tunnels run on in the
    successor, the rest end as in any crash, and the successor serves."""
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port))
        socks = echo_tunnels(relay, 150)
        relay.fault.write_text("kill_predecessor")
        upgrade(relay)
        assert relay.proc.wait(WAIT) == -signal.SIGKILL
        upgraded = relay.wait_event(lambda e: e["event"] == "upgraded")
        assert upgraded["predecessor_lost"] is True
        passed = upgraded["moved"]
        assert 0 < passed < 150
        alive_socks = []
        for sock in socks:
            sock.settimeout(WAIT)
            try:
                sock.sendall(b"?")
                if sock.recv(1) == b"?":
                    alive_socks.append(sock)
            except OSError:
                pass
        assert len(alive_socks) == passed
        extra = open_tunnel(relay.proxy)  # the successor accepts
        assert_echo([extra], b"new")
        for sock in [*socks, extra]:
            sock.close()


def test_upgrade_does_not_signal_a_process_that_cannot_handle_it(tmp_path: Path) -> None:
    """An old relay (no SIGUSR2 handler) would die of the signal: refuse."""
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = tmp_path / "relay.pid"
        pid_file.write_text(f"{old.pid}\n")
        wait_until(lambda: Path(f"/proc/{old.pid}/status").exists(), what="process")
        outcome = subprocess.run(
            [sys.executable, "-m", "relay", "upgrade", "--pid-file", str(pid_file)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert outcome.returncode == 1
        assert "does not handle upgrades" in outcome.stderr
        assert old.poll() is None  # not signalled
    finally:
        old.kill()
        old.wait()


# --- workers: N ----------------------------------------------------------------------


def worker_tunnels(relay: RelayProcess) -> set[tuple[int, int]]:
    return {(t["worker"], t["id"]) for t in json.loads(relay.get("/tunnels")[1])}


def test_workers_upgrade_moves_every_tunnel_of_every_worker(upgradable: Any) -> None:
    """workers: 2: both workers hand over (worker by worker, committed
    together); every tunnel carries on with its id; counters continue; the
    old supervisor and its workers exit; the new one owns the pid file."""
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port, workers=2))
        socks = echo_tunnels(relay, 60)
        before = worker_tunnels(relay)
        assert {w for w, _ in before} == {0, 1}  # the kernel spread them over both
        opened = relay.sample("konnect_relay_tunnels_opened_total", host=RAW_HOST)
        outcome = upgrade(relay)
        assert outcome.returncode == 0, outcome.stderr
        assert "60 tunnels moved, 0 stay" in outcome.stdout
        assert_echo(socks, b"after")
        assert worker_tunnels(relay) == before
        assert relay.sample("konnect_relay_tunnels_opened_total", host=RAW_HOST) == opened
        assert relay.proc.wait(WAIT) == 0
        successor = current_pid(relay)
        assert successor != relay.proc.pid and alive(successor)
        handed = [e for e in relay.drain() if e["event"] == "handed_over" and "worker" in e]
        assert sorted(e["worker"] for e in handed) == [0, 1]
        assert sum(e["moved"] for e in handed) == 60
        extra = open_tunnel(relay)  # the new workers accept
        assert_echo([extra], b"new")
        for sock in [*socks, extra]:
            sock.close()


@pytest.mark.parametrize("fault", ["tunnels@1", "hello@0", "listeners@1"])
def test_workers_upgrade_failing_in_one_worker_keeps_everything(
    upgradable: Any, fault: str
) -> None:
    """A new worker fails: the old supervisor aborts, every old worker takes
    its tunnels back (also the one that was ready), the next upgrade works."""
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port, workers=2, limits={"upgrade_timeout": 3}))
        socks = echo_tunnels(relay, 40)
        before = worker_tunnels(relay)
        relay.fault.write_text(fault)
        outcome = upgrade(relay)
        assert outcome.returncode == 1, outcome.stdout
        assert current_pid(relay) == relay.proc.pid and relay.proc.poll() is None
        assert_echo(socks, b"after-failure")
        assert worker_tunnels(relay) == before
        relay.fault.unlink()
        outcome = upgrade(relay)
        assert outcome.returncode == 0, outcome.stderr
        assert_echo(socks, b"after-upgrade")
        for sock in socks:
            sock.close()


def test_workers_upgrade_worker_crashing_after_the_commit_drains_only_its_own(
    upgradable: Any,
) -> None:
    """New worker 1 dies after the commit (on `done`): old worker 1 took its
    tunnels back and drains them, as a restart would; worker 0's moved; the
    command says which worker failed and exits 1."""
    with tcp_peer(echo) as (port, _):
        relay = upgradable(peer_config(port, workers=2, limits={"drain_timeout": 2}))
        socks = echo_tunnels(relay, 40)
        on_0 = sum(1 for t in json.loads(relay.get("/tunnels")[1]) if t["worker"] == 0)
        relay.fault.write_text("done@1")
        outcome = upgrade(relay)
        assert outcome.returncode == 1
        assert "workers [1] failed after the commit" in outcome.stderr, outcome.stderr
        handed = relay.wait_event(lambda e: e["event"] == "handed_over" and "worker" not in e)
        assert list(handed["failed_workers"]) == ["1"]
        closed = [relay.wait_event(lambda e: e["event"] == "tunnel_closed") for _ in range(2)]
        assert {c["reason"] for c in closed} == {"drain"}
        assert relay.proc.wait(WAIT) == 0  # the old supervisor, once its workers ended
        moved = handed["moved"]
        assert 0 < moved < 40
        alive_after = 0
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"?")
                alive_after += sock.recv(1) == b"?"
        assert alive_after == moved == on_0
        for sock in socks:
            sock.close()
