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

import enum
import ipaddress
import json
import re
import unicodedata
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

# RFC 1035 §2.3.4: 63 octets per label, 255 octets per name on the wire, which
# is 253 characters in dotted text without the trailing dot.
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253
# How much of a refused input is echoed back in a message: enough to recognise
# it in a log line, not enough to let a client fill the log.
MAX_SHOWN = 80

DEFAULT_PORT = 443  # the only port Konnect needs (Konnect networking docs)
MIN_PORT = 1
MAX_PORT = 65535


class Reason(enum.StrEnum):
    """Why a target was allowed or refused; a bounded set, safe as a metric label."""

    KONNECT = "konnect"
    ALLOW_RULE = "allow_rule"
    DENY_RULE = "deny_rule"
    NOT_ALLOWLISTED = "not_allowlisted"
    PORT_NOT_ALLOWED = "port_not_allowed"
    IP_LITERAL = "ip_literal"
    INVALID_HOST = "invalid_host"


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


class HostError(ValueError):
    """A CONNECT host that is not a plain DNS host name.

    ``reason`` is ``Reason.INVALID_HOST`` or ``Reason.IP_LITERAL``; ``problem``
    is the message without the quoted input; ``str(e)`` is the full message.
    """

    def __init__(self, reason: Reason, raw: str, problem: str) -> None:
        super().__init__(f"invalid host {_show(raw)}: {problem}")
        self.reason = reason
        self.problem = problem


class PatternError(ValueError):
    """An ``allow``/``deny`` pattern that cannot be used; the message suggests a fix."""


def _show(raw: str) -> str:
    """Quote untrusted text for a one-line message: double quotes, ASCII only,
    control characters escaped, bounded length."""
    if len(raw) > MAX_SHOWN:
        return json.dumps(raw[:MAX_SHOWN]) + "..."
    return json.dumps(raw)


# Checked on the lower-cased name before anything else; a plain character class
# matched in one pass, so hostile input cannot make it backtrack.
_LDH_CHARS = re.compile(r"[a-z0-9.\-]+").fullmatch
_DECIMAL_DIGITS = frozenset("0123456789")
_OCTAL_DIGITS = frozenset("01234567")
_HEX_DIGITS = frozenset("0123456789abcdef")
_CONTROL_OR_SPACE = frozenset(chr(c) for c in range(0x21)) | {"\x7f"}
# Dots that IDNA (RFC 3490 §3.1) treats as label separators.
_IDNA_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


def _label_problem(label: str) -> str | None:
    """What is wrong with one DNS label, or None.

    RFC 1035 §2.3.1 with RFC 1123 §2.1 (a label may start with a digit):
        label = let-dig [ *61( let-dig / "-" ) let-dig ]
    """
    if not label:
        return "empty label"
    if len(label) > MAX_LABEL_LENGTH:
        return (
            f"label {_show(label)} is {len(label)} characters; the limit is "
            f"{MAX_LABEL_LENGTH} (RFC 1035 section 2.3.4)"
        )
    if _LDH_CHARS(label) is None or "." in label:
        if "_" in label:
            return f"label {_show(label)} contains an underscore, which host names may not"
        return f"label {_show(label)} may contain only lower-case letters, digits and hyphens"
    if label[0] == "-" or label[-1] == "-":
        return f"label {_show(label)} starts or ends with a hyphen"
    return None


def _ipv4_number(part: str) -> int | None:
    """WHATWG URL "IPv4 number parser": decimal, 0x-hex or 0-octal; None if invalid."""
    if part[:2] == "0x":
        digits, allowed, base = part[2:], _HEX_DIGITS, 16
        if not digits:
            return 0
    elif len(part) > 1 and part[0] == "0":
        digits, allowed, base = part[1:], _OCTAL_DIGITS, 8
    else:
        digits, allowed, base = part, _DECIMAL_DIGITS, 10
    if not digits or not set(digits) <= allowed:
        return None
    return int(digits, base)


def _ipv4_value(host: str) -> str | None:
    """WHATWG URL "IPv4 parser" (URL Standard §3.5): dotted-quad text of ``host``, or None.

    Accepts what browsers and curl accept: 1 to 4 parts, each decimal, 0x-hex
    or 0-octal, the last part filling the remaining bytes (127.1, 2130706433).
    """
    parts = host.split(".")
    if len(parts) > 4:
        return None
    numbers = []
    for part in parts:
        if not part:
            return None
        n = _ipv4_number(part)
        if n is None:
            return None
        numbers.append(n)
    if any(n > 255 for n in numbers[:-1]):
        return None
    if numbers[-1] >= 256 ** (5 - len(numbers)):
        return None
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


def _ends_in_number(last_label: str) -> bool:
    """WHATWG URL "ends in a number": the last label is all digits or 0x-hex.

    Browsers, curl and many resolvers read such a name as an IPv4 address, so
    it is never treated as a host name.
    """
    if last_label.isdigit():
        return True
    return last_label[:2] == "0x" and set(last_label[2:]) <= _HEX_DIGITS


def _ip_error(raw: str, host: str) -> HostError:
    value = _ipv4_value(host)
    if value is not None and value != raw:
        problem = f"IP address literal (= {value}) is not allowed; use a host name"
    elif value is not None:
        problem = "IP address literal is not allowed; use a host name"
    else:
        problem = (
            "the last label is numeric, so URL parsers read the name as an IPv4 "
            "address; IP literals are not allowed"
        )
    return HostError(Reason.IP_LITERAL, raw, problem)


def _is_ipv6(text: str) -> bool:
    if len(text) > 100:  # no IPv6 text form, zone id included, is this long
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _non_ascii_error(raw: str) -> HostError:
    # Unicode digits and dots that IDNA maps to ASCII (fullwidth digits, U+3002 dots)
    # still spell an IP address; say so rather than suggest an A-label.
    folded = unicodedata.normalize("NFKC", raw).translate(_IDNA_DOTS).lower()
    if folded.isascii() and _LDH_CHARS(folded) is not None:
        bare = folded[:-1] if folded.endswith(".") else folded
        if bare and _ends_in_number(bare.rsplit(".", 1)[-1]):
            return _ip_error(raw, bare)
    hint = ""
    try:
        a_label = raw.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    else:
        if a_label.isascii() and a_label != raw:
            hint = f", e.g. {_show(a_label.lower())}"
    return HostError(
        Reason.INVALID_HOST,
        raw,
        f"non-ASCII host name; use the xn-- A-label (IDNA) form{hint}",
    )


def _character_error(raw: str) -> HostError:
    """The most useful message for a name with a character outside [a-z0-9.-]."""
    chars = set(raw)
    if chars & _CONTROL_OR_SPACE:
        return HostError(Reason.INVALID_HOST, raw, "whitespace or control character in host")
    if "@" in chars:
        return HostError(
            Reason.INVALID_HOST, raw, 'userinfo ("user@") is not allowed in a CONNECT host'
        )
    if "[" in chars or "]" in chars:
        if raw[:1] == "[" and raw[-1:] == "]" and (_is_ipv6(raw[1:-1]) or raw[1:2] in ("v", "V")):
            return HostError(
                Reason.IP_LITERAL, raw, "IPv6 address literal is not allowed; use a host name"
            )
        return HostError(Reason.INVALID_HOST, raw, "brackets are only used around IPv6 literals")
    if ":" in chars:
        if _is_ipv6(raw):
            return HostError(
                Reason.IP_LITERAL, raw, "IPv6 address literal is not allowed; use a host name"
            )
        return HostError(
            Reason.INVALID_HOST,
            raw,
            '":" is not allowed in a host name; the port is given separately',
        )
    if "%" in chars:
        return HostError(Reason.INVALID_HOST, raw, "percent-escapes are not allowed in a host name")
    if chars & {"/", "?", "#"}:
        return HostError(
            Reason.INVALID_HOST, raw, "a path, query or fragment is not allowed in a host"
        )
    if "\\" in chars:
        return HostError(Reason.INVALID_HOST, raw, "backslash is not allowed in a host name")
    if "_" in chars:
        return HostError(
            Reason.INVALID_HOST,
            raw,
            "underscore is not allowed in a host name (RFC 952, RFC 1123 section 2.1)",
        )
    if "*" in chars:
        return HostError(Reason.INVALID_HOST, raw, '"*" is not a host name')
    bad = next(c for c in raw.lower() if _LDH_CHARS(c) is None)
    return HostError(
        Reason.INVALID_HOST,
        raw,
        f"character {_show(bad)} is not allowed; host names use letters, digits, hyphens and dots",
    )


def normalise_host(raw: str) -> str:
    """Return ``raw`` as a lower-case LDH host name, or raise :class:`HostError`.

    One trailing dot (the DNS root) is dropped; labels follow RFC 1035 §2.3.1 as
    relaxed by RFC 1123 §2.1 (letters, digits, hyphens inside; 1..63 characters);
    the name is at most 253 characters. ``xn--`` A-labels are plain LDH labels.
    Refused: IP literals in every spelling (``Reason.IP_LITERAL``: dotted quad,
    ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, any name whose
    last label is numeric or 0x-hex as the WHATWG URL host parser reads it,
    ``[::1]``, bare IPv6), and userinfo, percent-escapes, paths, backslashes,
    whitespace, control characters, empty labels and non-ASCII names
    (``Reason.INVALID_HOST``).
    """
    if not raw:
        raise HostError(Reason.INVALID_HOST, raw, "empty host")
    if len(raw) > MAX_NAME_LENGTH + 1:  # + 1: a trailing dot is not counted
        raise HostError(
            Reason.INVALID_HOST,
            raw,
            f"host is {len(raw.removesuffix('.'))} characters; the limit is {MAX_NAME_LENGTH}",
        )
    if not raw.isascii():
        raise _non_ascii_error(raw)
    host = raw.lower()
    if _LDH_CHARS(host) is None:
        raise _character_error(raw)
    if host[-1] == ".":
        host = host[:-1]
        if not host:
            raise HostError(Reason.INVALID_HOST, raw, "empty host")
        if host[-1] == ".":
            raise HostError(Reason.INVALID_HOST, raw, "more than one trailing dot")
    labels = host.split(".")
    if _ends_in_number(labels[-1]):
        raise _ip_error(raw, host)
    if len(host) > MAX_NAME_LENGTH:
        raise HostError(
            Reason.INVALID_HOST,
            raw,
            f"host is {len(host)} characters; the limit is {MAX_NAME_LENGTH}",
        )
    for label in labels:
        if not label or len(label) > MAX_LABEL_LENGTH or label[0] == "-" or label[-1] == "-":
            if label:
                problem = _label_problem(label) or "invalid label"
            elif host[0] == ".":
                problem = "empty label (leading dot)"
            else:
                problem = "empty label (two dots in a row)"
            raise HostError(Reason.INVALID_HOST, raw, problem)
    return host


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One ``allow``/``deny`` entry: an exact host or ``*.`` + a domain, and a port.

    ``host`` is normalised and has no ``*.``. A wildcard matches one or more
    labels under ``host`` and never ``host`` itself. Build it with
    :func:`parse_pattern`; direct construction is validated the same way.
    """

    host: str
    wildcard: bool
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        try:
            ok = normalise_host(self.host) == self.host
        except HostError as e:
            raise PatternError(f"pattern host {_show(self.host)}: {e.problem}") from None
        if not ok:
            raise PatternError(
                f"pattern host {_show(self.host)} is not normalised; "
                f"did you mean {_show(normalise_host(self.host))}?"
            )
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise PatternError(f"pattern port {self.port} is outside {MIN_PORT}..{MAX_PORT}")
        if self.wildcard and "." not in self.host:
            raise PatternError(
                f'"*.{self.host}" would allow every host under the top-level domain '
                f'"{self.host}"; name a domain, e.g. "*.example.{self.host}"'
            )

    @property
    def text(self) -> str:
        """Canonical form, e.g. ``*.example.com:443``."""
        return f"{'*.' if self.wildcard else ''}{self.host}:{self.port}"

    def matches(self, host: str, port: int) -> bool:
        """Whether normalised ``host`` on ``port`` falls under this pattern."""
        if port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


_SCHEME_PORTS = {"http": 80, "https": DEFAULT_PORT}


def _wildcard_suggestion(host: str) -> str:
    """For a misplaced ``*``, the leading-wildcard pattern that was probably meant."""
    tail = host[host.rfind("*") + 1 :].lstrip(".")
    if "." in tail and "*" not in tail:
        return f'; did you mean "*.{tail}"?'
    return ""


def parse_pattern(text: str) -> HostPattern:
    """Parse ``host[:port]`` or ``*.domain[:port]`` (port 443 when absent).

    Only a leading ``*.`` wildcard is supported, over a domain of two labels or
    more. IP literals, URL schemes, userinfo and paths are refused. Every
    :class:`PatternError` names the pattern and, where one exists, the fix.
    Public suffixes (``*.co.uk``) are not detected; no suffix list is shipped.
    """
    if not isinstance(text, str):
        raise PatternError(f'pattern must be a string like "example.com:443", not {text!r}')
    quoted = _show(text)
    if not text:
        raise PatternError('empty pattern; expected "host[:port]", e.g. "example.com:443"')
    stripped = text.strip()
    if stripped != text:
        raise PatternError(
            f"pattern {quoted} has surrounding whitespace; did you mean {_show(stripped)}?"
        )
    if "://" in text:
        scheme, _, rest = text.partition("://")
        hostport = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
        if ":" not in hostport.lstrip("[").rpartition("]")[2]:
            hostport = f"{hostport}:{_SCHEME_PORTS.get(scheme.lower(), DEFAULT_PORT)}"
        raise PatternError(
            f"pattern {quoted}: a URL is not a pattern; did you mean {_show(hostport)}?"
        )
    if any(c in text for c in "/?#"):
        hostport = re.split(r"[/?#]", text, maxsplit=1)[0]
        fix = f"; did you mean {_show(hostport)}?" if hostport else ""
        raise PatternError(f"pattern {quoted}: a path is not allowed{fix}")
    if "@" in text:
        raise PatternError(
            f"pattern {quoted}: userinfo is not allowed; did you mean "
            f"{_show(text.rpartition('@')[2])}?"
        )
    if text[0] == "[" or text.count(":") > 1:
        raise PatternError(
            f"pattern {quoted}: IP literals are not supported; the relay allows host names only"
        )
    host, sep, port_text = text.partition(":")
    port = DEFAULT_PORT
    if sep:
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise PatternError(
                f"pattern {quoted}: port must be a number {MIN_PORT}..{MAX_PORT}, "
                f"got {_show(port_text)}"
            )
        port = int(port_text)
        if not MIN_PORT <= port <= MAX_PORT:
            raise PatternError(f"pattern {quoted}: port {port} is outside {MIN_PORT}..{MAX_PORT}")
    wildcard = False
    if "*" in host:
        if not host.strip("*."):
            raise PatternError(
                f"pattern {quoted} would allow every host; list the domains you need, "
                'e.g. "*.example.com"'
            )
        if host.startswith("*.") and "*" not in host[2:]:
            wildcard = True
            host = host[2:]
        else:
            raise PatternError(
                f'pattern {quoted}: only a leading "*." wildcard is supported'
                + _wildcard_suggestion(host)
            )
    try:
        name = normalise_host(host)
    except HostError as e:
        if e.reason is Reason.IP_LITERAL:
            raise PatternError(
                f"pattern {quoted}: IP literals are not supported; the relay allows host names only"
            ) from None
        raise PatternError(f"pattern {quoted}: {e.problem}") from None
    # HostPattern refuses a wildcard over a top-level domain ("*.com").
    return HostPattern(name, wildcard, port)


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
