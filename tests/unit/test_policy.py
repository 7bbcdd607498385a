"""Tests for relay.policy: tables of Konnect names, hostile names and IP spellings,
allow/deny precedence, pattern parsing with suggested fixes, and property tests."""

from __future__ import annotations

import contextlib
import ipaddress
import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.policy import (
    DECISION_CACHE_SIZE,
    KONNECT_REGIONS,
    MESH_GEOS,
    Decision,
    HostError,
    HostPattern,
    KonnectScope,
    PatternError,
    Policy,
    Reason,
    normalise_host,
    parse_pattern,
)

CP = "a1b2c3d4e5"


def allow(*patterns: str) -> list[HostPattern]:
    return [parse_pattern(p) for p in patterns]


ALL = Policy(KonnectScope())
# Allows every host name a test here uses, on the ports they use: whatever an IP
# literal looks like, no rule may let it through.
EVERYTHING = Policy(
    KonnectScope(ports=(80, 443, 8443)),
    allow=allow(
        *(
            f"{p}:{port}"
            for p in (
                "*.example.com",
                "*.konghq.com",
                "*.kongportals.com",
                "*.nip.io",
                "*.in-addr.arpa",
                "*.ip6.arpa",
                "localhost",
            )
            for port in (80, 443, 8443)
        )
    ),
)


# --------------------------------------------------------------------------- normalise_host


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cloud.konghq.com", "cloud.konghq.com"),
        ("CLOUD.KongHQ.com", "cloud.konghq.com"),
        ("cloud.konghq.com.", "cloud.konghq.com"),
        ("localhost", "localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE.", "xn--bcher-kva.example"),
        ("a-b.c-d.example", "a-b.c-d.example"),
        ("ab--cd.example", "ab--cd.example"),
        ("123.example.com", "123.example.com"),  # numeric labels are fine unless last
        ("0x7f.example.com", "0x7f.example.com"),
        ("1.2.3.4.nip.io", "1.2.3.4.nip.io"),
        ("example.0x7g", "example.0x7g"),  # not hex, so not a number
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
        (".".join(["a" * 63] * 3 + ["b" * 61]) + ".", ".".join(["a" * 63] * 3 + ["b" * 61])),
        ("a", "a"),
        ("9a", "9a"),
    ],
)
def test_normalise_accepts(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected
    assert len(expected) <= 253


NAME_253 = ".".join(["a" * 63] * 3 + ["b" * 61])
assert len(NAME_253) == 253


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty host"),
        (".", "empty host"),
        ("..", "more than one trailing dot"),
        ("cloud.konghq.com..", "more than one trailing dot"),
        ("a..b", "empty label (two dots in a row)"),
        (".cloud.konghq.com", "empty label (leading dot)"),
        ("a" * 64 + ".com", "is 64 characters; the limit is 63"),
        (NAME_253 + "c", "host is 254 characters; the limit is 253"),
        (NAME_253 + "c.", "host is 254 characters; the limit is 253"),
        ("x" * 10_000, "host is 10000 characters; the limit is 253"),
        ("a_b.example.com", "underscore"),
        ("_dmarc.example.com", "underscore"),
        ("-a.example.com", "starts or ends with a hyphen"),
        ("a-.example.com", "starts or ends with a hyphen"),
        ("user@cloud.konghq.com", "userinfo"),
        ("user:pw@cloud.konghq.com", "userinfo"),
        ("cloud.konghq.com@evil.com", "userinfo"),
        ("cloud%2ekonghq.com", "percent-escapes"),
        ("%63loud.konghq.com", "percent-escapes"),
        ("cloud.konghq.com/path", "path, query or fragment"),
        ("cloud.konghq.com?x", "path, query or fragment"),
        ("cloud.konghq.com#x", "path, query or fragment"),
        ("evil.com\\cloud.konghq.com", "backslash"),
        ("cloud.konghq.com ", "whitespace or control character"),
        (" cloud.konghq.com", "whitespace or control character"),
        ("cloud\t.konghq.com", "whitespace or control character"),
        ("cloud.konghq.com\r\nX-Injected: 1", "whitespace or control character"),
        ("cloud.konghq.com\x00.evil.com", "whitespace or control character"),
        ("cloud.konghq.com\x7f", "whitespace or control character"),
        ("cloud.konghq.com:443", '":" is not allowed'),
        ("[cloud.konghq.com]", "brackets are only used around IPv6"),
        ("[]", "brackets are only used around IPv6"),
        ("*.konghq.com", '"*" is not a host name'),
        ("a+b.com", 'character "+" is not allowed'),
        ("a,b.com", 'character "," is not allowed'),
        ("bücher.example", 'use the xn-- A-label (IDNA) form, e.g. "xn--bcher-kva.example"'),
        ("cloud.konghq.cöm", "use the xn-- A-label"),
        ("clоud.konghq.com", "use the xn-- A-label"),  # noqa: RUF001 Cyrillic o
        ("cloud.konghq.com\u200b", "use the xn-- A-label"),
        ("\u212aonghq.com", "use the xn-- A-label"),  # Kelvin sign lower-cases to "k"
        ("\ud800.com", "use the xn-- A-label"),  # lone surrogate
    ],
)
def test_normalise_refuses(raw: str, message: str) -> None:
    with pytest.raises(HostError) as info:
        normalise_host(raw)
    assert info.value.reason is Reason.INVALID_HOST
    assert message in str(info.value)
    assert info.value.problem in str(info.value)
    assert "\n" not in str(info.value)
    assert str(info.value).isascii()


# Every spelling of an IP address a URL parser, curl or inet_aton would accept.
IP_LITERALS = [
    ("127.0.0.1", None),
    ("127.0.0.1.", None),
    ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("0X7F000001", "127.0.0.1"),
    ("0x7F.0x0.0x0.0x1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("0177.0000.0000.0001", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("169.254.169.254", None),
    ("0xa9fea9fe", "169.254.169.254"),
    ("2852039166", "169.254.169.254"),
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),
    ("10.0.0.1", None),
    ("4294967295", "255.255.255.255"),
    ("4294967296", "not allowed"),  # out of range: still reads as a number
    ("1.2.3.4.5", "last label is numeric"),
    ("256.0.0.1", "last label is numeric"),
    ("08.0.0.1", "last label is numeric"),
    ("example.123", "last label is numeric"),
    ("example.0x1f", "last label is numeric"),
    ("cloud.konghq.com.1", "last label is numeric"),
    ("[::1]", "IPv6"),
    ("::1", "IPv6"),
    ("[::ffff:127.0.0.1]", "IPv6"),
    ("::ffff:127.0.0.1", "IPv6"),
    ("::ffff:7f00:1", "IPv6"),
    ("[0:0:0:0:0:0:0:1]", "IPv6"),
    ("[fe80::1%25eth0]", "IPv6"),
    ("fe80::1%eth0", "IPv6"),
    ("[2001:DB8::1]", "IPv6"),
    ("[v1.fe]", "IPv6"),  # RFC 3986 IPvFuture
    ("１２７。０。０。１", "IP address literal"),  # noqa: RUF001 fullwidth digits, ideographic dots
    ("１２７．０．０．１", "IP address literal"),  # noqa: RUF001
]


@pytest.mark.parametrize(("raw", "shown"), IP_LITERALS)
def test_ip_literals_refused_in_every_spelling(raw: str, shown: str | None) -> None:
    with pytest.raises(HostError) as info:
        normalise_host(raw)
    assert info.value.reason is Reason.IP_LITERAL
    if shown is not None:
        assert shown in str(info.value)
    decision = EVERYTHING.decide(raw, 443)
    assert not decision.allowed
    assert decision.reason is Reason.IP_LITERAL
    assert decision.host == ""
    assert decision.rule == ""


# --------------------------------------------------------------------------- Konnect presets


@pytest.mark.parametrize("region", KONNECT_REGIONS)
@pytest.mark.parametrize(
    ("template", "rule"),
    [
        ("{region}.api.konghq.com", "konnect:{region}.api.konghq.com"),
        ("{cp}.{region}.cp0.konghq.com", "konnect:{{cp}}.{region}.cp0.konghq.com"),
        ("{cp}.{region}.tp0.konghq.com", "konnect:{{cp}}.{region}.tp0.konghq.com"),
        ("{cp}.{region}.cp.konghq.com", "konnect:{{cp}}.{region}.cp.konghq.com"),
        ("{cp}.{region}.tp.konghq.com", "konnect:{{cp}}.{region}.tp.konghq.com"),
        ("{cp}.{region}.portal.konghq.com", "konnect:{{portal}}.{region}.portal.konghq.com"),
        ("{cp}.{region}.kongportals.com", "konnect:{{portal}}.{region}.kongportals.com"),
    ],
)
def test_konnect_regional_hosts_allowed(region: str, template: str, rule: str) -> None:
    host = template.format(region=region, cp=CP)
    expected_rule = rule.format(region=region)
    d = ALL.decide(host, 443)
    assert d == Decision(True, Reason.KONNECT, expected_rule, host, 443, d.detail)
    assert expected_rule in d.detail
    assert ALL.konnect_rule(host) == expected_rule
    # the same name, spelled as a client might
    assert ALL.decide(host.upper() + ".", 443).allowed


@pytest.mark.parametrize(
    "host",
    [
        "cloud.konghq.com",
        "global.api.konghq.com",
        *(f"{geo}.mesh.sync.konghq.com" for geo in MESH_GEOS),
    ],
)
def test_konnect_fixed_hosts_allowed(host: str) -> None:
    d = ALL.decide(host, 443)
    assert (d.allowed, d.reason, d.rule) == (True, Reason.KONNECT, f"konnect:{host}")


HOSTILE = [
    "cloud.konghq.com.evil.com",
    "evilkonghq.com",
    "cloudkonghq.com",
    "konghq.com",
    "konghq.com.evil.com",
    "evil.com",
    "api.konghq.com",
    "mesh.sync.konghq.com",
    "sync.konghq.com",
    "x.cloud.konghq.com",
    "cloud.konghq.co",
    "cloud.konghq.com-evil.com",
    "eu.cp0.konghq.com",  # no prefix
    "cp0.konghq.com",
    f"a.{CP}.eu.cp0.konghq.com",  # two labels before the suffix
    "a.b.eu.cp0.konghq.com",
    "a.b.eu.tp0.konghq.com",
    "a.b.eu.portal.konghq.com",
    "a.b.eu.kongportals.com",
    f"{CP}.xx.cp0.konghq.com",  # unknown region
    f"{CP}.eu.cp1.konghq.com",
    f"{CP}.eu.cp0.konghq.com.evil.com",
    f"{CP}.eu.cp0.konghq.comevil.com",
    f"{CP}-eu.cp0.konghq.com",
    f"{CP}.eu.cp0-konghq.com",
    f"{CP}.eucp0.konghq.com",
    "xx.api.konghq.com",
    "x.global.api.konghq.com",
    "x.eu.api.konghq.com",
    "xx.mesh.sync.konghq.com",
    "x.global.mesh.sync.konghq.com",
    "eu.kongportals.com",
    "kongportals.com",
    "x.kongportals.com",
    f"{CP}.eu.konghq.com",
    f"{CP}.global.cp0.konghq.com",
    "eu.portal.konghq.com",
    f"{CP}.api.konghq.com",
]


@pytest.mark.parametrize("host", HOSTILE)
def test_hostile_lookalikes_not_allowlisted(host: str) -> None:
    d = ALL.decide(host, 443)
    assert (d.allowed, d.reason, d.rule) == (False, Reason.NOT_ALLOWLISTED, "")
    assert d.host == host
    assert d.detail.startswith(f"host not in Konnect allowlist: {host}:443")
    assert ALL.konnect_rule(host) is None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("cloud.konghq.com@evil.com", Reason.INVALID_HOST),
        ("evil.com#.cloud.konghq.com", Reason.INVALID_HOST),
        ("evil.com/.cloud.konghq.com", Reason.INVALID_HOST),
        ("evil.com?.cloud.konghq.com", Reason.INVALID_HOST),
        ("evil.com\\.cloud.konghq.com", Reason.INVALID_HOST),
        ("evil.com%00.cloud.konghq.com", Reason.INVALID_HOST),
        ("evil.com\x00.cloud.konghq.com", Reason.INVALID_HOST),
        ("cloud.konghq.com:443", Reason.INVALID_HOST),
        ("cloud.konghq.com..", Reason.INVALID_HOST),
        ("cloud..konghq.com", Reason.INVALID_HOST),
        ("cloud_.konghq.com", Reason.INVALID_HOST),
        ("clоud.konghq.com", Reason.INVALID_HOST),  # noqa: RUF001 Cyrillic o
        ("a" * 64 + ".eu.cp0.konghq.com", Reason.INVALID_HOST),
        ("cloud.konghq.com.127", Reason.IP_LITERAL),
        ("[::ffff:127.0.0.1]", Reason.IP_LITERAL),
    ],
)
def test_hostile_syntax_refused(host: str, reason: Reason) -> None:
    d = ALL.decide(host, 443)
    assert (d.allowed, d.reason, d.rule, d.host) == (False, reason, "", "")
    assert d.detail.startswith("invalid host ")
    assert d.detail.isascii()
    assert "\n" not in d.detail and "\r" not in d.detail


@pytest.mark.parametrize("port", [0, -1, 65536, 2**64, -(2**64)])
def test_port_out_of_range(port: int) -> None:
    d = ALL.decide("cloud.konghq.com", port)
    assert (d.allowed, d.reason, d.rule, d.host, d.port) == (
        False,
        Reason.INVALID_HOST,
        "",
        "cloud.konghq.com",
        port,
    )
    assert f"port {port} is outside 1..65535" in d.detail


@pytest.mark.parametrize("port", [1, 80, 8443, 8071, 444, 65535])
def test_konnect_host_on_other_port(port: int) -> None:
    d = ALL.decide(f"{CP}.eu.cp0.konghq.com", port)
    assert (d.allowed, d.reason, d.rule) == (
        False,
        Reason.PORT_NOT_ALLOWED,
        "konnect:{cp}.eu.cp0.konghq.com",
    )
    assert f"port {port} is not in konnect.ports (443)" in d.detail


def test_konnect_ports_configurable() -> None:
    policy = Policy(KonnectScope(ports=(443, 8443)))
    assert policy.decide("cloud.konghq.com", 8443).reason is Reason.KONNECT
    assert policy.decide("cloud.konghq.com", 443).reason is Reason.KONNECT
    d = policy.decide("cloud.konghq.com", 80)
    assert d.reason is Reason.PORT_NOT_ALLOWED
    assert "(443, 8443)" in d.detail
    # the port never makes a non-Konnect host a Konnect one
    assert policy.decide("evil.com", 8443).reason is Reason.NOT_ALLOWLISTED


@pytest.mark.parametrize(
    ("scope", "host", "allowed", "hint"),
    [
        (KonnectScope(regions=("eu",)), f"{CP}.eu.cp0.konghq.com", True, ""),
        (KonnectScope(regions=("eu",)), f"{CP}.us.cp0.konghq.com", False, 'region "us"'),
        (KonnectScope(regions=("eu",)), "us.api.konghq.com", False, 'region "us"'),
        (KonnectScope(regions=("eu",)), "p.us.kongportals.com", False, 'region "us"'),
        (KonnectScope(regions=("eu",)), "cloud.konghq.com", True, ""),
        (KonnectScope(regions=("eu",)), "global.api.konghq.com", True, ""),
        (KonnectScope(regions=()), "cloud.konghq.com", True, ""),
        (KonnectScope(regions=()), f"{CP}.eu.cp0.konghq.com", False, 'region "eu"'),
        (KonnectScope(mesh_geos=("global",)), "global.mesh.sync.konghq.com", True, ""),
        (KonnectScope(mesh_geos=("global",)), "eu.mesh.sync.konghq.com", False, 'geo "eu"'),
        (KonnectScope(mesh_geos=()), "global.mesh.sync.konghq.com", False, 'geo "global"'),
        # a region Konnect may add later needs no code change
        (KonnectScope(regions=("ca",)), f"{CP}.ca.cp0.konghq.com", True, ""),
        (KonnectScope(regions=("ca",)), "ca.api.konghq.com", True, ""),
        (KonnectScope(regions=("ca",)), f"{CP}.eu.cp0.konghq.com", False, 'region "eu"'),
        (KonnectScope(), f"{CP}.xx.cp0.konghq.com", False, ""),
        (KonnectScope(), f"a.{CP}.eu.cp0.konghq.com", False, "only one DNS label"),
    ],
)
def test_scope_regions_and_geos(scope: KonnectScope, host: str, allowed: bool, hint: str) -> None:
    d = Policy(scope).decide(host, 443)
    assert d.allowed is allowed
    assert d.reason is (Reason.KONNECT if allowed else Reason.NOT_ALLOWLISTED)
    assert hint in d.detail


PINNED = Policy(KonnectScope(control_planes=("abc123", "def456"), portals=("p1",)))


@pytest.mark.parametrize(
    ("host", "allowed", "hint"),
    [
        ("abc123.eu.cp0.konghq.com", True, ""),
        ("abc123.us.tp0.konghq.com", True, ""),
        ("def456.au.cp.konghq.com", True, ""),
        ("def456.sg.tp.konghq.com", True, ""),
        ("ABC123.EU.CP0.KONGHQ.COM.", True, ""),
        ("other.eu.cp0.konghq.com", False, 'control plane prefix "other"'),
        ("abc1234.eu.cp0.konghq.com", False, 'control plane prefix "abc1234"'),
        ("abc12.eu.cp0.konghq.com", False, 'control plane prefix "abc12"'),
        ("p1.eu.cp0.konghq.com", False, 'control plane prefix "p1"'),  # a portal id is no cp
        ("x.abc123.eu.cp0.konghq.com", False, "only one DNS label"),
        ("p1.eu.portal.konghq.com", True, ""),
        ("p1.me.kongportals.com", True, ""),
        ("p2.eu.portal.konghq.com", False, 'portal "p2"'),
        ("abc123.eu.portal.konghq.com", False, 'portal "abc123"'),  # a cp prefix is no portal
        ("cloud.konghq.com", True, ""),
        ("eu.api.konghq.com", True, ""),
    ],
)
def test_pinned_control_planes_and_portals(host: str, allowed: bool, hint: str) -> None:
    d = PINNED.decide(host, 443)
    assert d.allowed is allowed
    assert hint in d.detail
    assert (PINNED.konnect_rule(d.host) is not None) is allowed


# --------------------------------------------------------------------------- allow and deny


def test_deny_beats_preset() -> None:
    policy = Policy(KonnectScope(), deny=allow("evil.eu.cp0.konghq.com", "*.us.cp0.konghq.com"))
    d = policy.decide("evil.eu.cp0.konghq.com", 443)
    assert (d.allowed, d.reason, d.rule) == (
        False,
        Reason.DENY_RULE,
        "deny:evil.eu.cp0.konghq.com:443",
    )
    assert d.detail == "denied by rule deny:evil.eu.cp0.konghq.com:443: evil.eu.cp0.konghq.com:443"
    assert policy.decide("good.eu.cp0.konghq.com", 443).reason is Reason.KONNECT
    assert policy.decide("x.us.cp0.konghq.com", 443).reason is Reason.DENY_RULE
    # a deny on 443 leaves the other ports to the rest of the policy
    assert policy.decide("evil.eu.cp0.konghq.com", 8443).reason is Reason.PORT_NOT_ALLOWED
    # konnect_rule answers "is this a Konnect name", regardless of deny
    assert policy.konnect_rule("evil.eu.cp0.konghq.com") == "konnect:{cp}.eu.cp0.konghq.com"


def test_deny_beats_allow() -> None:
    policy = Policy(
        KonnectScope(),
        allow=allow("*.example.com", "api.example.com:8443"),
        deny=allow("*.bad.example.com", "api.example.com:8443"),
    )
    assert policy.decide("ok.example.com", 443).reason is Reason.ALLOW_RULE
    assert policy.decide("x.bad.example.com", 443).rule == "deny:*.bad.example.com:443"
    assert policy.decide("a.b.bad.example.com", 443).reason is Reason.DENY_RULE
    # the wildcard deny does not cover its apex, so the allow wildcard still applies
    assert policy.decide("bad.example.com", 443).reason is Reason.ALLOW_RULE
    assert policy.decide("api.example.com", 8443).reason is Reason.DENY_RULE


def test_allow_rule_opens_port_on_konnect_host() -> None:
    policy = Policy(KonnectScope(), allow=allow(f"{CP}.eu.cp0.konghq.com:8443"))
    d = policy.decide(f"{CP}.eu.cp0.konghq.com", 8443)
    assert (d.allowed, d.reason, d.rule) == (
        True,
        Reason.ALLOW_RULE,
        f"allow:{CP}.eu.cp0.konghq.com:8443",
    )
    assert policy.decide("other.eu.cp0.konghq.com", 8443).reason is Reason.PORT_NOT_ALLOWED
    # on a Konnect port the preset is what decides
    assert policy.decide(f"{CP}.eu.cp0.konghq.com", 443).reason is Reason.KONNECT


@pytest.mark.parametrize(
    ("pattern", "host", "port", "matches"),
    [
        ("*.example.com", "a.example.com", 443, True),
        ("*.example.com", "a.b.c.example.com", 443, True),
        ("*.example.com", "example.com", 443, False),  # never the apex
        ("*.example.com", "aexample.com", 443, False),
        ("*.example.com", "example.com.evil.com", 443, False),
        ("*.example.com", "a.example.com", 8443, False),
        ("*.example.com:8443", "a.example.com", 8443, True),
        ("*.example.com:8443", "a.example.com", 443, False),
        ("example.com", "example.com", 443, True),
        ("example.com", "a.example.com", 443, False),
        ("example.com", "example.co", 443, False),
        ("example.com:80", "example.com", 80, True),
        ("*.co.uk", "example.co.uk", 443, True),
    ],
)
def test_pattern_matching(pattern: str, host: str, port: int, matches: bool) -> None:
    p = parse_pattern(pattern)
    assert p.matches(host, port) is matches
    policy = Policy(KonnectScope(regions=(), mesh_geos=()), allow=[p])
    d = policy.decide(host, port)
    assert d.allowed is matches
    if matches:
        assert d.rule == f"allow:{p.text}"


def test_most_specific_wildcard_named() -> None:
    policy = Policy(
        KonnectScope(), allow=allow("*.example.com", "*.b.example.com", "a.b.example.com")
    )
    assert policy.decide("a.b.example.com", 443).rule == "allow:a.b.example.com:443"
    assert policy.decide("x.a.b.example.com", 443).rule == "allow:*.b.example.com:443"
    assert policy.decide("x.example.com", 443).rule == "allow:*.example.com:443"


def test_allowed_hosts_never_include_unknown() -> None:
    policy = Policy(KonnectScope(), allow=allow("api.example.com"))
    d = policy.decide("other.example.com", 443)
    assert (d.allowed, d.reason, d.rule) == (False, Reason.NOT_ALLOWLISTED, "")
    assert d.detail == "host not in Konnect allowlist: other.example.com:443"


# --------------------------------------------------------------------------- parse_pattern


@pytest.mark.parametrize(
    ("text", "host", "wildcard", "port", "canonical"),
    [
        ("example.com", "example.com", False, 443, "example.com:443"),
        ("example.com:443", "example.com", False, 443, "example.com:443"),
        ("Example.COM.:8443", "example.com", False, 8443, "example.com:8443"),
        ("*.example.com", "example.com", True, 443, "*.example.com:443"),
        ("*.Example.Com.", "example.com", True, 443, "*.example.com:443"),
        ("*.a.b.example.com:1", "a.b.example.com", True, 1, "*.a.b.example.com:1"),
        ("localhost:65535", "localhost", False, 65535, "localhost:65535"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", False, 443, "xn--bcher-kva.example:443"),
        ("example.com:0443", "example.com", False, 443, "example.com:443"),
    ],
)
def test_parse_pattern(text: str, host: str, wildcard: bool, port: int, canonical: str) -> None:
    p = parse_pattern(text)
    assert p == HostPattern(host, wildcard, port)
    assert p.text == canonical
    assert parse_pattern(p.text) == p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty pattern"),
        ("*", "would allow every host"),
        ("*.*", "would allow every host"),
        ("*:443", "would allow every host"),
        ("*.com", 'top-level domain "com"; name a domain, e.g. "*.example.com"'),
        ("*.COM.", 'top-level domain "com"'),
        ("foo.*.com", 'only a leading "*." wildcard is supported'),
        (
            "foo.*.example.com",
            'only a leading "*." wildcard is supported; did you mean "*.example.com"?',
        ),
        ("*foo.com", 'did you mean "*.foo.com"?'),
        ("**.example.com", 'did you mean "*.example.com"?'),
        ("*.*.example.com", 'did you mean "*.example.com"?'),
        ("foo*.example.com", 'did you mean "*.example.com"?'),
        ("example.*", 'only a leading "*." wildcard is supported'),
        ("https://api.example.com", 'a URL is not a pattern; did you mean "api.example.com:443"?'),
        ("http://api.example.com/x", 'did you mean "api.example.com:80"?'),
        ("https://api.example.com:8443/v1", 'did you mean "api.example.com:8443"?'),
        ("https://u:p@api.example.com", 'did you mean "api.example.com:443"?'),
        ("api.example.com/v1", 'a path is not allowed; did you mean "api.example.com"?'),
        ("api.example.com:443/v1", 'did you mean "api.example.com:443"?'),
        ("api.example.com?x=1", "a path is not allowed"),
        ("user@api.example.com", 'userinfo is not allowed; did you mean "api.example.com"?'),
        (" example.com", 'surrounding whitespace; did you mean "example.com"?'),
        ("example.com\n", "surrounding whitespace"),
        ("example.com:", "port must be a number 1..65535"),
        ("example.com:0", "port 0 is outside 1..65535"),
        ("example.com:65536", "port 65536 is outside 1..65535"),
        ("example.com:+443", "port must be a number"),
        ("example.com:https", "port must be a number"),
        ("example.com:４４３", "port must be a number"),  # noqa: RUF001
        ("example.com:443443", "port must be a number"),
        ("127.0.0.1", "IP literals are not supported"),
        ("127.0.0.1:443", "IP literals are not supported"),
        ("2130706433", "IP literals are not supported"),
        ("*.0.0.1", "IP literals are not supported"),
        ("[::1]:443", "IP literals are not supported"),
        ("::1", "IP literals are not supported"),
        ("a..example.com", "empty label"),
        ("under_score.example.com", "underscore"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a" * 64 + ".com", "the limit is 63"),
    ],
)
def test_parse_pattern_errors(text: str, message: str) -> None:
    with pytest.raises(PatternError) as info:
        parse_pattern(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_pattern_non_string() -> None:
    with pytest.raises(PatternError, match="must be a string"):
        parse_pattern(443)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Example.com", False, 443), 'did you mean "example.com"?'),
        (("example.com.", False, 443), 'did you mean "example.com"?'),
        (("*.example.com", True, 443), '"*" is not a host name'),
        (("com", True, 443), 'top-level domain "com"'),
        (("example.com", False, 0), "port 0 is outside"),
        (("example.com", False, 70000), "port 70000 is outside"),
        (("127.0.0.1", False, 443), "IP address literal"),
    ],
)
def test_host_pattern_validates(args: tuple[str, bool, int], message: str) -> None:
    with pytest.raises(PatternError) as info:
        HostPattern(*args)
    assert message in str(info.value)


# --------------------------------------------------------------------------- KonnectScope


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regions": ("EU",)}, 'konnect.regions: "EU" is not a single lower-case DNS label'),
        ({"regions": ("EU",)}, 'did you mean "eu"?'),
        ({"regions": ("eu.cp0",)}, 'give only the first label, e.g. "eu"'),
        ({"regions": ("",)}, "empty label"),
        ({"control_planes": ("abc.eu.cp0.konghq.com",)}, 'e.g. "abc"'),
        ({"control_planes": ("a_b",)}, "underscore"),
        ({"control_planes": ("-ab",)}, "hyphen"),
        ({"portals": ("*",)}, "konnect.portals"),
        ({"mesh_geos": ("x" * 64,)}, "limit is 63"),
        ({"ports": (0,)}, "konnect.ports: 0 is outside 1..65535"),
        ({"ports": (65536,)}, "outside"),
        ({"ports": (True,)}, "not an integer"),
        ({"regions": (1,)}, "not a string"),
    ],
)
def test_scope_validates(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        KonnectScope(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_numeric_control_plane_prefix_is_a_label() -> None:
    # A prefix may be all digits: only the last label of a name makes it an IP.
    policy = Policy(KonnectScope(control_planes=("123",)))
    assert policy.decide("123.eu.cp0.konghq.com", 443).allowed


# --------------------------------------------------------------------------- describe


def test_describe() -> None:
    policy = Policy(
        KonnectScope(regions=("eu",), control_planes=("abc",), mesh_geos=("global",)),
        allow=allow("*.example.com"),
        deny=allow("evil.konghq.com:8443"),
    )
    assert policy.describe() == [
        "deny    evil.konghq.com:8443",
        "konnect cloud.konghq.com:443",
        "konnect global.api.konghq.com:443",
        "konnect eu.api.konghq.com:443",
        "konnect {cp}.eu.cp.konghq.com:443  ({cp} one of: abc)",
        "konnect {cp}.eu.tp.konghq.com:443  ({cp} one of: abc)",
        "konnect {cp}.eu.cp0.konghq.com:443  ({cp} one of: abc)",
        "konnect {cp}.eu.tp0.konghq.com:443  ({cp} one of: abc)",
        "konnect eu.control-plane.konghq.com:443",
        "konnect eu.telemetry.konghq.com:443",
        "konnect global.mesh.sync.konghq.com:443",
        "konnect eu.identity.konghq.com:443",
        "konnect {id}.eu.identity.konghq.com:443  ({id} = any one DNS label)",
        "konnect {portal}.eu.kongportals.com:443  ({portal} = any one DNS label)",
        "konnect {portal}.eu.portal.konghq.com:443  ({portal} = any one DNS label)",
        "konnect eu.kic.api.konghq.com:443",
        "allow   *.example.com:443",
    ]


def test_describe_default_covers_every_region_and_geo() -> None:
    text = "\n".join(ALL.describe())
    for region in KONNECT_REGIONS:
        assert f"konnect {{cp}}.{region}.cp0.konghq.com:443" in text
        assert f"konnect {{portal}}.{region}.kongportals.com:443" in text
    for geo in MESH_GEOS:
        assert f"konnect {geo}.mesh.sync.konghq.com:443" in text


def test_reason_values_are_bounded_labels() -> None:
    assert sorted(r.value for r in Reason) == [
        "allow_rule",
        "deny_rule",
        "invalid_host",
        "ip_literal",
        "konnect",
        "not_allowlisted",
        "port_not_allowed",
    ]


# --------------------------------------------------------------------------- properties

LDH = string.ascii_lowercase + string.digits + "-"
labels = st.text(alphabet=LDH, min_size=1, max_size=63).filter(
    lambda s: s[0] != "-" and s[-1] != "-"
)
hostish = st.text(
    alphabet=st.sampled_from(string.ascii_letters + string.digits + "-._@%:/[]\\*# \t\x00é\u3002"),
    max_size=300,
)


@settings(max_examples=2000, deadline=None)
@given(
    host=st.one_of(st.text(max_size=300), hostish),
    port=st.integers(min_value=-(2**70), max_value=2**70),
)
@example(host="", port=0)
@example(host="\udcff", port=443)
@example(host="." * 300, port=443)
@example(host="a." * 127, port=443)
@example(host="[" + ":" * 200 + "]", port=443)
def test_decide_never_raises(host: str, port: int) -> None:
    d = ALL.decide(host, port)
    assert isinstance(d.reason, Reason)
    assert d.detail.isascii() and d.detail.isprintable()
    if d.allowed:
        assert d.reason is Reason.KONNECT
        assert ALL.konnect_rule(d.host) == d.rule
        assert d.port == 443
    if d.host:
        assert normalise_host(d.host) == d.host
    assert EVERYTHING.decide(host, port).reason in set(Reason)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(max_size=300), hostish, st.lists(labels, min_size=1).map(".".join)))
def test_normalise_returns_ldh_or_raises(raw: str) -> None:
    try:
        host = normalise_host(raw)
    except HostError as e:
        assert e.reason in (Reason.INVALID_HOST, Reason.IP_LITERAL)
        assert str(e).isascii() and str(e).isprintable()
        return
    assert 1 <= len(host) <= 253
    assert host == raw.lower().removesuffix(".")
    for label in host.split("."):
        assert 1 <= len(label) <= 63
        assert set(label) <= set(LDH)
        assert label[0] != "-" and label[-1] != "-"
    last = host.rsplit(".", 1)[-1]
    assert not last.isdigit()
    assert not last.startswith("0x") or not set(last[2:]) <= set(string.hexdigits.lower())
    assert normalise_host(host) == host


def _ipv4_part(value: int, style: str) -> str:
    if style == "hex":
        return hex(value)
    if style == "HEX":
        return hex(value).upper()
    if style == "oct":
        return "0" + format(value, "o")
    return str(value)


@st.composite
def ipv4_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """A 32-bit address spelled in 1 to 4 parts, each decimal, hex or octal (WHATWG)."""
    address = draw(st.integers(min_value=0, max_value=2**32 - 1))
    count = draw(st.integers(min_value=1, max_value=4))
    octets = address.to_bytes(4, "big")
    values = [*octets[: count - 1], int.from_bytes(octets[count - 1 :], "big")]
    styles = draw(
        st.lists(st.sampled_from(["dec", "hex", "HEX", "oct"]), min_size=count, max_size=count)
    )
    text = ".".join(_ipv4_part(v, s) for v, s in zip(values, styles, strict=True))
    if draw(st.booleans()):
        text += "."
    return text, str(ipaddress.IPv4Address(address))


@st.composite
def ipv6_spellings(draw: st.DrawFn) -> str:
    address = draw(st.ip_addresses(v=6))
    assert isinstance(address, ipaddress.IPv6Address)
    text = draw(st.sampled_from([address.compressed, address.exploded, address.compressed.upper()]))
    if draw(st.booleans()):
        v4 = draw(st.ip_addresses(v=4))
        text = f"::ffff:{v4}"
    return f"[{text}]" if draw(st.booleans()) else text


@settings(max_examples=1000, deadline=None)
@given(ipv4_spellings(), st.sampled_from([443, 80, 8443]))
def test_ipv4_spellings_never_allowed(spelling: tuple[str, str], port: int) -> None:
    text, dotted = spelling
    with pytest.raises(HostError) as info:
        normalise_host(text)
    assert info.value.reason is Reason.IP_LITERAL
    assert dotted in str(info.value) or text.removesuffix(".") == dotted
    for policy in (ALL, EVERYTHING, _allow_every_suffix(text, port)):
        d = policy.decide(text, port)
        assert not d.allowed
        assert d.reason is Reason.IP_LITERAL


@settings(max_examples=500, deadline=None)
@given(ipv6_spellings())
def test_ipv6_spellings_never_allowed(text: str) -> None:
    d = EVERYTHING.decide(text, 443)
    assert (d.allowed, d.reason) == (False, Reason.IP_LITERAL)


def _allow_every_suffix(text: str, port: int) -> Policy:
    """A policy with an allow rule for every parent domain of ``text`` a pattern can name."""
    parts = text.removesuffix(".").split(".")
    patterns = []
    for i in range(len(parts)):
        for candidate in (".".join(parts[i:]), "*." + ".".join(parts[i:])):
            with contextlib.suppress(PatternError):
                patterns.append(parse_pattern(f"{candidate}:{port}"))
    return Policy(KonnectScope(), allow=patterns)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(max_size=100), hostish.map(lambda s: s[:100])))
def test_parse_pattern_returns_or_raises_pattern_error(text: str) -> None:
    try:
        p = parse_pattern(text)
    except PatternError as e:
        assert "\n" not in str(e)
        return
    assert parse_pattern(p.text) == p
    assert 1 <= p.port <= 65535


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(labels, min_size=2, max_size=4).map(".".join),
    st.lists(labels, min_size=0, max_size=3).map(".".join),
    st.booleans(),
    st.sampled_from([443, 8443]),
    st.sampled_from([443, 8443]),
)
def test_policy_lookup_agrees_with_pattern_matches(
    domain: str, prefix: str, wildcard: bool, pattern_port: int, port: int
) -> None:
    host = f"{prefix}.{domain}" if prefix else domain
    try:
        pattern = HostPattern(domain, wildcard, pattern_port)
        host = normalise_host(host)
    except (PatternError, HostError):
        return  # too long, or numeric last label
    policy = Policy(KonnectScope(regions=(), mesh_geos=()), allow=[pattern])
    assert policy.decide(host, port).allowed is pattern.matches(host, port)
    assert pattern.matches(host, port) is (
        port == pattern_port and (host.endswith("." + domain) if wildcard else host == domain)
    )


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(KONNECT_REGIONS),
    labels,
    st.sampled_from(
        [
            "cp0.konghq.com",
            "tp0.konghq.com",
            "cp.konghq.com",
            "tp.konghq.com",
            "portal.konghq.com",
            "kongportals.com",
        ]
    ),
    st.lists(labels, min_size=1, max_size=2),
)
def test_one_label_prefix_always_and_only(
    region: str, prefix: str, suffix: str, extra: list[str]
) -> None:
    host = f"{prefix}.{region}.{suffix}"
    assert ALL.decide(host, 443).reason is Reason.KONNECT
    longer = ".".join([*extra, host])
    if len(longer) <= 253:
        assert ALL.decide(longer, 443).reason is Reason.NOT_ALLOWLISTED


def test_remembered_decisions_equal_fresh_ones_and_stay_bounded() -> None:
    policy = Policy(KonnectScope(), deny=allow("evil.eu.cp0.konghq.com"))
    hosts = ["x.eu.cp0.konghq.com", "evil.eu.cp0.konghq.com", "a..b", "example.com"]
    for host in hosts:
        first = policy.decide(host, 443)
        assert policy.decide(host, 443) is first  # remembered
        fresh = Policy(KonnectScope(), deny=allow("evil.eu.cp0.konghq.com"))
        assert fresh.decide(host, 443) == first
    for i in range(DECISION_CACHE_SIZE * 2 + 7):  # a flood of distinct names
        policy.decide(f"h{i}.example.com", 443)
    assert len(policy._decided) <= DECISION_CACHE_SIZE
    assert policy.decide("x.eu.cp0.konghq.com", 443).allowed
    assert not policy.decide("evil.eu.cp0.konghq.com", 443).allowed
