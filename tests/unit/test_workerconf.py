"""Workers, pure: metrics aggregation, restart backoff, worker count and the workers' document."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import config
from relay.aggregate import aggregate, render
from relay.workerconf import worker_count, worker_document
from relay.workers import BACKOFF_CAP, Backoff
from tests.support.relay import (
    parse_samples,
    relay_config,
)

WORKER_A = """\
# TYPE konnect_relay_tunnels_opened_total counter
konnect_relay_tunnels_opened_total{host="a"} 3.0
konnect_relay_tunnels_opened_total{host="b"} 1.0
# TYPE konnect_relay_tunnels_active gauge
konnect_relay_tunnels_active{host="a"} 2.0
# TYPE konnect_relay_ready gauge
konnect_relay_ready 1.0
# TYPE konnect_relay_build_info gauge
konnect_relay_build_info 1.0
# TYPE konnect_relay_config_reloads_total counter
konnect_relay_config_reloads_total{result="ok"} 5.0
# TYPE konnect_relay_upstream_connect_seconds histogram
konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="0.1"} 1.0
konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="+Inf"} 2.0
konnect_relay_upstream_connect_seconds_sum{egress="direct"} 0.5
konnect_relay_upstream_connect_seconds_count{egress="direct"} 2.0
"""


WORKER_B = """\
# TYPE konnect_relay_tunnels_opened_total counter
konnect_relay_tunnels_opened_total{host="a"} 4.0
# TYPE konnect_relay_tunnels_active gauge
konnect_relay_tunnels_active{host="a"} 1.0
# TYPE konnect_relay_ready gauge
konnect_relay_ready 0.0
# TYPE konnect_relay_build_info gauge
konnect_relay_build_info 1.0
# TYPE konnect_relay_config_reloads_total counter
konnect_relay_config_reloads_total{result="ok"} 5.0
# TYPE konnect_relay_upstream_connect_seconds histogram
konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="0.1"} 3.0
konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="+Inf"} 3.0
konnect_relay_upstream_connect_seconds_sum{egress="direct"} 0.25
konnect_relay_upstream_connect_seconds_count{egress="direct"} 3.0
"""


OWN = """\
# TYPE konnect_relay_config_reloads_total counter
konnect_relay_config_reloads_total{result="ok"} 1.0
"""


def _merged() -> dict[str, float]:
    sources = [list(text_string_to_metric_families(t)) for t in (WORKER_A, WORKER_B)]
    own = list(text_string_to_metric_families(OWN))
    return parse_samples(render(aggregate(sources, own)).decode())


@pytest.mark.parametrize(
    ("sample", "value"),
    [
        ('konnect_relay_tunnels_opened_total{host="a"}', 7),  # counters: sum
        ('konnect_relay_tunnels_opened_total{host="b"}', 1),  # present in one worker only
        ('konnect_relay_tunnels_active{host="a"}', 3),  # gauges: sum
        ("konnect_relay_ready{}", 0),  # ready only while every worker is
        ("konnect_relay_build_info{}", 1),  # one build, not two
        ('konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="0.1"}', 4),
        ('konnect_relay_upstream_connect_seconds_bucket{egress="direct",le="+Inf"}', 5),
        ('konnect_relay_upstream_connect_seconds_sum{egress="direct"}', 0.75),
        ('konnect_relay_upstream_connect_seconds_count{egress="direct"}', 5),
        ('konnect_relay_config_reloads_total{result="ok"}', 1),  # the supervisor's own count
    ],
)
def test_aggregate(sample: str, value: float) -> None:
    assert _merged()[sample] == value


def test_aggregate_of_nothing_is_the_supervisor_alone() -> None:
    own = list(text_string_to_metric_families(OWN))
    assert parse_samples(render(aggregate([[], []], own)).decode()) == {
        'konnect_relay_config_reloads_total{result="ok"}': 1
    }


@pytest.mark.parametrize(
    ("uptimes", "delays"),
    [
        ([0, 0, 0, 0, 0], [0.5, 1, 2, 4, 8]),
        ([0] * 9, [0.5, 1, 2, 4, 8, 16, BACKOFF_CAP, BACKOFF_CAP, BACKOFF_CAP]),
        ([0, 0, 0, 60, 0], [0.5, 1, 2, 0.5, 1]),  # ran a minute: starts over
        ([0, 0, 59.9], [0.5, 1, 2]),
    ],
)
def test_backoff(uptimes: list[float], delays: list[float]) -> None:
    backoff = Backoff()
    assert [backoff.next(u) for u in uptimes] == delays


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1),
        (3, 3),
        ("auto", min(len(os.sched_getaffinity(0)), config.MAX_WORKERS)),
    ],
)
def test_worker_count(value: int | str, expected: int) -> None:
    settings = config.build(relay_config(workers=value))
    assert worker_count(settings) == expected


def test_worker_document_keeps_keys_and_pins_ports() -> None:
    data = relay_config(
        workers=4,
        listen=[{"address": "127.0.0.1:0", "name": "a"}, {"address": "[::1]:3128"}],
    )
    doc = worker_document(data, ["127.0.0.1:40000", "[::1]:3128"])
    assert doc["listen"] == [{"address": "127.0.0.1:40000", "name": "a"}, {"address": "[::1]:3128"}]
    assert doc["workers"] == 1 and doc["admin"] == {"address": None}
    assert doc["allow"] == data["allow"] and doc["resolver"] == data["resolver"]
    assert data["listen"][0]["address"] == "127.0.0.1:0"  # the operator's mapping is untouched
    config.build(doc)  # and the result is a valid config
