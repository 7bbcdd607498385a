"""Sans-IO parser of the HTTP CONNECT request head, and the relay's plain responses.

The relay is the only way out of a restricted network, so this parser is strict:
anything two HTTP implementations could read differently (bare CR or LF, obs-fold,
whitespace before a colon, a request that claims to carry content) is refused
rather than guessed at.  It accepts exactly one thing, an authority-form CONNECT
(RFC 9110 §9.3.6, RFC 9112 §3.2.3), and hands the target to the policy module,
which owns every decision about which hosts are acceptable.

``parse_head`` is called with the whole buffer accumulated so far, again after
every read.  While the head is incomplete it only looks at what can already be
judged (the first byte, the request line once it has ended, stray line endings),
so a slow client costs a few C-speed scans per read, and an error found early is
the same error the complete head would have produced.

Error details are safe to log and to send back: they name the method or a short
sanitised target, never a header value (``Proxy-Authorization`` holds credentials).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final, NoReturn

__all__ = [
    "ESTABLISHED",
    "MAX_HEADERS",
    "MAX_HEAD_SIZE",
    "MAX_REQUEST_LINE",
    "REASONS",
    "ConnectRequest",
    "HeadError",
    "parse_head",
    "response",
]

# h11 stops at 16 KiB of incomplete head (DEFAULT_MAX_INCOMPLETE_EVENT_SIZE); nginx
# (large_client_header_buffers 8k) and Apache (LimitRequestLine/FieldSize 8190) cap a
# single line at 8 KiB.  Kong's CONNECT head is under 200 bytes; the headroom is for a
# Proxy-Authorization: Negotiate token, which carries a Kerberos ticket of several KiB.
MAX_HEAD_SIZE: Final = 16 * 1024

# RFC 9112 §3: a server MUST answer 414 to a request-target longer than it wishes
# to parse.  An authority-form target is a host name of at most 253 characters
# (RFC 1035 §2.3.4) or a bracketed IPv6 literal, a colon and five digits: with the
# method and version that is under 300 bytes.  1 KiB is ample and also bounds the
# work of re-checking an unfinished request line on every read.
MAX_REQUEST_LINE: Final = 1024

# Apache's LimitRequestFields default.  Kong sends three fields, decK and grpc-go a
# handful; a hundred is generous and bounds the per-line work of a hostile head.
MAX_HEADERS: Final = 100

# The relay's only successful answer.  Kong checks for the status line "HTTP/1.1 200"
# exactly and treats every byte after the blank line as TLS, so nothing else is sent.
ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"

# Bounded set of HeadError.reason values, for metric labels and log fields.
REASONS: Final = frozenset(
    {
        "bad_request",
        "bad_target",
        "host_mismatch",
        "request_has_content",
        "tls_on_plaintext_port",
        "method_not_allowed",
        "head_too_large",
        "request_line_too_long",
        "too_many_headers",
        "version_not_supported",
    }
)

_ALLOW_CONNECT: Final = (("Allow", "CONNECT"),)

# Longest method or target echoed into an error detail.
_ECHO_LIMIT: Final = 100

# RFC 9110 §5.6.2:
#   token = 1*tchar
#   tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#           "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TCHAR: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN: Final = re.compile(_TCHAR + rb"+")

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version
# Only visible ASCII and single spaces are accepted in it: no HTAB, no CR, no
# obs-text, and an authority-form target has no use for any of them.
_REQUEST_LINE_BAD_BYTE: Final = re.compile(rb"[^\x21-\x7e ]")

# RFC 9112 §2.3: HTTP-version = HTTP-name "/" DIGIT "." DIGIT ; HTTP-name is
# case-sensitive.  Well-formed but other than 1.0/1.1 is a 505, anything else a 400.
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")

# RFC 3986 §3.2.3: port = *DIGIT.  One to five digits, no sign; the range and the
# leading-zero rule are checked after the match.
_PORT: Final = re.compile(rb"[0-9]{1,5}")

# RFC 9112 §5 and RFC 9110 §5.5:
#   field-line    = field-name ":" OWS field-value OWS
#   field-value   = *field-content
#   field-content = field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ]
#   field-vchar   = VCHAR / obs-text
# So a value holds no CTL but HTAB (no NUL, CR, LF, DEL); obs-text (0x80-0xFF) is
# allowed.  No whitespace between name and colon (§5.1); trailing OWS is stripped.
_FIELD_LINE: Final = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")

_NOT_PRINTABLE: Final = re.compile(r"[^\x20-\x7e]")
# C0 controls and DEL: never in a response header value (RFC 9110 §5.5).
_CTL_STR: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Anything that could break a detail over lines in a body or a log record.
_LINE_BREAKING: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class HeadError(Exception):
    """A request head the relay refuses, with the response that says why.

    ``reason`` is a short label from :data:`REASONS` (or another bounded label the
    caller chooses, e.g. for a 408); ``detail`` is one line, safe to log and to send.
    """

    status: int
    reason: str
    detail: str
    headers: tuple[tuple[str, str], ...]

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(status, reason, detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = tuple(headers)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.detail}"


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A syntactically valid CONNECT head.

    ``host`` is the host part of the target as sent (an IPv6 literal keeps its
    brackets); it is printable ASCII without whitespace but is not validated as a
    DNS name here: the policy module decides about it with a precise reason.
    ``head_length`` counts the head's bytes including the final CRLFCRLF (and an
    ignored leading CRLF); bytes after it are early tunnel data to forward.
    """

    host: str
    port: int
    version: str
    # Excluded from repr so that logging a request never logs a credential.
    proxy_authorization: bytes | None = field(repr=False)
    user_agent: str | None
    head_length: int


_PHRASES: Final = {413: "Content Too Large", 414: "URI Too Long"}  # RFC 9110 §15.5.14-15


def response(status: int, detail: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """An HTTP/1.1 response with a one-line text body ``"{status} {detail}\\n"``.

    The connection is always closed after it: every non-200 answer ends the
    conversation, and saying so keeps clients from trying to reuse it.
    """
    # ValueError for a code that does not exist; RFC 9110's phrase where Python's is older.
    phrase = _PHRASES.get(status) or HTTPStatus(status).phrase
    body = f"{status} {_LINE_BREAKING.sub(' ', detail)}\n".encode()
    parts = [
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
    ]
    for name, value in headers:
        # A caller-supplied CR or LF would split the response; refuse it loudly.
        if not _TOKEN.fullmatch(name.encode("ascii", "replace")) or _CTL_STR.search(value):
            raise ValueError(f"invalid response header {name!r}")
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1") + body


def parse_head(buf: bytes | bytearray, *, max_size: int = MAX_HEAD_SIZE) -> ConnectRequest | None:
    """Parse the CONNECT head at the start of ``buf``.

    Returns None while the head is incomplete (read more and call again with the
    whole buffer), a :class:`ConnectRequest` once it is complete and valid, and
    raises :class:`HeadError` as soon as the bytes seen so far cannot become a
    valid head.  Only the first ``max_size`` bytes are ever considered: a head
    that does not end within them is a 431.
    """
    if not buf:
        return None
    if buf[0] == 0x16:
        # A TLS record starts with content type 22 (handshake), RFC 8446 §5.1: the
        # client was told "https://" for a proxy port that speaks plain HTTP.
        raise HeadError(
            400, "tls_on_plaintext_port", "TLS handshake sent to a plaintext proxy port"
        )

    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the
    # request line.  Exactly one is ignored; a second makes the request line empty.
    start = 2 if buf[:2] == b"\r\n" else 0
    window = min(len(buf), max_size)

    # Every check below looks only at buf[:window], and the checks made on an
    # incomplete head are made in the same order on the complete one, so an early
    # error is exactly the error the whole head would have produced.
    lf = buf.find(b"\n", start, window)
    if lf == -1:
        # The request line has not ended: only its bytes so far can be judged.  A
        # trailing CR may yet be followed by its LF.
        stop = window - 1 if window > start and buf[window - 1] == 0x0D else window
        if _REQUEST_LINE_BAD_BYTE.search(buf, start, min(stop, start + MAX_REQUEST_LINE)):
            raise _bad("invalid byte in request line")
        if stop - start > MAX_REQUEST_LINE:
            raise _line_too_long()
        if len(buf) >= max_size:
            raise _too_large(max_size)
        return None

    target, host, port, version = _request_line(buf, start, lf)

    end = buf.find(b"\r\n\r\n", lf - 1, window)
    if end == -1:
        # Headers incomplete.  A bare CR or LF already seen would lie inside any
        # head this buffer could still complete to, and a client that ends lines
        # with LF alone would otherwise wait for the read timeout.  Counting is
        # C-speed; a trailing CR may yet get its LF.
        stop = window - 1 if buf[window - 1] == 0x0D else window
        crlf = buf.count(b"\r\n", lf + 1, stop)
        if buf.count(b"\n", lf + 1, stop) != crlf or buf.count(b"\r", lf + 1, stop) != crlf:
            raise _bare_line_ending()
        if len(buf) >= max_size:
            raise _too_large(max_size)
        return None

    head_length = end + 4
    # The header block runs from after the request line to the CRLF that ends the
    # last field line; it is empty when the request line is followed by the blank line.
    block = bytes(buf[lf + 1 : end + 2])
    proxy_authorization, user_agent = _fields(block, host, target)
    return ConnectRequest(
        host=host.decode("ascii"),
        port=port,
        version=version,
        proxy_authorization=proxy_authorization,
        user_agent=user_agent,
        head_length=head_length,
    )


def _request_line(buf: bytes | bytearray, start: int, lf: int) -> tuple[bytes, bytes, int, str]:
    """Validate the request line ending with the LF at ``lf``.

    Returns the target, its host and port, and the HTTP version.
    """
    crlf = lf > start and buf[lf - 1] == 0x0D
    line = bytes(buf[start : lf - 1 if crlf else lf])
    if _REQUEST_LINE_BAD_BYTE.search(line, 0, MAX_REQUEST_LINE):
        raise _bad("invalid byte in request line")
    if len(line) > MAX_REQUEST_LINE:
        raise _line_too_long()
    if not crlf:
        raise _bad("bare LF in request line (lines must end with CRLF)")
    if not line:
        raise _bad("empty request line (more than one blank line before it)")

    parts = line.split(b" ")
    if len(parts) != 3 or b"" in parts:
        if len(parts) == 2 and b"" not in parts:
            raise _bad("request line has no HTTP version (HTTP/0.9 is not supported)")
        raise _bad("malformed request line: expected 'CONNECT host:port HTTP/1.1'")
    method, target, version = parts

    if version == b"HTTP/1.1" or version == b"HTTP/1.0":
        version_str = version.decode("ascii")
    elif _HTTP_VERSION.fullmatch(version):
        # The HTTP/2 preface (RFC 9113 §3.4) is a prior-knowledge h2 client; it is a
        # version problem, not a method problem, so it gets the same 505.
        if line == b"PRI * HTTP/2.0":
            detail = "HTTP/2 connection preface received; this port speaks HTTP/1.1 CONNECT"
        else:
            detail = f"{version.decode('ascii')} not supported; use HTTP/1.1 CONNECT"
        raise HeadError(505, "version_not_supported", detail)
    else:
        raise _bad("invalid HTTP version in request line")

    if not _TOKEN.fullmatch(method):
        raise _bad("invalid method in request line")
    if method != b"CONNECT":
        # Methods are case-sensitive (RFC 9110 §9.1): "connect" is not CONNECT.
        raise HeadError(
            405,
            "method_not_allowed",
            f"method {_echo(method)} not allowed; this proxy only accepts CONNECT",
            _ALLOW_CONNECT,
        )

    # RFC 9112 §3.2: only authority-form is valid for CONNECT; name the form that
    # was sent, which tells a misconfigured client what it did.  The target itself
    # is not echoed: a URL may carry userinfo or query credentials.
    if target == b"*":
        form = "asterisk-form"
    elif target[:1] == b"/":
        form = "origin-form"
    elif b"://" in target:
        form = "absolute-form"
    else:
        host, port = _authority(target)
        return target, host, port, version_str
    raise HeadError(
        405,
        "method_not_allowed",
        f"{form} request target; CONNECT takes authority-form host:port",
        _ALLOW_CONNECT,
    )


def _authority(target: bytes) -> tuple[bytes, int]:
    """Split an authority-form target (RFC 9112 §3.2.3: uri-host ":" port)."""
    if target[:1] == b"[":
        # RFC 3986 §3.2.2: IP-literal = "[" ( IPv6address / IPvFuture ) "]"
        close = target.find(b"]")
        if close == -1:
            raise _bad_target("unterminated '[' in CONNECT target", target)
        if close == 1:
            raise _bad_target("empty IPv6 literal in CONNECT target", target)
        host, rest = target[: close + 1], target[close + 1 :]
        if rest[:1] != b":":
            raise _bad_target("CONNECT target must be host:port (port missing)", target)
        port_bytes = rest[1:]
    else:
        host, colon, port_bytes = target.rpartition(b":")
        if not colon:
            raise _bad_target("CONNECT target must be host:port (port missing)", target)
        if not host:
            raise _bad_target("empty host in CONNECT target", target)
        if b":" in host:
            raise _bad_target("IPv6 address in CONNECT target must be in brackets", target)
    if not port_bytes:
        raise _bad_target("empty port in CONNECT target", target)
    if not _PORT.fullmatch(port_bytes) or port_bytes[:1] == b"0":
        # A sign, a leading zero or more than five digits: each is a second spelling
        # of some port that a policy written for "443" would have to anticipate.
        raise _bad_target("port must be a decimal number 1-65535", target)
    port = int(port_bytes)
    if port > 65535:
        raise _bad_target("port must be a decimal number 1-65535", target)
    return host, port


def _fields(block: bytes, host: bytes, target: bytes) -> tuple[bytes | None, str | None]:
    """Check every field line; return Proxy-Authorization and User-Agent."""
    if not block:
        return None, None
    # RFC 9112 §2.2: every CR and LF must belong to a CRLF.  A bare one invites a
    # disagreement with another parser about where a line or the head ends.
    crlf = block.count(b"\r\n")
    if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
        raise _bare_line_ending()
    lines = block[:-2].split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        raise HeadError(
            431, "too_many_headers", f"more than {MAX_HEADERS} header fields in request head"
        )

    host_field: bytes | None = None
    proxy_authorization: bytes | None = None
    user_agent: bytes | None = None
    for line in lines:
        m = _FIELD_LINE.fullmatch(line)
        if m is None:
            _diagnose_field_line(line)
        name = m.group(1).lower()
        value = m.group(2).rstrip(b" \t")
        if name == b"host":
            if host_field is not None:
                raise _bad("repeated Host header")
            host_field = value
        elif name == b"proxy-authorization":
            if proxy_authorization is not None:
                raise _bad("repeated Proxy-Authorization header")
            proxy_authorization = value
        elif name == b"user-agent":
            if user_agent is not None:
                raise _bad("repeated User-Agent header")
            user_agent = value
        elif name == b"content-length" or name == b"transfer-encoding":
            # RFC 9110 §9.3.6: a CONNECT request has no content.  Framing fields
            # on one are a request-smuggling attempt or a broken client.
            raise HeadError(
                400,
                "request_has_content",
                f"CONNECT request must not have content ({_FRAMING_NAMES[name]} header)",
            )

    if host_field is not None:
        # RFC 9110 §7.2: Host carries the target's authority.  Some clients leave
        # out the port; anything else names a different host than the tunnel's.
        lowered = host_field.lower()
        if lowered != target.lower() and lowered != host.lower():
            raise HeadError(400, "host_mismatch", "Host header does not match CONNECT target")

    return proxy_authorization, None if user_agent is None else user_agent.decode("latin-1")


_FRAMING_NAMES: Final = {
    b"content-length": "Content-Length",
    b"transfer-encoding": "Transfer-Encoding",
}


def _diagnose_field_line(line: bytes) -> NoReturn:
    """Raise the most precise error for a field line that did not match."""
    if line[:1] in (b" ", b"\t"):
        # RFC 9112 §5.2: obs-fold is only acceptable when the server replaces it,
        # and no CONNECT client needs it.
        raise _bad("obsolete line folding in header section")
    colon = line.find(b":")
    if colon == -1:
        raise _bad("header line without ':'")
    name = line[:colon]
    if name[-1:] in (b" ", b"\t"):
        # RFC 9112 §5.1: whitespace between field name and colon MUST be rejected.
        raise _bad("whitespace between header name and colon")
    if not _TOKEN.fullmatch(name):
        raise _bad("invalid header name")
    # The name is a token and safe to show; the value is never echoed.
    raise _bad(f"invalid byte in value of header {_echo(name)}")


def _echo(raw: bytes) -> str:
    """A short printable-ASCII rendering of ``raw`` for an error detail."""
    text = _NOT_PRINTABLE.sub("?", raw[:_ECHO_LIMIT].decode("ascii", "replace"))
    return text + "..." if len(raw) > _ECHO_LIMIT else text


def _bad(detail: str) -> HeadError:
    return HeadError(400, "bad_request", detail)


def _bad_target(detail: str, target: bytes) -> HeadError:
    # A target with '@' carries userinfo, possibly a password: name it, don't show it.
    shown = "(withheld: contains userinfo)" if b"@" in target else _echo(target)
    return HeadError(400, "bad_target", f"{detail}: {shown}")


def _bare_line_ending() -> HeadError:
    return _bad("bare CR or LF in header section (lines must end with CRLF)")


def _line_too_long() -> HeadError:
    return HeadError(
        414, "request_line_too_long", f"request line longer than {MAX_REQUEST_LINE} bytes"
    )


def _too_large(max_size: int) -> HeadError:
    return HeadError(431, "head_too_large", f"request head larger than {max_size} bytes")
