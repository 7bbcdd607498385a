"""Tests for relay.config: strict validation tables (unknown keys, wrong types,
bad values, every error reported with its dotted path), strict YAML (duplicate
keys, syntax errors with line and column), the embedded default, and a property
test that arbitrary YAML-shaped data only ever raises ConfigError."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from relay import config, policy
from relay.config import ConfigError, build, parse_yaml

ROOT = Path(__file__).resolve().parent.parent.parent


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(data)
    assert info.value.errors, "ConfigError without errors"
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def yaml_errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "test.yaml")
    assert info.value.source == "test.yaml"
    return info.value.errors


# --- unknown keys ----------------------------------------------------------------------

LISTEN_OK = {"address": "127.0.0.1:3128"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"Listen": [LISTEN_OK]}, "Listen: unknown key"),  # keys are case-sensitive
        ({"listen": [{**LISTEN_OK, "bogus": 1}]}, "listen.0.bogus: unknown key"),
        ({"listen": [LISTEN_OK, {**LISTEN_OK, "port": 1}]}, "listen.1.port: unknown key"),
        ({"admin": {"bogus": 1}}, "admin.bogus: unknown key"),
        ({"konnect": {"region": ["eu"]}}, "konnect.region: unknown key"),
        ({"resolver": {"bogus": 1}}, "resolver.bogus: unknown key"),
        ({"egress": {"proxy": "x"}}, "egress.proxy: unknown key"),
        ({"limits": {"bogus": 1}}, "limits.bogus: unknown key"),
        ({"limits": {"idle-timeout": 5}}, "limits.idle-timeout: unknown key"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unknown_key_names_dotted_path(data: dict[str, Any], expected: str) -> None:
    assert errors_of(data) == [expected]


# --- wrong types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"limits": {"idle_timeout": "600"}}, "limits.idle_timeout", "must be a float"),
        ({"limits": {"idle_timeout": True}}, "limits.idle_timeout", "must be a float"),
        ({"limits": {"connect_timeout": [4]}}, "limits.connect_timeout", "must be a float"),
        ({"konnect": {"ports": 443}}, "konnect.ports", "must be a list"),
        ({"konnect": {"ports": ["443"]}}, "konnect.ports.0", "must be an int"),
        ({"konnect": {"ports": [443.0]}}, "konnect.ports.0", "must be an int"),
        ({"konnect": {"regions": "eu"}}, "konnect.regions", "must be a list"),
        ({"konnect": {"control_planes": "abc"}}, "konnect.control_planes", "must be a list"),
        ({"konnect": {"control_planes": [1]}}, "konnect.control_planes.0", "must be a string"),
        ({"listen": "127.0.0.1:3128"}, "listen", "must be a list"),
        ({"listen": [{"address": 3128}]}, "listen.0.address", "must be a string"),
        ({"admin": {"address": 9464}}, "admin.address", "must be a string"),
        ({"allow": "example.com"}, "allow", "must be a list"),
        ({"allow": [443]}, "allow.0", "must be a string"),
        ({"deny": [None]}, "deny.0", "must be a string"),
        ({"resolver": {"static": []}}, "resolver.static", "must be a mapping"),
        ({"resolver": {"static": {"a": 1}}}, "resolver.static.a", "must be a string"),
        ({"resolver": {"allow_private": "yes"}}, "resolver.allow_private", "must be a bool"),
        ({"resolver": {"allow_private": 1}}, "resolver.allow_private", "must be a bool"),
        ({"resolver": {"cache_ttl": "30s"}}, "resolver.cache_ttl", "must be a float"),
        ({"egress": {"mode": 1}}, "egress.mode", "must be one of 'direct'"),
        ({"policy_mode": True}, "policy_mode", "must be one of 'enforce' or 'report'"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else None,
)
def test_wrong_type(data: dict[str, Any], path: str, expected: str) -> None:
    (line,) = errors_of(data)
    assert line.startswith(f"{path}: {expected}"), line


@pytest.mark.parametrize(
    "section", ["admin", "konnect", "resolver", "egress", "limits", "auth", "reload"]
)
@pytest.mark.parametrize("value", [[], "text", 1, None], ids=repr)
def test_section_must_be_mapping(section: str, value: Any) -> None:
    (line,) = errors_of({section: value})
    assert line.startswith(f"{section}: must be a "), line


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"admin": []}, "admin"),
        ({"limits": []}, "limits"),
        ({"egress": {"http_proxy": []}}, "egress.http_proxy"),
        ({"listen": [{"address": "127.0.0.1:0", "tls": []}]}, "listen.0.tls"),
    ],
)
def test_section_type_error_speaks_yaml(data: dict[str, Any], path: str) -> None:
    assert errors_of(data) == [f"{path}: must be a mapping (got [])"]


@pytest.mark.parametrize("value", ["x", True, 1.5])
def test_union_field_error_names_the_key(value: Any) -> None:
    (line,) = errors_of({"workers": value})
    assert line.startswith("workers: "), line


# --- bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # limits
        ({"limits": {"idle_timeout": 0}}, "limits.idle_timeout: must be > 0"),
        ({"limits": {"idle_timeout": -1}}, "limits.idle_timeout: must be > 0"),
        ({"limits": {"idle_timeout": -0.5}}, "limits.idle_timeout: must be > 0"),
        ({"limits": {"head_timeout": 0}}, "limits.head_timeout: must be > 0"),
        ({"limits": {"connect_timeout": 0.0}}, "limits.connect_timeout: must be > 0"),
        ({"limits": {"reconnect_window": 0}}, "limits.reconnect_window: must be > 0"),
        ({"limits": {"drain_timeout": -1}}, "limits.drain_timeout: must be >= 0"),
        ({"resolver": {"cache_ttl": -1}}, "resolver.cache_ttl: must be >= 0"),
        # ports
        ({"konnect": {"ports": [0]}}, "konnect.ports.0: must be >= 1"),
        ({"konnect": {"ports": [65536]}}, "konnect.ports.0: must be <= 65535"),
        ({"konnect": {"ports": [443, -1]}}, "konnect.ports.1: must be >= 1"),
        # regions and geos
        (
            {"konnect": {"regions": ["eu", "xx"]}},
            "konnect.regions.1: must be one of 'au', 'eu', 'me', 'in', 'sg' or 'us' (got 'xx')",
        ),
        (
            {"konnect": {"regions": ["EU"]}},
            "konnect.regions.0: must be one of 'au', 'eu', 'me', 'in', 'sg' or 'us' (got 'EU')",
        ),
        (
            {"konnect": {"mesh_geos": ["asia"]}},
            "konnect.mesh_geos.0: must be one of 'au', 'eu', 'us' or 'global' (got 'asia')",
        ),
        ({"egress": {"mode": "socks"}}, "egress.mode: must be one of 'direct'"),
        (
            {"egress": {"mode": "http_proxy"}},
            "egress: egress.http_proxy is required when http_proxy is used",
        ),
        # listen and admin addresses
        (
            {"listen": [{"address": "127.0.0.1"}]},
            "listen.0.address: '127.0.0.1' is not host:port (IPv6: [::1]:3128)",
        ),
        (
            {"listen": [{"address": "::1:3128"}]},
            "listen.0.address: '::1:3128': write an IPv6 address in brackets, e.g. [::1]:3128",
        ),
        (
            {"listen": [{"address": "127.0.0.1:http"}]},
            "listen.0.address: '127.0.0.1:http': port must be a number",
        ),
        (
            {"listen": [{"address": "127.0.0.1:-1"}]},
            "listen.0.address: '127.0.0.1:-1': port must be a number",
        ),
        (
            {"listen": [{"address": "127.0.0.1:\u0663"}]},  # ARABIC-INDIC DIGIT THREE
            "listen.0.address: '127.0.0.1:\u0663': port must be a number",
        ),
        (
            {"listen": [{"address": "127.0.0.1:65536"}]},
            "listen.0.address: '127.0.0.1:65536': port must be in 1..65535",
        ),
        (
            {"listen": [{"address": "[zz]:3128"}]},
            "listen.0.address: '[zz]:3128': 'zz' is not an IPv6 address",
        ),
        ({"listen": [{"address": ":3128"}]}, "listen.0.address: ':3128' is not host:port"),
        ({"admin": {"address": "9464"}}, "admin.address: '9464' is not host:port"),
        ({"listen": []}, "listen: List should have at least 1 item"),
        ({"konnect": {"ports": []}}, "konnect.ports: List should have at least 1 item"),
        ({"listen": [{}]}, "listen.0.address: required key is missing"),
        # control-plane prefixes are one DNS label
        (
            {"konnect": {"control_planes": ["a.b"]}},
            "konnect.control_planes.0: 'a.b' must be a single DNS label",
        ),
        ({"konnect": {"portals": ["my_portal"]}}, "konnect.portals.0: invalid host"),
        ({"limits": {"idle_timeout": math.nan}}, "limits.idle_timeout: "),
        ({"limits": {"idle_timeout": math.inf}}, "limits.idle_timeout: "),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_value(data: dict[str, Any], expected: str) -> None:
    (line,) = errors_of(data)
    assert line.startswith(expected), line


@pytest.mark.parametrize(
    "address", ["127.0.0.1:3128", "[::1]:3128", "0.0.0.0:0", "localhost:8080", "[::]:65535"]
)
def test_good_listen_addresses(address: str) -> None:
    s = build({"listen": [{"address": address}]})
    host, _, port = address.rpartition(":")
    assert s.listen == ((host.strip("[]"), int(port)),)


def test_admin_address_null_disables_admin() -> None:
    assert build({"admin": {"address": None}}).admin is None


# --- allow/deny patterns carry the fix from relay.policy -------------------------------

BAD_PATTERNS = [
    "*.com",
    "https://example.com/path",
    "example.com/path",
    "user@example.com",
    "a.*.example.com",
    " example.com",
    "example.com:99999",
    "example.com:https",
    "*",
    "10.0.0.1:443",
    "[::1]:443",
    "",
    "bad_name.example.com",
]


@pytest.mark.parametrize("key", ["allow", "deny"])
@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_pattern_error_carries_suggested_fix(key: str, pattern: str) -> None:
    with pytest.raises(policy.PatternError) as info:
        policy.parse_pattern(pattern)
    assert errors_of({key: ["example.com", pattern]}) == [f"{key}.1: {info.value}"]


@pytest.mark.parametrize(
    ("pattern", "fix"),
    [
        ("*.com", '"*.example.com"'),
        ("https://example.com/path", 'did you mean "example.com:443"?'),
        ("http://example.com", 'did you mean "example.com:80"?'),
        ("a.*.example.com", 'did you mean "*.example.com"?'),
        (" example.com", 'did you mean "example.com"?'),
        ("user@example.com", 'did you mean "example.com"?'),
    ],
)
def test_pattern_fix_text_reaches_config_error(pattern: str, fix: str) -> None:
    (line,) = errors_of({"deny": [pattern]})
    assert line.startswith("deny.0: ") and fix in line, line


def test_patterns_are_stored_normalised() -> None:
    s = build({"allow": ["Example.COM.", "*.example.org:8443"], "deny": ["x.example.com"]})
    assert s.raw.allow == ["example.com:443", "*.example.org:8443"]
    assert s.raw.deny == ["x.example.com:443"]
    assert s.policy.decide("example.com", 443).allowed
    assert s.policy.decide("a.example.org", 8443).allowed
    assert not s.policy.decide("x.example.com", 443).allowed


# --- resolver.static -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("static", "expected"),
    [
        ({"a.example.com": "b:0"}, "value 'b:0': port must be in 1..65535"),
        ({"a.example.com": "b:65536"}, "value 'b:65536': port must be in 1..65535"),
        ({"a.example.com:x": "b"}, "key 'a.example.com:x': port must be in 1..65535"),
        ({"a.example.com": "b:\u0663"}, "port must be in 1..65535"),
        ({"[::1": "b"}, "key '[::1': unclosed '['"),
        ({"a": "[::1]443"}, "value '[::1]443': expected ':port' after ']'"),
        ({"a": "[zz]:443"}, "value '[zz]:443': "),
        ({"a": "1:2:3"}, "value '1:2:3': "),
        ({"": "b"}, "key '': empty host"),
        ({"a": ":443"}, "value ':443': empty host"),
    ],
)
def test_static_bad_entry(static: dict[str, str], expected: str) -> None:
    (line,) = errors_of({"resolver": {"static": static}})
    assert line.startswith("resolver.static: ") and expected in line, line


def test_static_reports_every_bad_entry() -> None:
    (line,) = errors_of({"resolver": {"static": {"a:0": "b", "c": "d:0", "ok": "1.2.3.4:443"}}})
    assert "key 'a:0'" in line and "value 'd:0'" in line and "'ok'" not in line


@pytest.mark.parametrize(
    ("key", "value", "parsed_key", "parsed_value"),
    [
        ("A.Example.COM.", "10.0.0.1", ("a.example.com", None), ("10.0.0.1", None)),
        ("a.example.com:443", "10.0.0.1:8443", ("a.example.com", 443), ("10.0.0.1", 8443)),
        ("a.example.com", "[::1]:8443", ("a.example.com", None), ("::1", 8443)),
        ("a.example.com", "[::1]", ("a.example.com", None), ("::1", None)),
        ("a.example.com", "2001:db8::1", ("a.example.com", None), ("2001:db8::1", None)),
        ("a.example.com", "upstream.test:443", ("a.example.com", None), ("upstream.test", 443)),
    ],
)
def test_static_good_entry(
    key: str,
    value: str,
    parsed_key: tuple[str, int | None],
    parsed_value: tuple[str, int | None],
) -> None:
    s = build({"resolver": {"static": {key: value}}})
    assert dict(s.static) == {parsed_key: parsed_value}


# --- many errors at once ---------------------------------------------------------------


def test_every_error_is_reported_at_once() -> None:
    data = {
        "bogus": True,
        "listen": [{"address": "127.0.0.1"}, {"address": "[::1]:3128", "extra": 1}],
        "admin": {"address": "::1:9464"},
        "konnect": {"regions": ["eu", "mars", "moon"], "ports": [0, 443, 70000]},
        "allow": ["*.com", "good.example.com"],
        "deny": ["https://evil.example.com/"],
        "resolver": {"allow_private": "no", "static": {"a": "b:0"}},
        "egress": {"mode": "socks"},
        "limits": {"idle_timeout": 0, "drain_timeout": -1, "bogus": 1},
    }
    errors = errors_of(data)
    paths = sorted(line.partition(": ")[0] for line in errors)
    assert paths == sorted(
        [
            "bogus",
            "listen.0.address",
            "listen.1.extra",
            "admin.address",
            "konnect.regions.1",
            "konnect.regions.2",
            "konnect.ports.0",
            "konnect.ports.2",
            "allow.0",
            "deny.0",
            "resolver.static",
            "resolver.allow_private",
            "egress.mode",
            "limits.idle_timeout",
            "limits.drain_timeout",
            "limits.bogus",
        ]
    ), errors
    assert len(errors) == 16
    assert "limits.idle_timeout: must be > 0" in errors
    assert "limits.drain_timeout: must be >= 0" in errors


def test_load_reports_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("limits:\n  idle_timeout: 0\n  bogus: 1\nkonnect:\n  ports: [0]\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.source == str(path)
    assert sorted(info.value.errors) == [
        "konnect.ports.0: must be >= 1",
        "limits.bogus: unknown key",
        "limits.idle_timeout: must be > 0",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),  # no such file
        (b"\xff\xfe limits: {}\n", "cannot read"),  # not UTF-8
    ],
)
def test_load_unreadable(tmp_path: Path, content: bytes | None, expected: str) -> None:
    path = tmp_path / "relay.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    (line,) = info.value.errors
    assert line.startswith(f"{path}: {expected}"), line


def test_load_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path)
    assert info.value.errors[0].startswith(f"{tmp_path}: cannot read")


# --- strict YAML -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("a: 1\na: 2\n", 2, "a"),
        ("limits:\n  idle_timeout: 1\n  head_timeout: 2\n  idle_timeout: 3\n", 4, "idle_timeout"),
        ("limits: {}\nkonnect: {}\nlimits: {}\n", 3, "limits"),
        ("resolver:\n  static:\n    a.test: 1.2.3.4\n    a.test: 5.6.7.8\n", 4, "a.test"),
        ("listen:\n  - address: x:1\n    address: y:2\n", 3, "address"),
        ("limits: {idle_timeout: 1, idle_timeout: 2}\n", 1, "idle_timeout"),
    ],
)
def test_duplicate_key_refused_with_line(text: str, line: int, key: str) -> None:
    (error,) = yaml_errors_of(text)
    assert error.startswith(f"line {line}, column "), error
    assert f"duplicate key {key!r}" in error


def test_yaml_without_duplicates_loads() -> None:
    text = "limits:\n  idle_timeout: 1\n  head_timeout: 2\n"
    assert parse_yaml(text) == {"limits": {"idle_timeout": 1, "head_timeout": 2}}


def test_merge_key_override_is_not_a_duplicate() -> None:
    text = "base: &b {idle_timeout: 1, head_timeout: 2}\nlimits:\n  <<: *b\n  idle_timeout: 5\n"
    assert parse_yaml(text)["limits"] == {"idle_timeout": 5, "head_timeout": 2}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("limits: {idle_timeout: 1\n", "line 2, column 1"),
        ("listen:\n  - address: x\n   bad: 1\n", "line 3, column 4"),
        ("\t- x\n", "line 1, column 1"),
        ('admin:\n  address: "127.0.0.1:9464\n', "line 3, column 1"),
        ("limits:\n  idle_timeout: [1, 2\n", "line 3, column 1"),
        ("a: 1\n---\nb: 2\n", "line 2, column 1"),
        ("a: !!python/object:os.system x\n", "line 1, column 4"),
    ],
)
def test_yaml_syntax_error_has_line_and_column(text: str, where: str) -> None:
    (error,) = yaml_errors_of(text)
    assert error.startswith(f"{where}: "), error
    assert len(error) > len(where) + 2


@pytest.mark.parametrize(
    ("text", "kind"),
    [("[1, 2]\n", "list"), ("just text\n", "str"), ("42\n", "int"), ("- a: 1\n", "list")],
)
def test_top_level_must_be_mapping(text: str, kind: str) -> None:
    assert errors_of(parse_yaml(text)) == [f"<top>: must be a mapping (got {kind})"]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file_is_defaults(text: str) -> None:
    s = build(parse_yaml(text))
    assert s.raw == config.FileConfig()
    assert s.raw == config.load(None).raw


def test_non_string_keys_are_errors() -> None:
    (line,) = errors_of(parse_yaml("1: 2\n"))
    assert line.startswith("1: ")


# --- the embedded default --------------------------------------------------------------


def test_embedded_default_is_config_relay_yaml() -> None:
    assert config.default_text() == (ROOT / "config" / "relay.yaml").read_text()
    embedded = config.load(None)
    from_file = config.load(ROOT / "config" / "relay.yaml")
    assert embedded.source == "<embedded default>"
    assert from_file.source == str(ROOT / "config" / "relay.yaml")
    assert embedded.raw == from_file.raw
    assert embedded.policy.konnect == from_file.policy.konnect
    for name in ("listen", "admin", "static", "allow_private", "cache_ttl", "egress", "limits"):
        assert getattr(embedded, name) == getattr(from_file, name), name


def test_embedded_default_matches_design() -> None:
    s = config.load(None)
    assert s.listen == (("127.0.0.1", 3128),)
    assert s.admin == ("127.0.0.1", 9464)
    assert s.policy.konnect.regions == ("au", "eu", "me", "in", "sg", "us")
    assert s.policy.konnect.control_planes == ()
    assert s.policy.konnect.ports == (443,)
    assert s.raw.allow == [] and s.raw.deny == []
    assert dict(s.static) == {}
    assert s.allow_private is False
    assert s.egress == "direct"
    assert s.limits.idle_timeout == 600
    # Kong declares a control plane dead after 45 s of silence and gives up on a
    # proxy step after 5 s.
    assert s.limits.idle_timeout > 45
    assert s.limits.connect_timeout < 5
    decide = s.policy.decide
    assert decide("abc123.eu.cp0.konghq.com", 443).allowed
    assert decide("abc123.sg.tp0.konghq.com", 443).allowed
    assert not decide("abc123.eu.cp0.konghq.com", 8443).allowed


def test_build_without_data_is_the_embedded_default() -> None:
    assert build(None).raw == config.load(None).raw
    assert build({}).raw == config.load(None).raw


# --- property: build() fails only with ConfigError -------------------------------------


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation mentions (``list[X]``, ``X | None``...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


# What a YAML document can hold: scalars of every type the safe loader builds,
# lists, and mappings with keys of any type.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["eu", "direct", "127.0.0.1:0", "[::1]:1", "*.example.com", "a:b", "auto"])
)
any_yaml = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers() | st.none(), inner, max_size=4)
    ),
    max_leaves=20,
)


def shaped_like(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Mappings with the model's own keys (plus a stray one), each holding either
    something shaped like the nested model or arbitrary YAML: the fuzz reaches
    every validator in the schema, not only the top level."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        nested = [shaped_like(m) for m in _models_in(info.annotation)]
        value = st.one_of(any_yaml, *nested, *(st.lists(n, max_size=3) for n in nested))
        optional[name] = value
    optional["x-unknown"] = any_yaml
    return st.fixed_dictionaries({}, optional=optional)


@settings(max_examples=300, deadline=None)
@given(st.one_of(any_yaml, shaped_like(config.FileConfig)))
def test_build_raises_only_config_error(data: Any) -> None:
    try:
        s = build(data)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(line, str) and line for line in exc.errors)
    else:
        assert isinstance(s, config.Settings)


def test_a_password_file_is_read_once_per_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    reads: list[str] = []
    read_text = Path.read_text

    def counting(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == secret:
            reads.append(str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    settings = config.build(
        {"auth": {"basic": {"users": [{"name": "u", "password_file": str(secret)}]}}}
    )
    assert settings.auth is not None
    assert reads == [str(secret)]
