"""The configuration file's schema: pydantic models that forbid unknown keys
and coerce nothing (``strict``), the field types with their checks, and the
parsers of the few values written as text (addresses, proxy URLs). The
runtime settings built from it are config.py's; nothing at run time reads this
model but the workers' generated file.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    field_validator,
    model_validator,
)

from relay import konnect, policy
from relay.addresses import (
    nameserver_address,
    parse_address,
    parse_proxy_url,
    parse_static_side,
)
from relay.auth import Credential

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
# konnect-relay upgrade: the successor must be ready, and answer each step of the
# handover, within this (it imports, loads the config, starts its egress).
DEFAULT_UPGRADE_TIMEOUT = 30 * SECONDS
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


# --- field types -------------------------------------------------------------


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


class AdminActionsModel(_Strict):
    """``admin.actions``: POST /tunnels/{id}/close and POST /drain, off unless
    a token file is given (its content, stripped, is the bearer token)."""

    token_file: str | None = None
    _token: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_token(self) -> AdminActionsModel:
        # An unreadable, empty or short token file is a config error (the old config runs).
        if self.token_file is not None:
            try:
                token = Path(self.token_file).read_bytes().strip()
            except OSError as exc:
                raise ValueError(f"cannot read token_file: {exc}") from None
            if len(token) < MIN_TOKEN_BYTES:
                raise ValueError(f"token_file must hold at least {MIN_TOKEN_BYTES} characters")
            self._token = token
        return self

    def token(self) -> bytes | None:
        """The bearer token as read when this model was validated; None: actions off."""
        return self._token


MIN_TOKEN_BYTES = 16


class AdminModel(_Strict):
    address: Address | None = "127.0.0.1:9464"
    actions: AdminActionsModel = Field(default_factory=AdminActionsModel)


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
    # The secret as read while validating: a file or variable is read once per load.
    _credential: Credential | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_secret(self) -> UserModel:
        given = [k for k in ("password_hash", "password_env", "password_file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of password_hash, password_env, password_file")
        # A bad hash, unset variable or unreadable file is a config error.
        self._credential = self._read()
        return self

    def credential(self) -> Credential:
        """The secret read when this model was validated (each load reads anew)."""
        assert self._credential is not None
        return self._credential

    def _read(self) -> Credential:
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
    upgrade_timeout: PositiveSeconds = DEFAULT_UPGRADE_TIMEOUT
    reconnect_window: PositiveSeconds = DEFAULT_RECONNECT_WINDOW
    tls_peek_timeout: PositiveSeconds = DEFAULT_HEAD_TIMEOUT
    max_tunnels: int | None = Field(default=None, ge=1)
    max_tunnels_per_client: int | None = Field(default=None, ge=1)
    max_pending_heads: int = Field(default=DEFAULT_MAX_PENDING_HEADS, ge=1)


class DataPlanesModel(_Strict):
    """``data_planes``: the thresholds of the /clients states (relay/clients.py)."""

    no_telemetry_after: PositiveSeconds = 60.0
    flapping_reconnects: int = Field(default=5, ge=1)
    forget_after: PositiveSeconds = 3600.0


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
    data_planes: DataPlanesModel = Field(default_factory=DataPlanesModel)
