"""The parent proxy's response-head parser and the CONNECT request it is sent."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from relay.egress.http_proxy import (
    MAX_HEAD_SIZE,
    ParentHeadError,
    build_request,
    parse_response_head,
)
from tests.support.relay import CP_HOST

CP_TARGET = f"{CP_HOST}:443"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", (200, "Connection established", 39)),
        (b"HTTP/1.0 200 OK\r\nVia: 1.1 squid\r\n\r\nTLS", (200, "OK", 35)),
        (b"HTTP/1.1 204\r\n\r\n", (204, "", 16)),
        (b"HTTP/1.1 200 \r\n\r\n", (200, "", 17)),
        (b"HTTP/1.1 200 OK\n\n", (200, "OK", 17)),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\n", "incomplete"),
        (b"HTTP/1.", "incomplete"),
        (b"", "incomplete"),
        (b"HTTP/2 200\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\x00\r\n\r\n", "malformed status line"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x response"),
        (b"\x16\x03\x01\x00", "not an HTTP/1.x response"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_SIZE, "exceeds 16 KiB"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n", "exceeds 16 KiB"),
    ],
)
def test_parse_response_head(head: bytes, expected: Any) -> None:
    if expected is None:
        status, reason, length = parse_response_head(head)  # type: ignore[misc]
        assert (status, reason, length) == (407, "Proxy Authentication Required", len(head))
    elif expected == "incomplete":
        assert parse_response_head(head) is None
    elif isinstance(expected, str):
        with pytest.raises(ParentHeadError, match=expected):
            parse_response_head(head)
    else:
        assert parse_response_head(head) == expected


@pytest.mark.parametrize(
    ("authority", "credentials", "expected"),
    [
        (CP_TARGET, None, f"CONNECT {CP_TARGET} HTTP/1.1\r\nHost: {CP_TARGET}\r\n\r\n"),
        (
            "[2001:db8::1]:443",
            ("user", "pass"),
            "CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"
            "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n",
        ),
        (
            "a.example:443",
            ("d\u00e9j\u00e0", None),
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n"
            f"Proxy-Authorization: Basic {base64.b64encode('déjà:'.encode()).decode()}\r\n\r\n",
        ),
    ],
)
def test_build_request(
    authority: str, credentials: tuple[str, str | None] | None, expected: str
) -> None:
    assert build_request(authority, credentials) == expected.encode()
