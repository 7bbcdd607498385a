"""The doctor's pure parts: which hosts to check, target parsing, the table, progress."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from relay import config, doctor
from tests.support.helpers import parse_table


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("konnect", "expected", "noted"),
    [
        (
            {"regions": ["eu", "us"], "control_planes": ["a1", "b2"]},
            [
                "a1.eu.cp0.konghq.com",
                "a1.eu.tp0.konghq.com",
                "b2.eu.cp0.konghq.com",
                "b2.eu.tp0.konghq.com",
                "eu.api.konghq.com",
                "a1.us.cp0.konghq.com",
                "a1.us.tp0.konghq.com",
                "b2.us.cp0.konghq.com",
                "b2.us.tp0.konghq.com",
                "us.api.konghq.com",
                "cloud.konghq.com",
                "global.api.konghq.com",
            ],
            False,
        ),
        (
            {"regions": ["au"]},
            ["au.api.konghq.com", "cloud.konghq.com", "global.api.konghq.com"],
            True,
        ),
    ],
)
def test_konnect_targets(konnect: dict[str, Any], expected: list[str], noted: bool) -> None:
    targets, note = doctor.konnect_targets(config.build({"konnect": konnect}))
    assert targets == [(h, 443) for h in expected]
    assert bool(note) is noted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cloud.konghq.com", ("cloud.konghq.com", 443)),
        ("cloud.konghq.com:8443", ("cloud.konghq.com", 8443)),
        ("[::1]:443", ("[::1]", 443)),
        ("::1", ("::1", 443)),  # the policy refuses it as an IP literal
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert doctor.parse_target(text) == expected


@pytest.mark.parametrize("text", [":443", "host:", "host:0", "host:65536", "host:x"])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(doctor.UsageError):
        doctor.parse_target(text)


def test_table_aligns_columns_and_lists_details() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    checks = [
        doctor.Check(
            "a.example",
            443,
            ["192.0.2.1:443", "[2001:db8::1]:443"],
            12.34,
            "TLSv1.3",
            now + timedelta(days=30, hours=1),
            True,
            "ok",
        ),
        doctor.Check("b.example", 8443, verdict="connection refused", detail="refused by x"),
    ]
    text = doctor.format_table(checks, now)
    rows = parse_table(text)
    assert rows["a.example"] == {
        "HOST": "a.example",
        "ADDRESSES": "192.0.2.1:443, [2001:db8::1]:443",
        "CONNECT": "12.3 ms",
        "TLS": "TLSv1.3",
        "CERT EXPIRES": "2030-01-31 (30 d)",
        "VERDICT": "ok",
    }
    assert rows["b.example:8443"]["VERDICT"] == "connection refused"
    assert rows["b.example:8443"]["CONNECT"] == "-"
    assert text.endswith("details:\n  b.example:8443: refused by x\n")


@pytest.mark.parametrize("tty", [True, False])
def test_progress(tty: bool) -> None:
    stream = _Terminal() if tty else io.StringIO()
    progress = doctor.Progress(stream, 2)
    for host in ("a.example", "b.example"):
        progress.finished(doctor.Check(host, 443, verdict="ok", ok=True))
    progress.close()
    text = stream.getvalue()
    if tty:
        assert "\n" not in text
        assert "\rchecking 2/2 ... b.example" in text
        assert text.endswith("\r")  # the line is wiped before the table is printed
    else:
        assert text.splitlines() == [
            "checking 1/2 ... a.example: ok",
            "checking 2/2 ... b.example: ok",
        ]
