"""Every Prometheus metric the relay exports, defined in one place.

Label values are bounded: ``host`` is only ever a normalised host the policy
allowed, ``reason`` and ``egress`` come from fixed sets. Byte counters are
folded from the tunnels' plain integer counters on scrape and on close, so
they are current while a tunnel lives without any per-chunk work.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

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


class HostSeries:
    """The per-host children of the tunnel metrics, looked up once per host:
    ``labels()`` costs microseconds, a dict hit tens of nanoseconds."""

    __slots__ = ("active", "closed", "down", "duration", "metrics", "opened", "reconnects", "up")

    def __init__(self, metrics: Metrics, host: str) -> None:
        self.metrics = metrics
        self.opened = metrics.tunnels_opened.labels(host)
        self.active = metrics.tunnels_active.labels(host)
        self.reconnects = metrics.reconnects.labels(host)
        self.up = metrics.tunnel_bytes.labels(host, "upstream")
        self.down = metrics.tunnel_bytes.labels(host, "downstream")
        self.duration = metrics.tunnel_duration.labels(host)
        self.closed: dict[str, Counter] = {}

    def closed_by(self, host: str, reason: str) -> Counter:
        child = self.closed.get(reason)
        if child is None:
            child = self.closed[reason] = self.metrics.tunnels_closed.labels(host, reason)
        return child


class Metrics:
    """The relay's metrics in their own registry (one per relay instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Info("konnect_relay_build", "konnect-relay version", registry=r)
        self.tunnels_active = Gauge(
            "konnect_relay_tunnels_active", "Tunnels currently open", ["host"], registry=r
        )
        self.tunnels_opened = Counter(
            "konnect_relay_tunnels_opened_total", "Tunnels established", ["host"], registry=r
        )
        self.tunnel_bytes = Counter(
            "konnect_relay_tunnel_bytes_total",
            "Bytes relayed; direction=upstream is client to destination",
            ["host", "direction"],
            registry=r,
        )
        self.reconnects = Counter(
            "konnect_relay_tunnel_reconnects_total",
            "New tunnels from a client to a host whose previous tunnel closed within the window",
            ["host"],
            registry=r,
        )
        self.tunnels_closed = Counter(
            "konnect_relay_tunnels_closed_total", "Tunnels closed", ["host", "reason"], registry=r
        )
        self.requests_denied = Counter(
            "konnect_relay_requests_denied_total",
            "Requests refused before a tunnel was opened",
            ["reason"],
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
        self.connect_seconds = Histogram(
            "konnect_relay_upstream_connect_seconds",
            "Time to reach the destination (resolve and connect)",
            ["egress"],
            buckets=CONNECT_BUCKETS,
            registry=r,
        )
        self.tunnel_duration = Histogram(
            "konnect_relay_tunnel_duration_seconds",
            "Lifetime of closed tunnels",
            ["host"],
            buckets=DURATION_BUCKETS,
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
        self.pending_heads = Gauge(
            "konnect_relay_pending_requests",
            "Connections that have not yet sent a complete request head",
            registry=r,
        )
        self.ready = Gauge(
            "konnect_relay_ready", "1 while accepting new tunnels, 0 while draining", registry=r
        )
        # Host labels are bounded by the allowlist (see the module docstring).
        self._hosts: dict[str, HostSeries] = {}
        self._connect: dict[str, Histogram] = {}

    def host(self, label: str) -> HostSeries:
        series = self._hosts.get(label)
        if series is None:
            series = self._hosts[label] = HostSeries(self, label)
        return series

    def connect_time(self, egress: str) -> Histogram:
        child = self._connect.get(egress)
        if child is None:
            child = self._connect[egress] = self.connect_seconds.labels(egress)
        return child


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
