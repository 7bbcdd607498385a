"""Tests for relay.resolver: the special-purpose address table (embedded IPv4
followed through IPv4-mapped, NAT64 and 6to4 forms), the static map's
curl --connect-to semantics, RFC 8305 family interleaving, and Resolver.resolve
on IP literals (no DNS) with and without allow_private."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.resolver import (
    Endpoint,
    ResolveError,
    Resolver,
    interleave,
    special_purpose,
    static_target,
)

# --- special_purpose ---------------------------------------------------------------

# (address, the kinds accepted). Where the kind comes from the stdlib's
# is_private/is_reserved tables, which move between Python releases, any
# non-public kind is accepted; where relay.resolver names the range itself the
# kind is exact.
NON_PUBLIC = {"private", "reserved", "non-global"}

SPECIAL = [
    # loopback
    ("127.0.0.1", {"loopback"}),
    ("127.255.255.254", {"loopback"}),
    ("::1", {"loopback"}),
    # RFC 1918
    ("10.0.0.1", {"private"}),
    ("10.255.255.255", {"private"}),
    ("172.16.0.1", {"private"}),
    ("172.31.255.255", {"private"}),
    ("192.168.0.1", {"private"}),
    ("192.168.255.255", {"private"}),
    # link-local, cloud metadata
    ("169.254.169.254", {"link-local"}),
    ("169.254.0.1", {"link-local"}),
    ("fe80::1", {"link-local"}),
    ("fe80::a:b:c:d", {"link-local"}),
    # RFC 6598 shared address space (carrier-grade NAT)
    ("100.64.0.1", {"cgnat"}),
    ("100.127.255.254", {"cgnat"}),
    # unspecified
    ("0.0.0.0", {"unspecified"}),
    ("::", {"unspecified"}),
    ("0.1.2.3", NON_PUBLIC),  # "this network" 0/8
    # multicast
    ("224.0.0.1", {"multicast"}),
    ("239.255.255.250", {"multicast"}),
    ("ff02::1", {"multicast"}),
    ("ff05::1:3", {"multicast"}),
    # reserved, broadcast
    ("240.0.0.1", NON_PUBLIC),
    ("255.255.255.255", NON_PUBLIC),
    # IPv4-mapped IPv6 follows the embedded address
    ("::ffff:10.0.0.1", {"private"}),
    ("::ffff:127.0.0.1", {"loopback"}),
    ("::ffff:169.254.169.254", {"link-local"}),
    ("::ffff:100.64.0.1", {"cgnat"}),
    # NAT64 (RFC 6052 well-known prefix, RFC 8215 local-use prefix)
    ("64:ff9b::a00:1", {"private"}),  # 10.0.0.1
    ("64:ff9b::7f00:1", {"loopback"}),  # 127.0.0.1
    ("64:ff9b::a9fe:a9fe", {"link-local"}),  # 169.254.169.254
    # RFC 8215 local-use NAT64 prefix: the embedding is unknown, never public
    ("64:ff9b:1::a00:1", {"local-nat"}),
    ("64:ff9b:1:a00:0:1:808:808", {"local-nat"}),
    # 6to4 (RFC 3056): the IPv4 address in bits 16..47
    ("2002:0a00:0001::", {"private"}),  # 10.0.0.1
    ("2002:7f00:0001::1", {"loopback"}),
    ("2002:a9fe:a9fe::", {"link-local"}),
    # Teredo (RFC 4380): refused whatever it embeds
    ("2001:0::1", {"teredo"}),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", {"teredo"}),
    # unique local, site-local
    ("fc00::1", {"private"}),
    ("fd12:3456:789a::1", {"private"}),
    ("fec0::1", {"site-local"}),
    # documentation (RFC 5737, RFC 3849)
    ("192.0.2.1", NON_PUBLIC),
    ("198.51.100.7", NON_PUBLIC),
    ("203.0.113.255", NON_PUBLIC),
    ("2001:db8::1", NON_PUBLIC),
    # benchmarking, IETF protocol assignments
    ("198.18.0.1", NON_PUBLIC),
    ("192.0.0.1", NON_PUBLIC),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",  # just outside 172.16/12
    "100.128.0.1",  # just outside 100.64/10
    "11.0.0.1",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:0808:0808::",  # 6to4 of 8.8.8.8
    "2002:0808:0808::1",
]


@pytest.mark.parametrize(("address", "kinds"), SPECIAL, ids=[a for a, _ in SPECIAL])
def test_special_purpose(address: str, kinds: set[str]) -> None:
    assert special_purpose(ipaddress.ip_address(address)) in kinds


@pytest.mark.parametrize("address", PUBLIC)
def test_public_address(address: str) -> None:
    assert special_purpose(ipaddress.ip_address(address)) is None


@given(st.ip_addresses(v=4))
def test_mapped_nat64_6to4_agree_with_ipv4(ip: ipaddress.IPv4Address) -> None:
    """Every IPv6 form that embeds an IPv4 address gets the IPv4 address's verdict."""
    expected = special_purpose(ip)
    value = int(ip)
    mapped = ipaddress.IPv6Address(0xFFFF << 32 | value)
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | value)
    sixto4 = ipaddress.IPv6Address(0x2002 << 112 | value << 80 | 1)
    assert special_purpose(mapped) == expected
    assert special_purpose(nat64) == expected
    assert special_purpose(sixto4) == expected


@given(st.ip_addresses())
def test_special_purpose_total(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    kind = special_purpose(ip)
    assert kind is None or (kind and kind.replace("-", "").isalpha())
    if kind is None:
        assert ip.is_global


# --- static_target -----------------------------------------------------------------


STATIC = {
    ("a.example.com", None): ("10.0.0.1", None),
    ("a.example.com", 8443): ("10.0.0.2", 9443),
    ("b.example.com", None): ("upstream.test", 8080),
    ("c.example.com", 443): ("10.0.0.3", None),
}


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("a.example.com", 443, ("10.0.0.1", 443)),  # no port in the value: keep the request's
        ("a.example.com", 80, ("10.0.0.1", 80)),
        ("a.example.com", 8443, ("10.0.0.2", 9443)),  # host:port key beats host key
        ("b.example.com", 443, ("upstream.test", 8080)),
        ("c.example.com", 443, ("10.0.0.3", 443)),
        ("c.example.com", 444, None),  # host:port key only for that port
        ("d.example.com", 443, None),
        ("example.com", 443, None),
        ("x.a.example.com", 443, None),  # no suffix matching
    ],
)
def test_static_target(host: str, port: int, expected: tuple[str, int] | None) -> None:
    assert static_target(STATIC, host, port) == expected


def test_static_target_empty() -> None:
    assert static_target({}, "a.example.com", 443) is None


def test_static_target_order_does_not_matter() -> None:
    reverse = dict(reversed(list(STATIC.items())))
    assert static_target(reverse, "a.example.com", 8443) == ("10.0.0.2", 9443)


# --- interleave --------------------------------------------------------------------

V4, V6 = socket.AF_INET, socket.AF_INET6


def ep(spec: str) -> Endpoint:
    """'4a' -> an IPv4 endpoint tagged a; '6b' -> an IPv6 endpoint tagged b."""
    n = ord(spec[1]) - ord("a") + 1
    if spec[0] == "4":
        return Endpoint(V4, f"192.0.2.{n}", 443)
    return Endpoint(V6, f"2001:db8::{n}", 443)


@pytest.mark.parametrize(
    ("given_order", "expected"),
    [
        ("", ""),
        ("4a", "4a"),
        ("4a 4b", "4a 4b"),
        ("6a 6b 4a 4b", "6a 4a 6b 4b"),
        ("4a 4b 6a 6b", "4a 6a 4b 6b"),
        ("6a 6b 6c 4a", "6a 4a 6b 6c"),
        ("4a 6a 6b 6c", "4a 6a 6b 6c"),
        ("6a 4a 4b 4c 6b", "6a 4a 6b 4b 4c"),
        ("4a 4b 4c 6a", "4a 6a 4b 4c"),
    ],
)
def test_interleave(given_order: str, expected: str) -> None:
    endpoints = [ep(s) for s in given_order.split()]
    assert interleave(endpoints) == [ep(s) for s in expected.split()]


@given(st.lists(st.sampled_from([V4, V6]), max_size=12))
def test_interleave_is_a_fair_permutation(families: list[int]) -> None:
    endpoints = [
        Endpoint(f, f"192.0.2.{i}" if f == V4 else f"2001:db8::{i}", 443)
        for i, f in enumerate(families, 1)
    ]
    out = interleave(endpoints)
    assert sorted(out, key=str) == sorted(endpoints, key=str)
    if endpoints:
        assert out[0] == endpoints[0]
    # Within a family the original order is kept.
    for family in (V4, V6):
        assert [e for e in out if e.family == family] == [
            e for e in endpoints if e.family == family
        ]
    # The families alternate for as long as both have endpoints left.
    both = 2 * min(families.count(V4), families.count(V6))
    for i in range(1, both):
        assert out[i].family != out[i - 1].family


def test_endpoint_text() -> None:
    assert str(Endpoint(V4, "10.0.0.1", 443)) == "10.0.0.1:443"
    assert str(Endpoint(V6, "::1", 443)) == "[::1]:443"
    assert Endpoint(V6, "::1", 8443).sockaddr == ("::1", 8443)


# --- Resolver.resolve on static entries (IP literals: no DNS) -----------------------


Static = dict[tuple[str, int | None], tuple[str, int | None]]


def resolve(
    static: Static,
    host: str,
    port: int,
    *,
    allow_private: bool,
) -> list[Endpoint]:
    resolver = Resolver(static, allow_private=allow_private, cache_ttl=30)
    return asyncio.run(resolver.resolve(host, port))


CP = "dp-test.eu.cp0.konghq.com"


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (("127.0.0.1", None), "loopback"),
        (("10.1.2.3", 8443), "private"),
        (("169.254.169.254", 80), "link-local"),
        (("100.64.0.1", None), "cgnat"),
        (("::1", None), "loopback"),
        (("::ffff:127.0.0.1", None), "loopback"),
        (("64:ff9b::a00:1", None), "private"),
        (("2002:a9fe:a9fe::", None), "link-local"),
        (("fd00::1", None), "private"),
        (("2001::1", None), "teredo"),
        (("0.0.0.0", None), "unspecified"),
    ],
)
def test_resolve_refuses_private_static_target(target: tuple[str, int | None], kind: str) -> None:
    static: Static = {(CP, None): target}
    with pytest.raises(ResolveError) as info:
        resolve(static, CP, 443, allow_private=False)
    err = info.value
    assert err.reason == "private_address"
    assert err.status == 403
    shown = str(ipaddress.ip_address(target[0]))  # the spelling the stdlib prints
    assert f"{shown} ({kind})" in err.detail
    assert err.detail.startswith(f"{target[0]} resolves only to non-public addresses")


@pytest.mark.parametrize(
    ("target", "family", "address", "port"),
    [
        (("127.0.0.1", None), V4, "127.0.0.1", 443),
        (("10.1.2.3", 8443), V4, "10.1.2.3", 8443),
        (("::1", 9000), V6, "::1", 9000),
        (("169.254.169.254", None), V4, "169.254.169.254", 443),
    ],
)
def test_resolve_allow_private(
    target: tuple[str, int | None], family: int, address: str, port: int
) -> None:
    static: Static = {(CP, None): target}
    assert resolve(static, CP, 443, allow_private=True) == [Endpoint(family, address, port)]


@pytest.mark.parametrize("allow_private", [False, True])
def test_resolve_public_static_target(allow_private: bool) -> None:
    static = {(CP, 443): ("8.8.8.8", 8443), (CP, None): ("2606:4700::1111", None)}
    assert resolve(static, CP, 443, allow_private=allow_private) == [Endpoint(V4, "8.8.8.8", 8443)]
    assert resolve(static, CP, 80, allow_private=allow_private) == [
        Endpoint(V6, "2606:4700::1111", 80)
    ]


@pytest.mark.parametrize(("literal", "family"), [("8.8.4.4", V4), ("2001:4860:4860::8844", V6)])
def test_resolve_ip_literal_host_needs_no_dns(literal: str, family: int) -> None:
    assert resolve({}, literal, 443, allow_private=False) == [Endpoint(family, literal, 443)]


def test_resolve_ip_literal_host_is_checked() -> None:
    with pytest.raises(ResolveError) as info:
        resolve({}, "192.168.1.1", 443, allow_private=False)
    assert info.value.reason == "private_address" and "192.168.1.1 (private)" in info.value.detail
