"""Kong's published Konnect ingress addresses: the document, parsed and checked.

Kong publishes every Konnect ingress address per geo at
``https://ip-addresses.origin.konghq.com/ip-addresses.json`` and asks firewall
admins to allowlist its ``ingressIPs`` block rather than DNS names. The relay
pins Konnect names to those prefixes (``resolver.konnect_ips``); this module
turns the document into an :class:`IPList` or refuses it whole.

The shape Kong uses may change, so the parser is tolerant of structure and
strict about content. Under ``ingressIPs`` each configured region is a key
whose value is a list of addresses or prefixes, or any nesting of objects and
lists beneath it (per service, per address family); keys outside the
configured regions are ignored. A document is refused, naming the JSON path of
the problem, when it is not JSON, has no ``ingressIPs`` object, yields no
prefix for a configured region, holds anything under a region that is not an
address or prefix, or holds a prefix shorter than /8 (IPv4) or /16 (IPv6): a
poisoned or broken list must never switch pinning off by allowing everything.

Pure: no I/O; the fetch lives in konnect_ips_feed.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_DOCUMENT_SIZE", "IPList", "IPListError", "Network", "parse_document"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The 2026 document is a few KiB; a thousand times that is not a list of
# addresses any more.
MAX_DOCUMENT_SIZE = 1024 * 1024
# Shorter prefixes would pin a Konnect name to a sixteenth of the IPv4 Internet
# or more: no ingress list holds one, a poisoned one might.
MIN_PREFIX_LENGTH = {4: 8, 6: 16}
# Nesting deeper than this under a region is not a list of addresses.
MAX_DEPTH = 8
# How much of a bad value a message quotes.
MAX_SHOWN = 60


class IPListError(ValueError):
    """A document that cannot be used; ``path`` is a JSON path (``$.ingressIPs.us[2]``)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else json.dumps(value[:MAX_SHOWN])
    return text[: MAX_SHOWN + 2] + ("..." if len(text) > MAX_SHOWN + 2 else "")


@dataclass(frozen=True, slots=True)
class IPList:
    """The prefixes of one accepted document, for the regions asked for."""

    networks: tuple[Network, ...]
    per_region: dict[str, int] = field(default_factory=dict)
    digest: str = ""  # SHA-256 of the document, to tell a changed one from the same

    def __len__(self) -> int:
        return len(self.networks)

    def __contains__(self, ip: object) -> bool:
        return any(ip in net for net in self.networks)

    def texts(self) -> frozenset[str]:
        return frozenset(str(n) for n in self.networks)


def _leaves(value: Any, path: str, depth: int = 0) -> Iterable[tuple[str, Any]]:
    """(JSON path, value) of every non-container value under ``value``."""
    if depth > MAX_DEPTH:
        raise IPListError(path, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]", depth + 1)
    else:
        yield path, value


def _network(path: str, value: Any) -> Network:
    if not isinstance(value, str):
        raise IPListError(path, f"{_show(value)} is not an IP address or prefix")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise IPListError(path, f"{_show(value)} is not an IP address or prefix") from None
    shortest = MIN_PREFIX_LENGTH[net.version]
    if net.prefixlen < shortest:
        raise IPListError(
            path,
            f"prefix {net} is shorter than /{shortest}; refusing a list that would pin "
            "Konnect names to so wide a range",
        )
    return net


def parse_document(data: bytes, regions: Sequence[str], optional: Sequence[str] = ()) -> IPList:
    """The prefixes under ``ingressIPs`` for ``regions`` (each must yield at
    least one) and ``optional`` keys (``global``, mesh geos) where present;
    raise :class:`IPListError` naming the first problem."""
    if len(data) > MAX_DOCUMENT_SIZE:
        raise IPListError("$", f"document is over {MAX_DOCUMENT_SIZE // 1024} KiB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IPListError("$", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise IPListError("$", "not a JSON object")
    ingress = doc.get("ingressIPs")
    if ingress is None:
        raise IPListError("$", "no ingressIPs")
    if not isinstance(ingress, dict):
        raise IPListError("$.ingressIPs", "not an object of regions")
    found: dict[str, list[Network]] = {}
    for key in dict.fromkeys((*regions, *optional)):
        if key not in ingress:
            if key in regions:
                raise IPListError("$.ingressIPs", f'no entry for configured region "{key}"')
            continue
        path = f"$.ingressIPs.{key}"
        nets = [_network(p, v) for p, v in _leaves(ingress[key], path)]
        if not nets and key in regions:
            raise IPListError(path, f'no prefix for configured region "{key}"')
        found[key] = nets
    merged: list[Network] = []
    for version in (4, 6):
        same = [n for nets in found.values() for n in nets if n.version == version]
        merged.extend(ipaddress.collapse_addresses(same))  # type: ignore[type-var]
    return IPList(
        networks=tuple(merged),
        per_region={k: len(v) for k, v in found.items()},
        digest=hashlib.sha256(data).hexdigest(),
    )
