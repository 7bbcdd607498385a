"""Every Prometheus metric the relay exports, defined in one place.

Label values are bounded: ``host`` is only ever a normalised host the policy
allowed, ``reason`` and ``egress`` come from fixed sets. Byte counters are
folded from the tunnels' plain integer counters on scrape and on close, so
they are current while a tunnel lives without any per-chunk work.

The series every tunnel touches (opened, active, closed, bytes, reconnects,
durations, dial times, pending heads) are plain integers and bucket lists
here, turned into Prometheus families only when /metrics is scraped
(``TunnelCollector``): a tunnel's setup and close cost a few additions
instead of a dozen locked client-library calls. The exposition is the same
as with the client library's own Counter, Gauge and Histogram.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString

from relay.admin import Reply

# The *_created series double the exposition size and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Dial latency: loopback is sub-millisecond, intercontinental TLS-free TCP
# setup ~300 ms; Kong gives up at 5 s.
CONNECT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Tunnels live for seconds (a decK call) to days (a data plane's outlet).
DURATION_BUCKETS = (1, 10, 60, 300, 1800, 3600, 6 * 3600, 24 * 3600, 7 * 24 * 3600)


def reloads_counter(registry: CollectorRegistry) -> Counter:
    """Reloads by result; the supervisor owns it when there are workers."""
    return Counter(
        "konnect_relay_config_reloads_total",
        "Configuration reloads by result (ok, error: the old config keeps running)",
        ["result"],
        registry=registry,
    )


class KonnectIPsMetrics:
    """resolver.konnect_ips: the list in force and its refreshes. The supervisor
    owns these when there are workers (it fetches for all of them)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prefixes = Gauge(
            "konnect_relay_konnect_ips_prefixes",
            "Prefixes in Konnect's published ingress list in force (0: none)",
            registry=registry,
        )
        self.age = Gauge(
            "konnect_relay_konnect_ips_age_seconds",
            "Seconds since the list in force was fetched (+Inf while there is none)",
            registry=registry,
        )
        self.refreshes = Counter(
            "konnect_relay_konnect_ips_refreshes_total",
            "Fetches and loads of Konnect's ingress list by result (error: the old list stays)",
            ["result"],
            registry=registry,
        )


class LazyHistogram:
    """A histogram kept as integers: observe() is one bisect and two additions.
    Buckets hold v <= bound, as the client library's Histogram does."""

    __slots__ = ("bounds", "counts", "labels", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        # "le" values exactly as the client library writes them (1 -> "1.0").
        self.labels = [floatToGoString(b) for b in (*bounds, INF)]  # type: ignore[no-untyped-call]

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def state(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    def add(self, state: dict[str, Any]) -> None:
        """Add another histogram's counts (same buckets only)."""
        if tuple(state["bounds"]) != self.bounds:
            return
        for i, count in enumerate(state["counts"]):
            self.counts[i] += int(count)
        self.sum += float(state["sum"])

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for label, count in zip(self.labels, self.counts, strict=True):
            total += count
            out.append((label, total))
        return out


class HostSeries:
    """One host's tunnel series as plain numbers (exported by TunnelCollector)."""

    __slots__ = ("active", "closed", "down", "duration", "opened", "reconnects", "up")

    def __init__(self) -> None:
        self.opened = 0
        self.active = 0
        self.reconnects = 0
        self.up = 0
        self.down = 0
        self.duration = LazyHistogram(DURATION_BUCKETS)
        self.closed: dict[str, int] = {}  # by reason

    def closed_by(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1


class TunnelCollector(Collector):
    """Builds the per-tunnel families from the plain counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        hosts = sorted(m.hosts.items())
        active = GaugeMetricFamily(
            "konnect_relay_tunnels_active", "Tunnels currently open", labels=["host"]
        )
        opened = CounterMetricFamily(
            "konnect_relay_tunnels_opened", "Tunnels established", labels=["host"]
        )
        nbytes = CounterMetricFamily(
            "konnect_relay_tunnel_bytes",
            "Bytes relayed; direction=upstream is client to destination",
            labels=["host", "direction"],
        )
        reconnects = CounterMetricFamily(
            "konnect_relay_tunnel_reconnects",
            "New tunnels from a client to a host whose previous tunnel closed within the window",
            labels=["host"],
        )
        closed = CounterMetricFamily(
            "konnect_relay_tunnels_closed", "Tunnels closed", labels=["host", "reason"]
        )
        duration = HistogramMetricFamily(
            "konnect_relay_tunnel_duration_seconds", "Lifetime of closed tunnels", labels=["host"]
        )
        for host, series in hosts:
            active.add_metric([host], series.active)
            opened.add_metric([host], series.opened)
            nbytes.add_metric([host, "upstream"], series.up)
            nbytes.add_metric([host, "downstream"], series.down)
            reconnects.add_metric([host], series.reconnects)
            for reason, count in series.closed.items():
                closed.add_metric([host, reason], count)
            duration.add_metric([host], series.duration.cumulative(), series.duration.sum)
        connect = HistogramMetricFamily(
            "konnect_relay_upstream_connect_seconds",
            "Time to reach the destination (resolve and connect)",
            labels=["egress"],
        )
        for egress, histogram in sorted(m.connect.items()):
            connect.add_metric([egress], histogram.cumulative(), histogram.sum)
        pending = GaugeMetricFamily(
            "konnect_relay_pending_requests",
            "Connections that have not yet sent a complete request head",
            value=m.pending_heads(),
        )
        planes = GaugeMetricFamily(
            "konnect_relay_data_planes",
            "Client identities (data planes) by state (see /clients)",
            labels=["state"],
        )
        for state, count in m.data_planes().items():
            planes.add_metric([state], count)
        yield from (active, opened, nbytes, reconnects, closed, duration, connect, pending, planes)


class Metrics:
    """The relay's metrics in their own registry (one per relay instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Info("konnect_relay_build", "konnect-relay version", registry=r)
        # process_open_fds, process_max_fds, CPU, memory: for the open-files alert
        # (deploy/prometheus); with workers the supervisor sums the workers' values.
        ProcessCollector(registry=r)
        # Host labels are bounded by the allowlist (see the module docstring).
        self.hosts: dict[str, HostSeries] = {}
        self.connect: dict[str, LazyHistogram] = {}  # dial times by egress
        # Set by the relay: how many connections are still sending their head.
        self.pending_heads: Callable[[], int] = lambda: 0
        self.data_planes: Callable[[], dict[str, int]] = dict
        r.register(TunnelCollector(self))
        self.requests_denied = Counter(
            "konnect_relay_requests_denied_total",
            "Requests refused before a tunnel was opened",
            ["reason"],
            registry=r,
        )
        self.early_closes = Counter(
            "konnect_relay_early_closes_total",
            "Connections that ended before a complete request head, by listener and "
            "phase (tls_handshake, head)",
            ["listener", "phase"],
            registry=r,
        )
        self.would_deny = Counter(
            "konnect_relay_requests_would_deny_total",
            "Requests the policy would deny, let through in policy_mode: report",
            ["reason"],
            registry=r,
        )
        self.connect_failures = Counter(
            "konnect_relay_upstream_connect_failures_total",
            "Dials that failed, by cause",
            ["egress", "reason"],
            registry=r,
        )
        self.egress_up = Gauge(
            "konnect_relay_egress_up",
            "1 while a long-lived egress connection (SSH bastion) is up",
            ["egress"],
            registry=r,
        )
        self.egress_reconnects = Counter(
            "konnect_relay_egress_reconnects_total",
            "Times a long-lived egress connection was re-established",
            ["egress"],
            registry=r,
        )
        self.reloads = reloads_counter(r)
        self.konnect_ips = KonnectIPsMetrics(r)
        self.ready = Gauge(
            "konnect_relay_ready", "1 while accepting new tunnels, 0 while draining", registry=r
        )

    def counters(self) -> list[Counter]:
        """The client library's counters among these families (for carry())."""
        return [
            self.requests_denied,
            self.early_closes,
            self.would_deny,
            self.connect_failures,
            self.egress_reconnects,
            self.reloads,
            self.konnect_ips.refreshes,
        ]

    def carried(self) -> dict[str, Any]:
        """Every cumulative series, for a successor to continue from (so an
        upgrade is no counter reset to rate()); gauges are its own."""
        counters: dict[str, list[tuple[dict[str, str], float]]] = {}
        for counter in self.counters():
            for family in counter.collect():
                counters[family.name] = [
                    (s.labels, s.value) for s in family.samples if s.name.endswith("_total")
                ]
        return {
            "hosts": {
                label: {
                    "opened": h.opened,
                    "reconnects": h.reconnects,
                    "up": h.up,
                    "down": h.down,
                    "closed": h.closed,
                    "duration": h.duration.state(),
                }
                for label, h in self.hosts.items()
            },
            "connect": {egress: hist.state() for egress, hist in self.connect.items()},
            "counters": counters,
        }

    def add_carried(self, state: dict[str, Any]) -> None:
        """Add a predecessor's totals (carried()) to ours. A series this
        version no longer has, or a histogram whose buckets changed, is left out."""
        for label, h in state.get("hosts", {}).items():
            series = self.host(label)
            series.opened += int(h["opened"])
            series.reconnects += int(h["reconnects"])
            series.up += int(h["up"])
            series.down += int(h["down"])
            for reason, count in h["closed"].items():
                series.closed[reason] = series.closed.get(reason, 0) + int(count)
            series.duration.add(h["duration"])
        for egress, hist in state.get("connect", {}).items():
            self.connect_time(egress).add(hist)
        by_name = {family.name: c for c in self.counters() for family in c.collect()}
        for name, samples in state.get("counters", {}).items():
            counter = by_name.get(name)
            if counter is None:
                continue
            for labels, value in samples:
                try:
                    target = counter.labels(**labels) if labels else counter
                    target.inc(float(value))
                except ValueError:  # label names changed
                    continue

    def reply(self) -> Reply:
        """/metrics: the exposition of this registry."""
        return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    def host(self, label: str) -> HostSeries:
        series = self.hosts.get(label)
        if series is None:
            series = self.hosts[label] = HostSeries()
        return series

    def connect_time(self, egress: str) -> LazyHistogram:
        histogram = self.connect.get(egress)
        if histogram is None:
            histogram = self.connect[egress] = LazyHistogram(CONNECT_BUCKETS)
        return histogram


class SupervisorMetrics:
    """The supervisor's own families, merged into the aggregated /metrics."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.workers = Gauge(
            "konnect_relay_workers",
            "Worker processes: configured, up (running), ready (listening)",
            ["state"],
            registry=r,
        )
        self.restarts = Counter(
            "konnect_relay_worker_restarts_total",
            "Workers restarted after an unexpected exit",
            registry=r,
        )
        self.scrape_errors = Counter(
            "konnect_relay_worker_scrape_errors_total",
            "Worker admin queries that failed or timed out (their samples are missing)",
            registry=r,
        )
        self.reloads = reloads_counter(r)
        self.konnect_ips = KonnectIPsMetrics(r)
