"""The benchmark's "Setup targets" block: each target against this run's figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN_PY = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["bench_run"]
    return module


def figures(relay_rate: float, relay_p99: float) -> dict[str, dict[str, Any]]:
    def proxy(rate: float, p99: float) -> dict[str, Any]:
        return {"setup_c64": {"tunnels_per_s": rate}, "setup_c1": {"p99_ms": p99}}

    return {
        "relay": proxy(relay_rate, relay_p99),
        "squid": proxy(4000.0, 0.60),
        "uvloop-bare": proxy(5000.0, 0.50),
        "tinyproxy": proxy(6000.0, 0.50),
    }


def test_a_run_short_of_every_target_says_not_met(bench: ModuleType) -> None:
    lines = bench.target_lines(figures(2841.0, 1.483), after=False)
    assert lines == [
        "Setup targets (one worker, every feature on):",
        "",
        "- setup rate c=64 at least 0.80x squid's: 0.71x, not met",
        "- setup rate c=64 at least 0.65x uvloop-bare's: 0.57x, not met",
        "- p99 at c=1 at most 1.00x squid's: 2.47x, not met",
        "- p99 at c=1 at most 1.30x tinyproxy's: 2.97x, not met",
    ]


def test_each_bound_is_met_at_its_edge(bench: ModuleType) -> None:
    # 3,250/s is 0.81x squid and 0.65x uvloop-bare; 0.60 ms equals squid's p99
    # and is 1.20x tinyproxy's.
    lines = bench.target_lines(figures(3250.0, 0.60), after=True)
    assert lines[0] == ""
    assert [line.rsplit(", ", 1)[1] for line in lines[3:]] == ["met"] * 4


def test_one_p99_target_missed_is_the_only_one_not_met(bench: ModuleType) -> None:
    lines = bench.target_lines(figures(3500.0, 0.62), after=False)
    verdicts = {line.split(": ")[0]: line.rsplit(", ", 1)[1] for line in lines[2:]}
    assert verdicts == {
        "- setup rate c=64 at least 0.80x squid's": "met",
        "- setup rate c=64 at least 0.65x uvloop-bare's": "met",
        "- p99 at c=1 at most 1.00x squid's": "not met",
        "- p99 at c=1 at most 1.30x tinyproxy's": "met",
    }


def test_targets_without_their_figures_are_left_out(bench: ModuleType) -> None:
    figs = figures(3000.0, 1.0)
    del figs["tinyproxy"], figs["uvloop-bare"]
    lines = bench.target_lines(figs, after=False)
    assert [line.split(" at ")[0] for line in lines[2:]] == ["- setup rate c=64", "- p99"]
    assert bench.target_lines({"relay": figs["relay"]}, after=True) == []


INTERRUPTS = """\
            CPU0       CPU1
   1:          9          0   IO-APIC    1-edge      i8042
LOC:    2714611    2453709   Local timer interrupts
RES:     286363    1532515   Rescheduling interrupts
CAL:    2444171   11394150   Function call interrupts
TLB:      51039      46081   TLB shootdowns
"""


def test_wakeup_ipis_sums_rescheduling_and_function_calls_of_one_core(bench: ModuleType) -> None:
    assert bench.wakeup_ipis(1, INTERRUPTS) == 1532515 + 11394150
    assert bench.wakeup_ipis(0, INTERRUPTS) == 286363 + 2444171


@pytest.mark.parametrize(
    "text",
    [
        "",
        INTERRUPTS.replace("CAL:", "XYZ:"),  # a kernel without one of the rows
        INTERRUPTS.replace("CPU1", "CPU7"),  # no such core
    ],
)
def test_wakeup_ipis_unknown_is_none(bench: ModuleType, text: str) -> None:
    assert bench.wakeup_ipis(1, text) is None


def test_wakeup_ipis_reads_this_kernel(bench: ModuleType) -> None:
    if not Path("/proc/interrupts").exists():
        pytest.skip("no /proc/interrupts")
    first = bench.wakeup_ipis(0)
    if first is None:
        pytest.skip("this kernel shows no RES/CAL rows")
    assert first >= 0
    assert bench.wakeup_ipis(0) >= first  # counters only grow


def test_setup_table_shows_wakeups_and_a_dash_where_unmeasured(bench: ModuleType) -> None:
    assert bench.setup_cell("load_ipis_per_tunnel", {"load_ipis_per_tunnel": 2.976}) == "2.98"
    assert bench.setup_cell("load_ipis_per_tunnel", {}) == "-"


KEPT_RUN = RUN_PY.parent / "results"


def test_kept_results_render_as_kept(bench: ModuleType) -> None:
    results = json.loads((KEPT_RUN / "results.json").read_text())
    assert bench.to_markdown(results) == (KEPT_RUN / "results.md").read_text()


def test_wakeup_explanation_only_where_wakeups_were_measured(bench: ModuleType) -> None:
    results = json.loads((KEPT_RUN / "results.json").read_text())
    assert "Load-core wake-ups:" in bench.to_markdown(results)
    for figs in results["proxies"].values():
        for record in figs.values():
            record.pop("load_ipis_per_tunnel", None)
    text = bench.to_markdown(results)
    assert "Load-core wake-ups:" not in text
    assert "| c=64 load-core wake-ups per tunnel | - | - |" in text
