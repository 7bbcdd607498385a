"""Host names as the relay accepts them: normalisation and the precise reason
a name is refused (IP literals in every spelling, userinfo, escapes, Unicode).

Pure: no I/O. ``policy.py`` decides on the names this module normalises.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import re
import unicodedata

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


class HostError(ValueError):
    """A CONNECT host that is not a plain DNS host name.

    ``reason`` is ``Reason.INVALID_HOST`` or ``Reason.IP_LITERAL``; ``problem``
    is the message without the quoted input; ``str(e)`` is the full message.
    """

    def __init__(self, reason: Reason, raw: str, problem: str) -> None:
        super().__init__(f"invalid host {_show(raw)}: {problem}")
        self.reason = reason
        self.problem = problem


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
                problem = _label_problem(label)
                assert problem is not None
            elif host[0] == ".":
                problem = "empty label (leading dot)"
            else:
                problem = "empty label (two dots in a row)"
            raise HostError(Reason.INVALID_HOST, raw, problem)
    return host
