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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from relay import konnect, policy
from relay.auth import BasicAuth, Credential
from relay.policy import HostPattern, Policy

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

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
DEFAULT_DNS_TIMEOUT = 2 * SECONDS  # inside the connect timeout, which covers both
# Slowloris guard: 2,000 idle half-sent heads must not starve real clients, and
# each pending head costs one fd and at most 16 KiB.
DEFAULT_MAX_PENDING_HEADS = 4096
MAX_WORKERS = 64
# Kong's published ingress addresses (Konnect networking page).
DEFAULT_KONNECT_IPS_URL = "https://ip-addresses.origin.konghq.com/ip-addresses.json"
# Kong announces changes ahead (RSS feed); four fetches a day follow them
# closely and cost one small HTTPS request each.
DEFAULT_KONNECT_IPS_REFRESH = 6 * HOURS
MIN_REFRESH = 1 * SECONDS
MAX_REFRESH = 7 * DAYS
# The whole fetch: connect through the egress, TLS, request, the body.
DEFAULT_KONNECT_IPS_TIMEOUT = 30 * SECONDS


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
    # Duplicates are looked for among the keys written in this mapping only: a
    # key that overrides one brought in by a "<<" merge is YAML 1.1's intent.
    first_seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in first_seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {first_seen[key]})",
                key_node.start_mark,
            )
        first_seen[key] = line
    loader.flatten_mapping(node)  # merged pairs first, so explicit keys win below
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        mapping[loader.construct_object(key_node, deep=True)] = loader.construct_object(
            value_node, deep=True
        )
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


def _one_of(values: tuple[str, ...]) -> Any:
    """A validator admitting exactly ``values`` (from the Konnect table)."""
    listed = ", ".join(repr(v) for v in values[:-1]) + f" or {values[-1]!r}"

    def check(text: str) -> str:
        if text not in values:
            raise ValueError(f"must be one of {listed} (got {text!r})")
        return text

    return AfterValidator(check)


# Regions, geos and products are those of relay/konnect.py's table, the one list.
REGIONS = konnect.REGIONS
MESH_GEOS = konnect.MESH_GEOS
PRODUCTS = konnect.PRODUCTS
Region = Annotated[str, _one_of(REGIONS)]
MeshGeo = Annotated[str, _one_of(MESH_GEOS)]
Product = Annotated[str, _one_of(PRODUCTS)]
PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- file schema -------------------------------------------------------------


def _check_cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a CIDR range (e.g. 10.0.0.0/8 or 2001:db8::/32)"
        ) from None


def _check_user(text: str) -> str:
    if not text or ":" in text or not text.isprintable():
        raise ValueError(f"{text!r}: a user name is non-empty, printable and has no ':'")
    return text


def _check_workers(value: object) -> int | str:
    # One validator for the whole union, so an error names "workers" itself
    # rather than each member type pydantic tried.
    if value == "auto" or (
        type(value) is int and 1 <= value <= MAX_WORKERS  # bool is not a count
    ):
        return value
    raise ValueError(f"must be a number of processes 1..{MAX_WORKERS} or auto (got {value!r})")


Workers = Annotated[int | str, PlainValidator(_check_workers)]
CIDR = Annotated[str, AfterValidator(_check_cidr)]
UserName = Annotated[str, AfterValidator(_check_user)]


class TLSModel(_Strict):
    cert: str
    key: str
    client_ca: str | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"


class ListenModel(_Strict):
    address: Address
    name: str | None = None
    mode: Literal["connect", "sni"] = "connect"
    target_port: Port | None = None
    tls: TLSModel | None = None
    proxy_protocol: bool = False
    trusted_proxies: list[CIDR] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ListenModel:
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "proxy_protocol: true needs trusted_proxies (the load balancers' CIDRs)"
            )
        if self.proxy_protocol and self.tls is not None:
            raise ValueError(
                "proxy_protocol with tls is not supported: the PROXY header precedes the "
                "TLS handshake; terminate TLS in front of the relay or use a plain listener"
            )
        if self.target_port is not None and self.mode != "sni":
            raise ValueError("target_port is for sni listeners (a CONNECT names its port)")
        if self.mode == "sni" and self.tls is not None:
            raise ValueError("an sni listener relays the client's own TLS; it takes no tls:")
        return self


class AdminModel(_Strict):
    address: Address | None = "127.0.0.1:9464"


class KonnectModel(_Strict):
    regions: list[Region] = Field(default_factory=lambda: list(REGIONS))
    control_planes: list[Label] = Field(default_factory=list)
    portals: list[Label] = Field(default_factory=list)
    mesh_geos: list[MeshGeo] = Field(default_factory=lambda: list(MESH_GEOS))
    ports: list[Port] = Field(default_factory=lambda: [443], min_length=1)
    products: list[Product] = Field(default_factory=lambda: list(PRODUCTS), min_length=1)
    require_tls: bool = True
    check_sni: bool = True


class UserModel(_Strict):
    name: UserName
    password_hash: str | None = None
    password_env: str | None = None
    password_file: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> UserModel:
        given = [k for k in ("password_hash", "password_env", "password_file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of password_hash, password_env, password_file")
        self.credential()  # a bad hash, unset variable or unreadable file is a config error
        return self

    def credential(self) -> Credential:
        """The secret, read now from the environment or the file (re-read on reload)."""
        if self.password_hash is not None:
            return Credential(password_hash=self.password_hash)
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"environment variable {self.password_env} is not set")
            return Credential(password=value)
        assert self.password_file is not None
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read password_file: {exc}") from None
        return Credential(password=text.rstrip("\r\n"))


class BasicAuthModel(_Strict):
    users: list[UserModel] = Field(min_length=1)


class AuthModel(_Strict):
    basic: BasicAuthModel | None = None


class ClientMatchModel(_Strict):
    users: list[UserName] = Field(default_factory=list)
    certs: list[str] = Field(default_factory=list)
    cidrs: list[CIDR] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> ClientMatchModel:
        if not (self.users or self.certs or self.cidrs):
            raise ValueError("match needs at least one of users, certs, cidrs")
        return self


class ClientKonnectModel(_Strict):
    products: list[Product] | None = None
    regions: list[Region] | None = None
    control_planes: list[Label] | None = None
    portals: list[Label] | None = None


class ClientModel(_Strict):
    name: str = Field(min_length=1)
    match: ClientMatchModel
    konnect: ClientKonnectModel = Field(default_factory=ClientKonnectModel)
    allow: list[Pattern] = Field(default_factory=list)


_DURATION_UNITS = {"s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}


def _check_duration(value: object) -> float:
    """Seconds as a number, or a string like ``30s``, ``15m``, ``6h``, ``1d``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value[-1:] in _DURATION_UNITS:
        number = value[:-1]
        if not number.replace(".", "", 1).isdigit() or not number.isascii():
            raise ValueError(f"{value!r} is not a duration like 30s, 15m, 6h or 1d")
        seconds = float(number) * _DURATION_UNITS[value[-1]]
    else:
        raise ValueError(f"must be seconds or a duration like 30s, 15m, 6h, 1d (got {value!r})")
    if not MIN_REFRESH <= seconds <= MAX_REFRESH:
        raise ValueError(f"must be between {MIN_REFRESH:g} s and {MAX_REFRESH / DAYS:g} days")
    return seconds


Duration = Annotated[float, PlainValidator(_check_duration)]


def _check_https_url(text: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"bad URL {text!r}: {exc}") from None
    if parts.scheme != "https":
        raise ValueError(f"{text!r}: the list is fetched over https:// only")
    if not parts.hostname or parts.username is not None or parts.fragment:
        raise ValueError(f"{text!r}: expected https://host[:port]/path")
    return text


class KonnectIPsModel(_Strict):
    enabled: bool = False
    url: Annotated[str, AfterValidator(_check_https_url)] = DEFAULT_KONNECT_IPS_URL
    refresh: Duration = DEFAULT_KONNECT_IPS_REFRESH
    cache_file: str | None = None
    mode: Literal["enforce", "report"] = "enforce"
    ca_file: str | None = None
    timeout: PositiveSeconds = DEFAULT_KONNECT_IPS_TIMEOUT
    fetch: bool = True

    @model_validator(mode="after")
    def _source(self) -> KonnectIPsModel:
        if not self.fetch and self.cache_file is None:
            raise ValueError("fetch: false reads the list from cache_file, which is not set")
        return self


class ResolverModel(_Strict):
    static: dict[str, str] = Field(default_factory=dict)
    allow_private: bool = False
    cache_ttl: Seconds = DEFAULT_CACHE_TTL
    allowed_cidrs: list[CIDR] = Field(default_factory=list)
    nameservers: list[str] = Field(default_factory=list)
    timeout: PositiveSeconds = DEFAULT_DNS_TIMEOUT
    konnect_ips: KonnectIPsModel = Field(default_factory=KonnectIPsModel)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, value: list[str]) -> list[str]:
        for text in value:
            nameserver_address(text)
        return value

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


EgressName = Literal["direct", "http_proxy", "ssh"]


def _check_route_pattern(text: str) -> str:
    return "*" if text == "*" else _check_pattern(text)


class HttpProxyModel(_Strict):
    url: str
    ca_file: str | None = None
    verify: bool = True
    connect_timeout: PositiveSeconds = DEFAULT_CONNECT_TIMEOUT

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_proxy_url(value)
        return value


class SSHModel(_Strict):
    host: str = Field(min_length=1)
    port: Port = 22
    username: str = Field(min_length=1)
    client_keys: list[str] = Field(default_factory=list)
    known_hosts: str = Field(min_length=1)
    keepalive_interval: PositiveSeconds = 15.0
    max_channels: int = Field(default=1000, ge=1)
    resolve: Literal["remote", "local"] = "remote"
    connect_timeout: PositiveSeconds = 10.0


class RouteModel(_Strict):
    match: list[Annotated[str, AfterValidator(_check_route_pattern)]] = Field(min_length=1)
    via: Literal["direct", "http_proxy", "ssh", "deny"]


class EgressModel(_Strict):
    mode: EgressName = "direct"
    http_proxy: HttpProxyModel | None = None
    ssh: SSHModel | None = None
    routes: list[RouteModel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sections(self) -> EgressModel:
        used = {self.mode} | {r.via for r in self.routes}
        missing = [m for m in ("http_proxy", "ssh") if m in used and getattr(self, m) is None]
        if missing:
            raise ValueError(
                " and ".join(f"egress.{m} is required when {m} is used" for m in missing)
            )
        return self


class LimitsModel(_Strict):
    idle_timeout: PositiveSeconds = DEFAULT_IDLE_TIMEOUT
    head_timeout: PositiveSeconds = DEFAULT_HEAD_TIMEOUT
    connect_timeout: PositiveSeconds = DEFAULT_CONNECT_TIMEOUT
    drain_timeout: Seconds = DEFAULT_DRAIN_TIMEOUT
    reconnect_window: PositiveSeconds = DEFAULT_RECONNECT_WINDOW
    tls_peek_timeout: PositiveSeconds = DEFAULT_HEAD_TIMEOUT
    max_tunnels: int | None = Field(default=None, ge=1)
    max_tunnels_per_client: int | None = Field(default=None, ge=1)
    max_pending_heads: int = Field(default=DEFAULT_MAX_PENDING_HEADS, ge=1)


class ReloadModel(_Strict):
    close_revoked: bool = True


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
    policy_mode: Literal["enforce", "report"] = "enforce"
    auth: AuthModel = Field(default_factory=AuthModel)
    clients: list[ClientModel] = Field(default_factory=list)
    clients_only: bool = False
    workers: Workers = 1
    reload: ReloadModel = Field(default_factory=ReloadModel)


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


def nameserver_address(text: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` of a DNS server (port 53 by default)."""
    host, port = parse_static_side(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r} must be an IP address") from None
    return host, port or 53


@dataclass(frozen=True, slots=True)
class ProxyURL:
    scheme: str
    host: str
    port: int
    username: str | None
    password: str | None


def parse_proxy_url(text: str) -> ProxyURL:
    """``http(s)://[user:pass@]host:port`` (userinfo percent-decoded, like Kong)."""
    from urllib.parse import unquote, urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad proxy URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("proxy URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("proxy URL needs a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("proxy URL takes no path, query or fragment")
    if port is None:
        raise ValueError("write the proxy port explicitly (http://host:3128)")
    return ProxyURL(
        parts.scheme,
        parts.hostname,
        port,
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
    )


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """A ``clients:`` entry: who it matches and the policy they get."""

    name: str
    users: frozenset[str]
    certs: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    policy: policy.Policy

    def matches(self, user: str | None, cert: str | None, ip: str) -> bool:
        if user is not None and user in self.users:
            return True
        if cert is not None and cert in self.certs:
            return True
        if self.networks:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return False
            return any(addr in net for net in self.networks)
        return False


@dataclass(frozen=True, slots=True)
class Settings:
    """What the running relay uses: addresses parsed, policy compiled."""

    listen: tuple[tuple[str, int], ...]
    admin: tuple[str, int] | None
    policy: Policy
    routes: tuple[tuple[tuple[HostPattern | None, ...], str], ...]
    clients: tuple[ClientPolicy, ...]
    auth: BasicAuth | None
    static: Mapping[tuple[str, int | None], tuple[str, int | None]]
    allow_private: bool
    cache_ttl: float
    egress: str
    limits: LimitsModel
    konnect_ips: KonnectIPsModel = field(default_factory=KonnectIPsModel)
    policy_mode: str = "enforce"
    clients_only: bool = False
    close_revoked: bool = True
    require_tls: bool = True
    check_sni: bool = True
    source: str = "<embedded default>"
    raw: FileConfig = field(default_factory=FileConfig, repr=False)

    def route(self, host: str, port: int) -> str:
        """The egress for host:port: the first ``egress.routes`` entry that
        matches, else ``egress.mode``; "deny" refuses."""
        for patterns, via in self.routes:
            if any(p is None or p.matches(host, port) for p in patterns):
                return via
        return self.egress

    def policy_for(self, user: str | None, cert: str | None, ip: str) -> tuple[str, Policy | None]:
        """(client entry name, its policy); the top-level policy when no entry
        matches, or None when ``clients_only`` refuses unmatched clients."""
        for entry in self.clients:
            if entry.matches(user, cert, ip):
                return entry.name, entry.policy
        if self.clients_only:
            return "", None
        return "", self.policy


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
        expected = kind.removesuffix("_type").replace("dict", "mapping").replace("model", "mapping")
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
    deny = [policy.parse_pattern(p) for p in raw.deny]

    def compile_policy(pins: ClientKonnectModel, allow: list[str]) -> policy.Policy:
        scope = policy.KonnectScope(
            regions=tuple(pins.regions if pins.regions is not None else k.regions),
            control_planes=tuple(
                pins.control_planes if pins.control_planes is not None else k.control_planes
            ),
            portals=tuple(pins.portals if pins.portals is not None else k.portals),
            mesh_geos=tuple(k.mesh_geos),
            ports=tuple(k.ports),
            products=tuple(pins.products if pins.products is not None else k.products),
        )
        return policy.Policy(scope, [policy.parse_pattern(p) for p in allow], deny)

    clients = tuple(
        ClientPolicy(
            name=c.name,
            users=frozenset(c.match.users),
            certs=frozenset(c.match.certs),
            networks=tuple(ipaddress.ip_network(n) for n in c.match.cidrs),
            policy=compile_policy(c.konnect, c.allow),
        )
        for c in raw.clients
    )
    return Settings(
        listen=tuple(parse_address(item.address) for item in raw.listen),
        admin=parse_address(raw.admin.address) if raw.admin.address else None,
        policy=compile_policy(ClientKonnectModel(), raw.allow),
        routes=tuple(
            (tuple(None if m == "*" else policy.parse_pattern(m) for m in r.match), r.via)
            for r in raw.egress.routes
        ),
        clients=clients,
        auth=BasicAuth({u.name: u.credential() for u in raw.auth.basic.users})
        if raw.auth.basic is not None
        else None,
        static={
            parse_static_side(key): parse_static_side(value)
            for key, value in raw.resolver.static.items()
        },
        allow_private=raw.resolver.allow_private,
        cache_ttl=raw.resolver.cache_ttl,
        egress=raw.egress.mode,
        limits=raw.limits,
        konnect_ips=raw.resolver.konnect_ips,
        policy_mode=raw.policy_mode,
        clients_only=raw.clients_only,
        close_revoked=raw.reload.close_revoked,
        require_tls=raw.konnect.require_tls,
        check_sni=raw.konnect.check_sni,
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
