"""relay.konnect_ips: Kong's ingress address document, accepted or refused whole
with the JSON path of the problem; a table of documents and property tests."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.konnect_ips import MAX_DOCUMENT_SIZE, IPList, IPListError, parse_document


def doc(ingress: object, **extra: object) -> bytes:
    return json.dumps({"ingressIPs": ingress, **extra}).encode()


@pytest.mark.parametrize(
    ("data", "regions", "expected"),
    [
        # a plain list per region
        (
            doc({"us": ["192.0.2.0/24", "198.51.100.7"]}),
            ["us"],
            ["192.0.2.0/24", "198.51.100.7/32"],
        ),
        # per service and per address family beneath a region, unknown keys around
        (
            doc(
                {
                    "us": {"cp": {"ipv4": ["203.0.113.0/25"], "ipv6": ["2001:db8:1::/48"]}},
                    "eu": {"api": ["203.0.113.128/25"]},
                    "xx": ["not even looked at"],
                },
                version=3,
                updated="2026-10-01",
            ),
            ["us", "eu"],
            ["203.0.113.0/24", "2001:db8:1::/48"],  # the two halves collapse
        ),
        # optional keys are used when present
        (doc({"us": ["192.0.2.0/24"], "global": ["198.51.100.0/24"]}), ["us"], None),
        # host bits in a prefix are tolerated (normalised)
        (doc({"us": ["192.0.2.77/24"]}), ["us"], ["192.0.2.0/24"]),
        # /8 and /16 are the widest accepted
        (doc({"us": ["10.0.0.0/8", "2001::/16"]}), ["us"], ["10.0.0.0/8", "2001::/16"]),
    ],
)
def test_accepted(data: bytes, regions: list[str], expected: list[str] | None) -> None:
    ips = parse_document(data, regions, optional=("global",))
    if expected is None:
        expected = ["192.0.2.0/24", "198.51.100.0/24"]
    assert [str(n) for n in ips.networks] == expected
    assert len(ips) == len(expected)
    assert ips.digest and len(ips.digest) == 64


@pytest.mark.parametrize(
    ("data", "path", "problem"),
    [
        (b"<html>nope</html>", "$", "not JSON"),
        (b"", "$", "not JSON"),
        (b"\xff\xfe", "$", "not JSON"),
        (b"[1, 2]", "$", "not a JSON object"),
        (json.dumps({"egressIPs": {}}).encode(), "$", "no ingressIPs"),
        (doc(["192.0.2.0/24"]), "$.ingressIPs", "not an object of regions"),
        (doc({"eu": ["192.0.2.0/24"]}), "$.ingressIPs", 'no entry for configured region "us"'),
        (doc({"us": []}), "$.ingressIPs.us", 'no prefix for configured region "us"'),
        (doc({"us": {"cp": {}}}), "$.ingressIPs.us", 'no prefix for configured region "us"'),
        (doc({"us": ["192.0.2.0/24", "konghq.com"]}), "$.ingressIPs.us[1]", "not an IP address"),
        (doc({"us": {"cp": [None]}}), "$.ingressIPs.us.cp[0]", "not an IP address"),
        (doc({"us": {"cp": [17]}}), "$.ingressIPs.us.cp[0]", "not an IP address"),
        (doc({"us": ["0.0.0.0/0"]}), "$.ingressIPs.us[0]", "shorter than /8"),
        (doc({"us": ["16.0.0.0/4"]}), "$.ingressIPs.us[0]", "shorter than /8"),
        (doc({"us": ["192.0.2.0/24", "::/0"]}), "$.ingressIPs.us[1]", "shorter than /16"),
        (doc({"us": ["2000::/3"]}), "$.ingressIPs.us[0]", "shorter than /16"),
        (doc({"us": ["192.0.2.0/33"]}), "$.ingressIPs.us[0]", "not an IP address"),
        (
            doc({"us": [[[[[[[[[["192.0.2.1"]]]]]]]]]]}),
            "$.ingressIPs.us[0][0][0][0][0][0][0][0][0]",
            "nested more than",
        ),
        (b" " * (MAX_DOCUMENT_SIZE + 1), "$", "over 1024 KiB"),
    ],
)
def test_refused_whole_naming_the_path(data: bytes, path: str, problem: str) -> None:
    with pytest.raises(IPListError) as info:
        parse_document(data, ["us"])
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{path}: ")


def test_a_missing_optional_key_is_fine_a_missing_region_is_not() -> None:
    data = doc({"us": ["192.0.2.0/24"]})
    assert len(parse_document(data, ["us"], optional=("global", "au"))) == 1
    with pytest.raises(IPListError):
        parse_document(data, ["us", "au"])


def test_membership_and_texts() -> None:
    ips = parse_document(doc({"us": ["192.0.2.0/24", "2001:db8::/32"]}), ["us"])
    assert ipaddress.ip_address("192.0.2.9") in ips
    assert ipaddress.ip_address("2001:db8::1") in ips
    assert ipaddress.ip_address("192.0.3.1") not in ips
    assert ipaddress.ip_address("127.0.0.1") not in ips
    assert ips.texts() == {"192.0.2.0/24", "2001:db8::/32"}
    assert ips.per_region == {"us": 2}


def test_a_quoted_bad_value_is_bounded() -> None:
    with pytest.raises(IPListError) as info:
        parse_document(doc({"us": ["x" * 10_000]}), ["us"])
    assert len(str(info.value)) < 200


prefixes = st.one_of(
    st.builds(
        lambda a, n: str(ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{n}", strict=False)),
        st.integers(0, 2**32 - 1),
        st.integers(8, 32),
    ),
    st.builds(
        lambda a, n: str(ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{n}", strict=False)),
        st.integers(0, 2**128 - 1),
        st.integers(16, 128),
    ),
)


@given(st.lists(prefixes, min_size=1, max_size=20))
def test_every_listed_prefix_is_covered(listed: list[str]) -> None:
    ips = parse_document(doc({"us": listed}), ["us"])
    for text in listed:
        net = ipaddress.ip_network(text)
        assert net.network_address in ips
        assert net.broadcast_address in ips
    assert isinstance(ips, IPList)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@given(json_values)
def test_any_json_is_accepted_with_a_prefix_or_refused_with_a_path(value: object) -> None:
    data = json.dumps({"ingressIPs": {"us": value}}).encode()
    try:
        ips = parse_document(data, ["us"])
    except IPListError as exc:
        assert exc.path.startswith("$")
    else:
        assert len(ips) >= 1


@given(st.binary(max_size=200))
def test_any_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        ips = parse_document(data, ["us"])
    except IPListError as exc:
        assert exc.path == "$"  # bytes that are no JSON object fail at the top
    else:
        assert len(ips) >= 1
