"""Allowlist policy: which ``CONNECT host:port`` targets the relay may open.

The policy is pure: it imports nothing of asyncio or sockets and does no DNS.
It answers one question, "may this client tunnel to ``host:port``?", with a
:class:`Decision` that always carries a bounded :class:`Reason` (the same value
becomes a log field and the ``reason`` label of
``konnect_relay_requests_denied_total``), the rule that decided, and one line of
text for humans.

Order of evaluation in :meth:`Policy.decide`:

1. the host is normalised (:func:`normalise_host`); anything that is not a
   plain LDH host name is refused here, IP literals in any spelling included
   (``IP_LITERAL``), as is a port outside 1..65535 (``INVALID_HOST``);
2. ``deny`` patterns: a match refuses, whatever else would allow (``DENY_RULE``);
3. Konnect presets (:class:`KonnectScope`): a matching name on a port in
   ``scope.ports`` is allowed (``KONNECT``); a matching name on another port is
   refused (``PORT_NOT_ALLOWED``) unless an ``allow`` pattern names that
   ``host:port``;
4. ``allow`` patterns (``ALLOW_RULE``);
5. anything else is refused (``NOT_ALLOWLISTED``).

The presets are the rows of :data:`relay.konnect.TABLE` for the scope's
products, filled in for its regions and mesh geos. Their rule names read like
the hostnames in Kong's networking documentation, with the concrete region and
a placeholder for the one free label: ``konnect:cloud.konghq.com``,
``konnect:eu.api.konghq.com``, ``konnect:{cp}.eu.cp.konghq.com``,
``konnect:{id}.eu.identity.konghq.com``, ``konnect:global.mesh.sync.konghq.com``.
``{cp}``, ``{portal}`` and ``{id}`` stand for exactly one DNS label; ``{cp}`` and
``{portal}`` are restricted to ``control_planes`` / ``portals`` when those are
given.

The relay sets up thousands of tunnels a second on one core, so
:meth:`Policy.decide` does no per-rule loop and runs no pattern regex: presets
are a dict keyed by the exact name or by the name minus its first label, exact
patterns a dict keyed by ``(host, port)``, and ``*.`` patterns are found by
looking up each parent suffix of the host (one lookup per dot).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay.konnect import LABEL_PINS, PRODUCTS, SHARED, TABLE, Row
from relay.konnect import MESH_GEOS as MESH_GEOS
from relay.konnect import REGIONS as KONNECT_REGIONS

__all__ = [
    "KONNECT_REGIONS",
    "MESH_GEOS",
    "Decision",
    "HostError",
    "HostPattern",
    "KonnectScope",
    "PatternError",
    "Policy",
    "Reason",
    "normalise_host",
    "parse_pattern",
]

from relay.hostname import (
    DEFAULT_PORT,
    MAX_PORT,
    MIN_PORT,
    HostError,
    Reason,
    _label_problem,
    _show,
    normalise_host,
)
from relay.patterns import HostPattern, PatternError, parse_pattern


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`Policy.decide`.

    ``rule`` names what decided (``konnect:{cp}.eu.cp0.konghq.com``,
    ``allow:*.example.com:443``, ``deny:evil.konghq.com:443``); for
    ``PORT_NOT_ALLOWED`` it is the preset whose name matched; it is ``""`` when
    no rule matched. ``host`` is the normalised host, ``""`` when the input could
    not be normalised. ``detail`` is one line of printable ASCII for logs and the
    HTTP error body.
    """

    allowed: bool
    reason: Reason
    rule: str
    host: str
    port: int
    detail: str


def _check_labels(field: str, values: Iterable[str]) -> None:
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"konnect.{field}: {value!r} is not a string")
        problem = _label_problem(value)
        if problem is not None:
            fix = ""
            first = value.split(".", 1)[0].lower()
            if "." in value and _label_problem(first) is None:
                fix = f'; give only the first label, e.g. "{first}"'
            elif value != value.lower() and _label_problem(value.lower()) is None:
                fix = f'; did you mean "{value.lower()}"?'
            raise ValueError(
                f"konnect.{field}: {_show(value)} is not a single lower-case DNS label "
                f"({problem}){fix}"
            )


@dataclass(frozen=True, slots=True)
class KonnectScope:
    """Which Konnect hostnames the presets allow.

    ``products`` selects rows of the table (:data:`relay.konnect.TABLE`; the
    shared rows always apply). ``control_planes`` / ``portals`` empty means any
    single DNS label in that position. Values are checked to be single
    lower-case DNS labels; whether a region, geo or product is one Konnect
    offers is left to the config layer, which checks them against the same
    table, so a new region needs no code change here.
    """

    regions: tuple[str, ...] = KONNECT_REGIONS
    control_planes: tuple[str, ...] = ()
    portals: tuple[str, ...] = ()
    mesh_geos: tuple[str, ...] = MESH_GEOS
    ports: tuple[int, ...] = (DEFAULT_PORT,)
    products: tuple[str, ...] = PRODUCTS

    def __post_init__(self) -> None:
        _check_labels("regions", self.regions)
        _check_labels("control_planes", self.control_planes)
        _check_labels("portals", self.portals)
        _check_labels("mesh_geos", self.mesh_geos)
        for port in self.ports:
            if isinstance(port, bool) or not isinstance(port, int):
                raise ValueError(f"konnect.ports: {port!r} is not an integer")
            if not MIN_PORT <= port <= MAX_PORT:
                raise ValueError(f"konnect.ports: {port} is outside {MIN_PORT}..{MAX_PORT}")


@dataclass(frozen=True, slots=True)
class Preset:
    """One table row filled in for a region or geo: what ``presets`` prints."""

    rule: str  # konnect:{cp}.eu.cp.konghq.com
    row: Row
    region: str | None  # the region or geo filled in, if the pattern has one
    label: str | None  # the free first label's placeholder, if any
    pinned: tuple[str, ...]  # the labels it is restricted to; () = any one label

    def text(self, ports: str) -> str:
        """``{cp}.eu.cp.konghq.com:443  ({cp} one of: a1)``, as ``describe`` lists it."""
        name = f"{self.rule.removeprefix('konnect:')}:{ports}"
        if self.label is None:
            return name
        if self.pinned:
            return f"{name}  ({self.label} one of: {', '.join(self.pinned)})"
        return f"{name}  ({self.label} = any one DNS label)"


def _expand(row: Row, scope: KonnectScope) -> Iterable[tuple[str, str | None, str]]:
    """(pattern filled in, region or geo, why it is off or "") for every region
    or geo the row can take: those in the scope and those Konnect offers."""
    product_off = (
        f'product "{row.product}" is not in konnect.products'
        if row.product != SHARED and row.product not in scope.products
        else ""
    )
    for key, chosen, known, what in (
        ("{region}", scope.regions, KONNECT_REGIONS, "region"),
        ("{geo}", scope.mesh_geos, MESH_GEOS, "mesh geo"),
    ):
        if key in row.pattern:
            field = "konnect.regions" if key == "{region}" else "konnect.mesh_geos"
            for value in dict.fromkeys((*chosen, *known)):
                off = product_off or (
                    "" if value in chosen else f'{what} "{value}" is not in {field}'
                )
                yield row.pattern.replace(key, value), value, off
            return
    yield row.pattern, None, product_off


_Lookup = tuple[dict[tuple[str, int], HostPattern], dict[tuple[str, int], HostPattern]]


def _index(patterns: Iterable[HostPattern]) -> _Lookup:
    exact: dict[tuple[str, int], HostPattern] = {}
    wild: dict[tuple[str, int], HostPattern] = {}
    for p in patterns:
        (wild if p.wildcard else exact).setdefault((p.host, p.port), p)
    return exact, wild


def _find(lookup: _Lookup, host: str, port: int) -> HostPattern | None:
    """Exact match, else the most specific ``*.`` pattern over a parent of ``host``."""
    exact, wild = lookup
    if exact:
        p = exact.get((host, port))
        if p is not None:
            return p
    if wild:
        dot = host.find(".")
        while dot >= 0:
            p = wild.get((host[dot + 1 :], port))
            if p is not None:
                return p
            dot = host.find(".", dot + 1)
    return None


# Decisions remembered per (host as received, port): the same few Konnect
# names come back thousands of times a second. Bounded: a flood of distinct
# (hostile) names only empties it now and then.
DECISION_CACHE_SIZE = 4096


class Policy:
    """Konnect presets plus ``allow``/``deny`` patterns; see the module docstring."""

    __slots__ = (
        "_allow",
        "_decided",
        "_deny",
        "_exact",
        "_hints",
        "_ports",
        "_prefixed",
        "_preset_lines",
        "allow",
        "deny",
        "konnect",
        "presets",
    )

    def __init__(
        self,
        konnect: KonnectScope,
        allow: Sequence[HostPattern] = (),
        deny: Sequence[HostPattern] = (),
    ) -> None:
        self.konnect = konnect
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._allow = _index(self.allow)
        self._deny = _index(self.deny)
        self._ports = frozenset(konnect.ports)
        self._decided: dict[tuple[str, int], Decision] = {}
        # exact name -> rule
        self._exact: dict[str, str] = {}
        # name without its first label -> (rule, pinned labels or None, scope field)
        self._prefixed: dict[str, tuple[str, frozenset[str] | None, str | None]] = {}
        # the table's rows filled in, in table order
        self.presets: list[Preset] = []
        pins = {"control_planes": konnect.control_planes, "portals": konnect.portals}
        hints: dict[str, str] = {}
        for row in TABLE:
            label = row.label
            field = LABEL_PINS[label] if label is not None else None
            pinned = tuple(pins[field]) if field is not None else ()
            for filled, region, off in _expand(row, konnect):
                key = filled if label is None else filled.split(".", 1)[1]
                if off:
                    hints.setdefault(key, off)
                    continue
                rule = f"konnect:{filled}"
                if label is None:
                    self._exact.setdefault(key, rule)
                else:
                    self._prefixed.setdefault(key, (rule, frozenset(pinned) or None, field))
                self.presets.append(Preset(rule, row, region, label, pinned))
        # Near misses (a product, region or geo outside the scope) -> the hint in
        # the deny detail; a name that another row allows is no near miss.
        self._hints = {
            k: v for k, v in hints.items() if k not in self._exact and k not in self._prefixed
        }
        ports = ",".join(str(n) for n in konnect.ports)
        self._preset_lines = [f"konnect {p.text(ports)}" for p in self.presets]

    def konnect_rule(self, host: str) -> str | None:
        """The preset a normalised ``host`` matches (any port), else None."""
        rule = self._exact.get(host)
        if rule is not None:
            return rule
        dot = host.find(".")
        if dot > 0:
            entry = self._prefixed.get(host[dot + 1 :])
            if entry is not None and (entry[1] is None or host[:dot] in entry[1]):
                return entry[0]
        return None

    def decide(self, host: str, port: int) -> Decision:
        """Decide on ``host`` as received in the CONNECT request; never raises.
        A policy never changes (a reload builds a new one), so decisions are
        remembered."""
        key = (host, port)
        decision = self._decided.get(key)
        if decision is None:
            decision = self._decide(host, port)
            if len(self._decided) >= DECISION_CACHE_SIZE:
                self._decided.clear()
            self._decided[key] = decision
        return decision

    def _decide(self, host: str, port: int) -> Decision:
        try:
            name = normalise_host(host)
        except HostError as e:
            return Decision(False, e.reason, "", "", port, str(e))
        if not MIN_PORT <= port <= MAX_PORT:
            return Decision(
                False,
                Reason.INVALID_HOST,
                "",
                name,
                port,
                f"port {port} is outside {MIN_PORT}..{MAX_PORT}: {name}",
            )
        p = _find(self._deny, name, port)
        if p is not None:
            return Decision(
                False,
                Reason.DENY_RULE,
                f"deny:{p.text}",
                name,
                port,
                f"denied by rule deny:{p.text}: {name}:{port}",
            )
        preset = self.konnect_rule(name)
        if preset is not None and port in self._ports:
            return Decision(
                True, Reason.KONNECT, preset, name, port, f"allowed by {preset}: {name}:{port}"
            )
        p = _find(self._allow, name, port)
        if p is not None:
            return Decision(
                True,
                Reason.ALLOW_RULE,
                f"allow:{p.text}",
                name,
                port,
                f"allowed by rule allow:{p.text}: {name}:{port}",
            )
        if preset is not None:
            ports = ", ".join(str(n) for n in sorted(self._ports))
            return Decision(
                False,
                Reason.PORT_NOT_ALLOWED,
                preset,
                name,
                port,
                f"port {port} is not in konnect.ports ({ports}) for Konnect host {name}",
            )
        hint = self._hint(name)
        return Decision(
            False,
            Reason.NOT_ALLOWLISTED,
            "",
            name,
            port,
            f"host not in Konnect allowlist: {name}:{port}" + (f" ({hint})" if hint else ""),
        )

    def _hint(self, host: str) -> str:
        """Why a name that looks like a Konnect host is not one (deny path only)."""
        hint = self._hints.get(host)
        if hint is not None:
            return hint
        dot = host.find(".")
        if dot <= 0:
            return ""
        first, suffix = host[:dot], host[dot + 1 :]
        entry = self._prefixed.get(suffix)
        if entry is not None:
            label = "control plane prefix" if entry[2] == "control_planes" else "portal"
            return f'{label} "{first}" is not in konnect.{entry[2]}'
        hint = self._hints.get(suffix)
        if hint is not None:
            return hint
        dot = suffix.find(".")
        while dot >= 0:
            parent = suffix[dot + 1 :]
            if parent in self._prefixed or parent in self._hints:
                return f'only one DNS label may come before ".{parent}"'
            dot = suffix.find(".", dot + 1)
        return ""

    def describe(self) -> list[str]:
        """The rules in the order they are applied, one per line."""
        return [
            *(f"deny    {p.text}" for p in self.deny),
            *self._preset_lines,
            *(f"allow   {p.text}" for p in self.allow),
        ]
