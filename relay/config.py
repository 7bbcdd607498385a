"""Configuration: the YAML file schema, strict loading, and the runtime settings.

The file is untrusted input. It is loaded with a YAML loader that refuses
duplicate keys, validated by pydantic models that forbid unknown keys and
coerce nothing (``strict``), and every problem is reported with the dotted
path of the key that caused it (``limits.idle_timeout: must be > 0``). The
file schema (``FileConfig``) is kept apart from the runtime model
(``Settings``): the latter holds parsed addresses and the compiled policy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from relay import policy

SECONDS = 1.0
MINUTES = 60 * SECONDS

# Kong pings every 30 s and declares the control plane dead after 45 s of
# silence; anything near that breaks data planes, so the default is far above.
DEFAULT_IDLE_TIMEOUT = 10 * MINUTES
# Kong's client gives up on every proxy step after 5 s: answer well before it.
DEFAULT_CONNECT_TIMEOUT = 4 * SECONDS
DEFAULT_HEAD_TIMEOUT = 10 * SECONDS
# Kubernetes' default terminationGracePeriodSeconds is 30 s.
DEFAULT_DRAIN_TIMEOUT = 25 * SECONDS
DEFAULT_RECONNECT_WINDOW = 15 * MINUTES
DEFAULT_CACHE_TTL = 30 * SECONDS


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` lists every problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        super().__init__("\n".join(errors))


# --- strict YAML -------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


# --- field types -------------------------------------------------------------


def parse_address(text: str, *, allow_port_zero: bool = True) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port). Port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6: [::1]:3128)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:3128")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port must be a number")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"{text!r}: port must be in 1..65535")
    return host, port


def _check_address(text: str) -> str:
    parse_address(text)
    return text


def _check_label(text: str) -> str:
    try:
        name = policy.normalise_host(text)
    except policy.HostError as exc:
        raise ValueError(str(exc)) from None
    if "." in name:
        raise ValueError(f"{text!r} must be a single DNS label (the prefix only, no dots)")
    return name


def _check_pattern(text: str) -> str:
    try:
        return policy.parse_pattern(text).text
    except policy.PatternError as exc:
        raise ValueError(str(exc)) from None


Address = Annotated[str, AfterValidator(_check_address)]
Label = Annotated[str, AfterValidator(_check_label)]
Pattern = Annotated[str, AfterValidator(_check_pattern)]
Port = Annotated[int, Field(ge=1, le=65535)]
Region = Literal["au", "eu", "me", "in", "sg", "us"]
MeshGeo = Literal["au", "eu", "us", "global"]
REGIONS: tuple[Region, ...] = get_args(Region)
MESH_GEOS: tuple[MeshGeo, ...] = get_args(MeshGeo)
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- file schema -------------------------------------------------------------


class ListenModel(_Strict):
    address: Address


class AdminModel(_Strict):
    address: Address | None = "127.0.0.1:9464"


class KonnectModel(_Strict):
    regions: list[Region] = Field(default_factory=lambda: list(REGIONS))
    control_planes: list[Label] = Field(default_factory=list)
    portals: list[Label] = Field(default_factory=list)
    mesh_geos: list[MeshGeo] = Field(default_factory=lambda: list(MESH_GEOS))
    ports: list[Port] = Field(default_factory=lambda: [443], min_length=1)


class ResolverModel(_Strict):
    static: dict[str, str] = Field(default_factory=dict)
    allow_private: bool = False
    cache_ttl: Seconds = DEFAULT_CACHE_TTL

    @field_validator("static")
    @classmethod
    def _static(cls, value: dict[str, str]) -> dict[str, str]:
        errors = []
        for key, target in value.items():
            for text, what in ((key, "key"), (target, "value")):
                try:
                    parse_static_side(text)
                except ValueError as exc:
                    errors.append(f"{what} {text!r}: {exc}")
        if errors:
            raise ValueError("; ".join(errors))
        return value


class EgressModel(_Strict):
    mode: Literal["direct"] = "direct"


class LimitsModel(_Strict):
    idle_timeout: PositiveSeconds = DEFAULT_IDLE_TIMEOUT
    head_timeout: PositiveSeconds = DEFAULT_HEAD_TIMEOUT
    connect_timeout: PositiveSeconds = DEFAULT_CONNECT_TIMEOUT
    drain_timeout: Seconds = DEFAULT_DRAIN_TIMEOUT
    reconnect_window: PositiveSeconds = DEFAULT_RECONNECT_WINDOW


class FileConfig(_Strict):
    listen: list[ListenModel] = Field(
        default_factory=lambda: [ListenModel(address="127.0.0.1:3128")], min_length=1
    )
    admin: AdminModel = Field(default_factory=AdminModel)
    konnect: KonnectModel = Field(default_factory=KonnectModel)
    allow: list[Pattern] = Field(default_factory=list)
    deny: list[Pattern] = Field(default_factory=list)
    resolver: ResolverModel = Field(default_factory=ResolverModel)
    egress: EgressModel = Field(default_factory=EgressModel)
    limits: LimitsModel = Field(default_factory=LimitsModel)


# --- runtime settings --------------------------------------------------------


def parse_static_side(text: str) -> tuple[str, int | None]:
    """One side of a ``resolver.static`` entry: ``host``, ``host:port``, ``[v6]:port``."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        ipaddress.IPv6Address(host)
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") > 1:
        ipaddress.IPv6Address(text)
        return text, None
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise ValueError("empty host")
        if not port_text:
            return host.lower().rstrip("."), None
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be in 1..65535")
    return host.lower().rstrip("."), int(port_text)


@dataclass(frozen=True, slots=True)
class Limits:
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    reconnect_window: float = DEFAULT_RECONNECT_WINDOW


@dataclass(frozen=True, slots=True)
class Settings:
    """What the running relay uses: addresses parsed, policy compiled."""

    listen: tuple[tuple[str, int], ...]
    admin: tuple[str, int] | None
    policy: policy.Policy
    static: Mapping[tuple[str, int | None], tuple[str, int | None]]
    allow_private: bool
    cache_ttl: float
    egress: str
    limits: Limits
    source: str = "<embedded default>"
    raw: FileConfig = field(default_factory=FileConfig, repr=False)


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"] if part not in ("function-after",))
        lines.append(f"{loc or '<top>'}: {_message(err)}")
    return lines


def _message(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "greater_than":
        return f"must be > {ctx['gt']:g}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']:g}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']:g}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (got {err['input']!r})"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind.endswith("_type"):
        expected = kind.removesuffix("_type").replace("dict", "mapping")
        return (
            f"must be {'an' if expected[0] in 'aeiou' else 'a'} {expected} (got {err['input']!r})"
        )
    return str(err["msg"])


def build(data: Any, source: str = "<config>") -> Settings:
    """Validate a parsed YAML document; raise ConfigError with every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"<top>: must be a mapping (got {type(data).__name__})"], source)
    try:
        raw = FileConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc), source) from None
    k = raw.konnect
    scope = policy.KonnectScope(
        regions=tuple(k.regions),
        control_planes=tuple(k.control_planes),
        portals=tuple(k.portals),
        mesh_geos=tuple(k.mesh_geos),
        ports=tuple(k.ports),
    )
    compiled = policy.Policy(
        scope,
        allow=[policy.parse_pattern(p) for p in raw.allow],
        deny=[policy.parse_pattern(p) for p in raw.deny],
    )
    lim = raw.limits
    return Settings(
        listen=tuple(parse_address(item.address) for item in raw.listen),
        admin=parse_address(raw.admin.address) if raw.admin.address else None,
        policy=compiled,
        static={
            parse_static_side(key): parse_static_side(value)
            for key, value in raw.resolver.static.items()
        },
        allow_private=raw.resolver.allow_private,
        cache_ttl=raw.resolver.cache_ttl,
        egress=raw.egress.mode,
        limits=Limits(
            idle_timeout=lim.idle_timeout,
            head_timeout=lim.head_timeout,
            connect_timeout=lim.connect_timeout,
            drain_timeout=lim.drain_timeout,
            reconnect_window=lim.reconnect_window,
        ),
        source=source,
        raw=raw,
    )


def parse_yaml(text: str, source: str = "<config>") -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: {problem}"], source) from None


def load(path: str | Path | None = None) -> Settings:
    """Load and validate ``path``, or the embedded default when it is None."""
    if path is None:
        return build(parse_yaml(default_text(), "<embedded default>"), "<embedded default>")
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: cannot read: {exc}"], source) from None
    return build(parse_yaml(text, source), source)


def default_text() -> str:
    return resources.files("relay").joinpath("relay.yaml").read_text(encoding="utf-8")
