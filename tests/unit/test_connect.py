"""Tests for relay.connect: a table of request heads (real clients' and hostile ones),
every split point of each, and property tests over arbitrary and mutated input."""

from __future__ import annotations

import http.client
import io
import time
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.connect import (
    ESTABLISHED,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    REASONS,
    ConnectRequest,
    HeadError,
    parse_head,
    response,
)

KONG = (
    b"CONNECT a.eu.cp0.konghq.com:443 HTTP/1.1\r\n"
    b"Host: a.eu.cp0.konghq.com:443\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"Proxy-Authorization: Basic dTpw\r\n"
    b"\r\n"
)
KONG_NO_AUTH = (
    b"CONNECT a.eu.cp0.konghq.com:443 HTTP/1.1\r\n"
    b"Host: a.eu.cp0.konghq.com:443\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
# As sent by OpenSSL 3.0 `s_client -proxy`: HTTP/1.0, no Host.
OPENSSL = b"CONNECT a.eu.tp0.konghq.com:443 HTTP/1.0\r\nProxy-Connection: Keep-Alive\r\n\r\n"
DECK = (
    b"CONNECT us.api.konghq.com:443 HTTP/1.1\r\n"
    b"Host: us.api.konghq.com:443\r\n"
    b"User-Agent: decK/v1.40.2 (linux; amd64)\r\n"
    b"Proxy-Authorization: Basic ZGVjazpzM2NyZXQ=\r\n"
    b"\r\n"
)
GRPC_GO = (
    b"CONNECT eu.mesh.sync.konghq.com:443 HTTP/1.1\r\n"
    b"Host: eu.mesh.sync.konghq.com:443\r\n"
    b"User-Agent: grpc-go/1.64.0\r\n"
    b"\r\n"
)
# As sent by curl 7.88.1 `-x http://u:p@relay:3128`.
CURL = (
    b"CONNECT global.api.konghq.com:443 HTTP/1.1\r\n"
    b"Host: global.api.konghq.com:443\r\n"
    b"Proxy-Authorization: Basic dTpw\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
# The start of a TLS 1.2/1.3 ClientHello record: handshake (22), TLS 1.0 record
# version, length, ClientHello (1).
CLIENT_HELLO = bytes.fromhex("16 03 01 02 00 01 00 01 fc 03 03") + bytes(32)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _with_headers(n: int) -> bytes:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(n))
    return b"CONNECT a.example:443 HTTP/1.1\r\n" + lines + b"\r\n"


@dataclass(frozen=True)
class Ok:
    host: str
    port: int
    version: str = "HTTP/1.1"
    proxy_authorization: bytes | None = None
    user_agent: str | None = None


VALID: list[tuple[str, bytes, Ok]] = [
    ("kong", KONG, Ok("a.eu.cp0.konghq.com", 443, proxy_authorization=b"Basic dTpw")),
    ("kong-no-auth", KONG_NO_AUTH, Ok("a.eu.cp0.konghq.com", 443)),
    ("openssl-http10-no-host", OPENSSL, Ok("a.eu.tp0.konghq.com", 443, "HTTP/1.0")),
    (
        "deck",
        DECK,
        Ok(
            "us.api.konghq.com",
            443,
            proxy_authorization=b"Basic ZGVjazpzM2NyZXQ=",
            user_agent="decK/v1.40.2 (linux; amd64)",
        ),
    ),
    ("grpc-go", GRPC_GO, Ok("eu.mesh.sync.konghq.com", 443, user_agent="grpc-go/1.64.0")),
    (
        "curl",
        CURL,
        Ok(
            "global.api.konghq.com",
            443,
            proxy_authorization=b"Basic dTpw",
            user_agent="curl/7.88.1",
        ),
    ),
    ("bare-http10", b"CONNECT a.example:443 HTTP/1.0\r\n\r\n", Ok("a.example", 443, "HTTP/1.0")),
    (
        "host-without-port",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\r\n\r\n",
        Ok("a.example", 443),
    ),
    (
        "host-header-case-insensitive",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: A.Example:443\r\n\r\n",
        Ok("a.example", 443),
    ),
    ("target-case-kept", b"CONNECT A.Example:443 HTTP/1.1\r\n\r\n", Ok("A.Example", 443)),
    ("ipv6-bracketed", b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n", Ok("[::1]", 443)),
    (
        "ipv6-host-header",
        b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n",
        Ok("[2001:db8::1]", 8443),
    ),
    ("ipv4", b"CONNECT 192.0.2.7:443 HTTP/1.1\r\n\r\n", Ok("192.0.2.7", 443)),
    ("port-1", b"CONNECT a.example:1 HTTP/1.1\r\n\r\n", Ok("a.example", 1)),
    ("port-65535", b"CONNECT a.example:65535 HTTP/1.1\r\n\r\n", Ok("a.example", 65535)),
    (
        "one-leading-crlf",
        b"\r\nCONNECT a.example:443 HTTP/1.1\r\n\r\n",
        Ok("a.example", 443),
    ),
    (
        "ows-around-value",
        b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: \t Basic dTpw \t\r\n\r\n",
        Ok("a.example", 443, proxy_authorization=b"Basic dTpw"),
    ),
    (
        "no-space-after-colon",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost:a.example:443\r\n\r\n",
        Ok("a.example", 443),
    ),
    (
        "field-names-any-case",
        b"CONNECT a.example:443 HTTP/1.1\r\nHOST: a.example:443\r\n"
        b"proxy-authorization: Bearer t\r\nuser-AGENT: x\r\n\r\n",
        Ok("a.example", 443, proxy_authorization=b"Bearer t", user_agent="x"),
    ),
    (
        "obs-text-in-value",
        b"CONNECT a.example:443 HTTP/1.1\r\nUser-Agent: caf\xe9\xff\r\n\r\n",
        Ok("a.example", 443, user_agent="caf\xe9\xff"),
    ),
    (
        "htab-inside-value",
        b"CONNECT a.example:443 HTTP/1.1\r\nUser-Agent: a\tb\r\n\r\n",
        Ok("a.example", 443, user_agent="a\tb"),
    ),
    (
        "empty-values",
        b"CONNECT a.example:443 HTTP/1.1\r\nX-Empty:\r\nProxy-Authorization:\r\n\r\n",
        Ok("a.example", 443, proxy_authorization=b""),
    ),
    (
        "unrelated-headers-ignored",
        b"CONNECT a.example:443 HTTP/1.1\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n"
        b"Upgrade: h2c\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n",
        Ok("a.example", 443),
    ),
    # The policy module rejects these with a precise reason; the parser passes them on.
    (
        "userinfo-passed-to-policy",
        b"CONNECT user@a.example:443 HTTP/1.1\r\n\r\n",
        Ok("user@a.example", 443),
    ),
    (
        "percent-passed-to-policy",
        b"CONNECT a%2e.example:443 HTTP/1.1\r\n\r\n",
        Ok("a%2e.example", 443),
    ),
    (
        "ipv6-zone-passed-to-policy",
        b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n",
        Ok("[fe80::1%25eth0]", 443),
    ),
    ("max-headers", _with_headers(MAX_HEADERS), Ok("a.example", 443)),
]

INVALID: list[tuple[str, bytes, int, str]] = [
    # Not HTTP at all.
    ("tls-client-hello", CLIENT_HELLO, 400, "tls_on_plaintext_port"),
    ("tls-first-byte-only", b"\x16", 400, "tls_on_plaintext_port"),
    ("h2-preface", H2_PREFACE, 505, "version_not_supported"),
    ("binary-garbage", b"\x00\x01\x02\x03", 400, "bad_request"),
    ("proxy-protocol-v1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", 400, "bad_request"),
    # Methods: case-sensitive, only CONNECT.
    ("get-origin-form", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 405, "method_not_allowed"),
    ("get-absolute-form", b"GET http://a.example/ HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("post", b"POST /x HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 405, "method_not_allowed"),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("lowercase-connect", b"connect a.example:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("mixed-case-connect", b"Connect a.example:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("method-not-token", b"CON(NECT a.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    # Request-target forms other than authority-form.
    ("absolute-form", b"CONNECT http://a.example:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    (
        "absolute-form-https",
        b"CONNECT https://a.example/ HTTP/1.1\r\n\r\n",
        405,
        "method_not_allowed",
    ),
    ("origin-form", b"CONNECT /a.example:443 HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    ("asterisk-form", b"CONNECT * HTTP/1.1\r\n\r\n", 405, "method_not_allowed"),
    # Versions.
    ("http09", b"CONNECT a.example:443\r\n\r\n", 400, "bad_request"),
    ("http12", b"CONNECT a.example:443 HTTP/1.2\r\n\r\n", 505, "version_not_supported"),
    ("http20", b"CONNECT a.example:443 HTTP/2.0\r\n\r\n", 505, "version_not_supported"),
    ("http30", b"CONNECT a.example:443 HTTP/3.0\r\n\r\n", 505, "version_not_supported"),
    ("http09-version", b"CONNECT a.example:443 HTTP/0.9\r\n\r\n", 505, "version_not_supported"),
    ("version-lowercase", b"CONNECT a.example:443 http/1.1\r\n\r\n", 400, "bad_request"),
    ("version-two-digits", b"CONNECT a.example:443 HTTP/1.10\r\n\r\n", 400, "bad_request"),
    ("version-no-minor", b"CONNECT a.example:443 HTTP/2\r\n\r\n", 400, "bad_request"),
    ("version-garbage", b"CONNECT a.example:443 FOO\r\n\r\n", 400, "bad_request"),
    # Request-line shape.
    ("double-space", b"CONNECT  a.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("trailing-space", b"CONNECT a.example:443 HTTP/1.1 \r\n\r\n", 400, "bad_request"),
    ("leading-space", b" CONNECT a.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("tab-separator", b"CONNECT\ta.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("four-parts", b"CONNECT a.example:443 HTTP/1.1 x\r\n\r\n", 400, "bad_request"),
    ("two-leading-crlf", b"\r\n\r\nCONNECT a.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("nul-in-request-line", b"CONNECT a.exa\x00mple:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("ctl-in-request-line", b"CONNECT a.example:443\x01 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("del-in-request-line", b"CONNECT a.example:443 HTTP/1.1\x7f\r\n\r\n", 400, "bad_request"),
    ("obs-text-in-target", b"CONNECT caf\xc3\xa9.example:443 HTTP/1.1\r\n\r\n", 400, "bad_request"),
    (
        "overlong-request-line",
        b"CONNECT " + b"a" * 2000 + b".example:443 HTTP/1.1\r\n\r\n",
        414,
        "request_line_too_long",
    ),
    # Line endings.
    (
        "bare-lf-request-line",
        b"CONNECT a.example:443 HTTP/1.1\nHost: a.example\r\n\r\n",
        400,
        "bad_request",
    ),
    ("lf-only-head", b"CONNECT a.example:443 HTTP/1.1\n\n", 400, "bad_request"),
    (
        "bare-lf-header",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\n\r\n",
        400,
        "bad_request",
    ),
    (
        "lf-lf-in-headers",
        b"CONNECT a.example:443 HTTP/1.1\r\nA: b\n\nC: d\r\n\r\n",
        400,
        "bad_request",
    ),
    ("bare-cr-request-line", b"CONNECT a.example:443\rHTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("bare-cr-header", b"CONNECT a.example:443 HTTP/1.1\r\nA: b\rC: d\r\n\r\n", 400, "bad_request"),
    ("crcr-lf", b"CONNECT a.example:443 HTTP/1.1\r\nA: b\r\r\n\r\n", 400, "bad_request"),
    # Field lines.
    ("obs-fold-sp", b"CONNECT a.example:443 HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400, "bad_request"),
    ("obs-fold-htab", b"CONNECT a.example:443 HTTP/1.1\r\nA: b\r\n\tc\r\n\r\n", 400, "bad_request"),
    (
        "ws-before-first-field",
        b"CONNECT a.example:443 HTTP/1.1\r\n Host: a.example\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "space-before-colon",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost : a.example\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "tab-before-colon",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost\t: a.example\r\n\r\n",
        400,
        "bad_request",
    ),
    ("no-colon", b"CONNECT a.example:443 HTTP/1.1\r\nHost a.example\r\n\r\n", 400, "bad_request"),
    ("empty-field-name", b"CONNECT a.example:443 HTTP/1.1\r\n: x\r\n\r\n", 400, "bad_request"),
    (
        "field-name-not-token",
        b"CONNECT a.example:443 HTTP/1.1\r\nHo(st: x\r\n\r\n",
        400,
        "bad_request",
    ),
    ("nul-in-value", b"CONNECT a.example:443 HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "bad_request"),
    ("ctl-in-value", b"CONNECT a.example:443 HTTP/1.1\r\nX: a\x1bb\r\n\r\n", 400, "bad_request"),
    ("del-in-value", b"CONNECT a.example:443 HTTP/1.1\r\nX: a\x7fb\r\n\r\n", 400, "bad_request"),
    # Host.
    (
        "duplicate-host",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nHost: a.example:443\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "conflicting-host",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nHost: b.example:443\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "host-mismatch",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\n",
        400,
        "host_mismatch",
    ),
    (
        "host-other-port",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:8443\r\n\r\n",
        400,
        "host_mismatch",
    ),
    ("host-empty", b"CONNECT a.example:443 HTTP/1.1\r\nHost:\r\n\r\n", 400, "host_mismatch"),
    (
        "host-suffix",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example.evil:443\r\n\r\n",
        400,
        "host_mismatch",
    ),
    # Content framing on a CONNECT.
    (
        "content-length",
        b"CONNECT a.example:443 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        400,
        "request_has_content",
    ),
    (
        "transfer-encoding",
        b"CONNECT a.example:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        "request_has_content",
    ),
    (
        "content-length-lower",
        b"CONNECT a.example:443 HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
        400,
        "request_has_content",
    ),
    # Credentials and metadata fields.
    (
        "duplicate-proxy-authorization",
        b"CONNECT a.example:443 HTTP/1.1\r\n"
        b"Proxy-Authorization: Basic dTpw\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        "duplicate-user-agent",
        b"CONNECT a.example:443 HTTP/1.1\r\nUser-Agent: a\r\nUser-Agent: b\r\n\r\n",
        400,
        "bad_request",
    ),
    # Target authority and port.
    ("port-missing", b"CONNECT a.example HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-empty", b"CONNECT a.example: HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-0", b"CONNECT a.example:0 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-65536", b"CONNECT a.example:65536 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-99999", b"CONNECT a.example:99999 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-minus-1", b"CONNECT a.example:-1 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-plus", b"CONNECT a.example:+443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-leading-zero", b"CONNECT a.example:0443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-six-digits", b"CONNECT a.example:100443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-not-digits", b"CONNECT a.example:https HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("port-trailing-junk", b"CONNECT a.example:443/ HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("host-empty-target", b"CONNECT :443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-unbracketed", b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-unbracketed-full", b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-no-port", b"CONNECT [::1] HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-no-colon", b"CONNECT [::1]443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-empty", b"CONNECT []:443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("ipv6-unterminated", b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    ("userinfo-with-password", b"CONNECT u:pw@a.example:443 HTTP/1.1\r\n\r\n", 400, "bad_target"),
    # Size limits.
    ("too-many-headers", _with_headers(MAX_HEADERS + 1), 431, "too_many_headers"),
    (
        "head-too-large",
        b"CONNECT a.example:443 HTTP/1.1\r\nX: " + b"v" * MAX_HEAD_SIZE + b"\r\n\r\n",
        431,
        "head_too_large",
    ),
    (
        "head-too-large-unterminated",
        b"CONNECT a.example:443 HTTP/1.1\r\n" + b"X: v\r\n" * 4000,
        431,
        "head_too_large",
    ),
]


def _outcome(buf: bytes | bytearray, **kw: int) -> object:
    """A comparable summary of what parse_head does with buf."""
    try:
        return parse_head(buf, **kw)
    except HeadError as e:
        return ("error", e.status, e.reason, e.detail, e.headers)


def _check_error(e: HeadError) -> None:
    """Invariants of every error the parser raises."""
    assert e.reason in REASONS
    assert e.status in {400, 405, 414, 431, 505}
    assert e.detail.isascii() and e.detail.isprintable(), e.detail
    assert 0 < len(e.detail) < 200
    if e.status == 405:
        assert e.headers == (("Allow", "CONNECT"),)
    else:
        assert e.headers == ()


# -- the table ----------------------------------------------------------------------


def test_table_is_large_enough() -> None:
    assert len(VALID) + len(INVALID) >= 60
    ids = [case[0] for case in VALID] + [case[0] for case in INVALID]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("head", "expected"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid(head: bytes, expected: Ok) -> None:
    req = parse_head(head)
    assert req == ConnectRequest(
        host=expected.host,
        port=expected.port,
        version=expected.version,
        proxy_authorization=expected.proxy_authorization,
        user_agent=expected.user_agent,
        head_length=len(head),
    )
    assert parse_head(bytearray(head)) == req


@pytest.mark.parametrize(
    ("head", "status", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid(head: bytes, status: int, reason: str) -> None:
    with pytest.raises(HeadError) as info:
        parse_head(head)
    assert (info.value.status, info.value.reason) == (status, reason), info.value.detail
    _check_error(info.value)
    with pytest.raises(HeadError) as again:
        parse_head(bytearray(head))
    assert again.value.detail == info.value.detail


ALL_HEADS = [(c[0], c[1]) for c in VALID] + [(c[0], c[1]) for c in INVALID]


@pytest.mark.parametrize("head", [c[1] for c in ALL_HEADS], ids=[c[0] for c in ALL_HEADS])
def test_every_split_point_agrees(head: bytes) -> None:
    """Fed as it arrives, a head gives None and then exactly its final outcome."""
    final = _outcome(head)
    assert final is not None
    step = 1 if len(head) < 4096 else 97
    decided = False
    for cut in [*range(0, len(head), step), len(head)]:
        got = _outcome(head[:cut])
        if got is None:
            assert not decided, f"None after a decision at cut {cut}"
        else:
            decided = True
            assert got == final, f"cut {cut}"


# -- the things a relay relies on -----------------------------------------------------


def test_early_bytes_after_head_are_left_for_the_tunnel() -> None:
    early = CLIENT_HELLO + b"more"
    req = parse_head(KONG + early)
    assert req is not None
    assert req.head_length == len(KONG)
    assert (KONG + early)[req.head_length :] == early


def test_leading_crlf_counts_in_head_length() -> None:
    buf = b"\r\n" + OPENSSL + b"tls"
    req = parse_head(buf)
    assert req is not None
    assert buf[req.head_length :] == b"tls"


def test_early_bytes_that_look_like_a_second_head_are_not_parsed() -> None:
    buf = KONG_NO_AUTH + b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    req = parse_head(buf)
    assert req is not None
    assert req.head_length == len(KONG_NO_AUTH)


@pytest.mark.parametrize("head", [KONG, OPENSSL, DECK, GRPC_GO])
def test_incomplete_returns_none(head: bytes) -> None:
    for cut in range(len(head)):
        assert parse_head(head[:cut]) is None
        assert parse_head(bytearray(head[:cut])) is None


@pytest.mark.parametrize(
    ("prefix", "status"),
    [
        (b"\x16", 400),
        (b"GET ", None),
        (b"GET / HTTP/1.1\r\n", 405),
        (b"connect a.example:443 HTTP/1.1\r\n", 405),
        (b"CONNECT a.example:443 HTTP/2.0\r\n", 505),
        (b"PRI * HTTP/2.0\r\n", 505),
        (b"CONNECT a.example:0 HTTP/1.1\r\n", 400),
        (b"CONNECT a.example:443 HTTP/1.1\n", 400),
        (b"CONNECT a.example:443 HTTP/1.1\nHost: a", 400),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\n\n", 400),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example\n\r\n", 400),
        (b"CONNECT a.example:443 HTTP/1.1\r\nA: b\rC", 400),
        (b"CONNECT a.example:443 HTTP/1.1\r\nA: b\r", None),
        (b"CONNECT a.ex\x00", 400),
        (b"CONNECT " + b"a" * MAX_REQUEST_LINE, 414),
        (b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example", None),
        (b"CONNECT a.example:443 HTTP/1.1\r", None),
        (b"\r", None),
        (b"\r\n", None),
    ],
)
def test_decided_before_the_head_ends(prefix: bytes, status: int | None) -> None:
    """What can be judged early is: the server answers instead of waiting for a timeout."""
    if status is None:
        assert parse_head(prefix) is None
    else:
        with pytest.raises(HeadError) as info:
            parse_head(prefix)
        assert info.value.status == status


def test_tls_detail_says_what_happened() -> None:
    with pytest.raises(HeadError) as info:
        parse_head(CLIENT_HELLO)
    assert info.value.detail == "TLS handshake sent to a plaintext proxy port"


def test_h2_preface_detail_names_http2() -> None:
    with pytest.raises(HeadError) as info:
        parse_head(H2_PREFACE)
    assert "HTTP/2" in info.value.detail


@pytest.mark.parametrize(
    ("head", "form"),
    [
        (b"CONNECT http://a.example:443 HTTP/1.1\r\n\r\n", "absolute-form"),
        (b"CONNECT /x HTTP/1.1\r\n\r\n", "origin-form"),
        (b"CONNECT * HTTP/1.1\r\n\r\n", "asterisk-form"),
    ],
)
def test_target_form_is_named(head: bytes, form: str) -> None:
    with pytest.raises(HeadError) as info:
        parse_head(head)
    assert form in info.value.detail
    assert (
        response(info.value.status, info.value.detail, info.value.headers).count(
            b"\r\nAllow: CONNECT\r\n"
        )
        == 1
    )


def test_method_is_echoed_and_truncated() -> None:
    with pytest.raises(HeadError) as info:
        parse_head(b"GET / HTTP/1.1\r\n")
    assert "GET" in info.value.detail
    with pytest.raises(HeadError) as info:
        parse_head(b"X" * 500 + b" / HTTP/1.1\r\n")
    assert "X" * 100 + "..." in info.value.detail
    assert "X" * 101 not in info.value.detail


# -- size limits ---------------------------------------------------------------------


def _head_of_size(n: int) -> bytes:
    base = b"CONNECT a.example:443 HTTP/1.1\r\nX: \r\n\r\n"
    assert n >= len(base)
    return base[:-4] + b"v" * (n - len(base)) + b"\r\n\r\n"


@pytest.mark.parametrize("max_size", [64, 1000, MAX_HEAD_SIZE])
def test_head_of_exactly_max_size_is_accepted(max_size: int) -> None:
    head = _head_of_size(max_size)
    req = parse_head(head + b"early", max_size=max_size)
    assert req is not None and req.head_length == max_size


@pytest.mark.parametrize("max_size", [64, 1000, MAX_HEAD_SIZE])
def test_head_one_byte_over_max_size_is_431(max_size: int) -> None:
    head = _head_of_size(max_size + 1)
    with pytest.raises(HeadError) as info:
        parse_head(head, max_size=max_size)
    assert info.value.status == 431
    # ...and it was already hopeless once max_size bytes had arrived.
    with pytest.raises(HeadError):
        parse_head(head[:max_size], max_size=max_size)
    assert parse_head(head[: max_size - 1], max_size=max_size) is None


def test_only_the_first_max_size_bytes_count() -> None:
    """Nothing past max_size is looked at, not even an LF that would end the line."""
    with pytest.raises(HeadError) as info:
        parse_head(b"CONNECT a.example:0 HTTP/1.1\r\n\r\n", max_size=20)
    assert info.value.status == 431
    with pytest.raises(HeadError) as info:
        parse_head(OPENSSL, max_size=len(OPENSSL) - 1)
    assert info.value.status == 431


def test_request_line_limit() -> None:
    target = b"a" * (MAX_REQUEST_LINE - len(b"CONNECT :443 HTTP/1.1"))
    line = b"CONNECT " + target + b":443 HTTP/1.1"
    assert len(line) == MAX_REQUEST_LINE
    assert parse_head(line + b"\r\n\r\n") is not None
    too_long = b"CONNECT a" + target + b":443 HTTP/1.1\r\n\r\n"
    with pytest.raises(HeadError) as info:
        parse_head(too_long)
    assert info.value.status == 414
    # A bad byte within the limit is reported as such, complete line or not.
    for buf in (line[:-1] + b"\x01\r\n\r\n", line[:-1] + b"\x01xx\r\n", line[:-1] + b"\x01xx"):
        with pytest.raises(HeadError) as info:
            parse_head(buf)
        assert info.value.detail == "invalid byte in request line"


def test_header_count_limit() -> None:
    assert parse_head(_with_headers(MAX_HEADERS)) is not None
    with pytest.raises(HeadError) as info:
        parse_head(_with_headers(MAX_HEADERS + 1))
    assert (info.value.status, info.value.reason) == (431, "too_many_headers")


# -- credentials never leak ----------------------------------------------------------

LEAKY_TEMPLATES = [
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\r\n"
    b"Proxy-Authorization: Basic %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\x00\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\x7f\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\rX\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\nX: y\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization : Basic %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy Authorization: Basic %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic\r\n %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nBasic %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\r\nHost: b.example\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nHost: %s\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic %s\r\nContent-Length: 0\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\nX-Token: %s\x01\r\n\r\n",
    b"CONNECT u:%s@a.example:443 HTTP/1.1\r\n\r\n",
    b"CONNECT %s@a.example:x HTTP/1.1\r\n\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\n"
    + b"X: y\r\n" * MAX_HEADERS
    + b"Proxy-Authorization: Basic %s\r\n\r\n",
]


@settings(max_examples=300)
@given(
    secret=st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
        min_size=12,
        max_size=60,
    ),
    template=st.sampled_from(LEAKY_TEMPLATES),
)
def test_credentials_never_appear_in_errors(secret: str, template: bytes) -> None:
    raw = secret.encode()
    head = template.replace(b"%s", raw)
    with pytest.raises(HeadError) as info:
        parse_head(head)
    e = info.value
    for text in (
        e.detail,
        str(e),
        repr(e),
        response(e.status, e.detail, e.headers).decode("latin-1"),
    ):
        assert secret not in text


def test_repr_of_request_hides_proxy_authorization() -> None:
    req = parse_head(KONG)
    assert req is not None
    assert "dTpw" not in repr(req)
    assert req.proxy_authorization == b"Basic dTpw"


def test_ipv6_target_keeps_its_brackets() -> None:
    req = parse_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
    assert req is not None and (req.host, req.port) == ("[::1]", 8443)


# -- responses -----------------------------------------------------------------------


def test_established_is_exactly_what_kong_expects() -> None:
    assert ESTABLISHED == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert ESTABLISHED.startswith(b"HTTP/1.1 200 ")


def test_response_example() -> None:
    assert response(403, "host not in Konnect allowlist: evil.com:443") == (
        b"HTTP/1.1 403 Forbidden\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 48\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"403 host not in Konnect allowlist: evil.com:443\n"
    )


def test_head_error_response_carries_its_headers() -> None:
    with pytest.raises(HeadError) as info:
        parse_head(b"GET / HTTP/1.1\r\n\r\n")
    data = response(info.value.status, info.value.detail, info.value.headers)
    assert data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: CONNECT\r\n\r\n405 method GET" in data


def test_head_error_for_timeout_is_constructible() -> None:
    e = HeadError(408, "head_timeout", "request head not received within 10 s")
    assert response(e.status, e.detail, e.headers).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert str(e) == "408 head_timeout: request head not received within 10 s"


@pytest.mark.parametrize(
    "headers",
    [
        [("Allow", "CONNECT\r\nSet-Cookie: x")],
        [("Allow\r\nX", "CONNECT")],
        [("", "x")],
        [("X", "a\nb")],
        [("X", "a\x00b")],
        [("Bad Name", "x")],
    ],
)
def test_response_refuses_header_injection(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        response(400, "x", headers)


def test_response_refuses_unknown_status() -> None:
    with pytest.raises(ValueError):
        response(799, "x")


class _ReadOnlySocket:
    """Just enough of a socket for http.client to read a response from bytes."""

    def __init__(self, data: bytes) -> None:
        self.file = io.BytesIO(data)

    def makefile(self, mode: str, *args: object, **kwargs: object) -> io.BytesIO:
        return self.file


STATUSES = [400, 403, 405, 407, 408, 414, 429, 431, 500, 502, 503, 504, 505]


@settings(max_examples=300)
@given(
    status=st.sampled_from(STATUSES),
    detail=st.text(max_size=300),
    headers=st.lists(
        st.tuples(
            st.sampled_from(["Allow", "Proxy-Authenticate", "Retry-After", "X-Reason"]),
            st.text(
                alphabet=st.characters(
                    min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"
                ),
                max_size=40,
            ),
        ),
        max_size=3,
    ),
)
@example(
    status=407,
    detail="proxy authentication required",
    headers=[("Proxy-Authenticate", 'Basic realm="konnect-relay"')],
)
@example(status=400, detail="two\r\nlines\x00", headers=[])
def test_response_is_well_formed(status: int, detail: str, headers: list[tuple[str, str]]) -> None:
    data = response(status, detail, headers)
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep
    # Every line of the head ends with CRLF; no stray CR or LF anywhere in it.
    assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n")
    assert body.endswith(b"\n") and body.count(b"\n") == 1 and b"\r" not in body
    assert body.startswith(b"%d " % status)

    sock = _ReadOnlySocket(data)
    r = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    r.begin()
    try:
        assert r.version == 11
        assert r.status == status
        assert r.getheader("Content-Length") == str(len(body))
        assert r.getheader("Connection") == "close"
        assert r.getheader("Content-Type") == "text/plain; charset=utf-8"
        for name, value in headers:
            assert value.strip() in (r.getheader(name) or "")
        assert r.read() == body
        assert len(data) == len(head) + 4 + int(r.getheader("Content-Length") or -1)
    finally:
        r.close()


# -- properties over arbitrary and mutated input -------------------------------------

SEEDS = [KONG, KONG_NO_AUTH, OPENSSL, DECK, GRPC_GO, CURL, H2_PREFACE]
INTERESTING = b"\r\n \t:\x00\x01\x7f\x80\xff[]@%+-/0123456789HTPCONE"


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A real head with a few bytes inserted, deleted or replaced, plus early bytes."""
    buf = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        byte = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        if op == "insert":
            buf.insert(pos, byte)
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        elif op == "replace" and pos < len(buf):
            buf[pos] = byte
        elif op == "duplicate":
            end = draw(st.integers(pos, min(len(buf), pos + 40)))
            buf[pos:pos] = buf[pos:end]
    buf += draw(st.binary(max_size=20))
    return bytes(buf)


any_input = st.one_of(st.binary(max_size=400), mutated_heads())


def _checked(
    buf: bytes | bytearray, max_size: int = MAX_HEAD_SIZE
) -> ConnectRequest | HeadError | None:
    try:
        result = parse_head(buf, max_size=max_size)
    except HeadError as e:
        _check_error(e)
        return e
    assert result is None or isinstance(result, ConnectRequest)
    return result


@settings(max_examples=1000)
@given(buf=any_input)
def test_only_none_request_or_head_error(buf: bytes) -> None:
    result = _checked(buf)
    if isinstance(result, ConnectRequest):
        assert 1 <= result.port <= 65535
        assert result.version in ("HTTP/1.0", "HTTP/1.1")
        assert result.host.isascii() and result.host.isprintable() and " " not in result.host


@settings(max_examples=500)
@given(buf=any_input, max_size=st.integers(1, 400))
def test_never_accepts_a_head_longer_than_max_size(buf: bytes, max_size: int) -> None:
    result = _checked(buf, max_size)
    if isinstance(result, ConnectRequest):
        assert result.head_length <= max_size
    if result is None:
        assert len(buf) < max_size


_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SPECIAL = {"host", "proxy-authorization", "user-agent", "content-length", "transfer-encoding"}
# field-vchar = VCHAR / obs-text (RFC 9110 §5.5)
_VCHARS = st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f")
_OWS = st.sampled_from(["", " ", "\t", " \t"])


@st.composite
def _field_value(draw: st.DrawFn) -> str:
    """field-value: vchars, with SP/HTAB runs only between them."""
    words = draw(st.lists(st.text(_VCHARS, min_size=1, max_size=12), max_size=4))
    gaps = [draw(st.sampled_from([" ", "\t", " \t "])) for _ in words[1:]]
    return words[0] + "".join(g + w for g, w in zip(gaps, words[1:], strict=True)) if words else ""


def _mixed_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(text, flips, strict=True))


@st.composite
def valid_heads(draw: st.DrawFn) -> tuple[bytes, Ok, int]:
    """A well-formed CONNECT head built from parts, its expected parse, its length."""
    if draw(st.booleans()):
        host = draw(st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True))
    else:
        host = f"[{draw(st.ip_addresses(v=6))}]"
    port = draw(st.integers(1, 65535))
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    target = f"{host}:{port}"
    fields: list[tuple[str, str]] = [
        (name, draw(_field_value()))
        for name in draw(st.lists(st.text(_TCHARS, min_size=1, max_size=20), max_size=8))
        if name.lower() not in _SPECIAL
    ]
    auth = draw(st.none() | _field_value())
    agent = draw(st.none() | _field_value())
    if auth is not None:
        fields.append((_mixed_case(draw, "proxy-authorization"), auth))
    if agent is not None:
        fields.append((_mixed_case(draw, "user-agent"), agent))
    if draw(st.booleans()):
        fields.append(
            (_mixed_case(draw, "host"), _mixed_case(draw, draw(st.sampled_from([target, host]))))
        )
    fields = draw(st.permutations(fields))
    lines = [f"CONNECT {target} {version}"]
    for name, value in fields:
        lines.append(f"{name}:{draw(_OWS)}{value}{draw(_OWS)}")
    head = ("\r\n" if draw(st.booleans()) else "") + "\r\n".join(lines) + "\r\n\r\n"
    raw = head.encode("latin-1")
    early = draw(st.binary(max_size=30))
    expected = Ok(
        host,
        port,
        version,
        None if auth is None else auth.encode("latin-1"),
        agent,
    )
    return raw + early, expected, len(raw)


@settings(max_examples=300)
@given(case=valid_heads())
def test_generated_heads_round_trip(case: tuple[bytes, Ok, int]) -> None:
    buf, expected, head_length = case
    assert parse_head(buf) == ConnectRequest(
        host=expected.host,
        port=expected.port,
        version=expected.version,
        proxy_authorization=expected.proxy_authorization,
        user_agent=expected.user_agent,
        head_length=head_length,
    )


@settings(max_examples=500)
@given(buf=any_input | valid_heads().map(lambda case: case[0]))
@example(buf=KONG + b"\x16\x03\x01")
def test_accepted_head_stands_alone(buf: bytes) -> None:
    result = _checked(buf)
    if not isinstance(result, ConnectRequest):
        return
    assert result.head_length <= len(buf)
    assert parse_head(buf[: result.head_length]) == result
    assert parse_head(buf[: result.head_length - 1]) is None


@settings(max_examples=1000)
@given(
    buf=any_input | valid_heads().map(lambda case: case[0]),
    max_size=st.just(MAX_HEAD_SIZE) | st.integers(1, 200),
    data=st.data(),
)
def test_prefix_is_undecided_or_agrees(buf: bytes, max_size: int, data: st.DataObject) -> None:
    """Calling again as bytes arrive can never change a decision already made."""
    cut = data.draw(st.integers(0, len(buf)))
    before = _outcome(buf[:cut], max_size=max_size)
    if before is not None:
        assert _outcome(buf, max_size=max_size) == before


# -- cost ----------------------------------------------------------------------------


def test_parse_rate() -> None:
    """Well above the 7,000 heads/s the relay needs from one core, parser included."""
    heads = [bytearray(KONG), bytearray(DECK), bytearray(OPENSSL)] * 2500
    t0 = time.perf_counter()
    for head in heads:
        parse_head(head)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{len(heads)} heads in {elapsed:.3f} s"


def test_byte_at_a_time_head_is_cheap() -> None:
    """A client dribbling a maximal head one byte per read costs linear finds, not more."""
    head = _head_of_size(MAX_HEAD_SIZE)
    buf = bytearray()
    t0 = time.perf_counter()
    for i in range(len(head) - 1):
        buf.append(head[i])
        assert parse_head(buf) is None
    buf.append(head[-1])
    assert parse_head(buf) is not None
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"{elapsed:.3f} s"
