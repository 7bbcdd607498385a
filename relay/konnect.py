"""The Konnect hostnames, by product: the one table the allowlist is built from.

Taken from Kong's "Networking in Konnect" page (2026 revision), which groups the
hostnames a firewall must allow by product. Each row is one hostname pattern,
the product it belongs to, what it is for, and whether the page lists it only
for older clients (``legacy``). A hostname Kong publishes next year is one more
row here; no logic changes.

Placeholders in a pattern:

- ``{region}``: a Konnect region (:data:`REGIONS`), expanded for every region in
  ``konnect.regions``;
- ``{geo}``: a Kong Mesh sync geo (:data:`MESH_GEOS`), expanded for
  ``konnect.mesh_geos``;
- ``{cp}``, ``{portal}``, ``{id}``: exactly one DNS label (a control-plane
  prefix, a portal id, a Kong Identity auth-server id). ``{cp}`` and
  ``{portal}`` are restricted to ``konnect.control_planes`` / ``konnect.portals``
  when those are non-empty (:data:`LABEL_PINS`); a free label may only stand
  first in a pattern.

This module is pure data and imports nothing of the relay.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LABEL_PINS",
    "MESH_GEOS",
    "PRODUCTS",
    "REGIONS",
    "SHARED",
    "TABLE",
    "Row",
    "is_konnect_host",
]

# Konnect regions; sg is in beta on the 2026 page.
REGIONS: tuple[str, ...] = ("au", "eu", "me", "in", "sg", "us")
# Kong Mesh zone control planes sync with {geo}.mesh.sync.konghq.com.
MESH_GEOS: tuple[str, ...] = ("au", "eu", "us", "global")

# The rows every product needs (the page's "shared" group): always allowed.
SHARED = "shared"
PRODUCTS: tuple[str, ...] = ("api-gateway", "event-gateway", "mesh", "applications", "kic")

# A free first label and the konnect.* list that restricts it (None: any label).
LABEL_PINS: dict[str, str | None] = {
    "{cp}": "control_planes",
    "{portal}": "portals",
    "{id}": None,
}


@dataclass(frozen=True, slots=True)
class Row:
    """One hostname pattern of the table."""

    pattern: str
    product: str
    purpose: str
    legacy: bool = False

    @property
    def label(self) -> str | None:
        """The free first label's placeholder (``{cp}``), or None."""
        first = self.pattern.split(".", 1)[0]
        return first if first in LABEL_PINS else None


TABLE: tuple[Row, ...] = (
    Row("cloud.konghq.com", SHARED, "Konnect UI and API"),
    Row("global.api.konghq.com", SHARED, "global Konnect API (authentication, organizations)"),
    Row("{region}.api.konghq.com", "api-gateway", "regional Konnect API (decK, Terraform)"),
    Row("{cp}.{region}.cp.konghq.com", "api-gateway", "data plane configuration (mTLS WebSocket)"),
    Row("{cp}.{region}.tp.konghq.com", "api-gateway", "data plane telemetry (mTLS WebSocket)"),
    Row(
        "{cp}.{region}.cp0.konghq.com",
        "api-gateway",
        "data plane configuration (mTLS WebSocket)",
        legacy=True,
    ),
    Row(
        "{cp}.{region}.tp0.konghq.com",
        "api-gateway",
        "data plane telemetry (mTLS WebSocket)",
        legacy=True,
    ),
    Row(
        "{region}.control-plane.konghq.com",
        "event-gateway",
        "Event Gateway data plane configuration",
    ),
    Row("{region}.telemetry.konghq.com", "event-gateway", "Event Gateway data plane telemetry"),
    Row("{geo}.mesh.sync.konghq.com", "mesh", "Kong Mesh zone control plane sync (gRPC)"),
    Row("{region}.identity.konghq.com", "applications", "Kong Identity"),
    Row(
        "{id}.{region}.identity.konghq.com",
        "applications",
        "Kong Identity auth server (issuer, JWKS, introspection)",
    ),
    Row("{portal}.{region}.kongportals.com", "applications", "Dev Portal"),
    Row("{portal}.{region}.portal.konghq.com", "applications", "Dev Portal", legacy=True),
    Row("{region}.kic.api.konghq.com", "kic", "Kong Ingress Controller's Konnect address"),
)


def _shapes() -> tuple[frozenset[str], frozenset[str]]:
    """Every name of the table with regions and geos filled in: (exact names,
    suffixes after a free first label)."""
    exact: set[str] = set()
    suffixes: set[str] = set()
    for row in TABLE:
        pattern = row.pattern
        label = row.label
        if label is not None:
            pattern = pattern.split(".", 1)[1]
        names = {pattern}
        if "{region}" in pattern:
            names = {n.replace("{region}", r) for n in names for r in REGIONS}
        if "{geo}" in pattern:
            names = {n.replace("{geo}", g) for n in names for g in MESH_GEOS}
        (suffixes if label is not None else exact).update(names)
    return frozenset(exact), frozenset(suffixes)


_EXACT, _SUFFIXES = _shapes()


def is_konnect_host(host: str) -> bool:
    """Is normalised ``host`` a name of the table (any product, region or geo)?

    The relay's own scope (products, regions, prefixes) decides what a client
    may reach; this decides which names Konnect's published ingress addresses
    pin (``resolver.konnect_ips``).
    """
    if host in _EXACT:
        return True
    dot = host.find(".")
    return dot > 0 and host[dot + 1 :] in _SUFFIXES
