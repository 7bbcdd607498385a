"""A table of hostile request heads sent raw to a running relay.

Each row names the exact status the relay must answer, the reason its log line
must carry, and which relay gets it (``plain``: no proxy auth; ``auth``: Basic
auth on). For every row the test checks the status line, the one-line body, the
log event, and that nothing was dialled: every name the table uses is mapped by
``resolver.static`` to one TCP peer whose accept count must not move. Rows that
carry credentials also check that none of them (the raw header value, the
decoded user or password) appears in any line the relay wrote.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest

from relay.auth import hash_password
from tests.support.helpers import MemoryTLS, dial, tcp_peer
from tests.support.relay import CP_HOST, RAW_HOST, RelayProcess, relay_config

T = b"cloud.konghq.com:443"
USER = "h0stile-user"
PASSWORD = "S3cr3t-Pa55-w0rd"
# A second user, only for the control request: a user who authenticates becomes
# the logged identity, so the hostile rows' user must never succeed.
CONTROL_USER, CONTROL_PASSWORD = "c0ntrol-user", "c0ntrol-Pa55"
PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    414: "URI Too Long",  # RFC 9110 §15.5.15
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}
CHALLENGE = b'Proxy-Authenticate: Basic realm="konnect-relay", charset="UTF-8"'

# Every name a row could make the relay dial, mapped to the counting peer.
DIALLABLE = [
    "cloud.konghq.com",
    CP_HOST,
    RAW_HOST,
    "evil.com",
    "cloud.konghq.com.evil.com",
    "evilkonghq.com",
    "konghq.com.evil.com",
    "a.b.eu.cp0.konghq.com",
    "dp.xx.cp0.konghq.com",
    "cloud.konghq.co",
    "xn--cloud-6ve.konghq.com",
    "127.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "127.1",
    "localhost",
]


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def connect(target: bytes = T, *headers: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"CONNECT " + target + b" " + version + b"\r\n" + b"".join(headers) + b"\r\n"


def auth(value: str) -> bytes:
    return connect(b"cloud.konghq.com:443", b"Proxy-Authorization: " + value.encode() + b"\r\n")


@dataclass(frozen=True)
class Case:
    id: str
    head: bytes
    status: int
    reason: str
    relay: str = "plain"
    # Text the one-line body must contain (beyond "<status> ").
    detail: str = ""
    # Strings that must never appear in the relay's output.
    secrets: tuple[str, ...] = field(default=())


H = b"Host: cloud.konghq.com:443\r\n"

CASES = [
    # --- Host header --------------------------------------------------------------
    Case("duplicate-host", connect(T, H, H), 400, "bad_request", detail="repeated Host header"),
    Case(
        "duplicate-host-other-case",
        connect(T, H, b"host: cloud.konghq.com:443\r\n"),
        400,
        "bad_request",
        detail="repeated Host",
    ),
    Case(
        "conflicting-host",
        connect(T, b"Host: evil.com:443\r\n"),
        400,
        "host_mismatch",
        detail="Host header does not match CONNECT target",
    ),
    Case("host-other-port", connect(T, b"Host: cloud.konghq.com:8443\r\n"), 400, "host_mismatch"),
    Case("host-empty", connect(T, b"Host: \r\n"), 400, "host_mismatch"),
    Case(
        "host-list",
        connect(T, b"Host: cloud.konghq.com:443, evil.com:443\r\n"),
        400,
        "host_mismatch",
    ),
    Case(
        "host-absolute-uri", connect(T, b"Host: https://cloud.konghq.com\r\n"), 400, "host_mismatch"
    ),
    # --- line structure -----------------------------------------------------------
    Case(
        "obs-fold-space",
        connect(T, H, b"X-A: a\r\n", b" folded\r\n"),
        400,
        "bad_request",
        detail="obsolete line folding",
    ),
    Case("obs-fold-tab", connect(T, H, b"X-A: a\r\n\tfolded\r\n"), 400, "bad_request"),
    Case(
        "bare-lf-request-line",
        b"CONNECT cloud.konghq.com:443 HTTP/1.1\nHost: cloud.konghq.com:443\r\n\r\n",
        400,
        "bad_request",
        detail="bare LF in request line",
    ),
    Case("bare-lf-everywhere", b"CONNECT cloud.konghq.com:443 HTTP/1.1\n\n", 400, "bad_request"),
    Case(
        "bare-lf-header",
        b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\nHost: cloud.konghq.com:443\n\r\n",
        400,
        "bad_request",
        detail="bare CR or LF",
    ),
    Case(
        "bare-lf-ends-head",
        b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\nHost: cloud.konghq.com:443\r\n\n",
        400,
        "bad_request",
    ),
    Case("bare-cr-header", connect(T, b"X-A: a\rb\r\n"), 400, "bad_request"),
    Case(
        "bare-cr-request-line",
        b"CONNECT cloud.konghq.com:443\rHTTP/1.1\r\n\r\n",
        400,
        "bad_request",
        detail="invalid byte in request line",
    ),
    Case("cr-cr-lf", b"CONNECT cloud.konghq.com:443 HTTP/1.1\r\r\n\r\n", 400, "bad_request"),
    Case(
        "two-blank-lines-first",
        b"\r\n\r\n" + connect(),
        400,
        "bad_request",
        detail="empty request line",
    ),
    Case(
        "whitespace-before-colon",
        connect(T, b"Host : cloud.konghq.com:443\r\n"),
        400,
        "bad_request",
        detail="whitespace between header name and colon",
    ),
    Case("header-without-colon", connect(T, b"Garbage\r\n"), 400, "bad_request"),
    Case("leading-space-request-line", b" " + connect(), 400, "bad_request"),
    Case(
        "double-space-request-line",
        b"CONNECT  cloud.konghq.com:443 HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    Case(
        "trailing-space-request-line",
        b"CONNECT cloud.konghq.com:443 HTTP/1.1 \r\n\r\n",
        400,
        "bad_request",
    ),
    Case("tab-request-line", b"CONNECT\tcloud.konghq.com:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    # --- NUL and control bytes ----------------------------------------------------
    Case(
        "nul-request-line", b"CONNECT cloud.konghq.com\x00:443 HTTP/1.1\r\n\r\n", 400, "bad_request"
    ),
    Case(
        "nul-header-value",
        connect(T, H, b"X-A: a\x00b\r\n"),
        400,
        "bad_request",
        detail="invalid byte in value of header X-A",
    ),
    Case(
        "nul-header-name",
        connect(T, b"Ho\x00st: x\r\n"),
        400,
        "bad_request",
        detail="invalid header name",
    ),
    Case("soh-header-value", connect(T, b"X-A: \x01\r\n"), 400, "bad_request"),
    Case("del-header-value", connect(T, b"X-A: a\x7f\r\n"), 400, "bad_request"),
    Case(
        "esc-request-line",
        b"CONNECT cloud.konghq.com:443\x1b[2J HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    Case(
        "obs-text-request-line",
        b"CONNECT cl\xc3\xb6ud.konghq.com:443 HTTP/1.1\r\n\r\n",
        400,
        "bad_request",
    ),
    Case("binary-garbage", bytes(range(0x80, 0x100)) + b"\r\n\r\n", 400, "bad_request"),
    # --- sizes --------------------------------------------------------------------
    Case(
        "overlong-request-line",
        connect(b"a" * 2000 + b".com:443"),
        414,
        "request_line_too_long",
        detail="request line longer than 1024 bytes",
    ),
    Case(
        "overlong-request-line-unfinished", b"CONNECT " + b"a" * 1100, 414, "request_line_too_long"
    ),
    Case(
        "overlong-header",
        connect(T, H, b"X-A: " + b"a" * 17000 + b"\r\n"),
        431,
        "head_too_large",
        detail="request head larger than 16384 bytes",
    ),
    Case(
        "overlong-header-unfinished",
        connect(T, H)[:-2] + b"X-A: " + b"a" * 16500,
        431,
        "head_too_large",
    ),
    Case(
        "too-many-headers",
        connect(T, *(b"X-%d: v\r\n" % i for i in range(101))),
        431,
        "too_many_headers",
        detail="more than 100 header fields",
    ),
    # --- methods and target forms ----------------------------------------------------
    Case(
        "get-absolute-form",
        b"GET http://cloud.konghq.com/ HTTP/1.1\r\nHost: cloud.konghq.com\r\n\r\n",
        405,
        "method_not_allowed",
        detail="method GET not allowed",
    ),
    Case(
        "get-origin-form",
        b"GET / HTTP/1.1\r\nHost: cloud.konghq.com\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    Case(
        "connect-absolute-form",
        b"CONNECT https://cloud.konghq.com:443/ HTTP/1.1\r\n\r\n",
        405,
        "method_not_allowed",
        detail="absolute-form request target",
    ),
    Case(
        "connect-origin-form",
        b"CONNECT /cloud.konghq.com:443 HTTP/1.1\r\n\r\n",
        405,
        "method_not_allowed",
        detail="origin-form request target",
    ),
    Case(
        "connect-asterisk",
        b"CONNECT * HTTP/1.1\r\n\r\n",
        405,
        "method_not_allowed",
        detail="asterisk-form request target",
    ),
    Case("options-asterisk", b"OPTIONS * HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    Case(
        "lowercase-connect",
        b"connect cloud.konghq.com:443 HTTP/1.1\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    Case("post", b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "method_not_allowed"),
    Case("method-not-token", b"CONN(ECT cloud.konghq.com:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    # --- versions -----------------------------------------------------------------
    Case(
        "http09-get",
        b"GET /\r\n\r\n",
        400,
        "bad_request",
        detail="no HTTP version (HTTP/0.9 is not supported)",
    ),
    Case("http09-connect", b"CONNECT cloud.konghq.com:443\r\n\r\n", 400, "bad_request"),
    Case(
        "http2-preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"),
        505,
        "version_not_supported",
        detail="HTTP/2 connection preface received",
    ),
    Case(
        "http12",
        connect(version=b"HTTP/1.2"),
        505,
        "version_not_supported",
        detail="HTTP/1.2 not supported",
    ),
    Case("http20", connect(version=b"HTTP/2.0"), 505, "version_not_supported"),
    Case("http30", connect(version=b"HTTP/3.0"), 505, "version_not_supported"),
    Case(
        "lowercase-version",
        connect(version=b"http/1.1"),
        400,
        "bad_request",
        detail="invalid HTTP version",
    ),
    Case("version-two-digits", connect(version=b"HTTP/1.10"), 400, "bad_request"),
    Case("https-version", connect(version=b"HTTPS/1.1"), 400, "bad_request"),
    Case(
        "tls-client-hello",
        MemoryTLS(ssl.create_default_context(), "cloud.konghq.com").hello(),
        400,
        "tls_on_plaintext_port",
        detail="TLS handshake sent to a plaintext proxy port",
    ),
    # --- content on a CONNECT -------------------------------------------------------
    Case(
        "content-length",
        connect(T, H, b"Content-Length: 0\r\n"),
        400,
        "request_has_content",
        detail="(Content-Length header)",
    ),
    Case(
        "transfer-encoding",
        connect(T, H, b"Transfer-Encoding: chunked\r\n"),
        400,
        "request_has_content",
        detail="(Transfer-Encoding header)",
    ),
    Case(
        "content-length-upper",
        connect(T, b"CONTENT-LENGTH: 5\r\n") + b"hello",
        400,
        "request_has_content",
    ),
    Case(
        "smuggling-te-cl",
        connect(T, b"Transfer-Encoding: chunked\r\n", b"Content-Length: 4\r\n") + b"0\r\n\r\n",
        400,
        "request_has_content",
    ),
    # --- ports ----------------------------------------------------------------------
    Case("no-port", connect(b"cloud.konghq.com"), 400, "bad_target", detail="port missing"),
    Case("empty-port", connect(b"cloud.konghq.com:"), 400, "bad_target", detail="empty port"),
    Case("port-zero", connect(b"cloud.konghq.com:0"), 400, "bad_target"),
    Case("port-65536", connect(b"cloud.konghq.com:65536"), 400, "bad_target"),
    Case("port-leading-zero", connect(b"cloud.konghq.com:0443"), 400, "bad_target"),
    Case("port-plus", connect(b"cloud.konghq.com:+443"), 400, "bad_target"),
    Case("port-six-digits", connect(b"cloud.konghq.com:443443"), 400, "bad_target"),
    Case("port-name", connect(b"cloud.konghq.com:https"), 400, "bad_target"),
    Case("port-twice", connect(b"cloud.konghq.com:443:443"), 400, "bad_target"),
    Case("empty-host", connect(b":443"), 400, "bad_target", detail="empty host"),
    Case("port-8443", connect(b"cloud.konghq.com:8443"), 403, "port_not_allowed"),
    Case("port-80", connect(b"cloud.konghq.com:80"), 403, "port_not_allowed"),
    Case("port-22-on-allowed-name", connect(RAW_HOST.encode() + b":22"), 403, "not_allowlisted"),
    # --- hosts: userinfo, escapes, unicode, IP literals ---------------------------------
    Case(
        "userinfo-with-password",
        connect(b"admin:hunter2-Pa55@cloud.konghq.com:443"),
        400,
        "bad_target",
        detail="(withheld: contains userinfo)",
        secrets=("hunter2-Pa55",),
    ),
    Case(
        "userinfo", connect(b"admin@cloud.konghq.com:443"), 400, "invalid_host", detail="userinfo"
    ),
    Case(
        "percent-escape",
        connect(b"cloud%2ekonghq.com:443"),
        400,
        "invalid_host",
        detail="percent-escapes",
    ),
    Case("percent-nul", connect(b"cloud.konghq.com%00.evil.com:443"), 400, "invalid_host"),
    Case("backslash", connect(b"cloud.konghq.com\\evil.com:443"), 400, "invalid_host"),
    Case("path-in-host", connect(b"cloud.konghq.com/evil:443"), 400, "invalid_host"),
    Case("query-in-host", connect(b"cloud.konghq.com?x=evil.com:443"), 400, "invalid_host"),
    Case("wildcard-host", connect(b"*.konghq.com:443"), 400, "invalid_host"),
    Case("underscore-host", connect(b"cloud_konghq.com:443"), 400, "invalid_host"),
    Case("two-trailing-dots", connect(b"cloud.konghq.com..:443"), 400, "invalid_host"),
    Case("leading-dot", connect(b".cloud.konghq.com:443"), 400, "invalid_host"),
    Case("empty-label", connect(b"cloud..konghq.com:443"), 400, "invalid_host"),
    Case("label-hyphen-edge", connect(b"-cloud.konghq.com:443"), 400, "invalid_host"),
    Case("label-64-chars", connect(b"a" * 64 + b".konghq.com:443"), 400, "invalid_host"),
    Case("name-300-chars", connect(b"a." * 145 + b"konghq.com:443"), 400, "invalid_host"),
    Case("unicode-utf8-host", connect("cl\u043eud.konghq.com:443".encode()), 400, "bad_request"),
    Case(
        "idna-a-label-lookalike", connect(b"xn--cloud-6ve.konghq.com:443"), 403, "not_allowlisted"
    ),
    Case("ipv4-literal", connect(b"127.0.0.1:443"), 403, "ip_literal"),
    Case("ipv4-decimal", connect(b"2130706433:443"), 403, "ip_literal", detail="= 127.0.0.1"),
    Case("ipv4-hex", connect(b"0x7f000001:443"), 403, "ip_literal"),
    Case("ipv4-octal", connect(b"0177.0.0.1:443"), 403, "ip_literal"),
    Case("ipv4-short", connect(b"127.1:443"), 403, "ip_literal"),
    Case("ipv6-literal", connect(b"[::1]:443"), 403, "ip_literal"),
    Case("ipv6-mapped-v4", connect(b"[::ffff:127.0.0.1]:443"), 403, "ip_literal"),
    Case("ipv6-unbracketed", connect(b"::1:443"), 400, "bad_target", detail="in brackets"),
    Case("ipv6-unterminated", connect(b"[::1:443"), 400, "bad_target"),
    Case("localhost", connect(b"localhost:443"), 403, "not_allowlisted"),
    # --- Konnect look-alikes ------------------------------------------------------------
    Case(
        "konnect-suffix-appended",
        connect(b"cloud.konghq.com.evil.com:443"),
        403,
        "not_allowlisted",
        detail="host not in Konnect allowlist: cloud.konghq.com.evil.com:443",
    ),
    Case("konnect-no-dot", connect(b"evilkonghq.com:443"), 403, "not_allowlisted"),
    Case("konnect-as-subdomain", connect(b"konghq.com.evil.com:443"), 403, "not_allowlisted"),
    Case(
        "konnect-two-labels-before-cp0",
        connect(b"a.b.eu.cp0.konghq.com:443"),
        403,
        "not_allowlisted",
        detail='only one DNS label may come before ".eu.cp0.konghq.com"',
    ),
    Case("konnect-unknown-region", connect(b"dp.xx.cp0.konghq.com:443"), 403, "not_allowlisted"),
    Case("konnect-other-tld", connect(b"cloud.konghq.co:443"), 403, "not_allowlisted"),
    Case("plain-evil", connect(b"evil.com:443"), 403, "not_allowlisted"),
    # --- credentials on a relay without auth are ignored, and never logged -----------------
    Case(
        "credentials-with-bad-head",
        connect(
            T, H, b"Proxy-Authorization: Basic " + b64(f"{USER}:{PASSWORD}").encode() + b"\r\n", H
        ),
        400,
        "bad_request",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}")),
    ),
    Case(
        "credentials-with-denied-host",
        connect(
            b"evil.com:443",
            b"Proxy-Authorization: Basic " + b64(f"{USER}:{PASSWORD}").encode() + b"\r\n",
        ),
        403,
        "not_allowlisted",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}")),
    ),
    # --- Proxy-Authorization, malformed in each way (auth on) ----------------------------
    Case("auth-missing", connect(T, H), 407, "auth_missing", "auth"),
    Case("auth-empty", auth(""), 407, "auth_malformed", "auth", "empty Proxy-Authorization"),
    Case("auth-blank", auth("   "), 407, "auth_malformed", "auth"),
    Case(
        "auth-basic-no-token",
        auth("Basic"),
        407,
        "auth_malformed",
        "auth",
        "Basic credentials missing",
    ),
    Case("auth-basic-space-only", auth("Basic "), 407, "auth_malformed", "auth"),
    Case(
        "auth-bad-base64",
        auth("Basic !!" + PASSWORD + "!!"),
        407,
        "auth_malformed",
        "auth",
        secrets=(PASSWORD,),
    ),
    Case(
        "auth-base64-unpadded",
        auth("Basic " + b64(f"{USER}:{PASSWORD}").rstrip("=")),
        407,
        "auth_malformed",
        "auth",
        secrets=(USER, PASSWORD),
    ),
    Case(
        "auth-two-tokens",
        auth("Basic " + b64(USER) + " " + b64(PASSWORD)),
        407,
        "auth_malformed",
        "auth",
        secrets=(b64(USER), b64(PASSWORD)),
    ),
    Case(
        "auth-no-colon",
        auth("Basic " + b64(USER + PASSWORD)),
        407,
        "auth_malformed",
        "auth",
        "no colon",
        secrets=(USER + PASSWORD, b64(USER + PASSWORD)),
    ),
    Case(
        "auth-empty-user",
        auth("Basic " + b64(":" + PASSWORD)),
        407,
        "auth_malformed",
        "auth",
        secrets=(PASSWORD, b64(":" + PASSWORD)),
    ),
    Case(
        "auth-not-utf8",
        auth("Basic " + b64(b"\xff\xfe:" + PASSWORD.encode())),
        407,
        "auth_malformed",
        "auth",
        secrets=(PASSWORD,),
    ),
    Case(
        "auth-control-char",
        auth("Basic " + b64(f"{USER}:{PASSWORD}\x07")),
        407,
        "auth_malformed",
        "auth",
        secrets=(USER, PASSWORD),
    ),
    Case(
        "auth-non-canonical-base64",
        auth("Basic YR=="),
        407,
        "auth_malformed",
        "auth",
        "not canonical base64",
    ),
    Case(
        "auth-bearer",
        auth("Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.sig"),
        407,
        "auth_scheme",
        "auth",
        "scheme is not Basic",
        secrets=("eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXRva2Vu.sig",),
    ),
    Case(
        "auth-digest",
        auth(
            f'Digest username="{USER}", realm="konnect-relay", '
            'response="6629fae49393a05397450978507c4ef1"'
        ),
        407,
        "auth_scheme",
        "auth",
        secrets=(USER, "6629fae49393a05397450978507c4ef1"),
    ),
    Case(
        "auth-negotiate",
        auth("Negotiate YIIGhgYJKoZIhvcSAQICAQBuggZ1MIIGcaADAgEFoQMCAQ6i"),
        407,
        "auth_scheme",
        "auth",
        secrets=("YIIGhgYJKoZIhvcSAQICAQBuggZ1MIIGcaADAgEFoQMCAQ6i",),
    ),
    Case("auth-ntlm", auth("NTLM TlRMTVNTUAABAAAAB4IIog=="), 407, "auth_scheme", "auth"),
    Case(
        "auth-credentials-without-scheme",
        auth(b64(f"{USER}:{PASSWORD}")),
        407,
        "auth_malformed",
        "auth",
        "does not start with an authentication scheme",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}")),
    ),
    Case(
        # Unpadded base64 is a valid token, so it reads as an unknown scheme.
        "auth-credentials-as-scheme",
        auth(b64(f"{USER}:{PASSWORD}!")),
        407,
        "auth_scheme",
        "auth",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}!")),
    ),
    Case(
        "auth-scheme-not-token",
        auth('"Basic" ' + b64(f"{USER}:{PASSWORD}")),
        407,
        "auth_malformed",
        "auth",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}")),
    ),
    Case(
        "auth-wrong-password",
        auth("Basic " + b64(f"{USER}:wrong-{PASSWORD}")),
        407,
        "auth_failed",
        "auth",
        "invalid proxy credentials",
        secrets=(USER, f"wrong-{PASSWORD}", b64(f"{USER}:wrong-{PASSWORD}")),
    ),
    Case(
        "auth-unknown-user",
        auth("Basic " + b64(f"n0body-here:{PASSWORD}")),
        407,
        "auth_failed",
        "auth",
        secrets=("n0body-here", PASSWORD, b64(f"n0body-here:{PASSWORD}")),
    ),
    Case(
        "auth-duplicate-header",
        connect(
            T,
            b"Proxy-Authorization: Basic " + b64(f"{USER}:{PASSWORD}").encode() + b"\r\n",
            b"Proxy-Authorization: Basic " + b64(f"{USER}:{PASSWORD}").encode() + b"\r\n",
        ),
        400,
        "bad_request",
        "auth",
        "repeated Proxy-Authorization header",
        secrets=(USER, PASSWORD, b64(f"{USER}:{PASSWORD}")),
    ),
    Case(
        "auth-value-with-nul",
        connect(
            T,
            b"Proxy-Authorization: Basic "
            + b64(USER).encode()
            + b"\x00"
            + PASSWORD.encode()
            + b"\r\n",
        ),
        400,
        "bad_request",
        "auth",
        secrets=(PASSWORD, b64(USER)),
    ),
    Case(
        "auth-obs-fold",
        connect(
            T,
            b"Proxy-Authorization: Basic\r\n",
            b" " + b64(f"{USER}:{PASSWORD}").encode() + b"\r\n",
        ),
        400,
        "bad_request",
        "auth",
        secrets=(b64(f"{USER}:{PASSWORD}"),),
    ),
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.status for c in CASES} == set(PHRASES)


# --- the two relays and the counting peer, shared by every row ----------------------------


@dataclass
class Relays:
    plain: RelayProcess
    auth: RelayProcess
    accepted: list[int]


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relays]:
    with ExitStack() as stack:
        port, accepted = stack.enter_context(tcp_peer(lambda conn: None))
        static = {name: f"127.0.0.1:{port}" for name in DIALLABLE}
        base = relay_config(resolver={"static": static}, limits={"drain_timeout": 1})
        users = [
            {"name": USER, "password_hash": hash_password(PASSWORD)},
            {"name": CONTROL_USER, "password_hash": hash_password(CONTROL_PASSWORD)},
        ]
        plain = RelayProcess(base, tmp_path_factory.mktemp("plain"))
        stack.callback(plain.stop)
        authed = RelayProcess(
            {**base, "auth": {"basic": {"users": users}}}, tmp_path_factory.mktemp("auth")
        )
        stack.callback(authed.stop)
        yield Relays(plain, authed, accepted)


def exchange(relay: RelayProcess, head: bytes) -> tuple[bytes, str]:
    """Send ``head`` and read until the relay closes; (reply, client address)."""
    sock = dial(relay.proxy)
    with sock:
        client = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(head)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # after the answer: the relay closed with some of our bytes unread
    return reply, client


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_head(relays: Relays, case: Case) -> None:
    relay = relays.auth if case.relay == "auth" else relays.plain
    dialled = relays.accepted[0]
    reply, client = exchange(relay, case.head)

    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep, reply[:300]
    lines = head.split(b"\r\n")
    assert lines[0] == f"HTTP/1.1 {case.status} {PHRASES[case.status]}".encode()
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Content-Type"] == b"text/plain; charset=utf-8"
    assert headers[b"Connection"] == b"close"
    assert int(headers[b"Content-Length"]) == len(body)
    # One line: "<status> <detail>\n", printable.
    assert body.startswith(f"{case.status} ".encode()) and body.endswith(b"\n")
    assert body.count(b"\n") == 1 and body[:-1].isascii() and body[:-1].decode().isprintable()
    assert case.detail.encode() in body, body
    if case.status == 405:
        assert headers[b"Allow"] == b"CONNECT"
    if case.status == 407:
        assert head.endswith(b"\r\n" + CHALLENGE)
    else:
        assert b"Proxy-Authenticate" not in head

    event = relay.request_event(client)
    assert (event["status"], event["reason"], event["allowed"]) == (
        case.status,
        case.reason,
        False,
    )
    assert event.get("identity") in (None, "127.0.0.1")
    assert relays.accepted[0] == dialled, "the relay dialled"

    for secret in case.secrets:
        assert secret.encode() not in reply
        for line in relay.lines:
            assert secret not in line, (secret, line)


def test_controls_reach_the_peer(relays: Relays) -> None:
    """The static map leads to the counting peer: a good request is dialled."""
    before = relays.accepted[0]
    good = f"Basic {b64(f'{CONTROL_USER}:{CONTROL_PASSWORD}')}".encode()
    for relay, head in (
        (relays.plain, connect()),
        (relays.auth, connect(T, b"Proxy-Authorization: " + good + b"\r\n")),
    ):
        sock = dial(relay.proxy)
        with sock:
            sock.sendall(head)
            assert sock.recv(100) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    relays.plain.wait_event(lambda e: e["event"] == "request" and e["status"] == 200)
    event = relays.auth.wait_event(lambda e: e["event"] == "request" and e["status"] == 200)
    assert event["identity"] == CONTROL_USER
    assert relays.accepted[0] == before + 2
    event = relays.auth.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert event["client"] == CONTROL_USER  # the identity; the password and header stay out
    assert not any(
        CONTROL_PASSWORD in line or good.decode()[6:] in line for line in relays.auth.lines
    )


def test_nothing_secret_anywhere(relays: Relays) -> None:
    """Every line either relay wrote, after every row ran."""
    secrets = {s for c in CASES for s in c.secrets}
    assert secrets
    for relay in (relays.plain, relays.auth):
        assert relay.get("/healthz")[0] == 200
        for line in relay.lines:
            for secret in secrets:
                assert secret not in line, (secret, line)
