"""Every metric the Grafana dashboard queries is exported by a running relay."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.test_artifacts import dashboard_metric_names
from tests.support.relay import RelayProcess


def exported_names(relay: RelayProcess) -> set[str]:
    """Names from the `# TYPE` lines of /metrics; counters carry their _total there."""
    status, body = relay.get("/metrics")
    assert status == 200
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(
                f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
            )
    return names


def test_dashboard_queries_only_exported_metrics(
    start_relay: Callable[..., RelayProcess],
) -> None:
    wanted = dashboard_metric_names()
    assert len(wanted) >= 6  # the dashboard really queries something
    missing = wanted - exported_names(start_relay())
    assert not missing, f"the dashboard queries metrics the relay does not export: {missing}"
