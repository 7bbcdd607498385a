"""The alert rules and the Grafana dashboard against a real Prometheus server.

Debian's prometheus, on loopback with its own temp dir, scrapes a running
relay every second and evaluates deploy/prometheus/konnect-relay.rules.yaml.
One data plane loses its telemetry tunnel, another reconnects in a loop, a
third is refused: Prometheus' HTTP API must show the matching alerts pending
(their ``for:`` is minutes; pending is the rule's expression holding), and
every query of deploy/grafana/konnect-relay.json must return data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.helpers import ROOT, connect_head, dial, read_head
from tests.support.relay import (
    CP_HOST,
    TP_HOST,
    FakeControlPlane,
    RelayProcess,
    StartRelay,
    free_port,
    relay_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(150)

RULES = ROOT / "deploy" / "prometheus" / "konnect-relay.rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "konnect-relay.json"
NO_TELEMETRY, FLAPPING, REFUSED = "127.0.0.3", "127.0.0.5", "127.0.0.4"
SETTLE = 60.0  # seconds Prometheus gets to scrape, evaluate and see rates


@contextmanager
def tunnel(relay: RelayProcess, source: str, host: str) -> Iterator[socket.socket]:
    sock = dial(relay.proxy, source)
    try:
        sock.sendall(connect_head(f"{host}:443"))
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        yield sock
    finally:
        sock.close()


@contextmanager
def prometheus(target: str, tmp: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's prometheus must be installed (.ci/run)")
        pytest.skip("Debian's prometheus is not installed")
    conf = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "konnect-relay", "static_configs": [{"targets": [target]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(conf))
    address = f"127.0.0.1:{free_port()}"
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_until(lambda: ready(address), what="prometheus ready")
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def ready(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def api(address: str, path: str, **params: str) -> Any:
    url = f"http://{address}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]
    assert exprs
    return [e.replace('"$instance"', '".*"').replace("$__rate_interval", "30s") for e in exprs]


def test_alerts_become_pending_and_every_dashboard_query_returns_data(
    start_relay: StartRelay, fake_cp: FakeControlPlane, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{fake_cp.port}"
    relay = start_relay(
        relay_config(
            resolver={"static": {CP_HOST: target, TP_HOST: target}, "allow_private": True},
            limits={"tls_peek_timeout": 120, "reconnect_window": 300},
            data_planes={"no_telemetry_after": 0.5, "flapping_reconnects": 3},
        )
    )
    with ExitStack() as stack:
        address = stack.enter_context(prometheus(relay.admin, tmp_path))
        stack.enter_context(tunnel(relay, NO_TELEMETRY, CP_HOST))  # and never telemetry
        deadline = time.monotonic() + SETTLE
        wanted = {"KonnectRelayDataPlanesNoTelemetry", "KonnectRelayDataPlanesFlapping"}
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            # A data plane that loops: connect, drop, connect again (refused between).
            with tunnel(relay, FLAPPING, CP_HOST):
                pass
            with dial(relay.proxy, REFUSED) as sock:
                sock.sendall(connect_head("evil.example.com:443"))
                read_head(sock)
            alerts = api(address, "alerts")["alerts"]
            seen = {a["labels"]["alertname"]: a["state"] for a in alerts}
            if wanted <= seen.keys() and all(
                api(address, "query", query=q)["result"] for q in dashboard_queries()
            ):
                break
            time.sleep(0.5)  # a reconnect every half second: a flapping data plane's pace
        assert wanted <= seen.keys(), seen
        assert {seen[a] for a in wanted} <= {"pending", "firing"}
        assert "KonnectRelayDown" not in seen and "KonnectRelayTargetMissing" not in seen
        [target_health] = api(address, "targets")["activeTargets"]
        assert target_health["health"] == "up", target_health
        empty = [q for q in dashboard_queries() if not api(address, "query", query=q)["result"]]
        assert empty == [], empty
        planes = api(address, "query", query="konnect_relay_data_planes")["result"]
        by_state = {r["metric"]["state"]: float(r["value"][1]) for r in planes}
        assert by_state["no_telemetry"] == 1 and by_state["flapping"] == 1
