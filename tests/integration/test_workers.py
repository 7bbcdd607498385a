"""``workers: N``: the supervisor, its workers on one port, aggregated admin,
restarts, reload and drain across workers, sd_notify, and the systemd unit.

Real processes on loopback. SO_REUSEPORT spreads connections by a hash of the
4-tuple, so tests open tunnels until both workers serve some (bounded).
"""

from __future__ import annotations

import configparser
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay import config
from tests.support.helpers import (
    ROOT,
    NotifySocket,
    connect_via,
    echo,
    echoes,
    open_tunnel,
    relay_cli,
    tcp_peer,
    write_config,
)
from tests.support.relay import (
    RAW_HOST,
    WAIT,
    RelayProcess,
    StartRelay,
    peer_config,
    relay_config,
)

UNIT = ROOT / "deploy" / "systemd" / "konnect-relay.service"
# P(64 connections all hashed to one of two workers) = 2**-63.
MAX_SPREAD = 64
HOST = f'host="{RAW_HOST}"'


@pytest.fixture
def echo_port() -> Iterator[int]:
    with tcp_peer(echo) as (port, _):
        yield port


def workers_config(port: int, **overrides: Any) -> dict[str, Any]:
    return peer_config(port, **{"workers": 2, **overrides})


Event = dict[str, Any]


def from_worker(name: str, index: int) -> Callable[[Event], bool]:
    """Matches event ``name`` from (or, for worker_*, about) worker ``index``."""
    return lambda e: e["event"] == name and e.get("worker") == index


def from_supervisor(name: str) -> Callable[[Event], bool]:
    """Matches event ``name`` logged by the supervisor itself."""
    return lambda e: e["event"] == name and "worker" not in e


def request_from(client: str) -> Callable[[Event], bool]:
    return lambda e: e["event"] == "request" and e["client"] == client


@dataclass
class Workers:
    relay: RelayProcess
    pids: dict[int, int]  # worker index -> pid at start
    rundir: Path  # the supervisor's private directory


def start_workers(start: StartRelay, cfg: dict[str, Any]) -> Workers:
    """Start a 2-worker relay; consume the workers' startup lines (so a later
    wait for a worker's "listening" sees only a restart)."""
    relay = start(cfg)
    pids = {}
    for i in (0, 1):
        pids[i] = relay.wait_event(from_worker("worker_started", i))["pid"]
        listening = relay.wait_event(from_worker("listening", i))
    return Workers(relay, pids, Path(listening["admin"]).parent)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Client sockets a test opens, closed when it ends (passed or not)."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def spread(relay: RelayProcess, opened: list[socket.socket]) -> dict[int, list[socket.socket]]:
    """Open tunnels until both workers hold at least one; {worker: sockets}."""
    by_worker: dict[int, list[socket.socket]] = {0: [], 1: []}
    for _ in range(MAX_SPREAD):
        sock = open_tunnel(relay)
        opened.append(sock)
        client = "{}:{}".format(*sock.getsockname())
        request = relay.wait_event(request_from(client))
        assert request["status"] == 200
        by_worker[request["worker"]].append(sock)
        if by_worker[0] and by_worker[1]:
            return by_worker
    raise AssertionError(f"{MAX_SPREAD} connections all reached one worker")


def everything(by_worker: dict[int, list[socket.socket]]) -> list[socket.socket]:
    return [s for socks in by_worker.values() for s in socks]


def assert_closed(sock: socket.socket) -> None:
    with suppress(ConnectionResetError):  # a killed worker's sockets are reset
        assert sock.recv(1) == b""


# --- aggregation over workers ----------------------------------------------------------


def test_one_port_two_workers_aggregated_admin(
    start_relay: StartRelay, echo_port: int, sockets: list[socket.socket]
) -> None:
    relay = start_workers(start_relay, workers_config(echo_port)).relay
    by_worker = spread(relay, sockets)
    socks = everything(by_worker)
    for n, sock in enumerate(socks, 1):
        assert echoes(sock, b"x" * n)
    sent = sum(range(1, len(socks) + 1))

    status, body = relay.get("/tunnels")
    assert status == 200
    tunnels = json.loads(body)
    assert sorted(t["worker"] for t in tunnels) == sorted(
        w for w, socks_w in by_worker.items() for _ in socks_w
    )
    assert sum(t["bytes_up"] for t in tunnels) == sent

    samples = relay.metrics()
    assert samples[f"konnect_relay_tunnels_opened_total{{{HOST}}}"] == len(socks)
    assert samples[f"konnect_relay_tunnels_active{{{HOST}}}"] == len(socks)
    assert samples[f'konnect_relay_tunnel_bytes_total{{direction="upstream",{HOST}}}'] == sent
    assert samples['konnect_relay_upstream_connect_seconds_count{egress="direct"}'] == len(socks)
    assert samples['konnect_relay_workers{state="up"}'] == 2
    assert samples['konnect_relay_workers{state="ready"}'] == 2
    assert samples["konnect_relay_worker_restarts_total{}"] == 0
    assert samples["konnect_relay_ready{}"] == 1
    assert samples["konnect_relay_build_info{}"] == 1
    assert relay.get("/healthz")[0] == 200
    assert relay.get("/readyz")[0] == 200
    for sock in socks:
        sock.close()


def test_listening_line_names_the_shared_port(start_relay: StartRelay, echo_port: int) -> None:
    """The supervisor's own line comes first (tests and tools parse it) and
    every worker listens on exactly that port."""
    relay = start_relay(workers_config(echo_port))
    worker_lines = [relay.wait_event(from_worker("listening", i)) for i in (0, 1)]
    proxy = f"{relay.proxy[0]}:{relay.proxy[1]}"
    assert relay.proxy[1] != 0
    assert [line["proxy"] for line in worker_lines] == [[proxy], [proxy]]
    assert all(line["admin"].endswith(f"worker-{i}.sock") for i, line in enumerate(worker_lines))
    rundir = Path(worker_lines[0]["admin"]).parent
    assert rundir.stat().st_mode & 0o777 == 0o700
    assert relay.stop() == 0
    assert not rundir.exists()


# --- restarts ------------------------------------------------------------------------------


def test_killed_worker_is_restarted_and_the_other_untouched(
    start_relay: StartRelay, echo_port: int, sockets: list[socket.socket]
) -> None:
    started = start_workers(start_relay, workers_config(echo_port))
    relay, pids = started.relay, started.pids
    by_worker = spread(relay, sockets)
    for sock in everything(by_worker):
        assert echoes(sock)
    opened = relay.metrics()[f"konnect_relay_tunnels_opened_total{{{HOST}}}"]

    os.kill(pids[0], signal.SIGKILL)
    exited = relay.wait_event(lambda e: e["event"] == "worker_exited" and e["worker"] == 0)
    assert exited["signal"] == "SIGKILL" and exited["expected"] is False
    restarting = relay.wait_event(lambda e: e["event"] == "worker_restarting")
    assert restarting["worker"] == 0 and restarting["delay_s"] == 0.5
    started = relay.wait_event(lambda e: e["event"] == "worker_started" and e["worker"] == 0)
    assert started["pid"] != pids[0]
    again = relay.wait_event(from_worker("listening", 0))
    assert again["proxy"] == [f"{relay.proxy[0]}:{relay.proxy[1]}"]  # the reserved port

    for sock in by_worker[0]:
        assert_closed(sock)
    for sock in by_worker[1]:
        assert echoes(sock, b"still here")
    samples = relay.metrics()
    assert samples["konnect_relay_worker_restarts_total{}"] == 1
    assert samples['konnect_relay_workers{state="up"}'] == 2
    # The dead worker's counts were kept: the total does not go backwards.
    assert samples[f"konnect_relay_tunnels_opened_total{{{HOST}}}"] == opened
    assert samples[f"konnect_relay_tunnels_active{{{HOST}}}"] == len(by_worker[1])
    assert {t["worker"] for t in json.loads(relay.get("/tunnels")[1])} == {1}
    sockets.append(open_tunnel(relay))
    assert echoes(sockets[-1])  # and new tunnels work
    for sock in everything(by_worker):
        sock.close()


def test_workers_die_with_a_killed_supervisor(start_relay: StartRelay, echo_port: int) -> None:
    """PR_SET_PDEATHSIG: no orphaned worker keeps the port."""
    started = start_workers(start_relay, workers_config(echo_port))
    fds = [os.pidfd_open(pid) for pid in started.pids.values()]
    try:
        started.relay.proc.kill()
        for fd in fds:
            readable, _, _ = select.select([fd], [], [], WAIT)
            assert readable, "a worker outlived its supervisor"
    finally:
        for fd in fds:
            os.close(fd)
        # nobody was left to remove it
        shutil.rmtree(started.rundir, ignore_errors=True)


def test_worker_failing_at_startup_is_fatal(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: workers fail
        port = taken.getsockname()[1]
        cfg = relay_config(workers=2, listen=[{"address": f"127.0.0.1:{port}"}])
        done = relay_cli("run", "--config", str(write_config(tmp_path, cfg)))
    assert done.returncode == 1
    assert "cannot listen" in done.stderr
    assert "while starting" in done.stderr
    assert '"event":"worker_restarting"' not in done.stdout


# --- reload and drain across workers ---------------------------------------------------


def test_sighup_invalid_is_refused_valid_reaches_every_worker(
    start_relay: StartRelay, echo_port: int, sockets: list[socket.socket]
) -> None:
    cfg = workers_config(echo_port)
    relay = start_workers(start_relay, cfg).relay
    by_worker = spread(relay, sockets)

    relay.rewrite({**cfg, "limits": {"idle_timeout": -1}})
    relay.sighup()
    failed = relay.wait_event(lambda e: e["event"] == "reload_failed")
    assert "worker" not in failed  # refused by the supervisor itself
    assert failed["errors"] == ["limits.idle_timeout: must be > 0"]
    assert relay.metrics()['konnect_relay_config_reloads_total{result="error"}'] == 1
    for sock in everything(by_worker):
        assert echoes(sock)

    relay.rewrite({**cfg, "deny": [RAW_HOST]})
    relay.sighup()
    for i in (0, 1):
        done = relay.wait_event(from_worker("reloaded", i))
        assert done["revoked"] == len(by_worker[i])
    summary = relay.wait_event(from_supervisor("reloaded"))
    assert summary["workers"] == [0, 1] and summary["failed"] == []
    # The invalid file never reached a worker: none logged a failed reload.
    assert not [e for e in relay.seen if e["event"] == "reload_failed" and "worker" in e]
    assert not [e for e in relay.seen if e["event"] == "worker_exited"]

    for sock in everything(by_worker):
        assert_closed(sock)
        sock.close()
    sock, head = connect_via(relay, f"{RAW_HOST}:443")
    assert head.startswith(b"HTTP/1.1 403 ")
    sock.close()
    samples = relay.metrics()
    assert samples['konnect_relay_config_reloads_total{result="ok"}'] == 1
    assert samples['konnect_relay_config_reloads_total{result="error"}'] == 1
    assert samples[f'konnect_relay_tunnels_closed_total{{{HOST},reason="policy_revoked"}}'] == len(
        everything(by_worker)
    )


def test_sigterm_drains_every_worker_and_exits_0(
    start_relay: StartRelay, echo_port: int, sockets: list[socket.socket]
) -> None:
    cfg = workers_config(echo_port, limits={"drain_timeout": 1.5})
    relay = start_workers(start_relay, cfg).relay
    by_worker = spread(relay, sockets)
    relay.proc.terminate()
    relay.wait_event(from_supervisor("draining"))
    for i in (0, 1):
        relay.wait_event(from_worker("draining", i))
    assert relay.get("/readyz")[0] == 503
    for sock in everything(by_worker):
        assert echoes(sock, b"still flowing")  # live tunnels run on while draining
    for sock in everything(by_worker):
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
        assert closed["reason"] == "drain"
        assert_closed(sock)
        sock.close()
    assert relay.proc.wait(WAIT) == 0
    relay.wait_event(from_supervisor("stopped"))
    exits = [relay.wait_event(lambda e: e["event"] == "worker_exited") for _ in (0, 1)]
    assert all(e["expected"] and e.get("code") == 0 for e in exits)


# --- sd_notify --------------------------------------------------------------------------


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    ns = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    yield ns
    ns.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sd_notify_ready_reloading_stopping(
    start_relay: StartRelay,
    echo_port: int,
    notify_socket: NotifySocket,
    workers: int,
) -> None:
    relay = start_relay(workers_config(echo_port, workers=workers))
    messages = [notify_socket.recv()]
    relay.sighup()
    relay.wait_event(from_supervisor("reloaded"))
    messages += [notify_socket.recv(), notify_socket.recv()]
    relay.proc.terminate()
    messages.append(notify_socket.recv())
    assert relay.proc.wait(WAIT * 2) == 0

    texts = [text for text, _ in messages]
    assert texts[0] == "READY=1"
    assert texts[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert texts[2:] == ["READY=1", "STOPPING=1"]
    # Only the main process speaks to systemd (workers get no NOTIFY_SOCKET).
    assert {pid for _, pid in messages} == {relay.proc.pid}


# --- pure parts -------------------------------------------------------------------------


# --- the systemd unit --------------------------------------------------------------------


def test_unit_file_keys() -> None:
    unit = configparser.RawConfigParser(strict=True, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    expected = {
        "Type": "notify",
        # All: after `konnect-relay upgrade` the successor sends MAINPID= and READY=1.
        "NotifyAccess": "all",
        "ExecStart": "/usr/local/bin/konnect-relay run --config /etc/konnect-relay/relay.yaml"
        " --pid-file /run/konnect-relay/relay.pid",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillMode": "mixed",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LimitNOFILE": "65536",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
    }
    assert {k: service.get(k) for k in expected} == expected
    # Stop timeout covers the default drain (25 s) plus the workers' 10 s grace.
    drain = config.DEFAULT_DRAIN_TIMEOUT
    assert int(service["TimeoutStopSec"]) >= drain + 10
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the keys are checked by test_unit_file_keys)")
    binary = shutil.which("konnect-relay", path=os.path.dirname(sys.executable))
    assert binary is not None, "konnect-relay console script not installed in this environment"
    # verify insists that ExecStart exists: point it at this environment's script.
    unit = tmp_path / "konnect-relay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/konnect-relay", binary))
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr
