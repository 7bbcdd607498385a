"""Tests for relay.proxyproto: tables of valid and invalid v1 lines and v2 headers,
every split point of each valid one, and property tests over arbitrary bytes and
generated headers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.proxyproto import (
    MAX_HEADER,
    MAX_V2_LENGTH,
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

REST = b"CONNECT a.eu.cp0.konghq.com:443 HTTP/1.1\r\n"


def v2(
    command: int = 1,
    family: int = 0x11,
    block: bytes = b"",
    tlvs: bytes = b"",
    *,
    version: int = 2,
    length: int | None = None,
    signature: bytes = V2_SIGNATURE,
) -> bytes:
    """A v2 header: signature, version/command, family/transport, length, body."""
    body = block + tlvs
    size = len(body) if length is None else length
    return signature + bytes([version << 4 | command, family]) + size.to_bytes(2, "big") + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An AF_INET or AF_INET6 address block (spec §2.2: addresses, then ports)."""
    return (
        ipaddress.ip_address(src).packed
        + ipaddress.ip_address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


V4_BLOCK = inet("192.0.2.10", "198.51.100.1", 56324, 3128)
V6_BLOCK = inet("2001:db8::10", "2001:db8::1", 40000, 3128)
UNIX_BLOCK = b"/run/lb.sock".ljust(108, b"\x00") + b"/run/relay.sock".ljust(108, b"\x00")
SSL_TLV = tlv(
    0x20,
    b"\x07" + bytes(4) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"dp-1") + tlv(0x23, b"TLS_AES"),
)
V4 = (("192.0.2.10", 56324), ("198.51.100.1", 3128))
V6 = (("2001:db8::10", 40000), ("2001:db8::1", 3128))
LOCAL = (None, None)

FFFF6 = ":".join(["ffff"] * 8)
UNKNOWN_107 = b"PROXY UNKNOWN " + FFFF6.encode() + b" " + FFFF6.encode() + b" 65535 65535\r\n"

VALID: list[object] = [
    # --- v1 ---
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 3128\r\n", 1, V4, id="v1-tcp4"),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        1,
        (("255.255.255.255", 65535), ("255.255.255.255", 65535)),
        id="v1-tcp4-longest",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n",
        1,
        (("0.0.0.0", 0), ("10.0.0.1", 0)),
        id="v1-tcp4-zeros",
    ),
    pytest.param(b"PROXY TCP6 2001:db8::10 2001:db8::1 40000 3128\r\n", 1, V6, id="v1-tcp6"),
    pytest.param(
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:10 2001:0db8::0001 40000 3128\r\n",
        1,
        V6,
        id="v1-tcp6-normalised",
    ),
    pytest.param(
        b"PROXY TCP6 " + FFFF6.encode() + b" ::1 65535 1\r\n",
        1,
        ((FFFF6, 65535), ("::1", 1)),
        id="v1-tcp6-longest-address",
    ),
    pytest.param(b"PROXY TCP6 :: ::1 1 2\r\n", 1, (("::", 1), ("::1", 2)), id="v1-tcp6-any"),
    pytest.param(b"PROXY UNKNOWN\r\n", 1, LOCAL, id="v1-unknown-short"),
    pytest.param(b"PROXY UNKNOWN whatever 1 2\r\n", 1, LOCAL, id="v1-unknown-long"),
    pytest.param(UNKNOWN_107, 1, LOCAL, id="v1-unknown-107-bytes"),
    # --- v2 ---
    pytest.param(v2(1, 0x11, V4_BLOCK), 2, V4, id="v2-tcp4"),
    pytest.param(v2(1, 0x21, V6_BLOCK), 2, V6, id="v2-tcp6"),
    pytest.param(
        v2(1, 0x11, V4_BLOCK, tlv(0x01, b"h2") + tlv(0x02, b"a.eu.cp0.konghq.com")),
        2,
        V4,
        id="v2-tcp4-alpn-authority",
    ),
    pytest.param(v2(1, 0x21, V6_BLOCK, SSL_TLV), 2, V6, id="v2-tcp6-ssl-tlv"),
    pytest.param(v2(1, 0x11, V4_BLOCK, tlv(0x04, b"")), 2, V4, id="v2-empty-noop-tlv"),
    pytest.param(
        v2(1, 0x11, V4_BLOCK, tlv(0xEA, b"\x01vpce-0123456789abcdef0")),
        2,
        V4,
        id="v2-aws-vpce-tlv",
    ),
    pytest.param(
        v2(1, 0x11, V4_BLOCK, tlv(0x04, bytes(MAX_V2_LENGTH - 16 - 12 - 3))),
        2,
        V4,
        id="v2-at-max-length",
    ),
    pytest.param(v2(0, 0x00), 2, LOCAL, id="v2-local-health-check"),
    pytest.param(v2(0, 0x11, V4_BLOCK), 2, LOCAL, id="v2-local-ignores-addresses"),
    pytest.param(v2(0, 0xFF, b"\x00" * 5), 2, LOCAL, id="v2-local-ignores-family"),
    pytest.param(v2(0, 0x11, b"\x01\x02"), 2, LOCAL, id="v2-local-ignores-block"),
    pytest.param(v2(1, 0x00), 2, LOCAL, id="v2-proxy-unspec"),
    pytest.param(v2(1, 0x00, b"opaque"), 2, LOCAL, id="v2-proxy-unspec-with-bytes"),
    pytest.param(v2(1, 0x31, UNIX_BLOCK), 2, LOCAL, id="v2-unix-stream"),
    pytest.param(v2(1, 0x31, UNIX_BLOCK, tlv(0x05, b"id")), 2, LOCAL, id="v2-unix-tlv"),
]


@pytest.mark.parametrize(("header", "version", "addresses"), VALID)
def test_valid(
    header: bytes,
    version: int,
    addresses: tuple[tuple[str, int] | None, tuple[str, int] | None],
) -> None:
    source, destination = addresses
    expected = ProxyHeader(
        version=version,
        local=source is None,
        source=source,
        destination=destination,
        length=len(header),
    )
    assert parse(header) == expected
    # What follows belongs to the client and is left alone.
    assert parse(header + REST) == expected
    assert parse(bytearray(header + REST)) == expected
    # Every proper prefix asks for more bytes.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


def test_v1_embedded_ipv4() -> None:
    # inet_ntop writes v4-mapped addresses with a dotted tail (HAProxy on a
    # dual-stack bind does this).
    result = parse(b"PROXY TCP6 ::ffff:192.0.2.10 ::ffff:198.51.100.1 1 2\r\n")
    assert result is not None and result.source is not None
    assert ipaddress.ip_address(result.source[0]) == ipaddress.ip_address("::ffff:192.0.2.10")


INVALID_V1 = [
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 3128\n", id="bare-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 3128\r\r\n", id="cr-cr-lf"),
    pytest.param(b"PROXY TCP4 192.0.2.10\r198.51.100.1 56324 3128\r\n", id="bare-cr"),
    pytest.param(b"PROXY UNKNOWN\n", id="unknown-bare-lf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 93, id="no-crlf-in-107"),
    pytest.param(UNKNOWN_107[:-2] + b"x\r\n", id="108-byte-line"),
    pytest.param(
        b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 3128 " + b" " * 60 + b"\r\n", id="long"
    ),
    pytest.param(b"PROXY\r\n", id="no-protocol"),
    pytest.param(b"PROXY \r\n", id="empty-protocol"),
    pytest.param(b"PROXY UNKNOWNX\r\n", id="unknown-suffix"),
    pytest.param(b"PROXY unknown\r\n", id="unknown-lowercase"),
    pytest.param(b"PROXY TCP5 192.0.2.10 198.51.100.1 1 2\r\n", id="bad-family"),
    pytest.param(b"PROXY UDP4 192.0.2.10 198.51.100.1 1 2\r\n", id="udp"),
    pytest.param(b"PROXY tcp4 192.0.2.10 198.51.100.1 1 2\r\n", id="family-lowercase"),
    pytest.param(b"proxy TCP4 192.0.2.10 198.51.100.1 1 2\r\n", id="keyword-lowercase"),
    pytest.param(b"PROXY TCP4\r\n", id="no-addresses"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 1\r\n", id="missing-port"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2 3\r\n", id="extra-field"),
    pytest.param(b"PROXY TCP4  192.0.2.10 198.51.100.1 1 2\r\n", id="double-space"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2 \r\n", id="trailing-space"),
    pytest.param(b"PROXY  TCP4 192.0.2.10 198.51.100.1 1 2\r\n", id="double-space-first"),
    pytest.param(b"PROXY TCP4 192.0.2.10\t198.51.100.1 1 2\r\n", id="tab"),
    pytest.param(b"PROXY TCP4 192.0.2.010 198.51.100.1 1 2\r\n", id="v4-leading-zero"),
    pytest.param(b"PROXY TCP4 00.0.0.1 198.51.100.1 1 2\r\n", id="v4-double-zero"),
    pytest.param(b"PROXY TCP4 256.0.2.10 198.51.100.1 1 2\r\n", id="v4-octet-256"),
    pytest.param(b"PROXY TCP4 192.0.2 198.51.100.1 1 2\r\n", id="v4-three-octets"),
    pytest.param(b"PROXY TCP4 192.0.2.10.1 198.51.100.1 1 2\r\n", id="v4-five-octets"),
    pytest.param(b"PROXY TCP4 3221225994 198.51.100.1 1 2\r\n", id="v4-integer"),
    pytest.param(b"PROXY TCP4 0x7f.0.0.1 198.51.100.1 1 2\r\n", id="v4-hex"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100. 1 2\r\n", id="v4-trailing-dot"),
    pytest.param(b"PROXY TCP4 2001:db8::10 198.51.100.1 1 2\r\n", id="v6-in-tcp4"),
    pytest.param(b"PROXY TCP6 192.0.2.10 2001:db8::1 1 2\r\n", id="v4-in-tcp6"),
    pytest.param(b"PROXY TCP6 2001:db8::10 2001:db8::1%eth0 1 2\r\n", id="v6-zone"),
    pytest.param(b"PROXY TCP6 [2001:db8::10] 2001:db8::1 1 2\r\n", id="v6-brackets"),
    pytest.param(b"PROXY TCP6 2001:db8::10::1 2001:db8::1 1 2\r\n", id="v6-two-double-colons"),
    pytest.param(b"PROXY TCP6 2001:db8:1:2:3:4:5:6:7 ::1 1 2\r\n", id="v6-nine-groups"),
    pytest.param(b"PROXY TCP6 2001:db8:00001::1 ::1 1 2\r\n", id="v6-five-digit-group"),
    pytest.param(b"PROXY TCP6 ::ffff:192.0.2.010 ::1 1 2\r\n", id="v6-v4-tail-leading-zero"),
    pytest.param(b"PROXY TCP6 g::1 ::1 1 2\r\n", id="v6-non-hex"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 0443 3128\r\n", id="port-leading-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 00 3128\r\n", id="port-double-zero"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 +443 3128\r\n", id="port-plus"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 3128\r\n", id="port-minus"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 3128\r\n", id="port-65536"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 100000 3128\r\n", id="port-six-digits"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 443a 3128\r\n", id="port-suffix"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 1_0 3128\r\n", id="port-underscore"),
    pytest.param("PROXY TCP4 192.0.2.10 198.51.100.1 \u0661 2\r\n".encode(), id="port-arabic"),
    pytest.param(b"PROXY TCP4 192.0.2.10 198.51.100.1 1 2\x00\r\n", id="nul"),
    pytest.param(b"PROXY UNKNOWN \x00\r\n", id="unknown-nul"),
    pytest.param(b"PROXY UNKNOWN \xc3\xa9\r\n", id="unknown-non-ascii"),
]


@pytest.mark.parametrize("header", INVALID_V1)
def test_invalid_v1(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(header)
    assert info.value.detail == str(info.value)
    with pytest.raises(ProxyProtocolError):
        parse(header + REST)


V4_HDR = v2(1, 0x11, V4_BLOCK)

INVALID_V2 = [
    pytest.param(v2(1, 0x11, V4_BLOCK, version=1), id="version-1"),
    pytest.param(v2(1, 0x11, V4_BLOCK, version=3), id="version-3"),
    pytest.param(v2(1, 0x11, V4_BLOCK, version=0), id="version-0"),
    pytest.param(v2(1, 0x11, V4_BLOCK, version=0xF), id="version-15"),
    pytest.param(v2(2, 0x11, V4_BLOCK), id="command-2"),
    pytest.param(v2(0xF, 0x11, V4_BLOCK), id="command-15"),
    pytest.param(v2(1, 0x12, V4_BLOCK), id="udp4"),
    pytest.param(v2(1, 0x22, V6_BLOCK), id="udp6"),
    pytest.param(v2(1, 0x32, UNIX_BLOCK), id="unix-dgram"),
    pytest.param(v2(1, 0x01, V4_BLOCK), id="unspec-family-stream"),
    pytest.param(v2(1, 0x10, V4_BLOCK), id="inet-unspec-transport"),
    pytest.param(v2(1, 0x13, V4_BLOCK), id="transport-3"),
    pytest.param(v2(1, 0x41, V4_BLOCK), id="family-4"),
    pytest.param(v2(1, 0xFF, V4_BLOCK), id="family-ff"),
    pytest.param(v2(1, 0x11, V4_BLOCK[:11]), id="tcp4-short-block"),
    pytest.param(v2(1, 0x11), id="tcp4-no-block"),
    pytest.param(v2(1, 0x21, V4_BLOCK), id="tcp6-with-v4-block"),
    pytest.param(v2(1, 0x31, UNIX_BLOCK[:215]), id="unix-short-block"),
    pytest.param(v2(1, 0x11, V4_BLOCK, b"\x04"), id="tlv-one-byte"),
    pytest.param(v2(1, 0x11, V4_BLOCK, b"\x04\x00"), id="tlv-two-bytes"),
    pytest.param(v2(1, 0x11, V4_BLOCK, b"\x04\x00\x01"), id="tlv-value-missing"),
    pytest.param(v2(1, 0x11, V4_BLOCK, tlv(0x02, b"abc")[:-1]), id="tlv-value-short"),
    pytest.param(v2(1, 0x11, V4_BLOCK, tlv(0x04, b"") + b"\x01"), id="tlv-trailing-byte"),
    pytest.param(v2(1, 0x11, V4_BLOCK, b"\x20\xff\xff" + bytes(20)), id="tlv-length-ffff"),
    pytest.param(v2(1, 0x11, V4_BLOCK, length=0xFFFF), id="length-ffff"),
    pytest.param(v2(0, 0x00, length=MAX_V2_LENGTH - 15), id="local-over-max"),
    pytest.param(
        v2(1, 0x11, V4_BLOCK, tlv(0x04, bytes(MAX_V2_LENGTH - 16 - 12 - 2))), id="over-max"
    ),
    pytest.param(V4_HDR[:11] + b"\x0b" + V4_HDR[12:], id="signature-last-byte"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIT\r" + V4_HDR[12:], id="signature-cr"),
    pytest.param(b"\r\n\r\n" + V4_HDR[12:], id="signature-only-crlfcrlf"),
]


@pytest.mark.parametrize("header", INVALID_V2)
def test_invalid_v2(header: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(header)
    with pytest.raises(ProxyProtocolError):
        parse(header + REST)


@pytest.mark.parametrize("family", [0x12, 0x22, 0x32])
def test_datagram_named_in_error(family: int) -> None:
    with pytest.raises(ProxyProtocolError, match="datagram"):
        parse(v2(1, family, UNIX_BLOCK))


@pytest.mark.parametrize(
    ("prefix", "decided_at"),
    [
        pytest.param(v2(1, 0x11, V4_BLOCK, version=3), 13, id="version-at-byte-13"),
        pytest.param(v2(3, 0x11, V4_BLOCK), 13, id="command-at-byte-13"),
        pytest.param(v2(1, 0x12, V4_BLOCK), 16, id="dgram-at-byte-16"),
        pytest.param(v2(1, 0x11, V4_BLOCK[:8]), 16, id="short-block-at-byte-16"),
        pytest.param(v2(1, 0x11, length=0xFFFF), 16, id="too-long-at-byte-16"),
        pytest.param(b"PROXY TCP4 1.2.3.4\x00", 19, id="v1-nul-at-once"),
        pytest.param(b"PROXY TCP4 1.2.3.4\r 5", 20, id="v1-cr-not-followed-by-lf"),
        pytest.param(b"PROXY UNKNOWN " + b"x" * 200, V1_MAX, id="v1-no-crlf-at-107"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 1, id="http-at-byte-1"),
        pytest.param(b"CONNECT a:443 HTTP/1.1\r\n", 1, id="connect-at-byte-1"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01", 1, id="tls-at-byte-1"),
        pytest.param(b"PRI * HTTP/2.0\r\n", 3, id="h2-preface-at-byte-3"),
        pytest.param(b"PROXZ", 5, id="v1-keyword-at-byte-5"),
        pytest.param(b"PROXY\r\n", 6, id="v1-no-space-at-byte-6"),
        pytest.param(b"\r\n\r\nx", 5, id="v2-signature-at-byte-5"),
        pytest.param(b"\x00", 1, id="nul-at-byte-1"),
    ],
)
def test_refused_as_soon_as_decided(prefix: bytes, decided_at: int) -> None:
    """Bytes that cannot become a valid header are refused at the first byte that
    rules it out, without waiting for the rest."""
    for cut in range(decided_at):
        assert parse(prefix[:cut]) is None, cut
    with pytest.raises(ProxyProtocolError):
        parse(prefix[:decided_at])


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(v2(1, 0x11, V4_BLOCK), id="tcp4"),
        pytest.param(v2(1, 0x11, V4_BLOCK, SSL_TLV), id="tcp4-tlv"),
        pytest.param(v2(0, 0x00, b"x" * 100), id="local-with-bytes"),
    ],
)
def test_v2_length_past_buffer_waits(header: bytes) -> None:
    # The length field claims more than has arrived: wait, even with the whole
    # address block present.
    for cut in range(16, len(header)):
        assert parse(header[:cut]) is None


def test_empty_buffer_needs_more() -> None:
    assert parse(b"") is None
    assert parse(bytearray()) is None


def test_error_text_quotes_no_input() -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(b"PROXY TCP4 10.9.8.7 10.9.8.6 4242 3128 secret\r\n")
    assert "10.9.8.7" not in str(info.value)
    assert "secret" not in str(info.value)
    with pytest.raises(ProxyProtocolError) as info:
        parse(b"hello secret")
    assert "secret" not in repr(info.value)


def test_limits() -> None:
    assert V1_MAX == 107
    assert len(UNKNOWN_107) == V1_MAX
    assert V2_SIGNATURE == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    assert MAX_HEADER >= MAX_V2_LENGTH >= 16 + 216 + 255 + 128


# --- property tests --------------------------------------------------------------


def _check_any(buf: bytes) -> None:
    """Invariants the server relies on, for any input."""
    try:
        result = parse(buf)
    except ProxyProtocolError as exc:
        assert isinstance(exc.detail, str) and exc.detail
        # Once refused, more bytes cannot rescue it.
        with pytest.raises(ProxyProtocolError):
            parse(buf + b"\r\n")
        return
    if result is None:
        # Never more than MAX_HEADER bytes buffered waiting for a header.
        assert len(buf) < MAX_HEADER
        return
    assert result.version in (1, 2)
    assert 0 < result.length <= len(buf)
    assert result.local == (result.source is None) == (result.destination is None)
    for address in (result.source, result.destination):
        if address is not None:
            ipaddress.ip_address(address[0])
            assert 0 <= address[1] <= 65535
    # The answer depends on the header's bytes only.
    assert parse(buf[: result.length]) == result
    assert parse(buf[: result.length] + b"\xff" * 8) == result


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
@example(b"PROXY UNKNOWN\r\n")
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12))
def test_arbitrary_bytes(buf: bytes) -> None:
    _check_any(buf)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_after_v1_prefix(tail: bytes) -> None:
    _check_any(b"PROXY " + tail)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN", b""]),
    st.text(st.sampled_from("0123456789abcdefABCDEF.: \r\n%+-"), max_size=110),
)
def test_arbitrary_v1_text(protocol: bytes, text: str) -> None:
    _check_any(b"PROXY " + protocol + text.encode())


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))
def test_arbitrary_after_v2_signature(ver_cmd: int, family: int, rest: bytes) -> None:
    _check_any(V2_SIGNATURE + bytes([ver_cmd, family]) + rest)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([0x00, 0x11, 0x21, 0x31]),
    st.integers(0, 1),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(max_size=80),
)
def test_arbitrary_v2_tlvs(
    family: int, command: int, tlvs: list[tuple[int, bytes]], rest: bytes
) -> None:
    block = {0x00: b"", 0x11: V4_BLOCK, 0x21: V6_BLOCK, 0x31: UNIX_BLOCK}[family]
    body = b"".join(tlv(kind, value) for kind, value in tlvs)
    header = v2(command, family, block, body)
    assert parse(header + rest) == parse(header)
    _check_any(header + rest)


ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid header of any kind, with the ProxyHeader it must parse to."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    family = 6 if kind.endswith("6") else 4
    src = draw(ipv6s if family == 6 else ipv4s)
    dst = draw(ipv6s if family == 6 else ipv4s)
    sport, dport = draw(ports), draw(ports)
    addresses = ((str(src), sport), (str(dst), dport))
    if kind == "v1-unknown":
        line = b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" ", b" x y 1 2"])) + b"\r\n"
        return line, ProxyHeader(1, True, None, None, len(line))
    if kind.startswith("v1"):
        line = f"PROXY TCP{family} {src} {dst} {sport} {dport}\r\n".encode()
        return line, ProxyHeader(1, False, *addresses, len(line))
    tlvs = b"".join(
        tlv(k, v)
        for k, v in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=30)), max_size=3)
        )
    )
    if kind == "v2-local":
        header = v2(0, draw(st.integers(0, 255)), draw(st.binary(max_size=40)))
        return header, ProxyHeader(2, True, None, None, len(header))
    block = inet(str(src), str(dst), sport, dport)
    header = v2(1, 0x21 if family == 6 else 0x11, block, tlvs)
    return header, ProxyHeader(2, False, *addresses, len(header))


@settings(max_examples=500, deadline=None)
@given(headers(), st.binary(max_size=40), st.data())
def test_generated_headers_and_their_prefixes(
    case: tuple[bytes, ProxyHeader], rest: bytes, data: st.DataObject
) -> None:
    header, expected = case
    assert parse(header) == expected
    assert parse(header + rest) == expected
    cut = data.draw(st.integers(0, len(header) - 1), label="cut")
    assert parse(header[:cut]) is None
