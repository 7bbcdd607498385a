"""The benchmark's smoke mode runs end to end, so bench/ never rots.

Runs ``bench/run.py --smoke`` (a few seconds: one repetition, tiny sizes) in a
subprocess and checks that results.json holds every figure for every target
with plausible numbers. The full benchmark is not part of the test run.

squid and tinyproxy are Debian packages; without them the test skips locally
and fails in CI (``CI`` set), where they must be installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
TARGETS = ("direct", "relay", "squid", "tinyproxy")
PROXIES = ("relay", "squid", "tinyproxy")
BULK = ("bulk_up_1", "bulk_up_8", "bulk_down_1", "bulk_down_8")
SETUP = ("setup_c1", "setup_c64")
# Smoke mode takes ~15 s here; the margin covers a loaded CI runner.
SMOKE_TIMEOUT = 150


def missing_tools() -> list[str]:
    return [t for t in ("squid", "tinyproxy", "gcc", "taskset") if shutil.which(t) is None]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = missing_tools()
    if missing:
        reason = f"benchmark needs {', '.join(missing)} (apt-get install squid tinyproxy)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("benchmark pins the proxy and the load to two different cores")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "results.md").read_text().count("|") > 50
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def is_share(x: Any) -> bool:
    """A CPU share: a number between 0 and 1 (a little over, from tick rounding).

    Smoke runs last tens of milliseconds, a few 10 ms ticks, so a share of 0 is
    a possible reading; the full run lasts seconds per figure.
    """
    return isinstance(x, int | float) and 0 <= x <= 1.5


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_every_target_is_measured(results: dict[str, Any]) -> None:
    assert results["mode"] == "smoke"
    assert sorted(results["proxies"]) == sorted(TARGETS)
    machine = results["machine"]
    assert machine["cores"] >= 2
    assert machine["open_files_cap"]["hard"] > 0
    assert "Squid" in machine["squid"]
    assert "tinyproxy" in machine["tinyproxy"]


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("figure", BULK)
def test_bulk_figure(results: dict[str, Any], target: str, figure: str) -> None:
    fig = results["proxies"][target][figure]
    tunnels = int(figure.rsplit("_", 1)[1])
    assert fig["tunnels"] == tunnels
    assert fig["bytes"] == results["method"]["bulk_bytes_per_figure"] // tunnels * tunnels
    assert fig["seconds"] > 0
    assert fig["bytes_per_s"] > 0
    assert is_share(fig["load_cpu"])
    if target == "direct":
        assert fig["proxy_cpu"] is None
    else:
        assert is_share(fig["proxy_cpu"])


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("figure", SETUP)
def test_setup_figure(results: dict[str, Any], target: str, figure: str) -> None:
    fig = results["proxies"][target][figure]
    assert fig["errors"] == 0
    assert fig["tunnels"] > 0
    assert fig["tunnels_per_s"] > 0
    assert 0 < fig["p50_ms"] <= fig["p99_ms"] <= fig["max_ms"]
    if target == "direct":
        assert fig["proxy_cpu"] is None
    else:
        assert is_share(fig["proxy_cpu"])
        assert fig["proxy_cpu"] > 0  # hundreds of tunnels over 0.3 s: many ticks


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", PROXIES)
def test_idle_figure(results: dict[str, Any], target: str) -> None:
    fig = results["proxies"][target]["idle"]
    steps = results["method"]["idle_steps"]
    assert [s["tunnels"] for s in fig["steps"]] == [0, *steps]
    assert all(s["rss_kb"] > 0 for s in fig["steps"])
    assert all(isinstance(s["kb_per_tunnel"], int | float) for s in fig["steps"][1:])
    assert fig["kb_per_tunnel"] == fig["steps"][-1]["kb_per_tunnel"]


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_direct_has_no_memory_figure(results: dict[str, Any]) -> None:
    assert "idle" not in results["proxies"]["direct"]
