"""``allow``/``deny`` patterns: an exact host or a leading ``*.`` wildcard, and
a port; parsed strictly, every error with the fix it suggests (smokescreen's
``ValidateDomainGlob``). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.hostname import (
    DEFAULT_PORT,
    MAX_PORT,
    MIN_PORT,
    HostError,
    Reason,
    _show,
    normalise_host,
)


class PatternError(ValueError):
    """An ``allow``/``deny`` pattern that cannot be used; the message suggests a fix."""


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
