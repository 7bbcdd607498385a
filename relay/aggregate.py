"""Metrics of several processes merged into one exposition (pure).

With ``workers: N`` the supervisor's /metrics sums the workers' samples by
(name, labels): counters, histograms and most gauges are summed, 0/1 state
gauges take the minimum, ``*_info`` the maximum; the supervisor's own families
replace the workers' of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client import generate_latest as render_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# 0/1 state gauges: the aggregate is 1 only while every worker reports 1.
MIN_GAUGES = frozenset({"konnect_relay_ready", "konnect_relay_egress_up"})
# Sample types whose value only grows while a process lives.
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})

# As in metrics.py: the *_created series double the exposition and no dashboard
# uses them (the switch is process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _combine(family: Metric) -> str:
    if family.type == "gauge":
        if family.name in MIN_GAUGES:
            return "min"
        if family.name.endswith("_info"):
            return "max"  # constant 1 per process
    return "sum"


def aggregate(sources: Iterable[Iterable[Metric]], own: Iterable[Metric] = ()) -> list[Metric]:
    """Merge metric families from several processes by (sample name, labels).

    Counters, histograms and gauges are summed, except MIN_GAUGES (minimum) and
    ``*_info`` (maximum). Families in ``own`` are the supervisor's and are taken
    as they are; a worker family of the same name is dropped (the supervisor
    counts config reloads once, not once per worker).
    """
    own = list(own)
    owned = {f.name for f in own}
    merged: dict[str, tuple[Metric, dict[SampleKey, float]]] = {}
    for families in sources:
        for family in families:
            if family.name in owned:
                continue
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (family, {})
            how = _combine(entry[0])
            values = entry[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = values.get(key)
                if old is None:
                    values[key] = sample.value
                elif how == "min":
                    values[key] = min(old, sample.value)
                elif how == "max":
                    values[key] = max(old, sample.value)
                else:
                    values[key] = old + sample.value
    out = []
    for first, values in merged.values():
        family = Metric(first.name, first.documentation, first.type, first.unit)
        for (name, labels), value in values.items():
            family.add_sample(name, dict(labels), value)
        out.append(family)
    return out + own


def cumulative(families: Iterable[Metric]) -> list[Metric]:
    """The families whose samples only grow (what a dead worker leaves behind)."""
    return [f for f in families if f.type in CUMULATIVE_TYPES]


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    """Prometheus text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Snapshot(families))
    return render_latest(registry)
