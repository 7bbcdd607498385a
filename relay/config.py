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
from typing import Any

import yaml
from pydantic import ValidationError

from relay import policy

# The file schema and its parsers (schema.py), as the rest of the relay uses them.
from relay.addresses import (
    ProxyURL,
    nameserver_address,
    parse_address,
    parse_proxy_url,
    parse_static_side,
)
from relay.auth import BasicAuth
from relay.egress import Dialer, EgressSettings, HttpProxySettings, SSHSettings
from relay.policy import HostPattern, Policy
from relay.schema import (
    DAYS,
    DEFAULT_DRAIN_TIMEOUT,
    HOURS,
    MAX_WORKERS,
    MESH_GEOS,
    MINUTES,
    PRODUCTS,
    REGIONS,
    SECONDS,
    ClientKonnectModel,
    DataPlanesModel,
    FileConfig,
    HttpProxyModel,
    KonnectIPsModel,
    LimitsModel,
    ListenModel,
    SSHModel,
    TLSModel,
)

__all__ = [
    "DAYS",
    "DEFAULT_DRAIN_TIMEOUT",
    "HOURS",
    "MAX_WORKERS",
    "MESH_GEOS",
    "MINUTES",
    "PRODUCTS",
    "REGIONS",
    "SECONDS",
    "ClientPolicy",
    "ConfigError",
    "FileConfig",
    "HttpProxyModel",
    "KonnectIPsModel",
    "LimitsModel",
    "ListenModel",
    "ProxyURL",
    "SSHModel",
    "Settings",
    "TLSModel",
    "build",
    "default_text",
    "http_proxy_settings",
    "load",
    "load_document",
    "nameserver_address",
    "parse_address",
    "parse_proxy_url",
    "parse_static_side",
    "parse_yaml",
    "ssh_settings",
]


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


# --- runtime settings --------------------------------------------------------


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
    data_planes: DataPlanesModel
    admin_token: bytes | None  # admin.actions.token_file's content; None: actions off
    specs: tuple[ListenModel, ...] = ()  # the listen: entries, in order with ``listen``
    workers: int | str = 1
    allowed_cidrs: tuple[str, ...] = ()
    nameservers: tuple[tuple[str, int], ...] = ()
    dns_timeout: float = 2.0
    egress_config: EgressSettings = field(default_factory=EgressSettings)
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

    def dialer_for(self, dialers: Mapping[str, Dialer], host: str, port: int) -> Dialer | None:
        """The dialer ``egress.routes`` picks for host:port; None for a deny route."""
        via = self.route(host, port)
        return None if via == "deny" else dialers.get(via)

    def policy_for(self, user: str | None, cert: str | None, ip: str) -> tuple[str, Policy | None]:
        """(client entry name, its policy); the top-level policy when no entry
        matches, or None when ``clients_only`` refuses unmatched clients."""
        for entry in self.clients:
            if entry.matches(user, cert, ip):
                return entry.name, entry.policy
        if self.clients_only:
            return "", None
        return "", self.policy


def http_proxy_settings(model: HttpProxyModel) -> HttpProxySettings:
    """What the parent-proxy dialer takes from ``egress.http_proxy``."""
    return HttpProxySettings(**model.model_dump())


def ssh_settings(model: SSHModel) -> SSHSettings:
    """What the SSH dialer takes from ``egress.ssh``."""
    return SSHSettings(**{**model.model_dump(), "client_keys": tuple(model.client_keys)})


def _egress_settings(raw: FileConfig) -> EgressSettings:
    egress = raw.egress
    used = {egress.mode} | {r.via for r in egress.routes if r.via != "deny"}
    return EgressSettings(
        mode=egress.mode,
        used=tuple(sorted(used)),
        http_proxy=http_proxy_settings(egress.http_proxy) if egress.http_proxy else None,
        ssh=ssh_settings(egress.ssh) if egress.ssh else None,
    )


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
        data_planes=raw.data_planes,
        admin_token=raw.admin.actions.token(),
        specs=tuple(raw.listen),
        workers=raw.workers,
        allowed_cidrs=tuple(raw.resolver.allowed_cidrs),
        nameservers=tuple(nameserver_address(n) for n in raw.resolver.nameservers),
        dns_timeout=raw.resolver.timeout,
        egress_config=_egress_settings(raw),
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
    return load_document(path)[0]


def load_document(path: str | Path | None = None) -> tuple[Settings, dict[str, Any]]:
    """Like :func:`load`, also returning the parsed YAML mapping (the
    supervisor generates its workers' file from it, every key as written)."""
    if path is None:
        source, text = "<embedded default>", default_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{source}: cannot read: {exc}"], source) from None
    data = parse_yaml(text, source)
    return build(data, source), data if isinstance(data, dict) else {}


def default_text() -> str:
    return resources.files("relay").joinpath("relay.yaml").read_text(encoding="utf-8")
