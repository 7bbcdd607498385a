"""Name -> addresses: the static map, the system resolver, a short cache, and
the checks that keep a tunnel off private, internal and special-purpose
addresses.

The relay dials exactly the addresses this module returned and checked: there
is no second lookup between the check and the connect (no DNS rebinding).

Two lists pin addresses: ``resolver.allowed_cidrs`` (every name) and, for the
names of the Konnect table, Kong's published ingress prefixes
(``resolver.konnect_ips``, held by a :class:`KonnectPins` that the feed swaps
whole when a new list arrives).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.hostport import hostport
from relay.konnect import is_konnect_host

if TYPE_CHECKING:
    from relay.config import Settings
    from relay.konnect_ips import IPList

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cache entries are bounded: only allowed names are resolved, but a preset with
# "any control-plane prefix" admits an unbounded set of names.
MAX_CACHE_ENTRIES = 4096

_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, not covered by is_private
_NAT64 = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # RFC 6052 well-known prefix
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215 local-use prefix
)
_6TO4 = ipaddress.IPv6Network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380


class ResolveError(Exception):
    """Why a name gave no usable address; ``reason`` is a bounded label."""

    def __init__(self, reason: str, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


def special_purpose(ip: IPAddress) -> str | None:
    """The kind of non-public range ``ip`` is in (following embedded IPv4), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return special_purpose(ip.ipv4_mapped)
        if ip in _NAT64[0]:
            return special_purpose(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64[1]:
            # The local-use prefix admits other prefix lengths (RFC 6052 §2.2), so
            # where the IPv4 address sits is not known: never treat it as public.
            return "local-nat"
        if ip in _TEREDO:
            return "teredo"
        if ip in _6TO4:
            return special_purpose(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    if ip.is_loopback:
        return "loopback"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    if not ip.is_global:
        return "non-global"
    return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address to dial, already checked. ``would_deny`` is set (to the
    reason's detail) for an address that ``resolver.konnect_ips`` in report
    mode lets through although it is outside the published prefixes."""

    family: int
    address: str
    port: int
    would_deny: str = ""

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        return hostport(self.address, self.port)


def static_target(
    static: Mapping[tuple[str, int | None], tuple[str, int | None]], host: str, port: int
) -> tuple[str, int] | None:
    """The ``resolver.static`` override for host:port (curl --connect-to semantics)."""
    if not static:
        return None
    hit = static.get((host, port)) or static.get((host, None))
    if hit is None:
        return None
    return hit[0], hit[1] if hit[1] is not None else port


class KonnectPins:
    """The ingress prefixes Konnect names must resolve into, and what to do
    about an address outside (``enforce``: refuse; ``report``: let it through,
    marked). ``ips`` is None while no list has been loaded or fetched. Never
    changed in place: the feed builds a new one per list or mode."""

    __slots__ = ("_inside", "ips", "mode")

    def __init__(self, ips: IPList | None, mode: str) -> None:
        self.ips = ips
        self.mode = mode
        self._inside: dict[str, bool] = {}

    def inside(self, address: str, ip: IPAddress) -> bool:
        """Is ``ip`` (``address`` parsed) in the published prefixes?"""
        verdict = self._inside.get(address)
        if verdict is None:
            verdict = self.ips is not None and ip in self.ips
            if len(self._inside) >= MAX_CACHE_ENTRIES:
                self._inside.clear()
            self._inside[address] = verdict
        return verdict


class Resolver:
    """Resolves allowed names; applies the static map and the address checks."""

    __slots__ = (
        "_cache",
        "_dns",
        "_literals",
        "_verdicts",
        "allow_private",
        "allowed_networks",
        "cache_ttl",
        "listening",
        "pins",
        "static",
        "timeout",
    )

    def __init__(
        self,
        static: Mapping[tuple[str, int | None], tuple[str, int | None]],
        *,
        allow_private: bool,
        cache_ttl: float,
        allowed_cidrs: Iterable[str] = (),
        nameservers: Iterable[tuple[str, int]] = (),
        timeout: float = 4.0,
        pins: KonnectPins | None = None,
    ) -> None:
        self.static = static
        # resolver.konnect_ips: set (and replaced) by the feed; None when off.
        self.pins = pins
        self.allow_private = allow_private
        self.cache_ttl = cache_ttl
        self.allowed_networks = tuple(ipaddress.ip_network(c) for c in allowed_cidrs)
        self.timeout = timeout
        self._dns = _dns_resolver(list(nameservers), timeout) if nameservers else None
        # (address, port) pairs this relay listens on, for the loop guard; an
        # unspecified address stands for every local address.
        self.listening: set[tuple[str, int]] = set()
        self._verdicts: dict[str, tuple[IPAddress, str | None, bool]] = {}
        self._cache: dict[str, tuple[float, tuple[tuple[int, str], ...]]] = {}
        # Address literals (every static mapping's target, say) parsed once.
        self._literals: dict[str, tuple[tuple[int, str], ...]] = {}

    async def resolve(self, host: str, port: int) -> list[Endpoint]:
        """Checked endpoints for host:port, in the order Happy Eyeballs should try."""
        endpoints = self.resolve_now(host, port)
        if endpoints is not None:
            return endpoints
        target = static_target(self.static, host, port)
        address, port = target if target is not None else (host, port)
        pins = self._pins_for(host) if self.pins is not None else None
        return self._check(host, address, port, await self._lookup(address), pins)

    def resolve_now(self, host: str, port: int) -> list[Endpoint] | None:
        """What ``resolve`` answers, when it needs no wait: a literal address, a
        static mapping onto one, or a name in the cache; None when a lookup is
        due. A dial then costs no coroutine for the resolver (most of the
        relay's dials, behind a static map or a cached name)."""
        name = host
        target = static_target(self.static, host, port)
        if target is not None:
            host, port = target
        pins = self._pins_for(name) if self.pins is not None else None
        addrs = self._literals.get(host)
        if addrs is None:
            addrs = self._known(host)
            if addrs is None:
                return None
        return self._check(name, host, port, addrs, pins)

    def _pins_for(self, name: str) -> KonnectPins | None:
        """Kong's list, for the names of the Konnect table only (other names are
        not pinned by it); raises while an enforced list has not arrived."""
        pins = self.pins
        if pins is None or not is_konnect_host(name):
            return None
        if pins.ips is None and pins.mode == "enforce":
            raise ResolveError(
                "konnect_ips_unavailable",
                f"{name}: Konnect's ingress address list (resolver.konnect_ips) has not "
                "been fetched yet and no cache_file holds one; retry shortly",
                status=503,
            )
        return pins

    def _check(
        self,
        name: str,
        host: str,
        port: int,
        addrs: tuple[tuple[int, str], ...],
        pins: KonnectPins | None,
    ) -> list[Endpoint]:
        """The addresses ``name`` resolved to (through ``host``), checked
        (``pins``: Kong's list when it applies to ``name``)."""
        endpoints, refused, unpinned = [], [], []
        for family, address in addrs:
            ip, kind, pinned = self._verdict(address)
            if self.listening and self.is_self(ip, port):
                raise ResolveError(
                    "loop",
                    f"{host} resolves to {Endpoint(family, address, port)}, "
                    "an address this relay listens on",
                    status=403,
                )
            if kind is not None:
                refused.append(f"{address} ({kind})")
            elif pins is not None:
                # Kong's prefixes plus resolver.allowed_cidrs pin a Konnect name.
                if pins.inside(address, ip) or (pinned and self.allowed_networks):
                    endpoints.append(Endpoint(family, address, port))
                elif pins.mode == "report":
                    endpoints.append(
                        Endpoint(family, address, port, _unpinned(name, address, pins))
                    )
                else:
                    unpinned.append(address)
            elif not pinned:
                unpinned.append(address)
            else:
                endpoints.append(Endpoint(family, address, port))
        if not endpoints:
            if unpinned:
                outside = (
                    "Konnect's published ingress prefixes (resolver.konnect_ips)"
                    if pins is not None
                    else "resolver.allowed_cidrs"
                )
                raise ResolveError(
                    "address_not_pinned",
                    f"{name} resolves to {', '.join(unpinned)}, outside {outside}",
                    status=403,
                )
            raise ResolveError(
                "private_address",
                f"{host} resolves only to non-public addresses: {', '.join(refused)}",
                status=403,
            )
        return interleave(endpoints)

    def _verdict(self, address: str) -> tuple[IPAddress, str | None, bool]:
        """(parsed address, non-public kind or None, inside allowed_cidrs): the same
        for every lookup of an address under one config, so computed once."""
        verdict = self._verdicts.get(address)
        if verdict is None:
            ip = ipaddress.ip_address(address)
            kind = None if self.allow_private else special_purpose(ip)
            pinned = not self.allowed_networks or any(ip in n for n in self.allowed_networks)
            if len(self._verdicts) >= MAX_CACHE_ENTRIES:
                self._verdicts.clear()
            verdict = self._verdicts[address] = (ip, kind, pinned)
        return verdict

    def is_self(self, ip: IPAddress, port: int) -> bool:
        """Would dialling ip:port reach one of this relay's own listeners?

        An IPv4-mapped address (``::ffff:a.b.c.d``) is dialled as a.b.c.d, and a
        connect to an unspecified address (0.0.0.0, ::) reaches this host, so
        both count as the listener they lead to."""
        ip = _unmapped(ip)
        for address, listen_port in self.listening:
            if listen_port != port:
                continue
            listen_ip = _unmapped(ipaddress.ip_address(address))
            if listen_ip == ip or ip.is_unspecified:
                return True
            if listen_ip.is_unspecified and (ip.is_loopback or _local(ip)):
                return True
        return False

    def _known(self, host: str) -> tuple[tuple[int, str], ...] | None:
        """The addresses of an address literal, or of a name in the cache."""
        literal = self._literals.get(host)
        if literal is not None:
            return literal
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if len(self._literals) >= MAX_CACHE_ENTRIES:
                self._literals.clear()
            literal = self._literals[host] = ((family, str(ip)),)
            return literal
        if self._dns is not None:
            return None  # resolver.nameservers: every lookup asks them
        cached = self._cache.get(host)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return None

    async def _lookup(self, host: str) -> tuple[tuple[int, str], ...]:
        known = self._known(host)
        if known is not None:
            return known
        if self._dns is not None:
            return await _dns_lookup(self._dns, host)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveError(
                "dns_failure", f"DNS lookup of {host} failed: {exc.strerror}"
            ) from None
        except UnicodeError:
            raise ResolveError("dns_failure", f"DNS lookup of {host} failed: bad name") from None
        seen: dict[tuple[int, str], None] = {}
        for family, _type, _proto, _canon, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                seen[(family, str(sockaddr[0]).split("%", 1)[0])] = None
        addrs = tuple(seen)
        if not addrs:
            raise ResolveError("dns_failure", f"DNS lookup of {host} returned no address")
        if self.cache_ttl > 0:
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
            self._cache[host] = (now + self.cache_ttl, addrs)
        return addrs


# Share of limits.connect_timeout a lookup through resolver.nameservers may use:
# the connect timeout covers lookup and connect, so a lookup must give up first
# or a dead nameserver would be reported as a connect timeout.
DNS_SHARE = 0.75


def resolver_for(settings: Settings, pins: KonnectPins | None = None) -> Resolver:
    """The resolver a relay (or `doctor`) builds from its settings; ``pins``
    is the current Konnect ingress list when ``resolver.konnect_ips`` is on."""
    return Resolver(
        settings.static,
        allow_private=settings.allow_private,
        cache_ttl=settings.cache_ttl,
        allowed_cidrs=settings.allowed_cidrs,
        nameservers=settings.nameservers,
        timeout=min(settings.dns_timeout, settings.limits.connect_timeout * DNS_SHARE),
        pins=pins,
    )


def _unpinned(name: str, address: str, pins: KonnectPins) -> str:
    if pins.ips is None:
        return f"{name}: no Konnect ingress address list yet (resolver.konnect_ips)"
    return (
        f"{name} resolves to {address}, outside Konnect's published ingress prefixes "
        "(resolver.konnect_ips)"
    )


def interleave(endpoints: list[Endpoint]) -> list[Endpoint]:
    """RFC 8305 §4: alternate address families, starting with the first one returned."""
    if len(endpoints) < 2:
        return endpoints
    first = endpoints[0].family
    a = [e for e in endpoints if e.family == first]
    b = [e for e in endpoints if e.family != first]
    out: list[Endpoint] = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


def _unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 address (RFC 4291 §2.5.5.2)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _local(ip: IPAddress) -> bool:
    """Is ``ip`` assigned to this host? Binding to it succeeds only if it is."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def _dns_resolver(nameservers: list[tuple[str, int]], timeout: float) -> Any:
    """A dnspython resolver that asks exactly these servers (``resolver.nameservers``)
    and caches answers for their TTL, so split-horizon records pointing Konnect
    names at this relay are never used for its own lookups."""
    import dns.asyncresolver
    import dns.nameserver
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
    resolver.lifetime = timeout
    resolver.cache = dns.resolver.LRUCache(MAX_CACHE_ENTRIES)
    return resolver


async def _dns_lookup(resolver: Any, host: str) -> tuple[tuple[int, str], ...]:
    import dns.exception
    import dns.resolver

    answers = await asyncio.gather(
        resolver.resolve(host, "AAAA", raise_on_no_answer=False),
        resolver.resolve(host, "A", raise_on_no_answer=False),
        return_exceptions=True,
    )
    addrs: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    for family, answer in zip((socket.AF_INET6, socket.AF_INET), answers, strict=True):
        if isinstance(answer, BaseException):
            errors.append(answer)
            continue
        addrs.extend((family, rr.address) for rr in answer)
    if addrs:
        return tuple(addrs)
    if any(isinstance(e, dns.exception.Timeout) for e in errors):
        raise ResolveError("dns_timeout", f"DNS lookup of {host} timed out", status=504)
    if any(isinstance(e, dns.resolver.NXDOMAIN) for e in errors):
        raise ResolveError("dns_failure", f"DNS lookup of {host} failed: no such name")
    if errors:
        raise ResolveError("dns_failure", f"DNS lookup of {host} failed: {errors[0]}")
    raise ResolveError("dns_failure", f"DNS lookup of {host} returned no address")
