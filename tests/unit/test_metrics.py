"""The per-tunnel series kept as plain numbers export exactly what the client
library's own Counter, Gauge and Histogram would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relay.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, LazyHistogram, Metrics

HOST = "x.eu.cp0.konghq.com"


@settings(max_examples=200)
@given(
    st.sampled_from([CONNECT_BUCKETS, DURATION_BUCKETS]),
    st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False), max_size=50),
)
def test_lazy_histogram_matches_the_client_library(
    bounds: tuple[float, ...], values: list[float]
) -> None:
    registry = CollectorRegistry()
    reference = Histogram("h", "h", buckets=bounds, registry=registry)
    lazy = LazyHistogram(bounds)
    for value in values:
        reference.observe(value)
        lazy.observe(value)
    for le, count in lazy.cumulative():
        assert registry.get_sample_value("h_bucket", {"le": le}) == count, le
    assert registry.get_sample_value("h_sum") == lazy.sum


def test_bucket_bounds_are_inclusive() -> None:
    lazy = LazyHistogram((1.0, 10.0))
    for value in (0.5, 1.0, 1.0000001, 10.0, 11.0):
        lazy.observe(value)
    assert lazy.cumulative() == [("1.0", 2), ("10.0", 4), ("+Inf", 5)]


def reference_exposition(pending: int) -> bytes:
    """What the same events give with the client library's metric classes."""
    r = CollectorRegistry()
    active = Gauge("konnect_relay_tunnels_active", "Tunnels currently open", ["host"], registry=r)
    opened = Counter(
        "konnect_relay_tunnels_opened_total", "Tunnels established", ["host"], registry=r
    )
    nbytes = Counter(
        "konnect_relay_tunnel_bytes_total",
        "Bytes relayed; direction=upstream is client to destination",
        ["host", "direction"],
        registry=r,
    )
    reconnects = Counter(
        "konnect_relay_tunnel_reconnects_total",
        "New tunnels from a client to a host whose previous tunnel closed within the window",
        ["host"],
        registry=r,
    )
    closed = Counter(
        "konnect_relay_tunnels_closed_total", "Tunnels closed", ["host", "reason"], registry=r
    )
    duration = Histogram(
        "konnect_relay_tunnel_duration_seconds",
        "Lifetime of closed tunnels",
        ["host"],
        buckets=DURATION_BUCKETS,
        registry=r,
    )
    connect = Histogram(
        "konnect_relay_upstream_connect_seconds",
        "Time to reach the destination (resolve and connect)",
        ["egress"],
        buckets=CONNECT_BUCKETS,
        registry=r,
    )
    gauge = Gauge(
        "konnect_relay_pending_requests",
        "Connections that have not yet sent a complete request head",
        registry=r,
    )
    opened.labels(HOST).inc(3)
    active.labels(HOST).set(1)
    reconnects.labels(HOST).inc(1)
    nbytes.labels(HOST, "upstream").inc(1234)
    nbytes.labels(HOST, "downstream").inc(99)
    closed.labels(HOST, "client_eof").inc(2)
    duration.labels(HOST).observe(0.25)
    duration.labels(HOST).observe(4000)
    connect.labels("direct").observe(0.003)
    gauge.set(pending)
    return generate_latest(r)


def test_exposition_equals_the_client_library() -> None:
    metrics = Metrics()
    metrics.pending_heads = lambda: 7
    series = metrics.host(HOST)
    series.opened += 3
    series.active += 3
    series.active -= 2
    series.reconnects += 1
    series.up += 1234
    series.down += 99
    series.closed_by("client_eof")
    series.closed_by("client_eof")
    series.duration.observe(0.25)
    series.duration.observe(4000)
    metrics.connect_time("direct").observe(0.003)
    ours = generate_latest(metrics.registry).decode()
    reference = reference_exposition(7).decode()
    for line in reference.splitlines():
        assert line in ours, line
