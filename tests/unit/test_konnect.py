"""The Konnect hostname table (relay/konnect.py), the presets built from it by
product, the README table that must match it, and ``is_konnect_host``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay import config, konnect
from relay.konnect import LABEL_PINS, MESH_GEOS, PRODUCTS, REGIONS, SHARED, TABLE, Row
from relay.policy import KonnectScope, Policy, Reason

README = Path(__file__).resolve().parents[2] / "README.md"

# The hostnames of Kong's 2026 networking page for region us, with the
# product that allows each (the issue's list and the page's groups).
PAGE = [
    ("cloud.konghq.com", SHARED),
    ("global.api.konghq.com", SHARED),
    ("us.api.konghq.com", "api-gateway"),
    ("a1b2c3.us.cp.konghq.com", "api-gateway"),
    ("a1b2c3.us.tp.konghq.com", "api-gateway"),
    ("a1b2c3.us.cp0.konghq.com", "api-gateway"),
    ("a1b2c3.us.tp0.konghq.com", "api-gateway"),
    ("us.control-plane.konghq.com", "event-gateway"),
    ("us.telemetry.konghq.com", "event-gateway"),
    ("us.mesh.sync.konghq.com", "mesh"),
    ("global.mesh.sync.konghq.com", "mesh"),
    ("us.identity.konghq.com", "applications"),
    ("x9y8z7.us.identity.konghq.com", "applications"),
    ("portal1.us.kongportals.com", "applications"),
    ("portal1.us.portal.konghq.com", "applications"),
    ("us.kic.api.konghq.com", "kic"),
]


def test_every_row_is_well_formed() -> None:
    seen = set()
    for row in TABLE:
        assert row.product in (SHARED, *PRODUCTS), row
        assert row.purpose and row.purpose == row.purpose.strip(), row
        assert row.pattern not in seen, f"duplicate row {row.pattern}"
        seen.add(row.pattern)
        labels = row.pattern.split(".")
        free = [label for label in labels if label in LABEL_PINS]
        assert labels.index(free[0]) == 0 if free else True, f"free label not first: {row}"
        assert len(free) <= 1, row
        for label in labels:
            assert label in (*LABEL_PINS, "{region}", "{geo}") or re.fullmatch(
                r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", label
            ), f"{row.pattern}: {label!r}"
    # every product has at least one row
    assert {r.product for r in TABLE} == {SHARED, *PRODUCTS}


@pytest.mark.parametrize(("host", "product"), PAGE)
def test_each_hostname_is_allowed_with_its_product_on_and_refused_with_it_off(
    host: str, product: str
) -> None:
    everything = Policy(KonnectScope())
    decision = everything.decide(host, 443)
    assert decision.allowed, decision
    assert decision.reason is Reason.KONNECT
    assert konnect.is_konnect_host(host)
    if product == SHARED:
        # the shared rows apply whatever the products
        for only in PRODUCTS:
            assert Policy(KonnectScope(products=(only,))).decide(host, 443).allowed
        return
    assert Policy(KonnectScope(products=(product,))).decide(host, 443).allowed
    others = tuple(p for p in PRODUCTS if p != product)
    off = Policy(KonnectScope(products=others)).decide(host, 443)
    assert not off.allowed
    assert off.reason is Reason.NOT_ALLOWLISTED
    assert f'product "{product}" is not in konnect.products' in off.detail


def test_the_issue_hostnames_were_refused_before_and_now_name_their_rule() -> None:
    policy = Policy(KonnectScope())
    expected = {
        "us.control-plane.konghq.com": "konnect:us.control-plane.konghq.com",
        "us.telemetry.konghq.com": "konnect:us.telemetry.konghq.com",
        "us.identity.konghq.com": "konnect:us.identity.konghq.com",
        "auth1.us.identity.konghq.com": "konnect:{id}.us.identity.konghq.com",
        "us.kic.api.konghq.com": "konnect:us.kic.api.konghq.com",
    }
    for host, rule in expected.items():
        assert policy.decide(host, 443).rule == rule


@pytest.mark.parametrize(
    "host",
    [
        "a.b.us.identity.konghq.com",  # {id} is one label
        "us.identity.konghq.com.evil.com",
        "xx.control-plane.konghq.com",  # not a region
        "control-plane.konghq.com",
        "a.us.control-plane.konghq.com",  # no free label on this row
        "a.us.kic.api.konghq.com",
        "kic.api.konghq.com",
        "us.telemetry.konghq.co",
    ],
)
def test_near_misses_are_refused(host: str) -> None:
    assert not Policy(KonnectScope()).decide(host, 443).allowed
    assert not konnect.is_konnect_host(host)


def test_region_and_geo_outside_the_scope_are_hinted() -> None:
    policy = Policy(KonnectScope(regions=("eu",), mesh_geos=("eu",)))
    us = policy.decide("us.telemetry.konghq.com", 443)
    assert not us.allowed and 'region "us" is not in konnect.regions' in us.detail
    geo = policy.decide("global.mesh.sync.konghq.com", 443)
    assert not geo.allowed and 'mesh geo "global" is not in konnect.mesh_geos' in geo.detail
    assert policy.decide("eu.telemetry.konghq.com", 443).allowed


def test_control_plane_pins_apply_to_cp_rows_only() -> None:
    policy = Policy(KonnectScope(control_planes=("abc",), portals=("p1",)))
    assert policy.decide("abc.us.cp.konghq.com", 443).allowed
    assert not policy.decide("xyz.us.cp.konghq.com", 443).allowed
    assert policy.decide("p1.us.kongportals.com", 443).allowed
    assert not policy.decide("p2.us.kongportals.com", 443).allowed
    # {id} takes any label
    assert policy.decide("whatever.us.identity.konghq.com", 443).allowed


def test_regions_geos_and_products_are_validated_against_the_table() -> None:
    assert config.REGIONS is REGIONS
    assert config.MESH_GEOS is MESH_GEOS
    assert config.PRODUCTS is PRODUCTS
    with pytest.raises(config.ConfigError) as info:
        config.build({"konnect": {"products": ["api-gateway", "gateway"]}})
    assert info.value.errors == [
        "konnect.products.1: must be one of 'api-gateway', 'event-gateway', 'mesh', "
        "'applications' or 'kic' (got 'gateway')"
    ]
    with pytest.raises(config.ConfigError) as info:
        config.build({"konnect": {"products": []}})
    assert info.value.errors[0].startswith("konnect.products:")


def test_products_narrow_the_policy_and_clients_can_narrow_further() -> None:
    settings = config.build(
        {
            "konnect": {"products": ["api-gateway", "kic"]},
            "clients": [
                {
                    "name": "kic-only",
                    "match": {"users": ["kic"]},
                    "konnect": {"products": ["kic"]},
                }
            ],
        }
    )
    assert settings.policy.decide("us.kic.api.konghq.com", 443).allowed
    assert not settings.policy.decide("us.telemetry.konghq.com", 443).allowed
    _, pol = settings.policy_for("kic", None, "10.0.0.1")
    assert pol is not None
    assert pol.decide("us.kic.api.konghq.com", 443).allowed
    assert not pol.decide("a1.us.cp.konghq.com", 443).allowed


def test_default_config_allows_every_product() -> None:
    settings = config.load(None)
    assert settings.policy.konnect.products == PRODUCTS
    assert len(settings.policy.presets) == sum(
        len(REGIONS) if "{region}" in r.pattern else len(MESH_GEOS) if "{geo}" in r.pattern else 1
        for r in TABLE
    )


def _readme_rows() -> list[tuple[str, str, str]]:
    text = README.read_text()
    start = text.index("<!-- konnect-table:start -->")
    end = text.index("<!-- konnect-table:end -->")
    rows = []
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("product", "---"):
            continue
        rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def _expected(row: Row) -> tuple[str, str, str]:
    purpose = row.purpose + (" (legacy)" if row.legacy else "")
    return row.product, f"`{row.pattern}`", purpose


def test_readme_table_is_the_table() -> None:
    """The README's "What is allowed" table lists exactly the rows, in order."""
    assert _readme_rows() == [_expected(r) for r in TABLE]
