"""Tests for relay.tlspeek: real ClientHellos from Python's ssl module and openssl,
hand-built edge cases for every length field, and property tests."""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.tlspeek import (
    _HOST_NAME,
    ALERT_ACCESS_DENIED,
    ALERT_DECODE_ERROR,
    ALERT_HANDSHAKE_FAILURE,
    ALERT_INTERNAL_ERROR,
    ALERT_PROTOCOL_VERSION,
    ALERT_UNRECOGNIZED_NAME,
    MAX_CLIENT_HELLO,
    ClientHello,
    PeekError,
    _host_name,
    _one_record,
    _parse_records,
    alert,
    looks_like_tls,
    parse_client_hello,
)

# --- real ClientHellos -----------------------------------------------------------


@functools.cache
def capture(
    server_hostname: str | None,
    *,
    alpn: tuple[str, ...] = (),
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight Python's ssl module (OpenSSL) sends for these settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@functools.cache
def capture_tls10() -> bytes:
    """A TLS 1.0-only hello: legacy_version 0x0301, no supported_versions."""
    with warnings.catch_warnings():
        # Setting TLSv1 is deprecated; that is the point of this capture.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="old.example")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    except ssl.SSLError as exc:  # an OpenSSL built without TLS 1.0
        pytest.skip(f"TLS 1.0 unavailable: {exc}")
    return outgoing.read()


def message_of(stream: bytes) -> bytes:
    """The handshake message inside a single-record capture."""
    assert stream[0] == 22
    assert len(stream) == 5 + int.from_bytes(stream[3:5])
    return stream[5:]


TLS13 = 0x0304
TLS12 = 0x0303
LONG_NAME = ".".join(c * 63 for c in "abcd")  # 255 characters, 63-octet labels

REAL_CASES: list[tuple[str | None, tuple[str, ...], ssl.TLSVersion | None, str | None]] = [
    # (server_hostname, alpn, max_version, expected server_name)
    ("example.com", (), None, "example.com"),
    ("x.eu.cp0.konghq.com", ("http/1.1",), None, "x.eu.cp0.konghq.com"),
    ("Example.COM", (), None, "example.com"),
    ("example.com.", (), None, "example.com"),
    ("xn--bcher-kva.example", (), None, "xn--bcher-kva.example"),
    ("bücher.example", (), None, "xn--bcher-kva.example"),  # ssl sends the A-label
    ("localhost", (), None, "localhost"),
    (LONG_NAME, (), None, LONG_NAME),
    ("eu.mesh.sync.konghq.com", ("h2",), None, "eu.mesh.sync.konghq.com"),
    ("us.api.konghq.com", ("h2", "http/1.1"), ssl.TLSVersion.TLSv1_2, "us.api.konghq.com"),
    ("x.us.tp0.konghq.com", (), ssl.TLSVersion.TLSv1_2, "x.us.tp0.konghq.com"),
    # Python omits SNI for IP addresses (RFC 6066 §3 forbids literal addresses).
    ("127.0.0.1", (), None, None),
    ("::1", ("h2",), None, None),
    ("192.0.2.1", (), ssl.TLSVersion.TLSv1_2, None),
    (None, (), None, None),
]


@pytest.mark.parametrize(("host", "alpn", "max_version", "expected"), REAL_CASES)
def test_real_client_hello(
    host: str | None,
    alpn: tuple[str, ...],
    max_version: ssl.TLSVersion | None,
    expected: str | None,
) -> None:
    stream = capture(host, alpn=alpn, max_version=max_version)
    hello = parse_client_hello(stream)
    assert hello is not None
    assert hello.server_name == expected
    assert hello.alpn == alpn
    assert hello.legacy_version == TLS12
    assert hello.record_bytes == len(stream)
    if max_version == ssl.TLSVersion.TLSv1_2:
        assert hello.supported_versions == ()
    else:
        assert hello.supported_versions[0] == TLS13
        assert TLS12 in hello.supported_versions


def test_real_tls10_client_hello() -> None:
    stream = capture_tls10()
    hello = parse_client_hello(stream)
    assert hello == ClientHello(
        server_name="old.example",
        alpn=(),
        legacy_version=0x0301,
        supported_versions=(),
        record_bytes=len(stream),
    )


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffer_types(kind: type[bytes | bytearray | memoryview]) -> None:
    stream = capture("example.com", alpn=("h2",))
    fragmented = records(message_of(stream), [100, 100, 1000])
    for data in (stream, fragmented):
        buf = kind(data)
        hello = parse_client_hello(buf)
        assert hello is not None
        assert hello.server_name == "example.com"
        assert hello.record_bytes == len(data)
        # No buffer export outlives the call: a bytearray can still grow.
        if isinstance(buf, bytearray):
            buf += b"more"


def test_bytes_after_the_hello_are_ignored() -> None:
    stream = capture("example.com")
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    for tail in (change_cipher_spec, b"\x17\x03\x03\x40\x00" + b"x" * 100, b"\xff" * 40000):
        hello = parse_client_hello(stream + tail)
        assert hello == parse_client_hello(stream)
        assert hello is not None
        assert hello.record_bytes == len(stream)


@pytest.mark.parametrize("host", ["example.com", "127.0.0.1", LONG_NAME])
def test_split_at_every_tcp_offset(host: str) -> None:
    stream = capture(host, alpn=("h2", "http/1.1"))
    whole = parse_client_hello(stream)
    assert whole is not None
    for cut in range(len(stream)):
        assert parse_client_hello(stream[:cut]) is None, cut
    # The caller's accumulate-and-retry loop, one TCP segment per byte.
    buf = bytearray()
    results = []
    for byte in stream:
        buf.append(byte)
        results.append(parse_client_hello(buf))
    assert results[:-1] == [None] * (len(stream) - 1)
    assert results[-1] == whole


# --- builders for hand-made edge cases -------------------------------------------


def record(payload: bytes, *, content_type: int = 22, version: int = 0x0301) -> bytes:
    return bytes((content_type,)) + version.to_bytes(2) + len(payload).to_bytes(2) + payload


def records(message: bytes, sizes: Sequence[int], *, version: int = 0x0301) -> bytes:
    """`message` cut into handshake records of `sizes` (the last takes the rest)."""
    out = bytearray()
    pos = 0
    for size in sizes:
        if pos >= len(message):
            break
        out += record(message[pos : pos + size], version=version)
        pos += size
    if pos < len(message):
        out += record(message[pos:], version=version)
    return bytes(out)


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3) + body


def vec8(data: bytes) -> bytes:
    return len(data).to_bytes(1) + data


def vec16(data: bytes) -> bytes:
    return len(data).to_bytes(2) + data


def ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2) + vec16(data)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec16(b"".join(bytes((name_type,)) + vec16(n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return ext(16, vec16(b"".join(vec8(n) for n in names)))


def versions_ext(*versions: int) -> bytes:
    return ext(43, vec8(b"".join(v.to_bytes(2) for v in versions)))


def body(
    extensions: bytes | None = None,
    *,
    version: int = TLS12,
    session_id: bytes = b"s" * 32,
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body (RFC 8446 §4.1.2); extensions=None leaves the field out."""
    out = version.to_bytes(2) + b"r" * 32 + vec8(session_id) + vec16(suites) + vec8(compression)
    if extensions is not None:
        out += vec16(extensions)
    return out


def hello(
    extensions: bytes | None = None,
    *,
    version: int = TLS12,
    session_id: bytes = b"s" * 32,
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    """A complete one-record ClientHello stream."""
    return record(
        handshake(
            body(
                extensions,
                version=version,
                session_id=session_id,
                suites=suites,
                compression=compression,
            )
        )
    )


def error_of(buf: bytes, **kwargs: int) -> PeekError:
    with pytest.raises(PeekError) as info:
        parse_client_hello(buf, **kwargs)
    return info.value


# --- fragmentation ---------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4, 7, 16, 100])
def test_fragmented_across_records(count: int) -> None:
    stream = capture("x.eu.cp0.konghq.com", alpn=("http/1.1",))
    message = message_of(stream)
    size = -(-len(message) // count)
    fragmented = records(message, [size] * count)
    record_count = -(-len(message) // size)
    assert 2 <= record_count <= count
    assert len(fragmented) == len(message) + 5 * record_count
    hello = parse_client_hello(fragmented)
    assert hello is not None
    assert hello.server_name == "x.eu.cp0.konghq.com"
    assert hello.alpn == ("http/1.1",)
    assert hello.record_bytes == len(fragmented)
    for cut in range(len(fragmented)):
        assert parse_client_hello(fragmented[:cut]) is None, cut


def test_one_byte_records_split_the_handshake_header() -> None:
    message = message_of(capture("example.com"))
    fragmented = records(message, [1] * len(message))
    assert len(fragmented) == 6 * len(message)
    hello = parse_client_hello(fragmented)
    assert hello is not None
    assert hello.server_name == "example.com"
    assert hello.record_bytes == len(fragmented)


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0302, 0x0303, 0x0304])
def test_record_versions_accepted(version: int) -> None:
    message = message_of(capture("example.com"))
    hello = parse_client_hello(records(message, [50], version=version))
    assert hello is not None
    assert hello.server_name == "example.com"


def test_hello_spanning_full_size_records() -> None:
    # A hello bigger than one record (2^14), as post-quantum key shares and big
    # session tickets can make it.
    padding = ext(0xFFCE, b"p" * 20000)
    message = handshake(body(sni(b"big.example") + padding))
    fragmented = records(message, [2**14] * 3)
    hello = parse_client_hello(fragmented)
    assert hello is not None
    assert hello.server_name == "big.example"
    assert hello.record_bytes == len(fragmented)


# --- not_tls: decided from the first three bytes ---------------------------------

NOT_TLS = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    # SSLv2-compatible ClientHello (RFC 5246 §E.2): two-byte header, high bit set.
    b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10" + bytes(37),
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert record
    b"\x17\x03\x03\x00\x05hello",  # application data
    b"\x14\x03\x03\x00\x01\x01",  # change_cipher_spec
    b"\x16\x02\x00\x00\x05",  # major version 2
    b"\x16\x03\x05\x00\x05",  # minor version past TLS 1.3
    b"\x16\xfe\xfd\x00\x05",  # DTLS 1.2
    b"\x00",
    b"\xff\xff\xff",
]


@pytest.mark.parametrize("data", NOT_TLS)
def test_not_tls(data: bytes) -> None:
    assert error_of(data).reason == "not_tls"
    assert not looks_like_tls(data[:3])
    # Decided on the first byte that rules TLS out, without waiting for more.
    first_bad = next(i for i in range(1, 4) if not looks_like_tls(data[:i]))
    assert error_of(data[:first_bad]).reason == "not_tls"
    assert parse_client_hello(data[: first_bad - 1]) is None


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", True),
        (b"\x16", True),
        (b"\x16\x03", True),
        (b"\x16\x03\x00", True),
        (b"\x16\x03\x01", True),
        (b"\x16\x03\x04", True),
        (b"\x16\x03\x05", False),
        (b"\x16\x02", False),
        (b"\x15", False),
        (b"G", False),
        (b"\x80", False),
    ],
)
def test_looks_like_tls(prefix: bytes, expected: bool) -> None:
    assert looks_like_tls(prefix) is expected


# --- not_client_hello ------------------------------------------------------------


@pytest.mark.parametrize("msg_type", [0, 2, 4, 8, 11, 20, 255])
def test_not_client_hello(msg_type: int) -> None:
    stream = record(handshake(b"\x03\x03" + bytes(70), msg_type=msg_type), version=0x0303)
    assert error_of(stream).reason == "not_client_hello"
    # Decided from the sixth byte, the handshake type.
    assert parse_client_hello(stream[:5]) is None
    assert error_of(stream[:6]).reason == "not_client_hello"


# --- too_large -------------------------------------------------------------------


def test_too_large_from_the_handshake_length_alone() -> None:
    header = b"\x16\x03\x01\x40\x00" + b"\x01" + (40000).to_bytes(3)
    assert error_of(header).reason == "too_large"
    assert parse_client_hello(header[:-1]) is None


def test_too_large_real_hello_with_padding() -> None:
    padding = ext(0xFFCE, b"p" * 40000)
    message = handshake(body(sni(b"big.example") + padding))
    fragmented = records(message, [2**14] * 3)
    assert error_of(fragmented).reason == "too_large"
    # Decided from the headers, before the bulk arrives.
    assert error_of(fragmented[:9]).reason == "too_large"
    hello = parse_client_hello(fragmented, max_size=64 * 1024)
    assert hello is not None
    assert hello.server_name == "big.example"


def test_too_large_counts_record_overhead() -> None:
    # 1-byte records cost 6 stream bytes per hello byte.
    message = message_of(capture("example.com"))
    fragmented = records(message, [1] * len(message))
    assert parse_client_hello(fragmented, max_size=len(fragmented)) is not None
    assert error_of(fragmented, max_size=len(fragmented) - 1).reason == "too_large"
    assert error_of(fragmented, max_size=len(message) + 5).reason == "too_large"


def test_max_size_boundary() -> None:
    stream = capture("example.com")
    assert parse_client_hello(stream, max_size=len(stream)) is not None
    assert error_of(stream, max_size=len(stream) - 1).reason == "too_large"


def test_default_limit() -> None:
    assert MAX_CLIENT_HELLO == 32 * 1024
    overhead = len(handshake(body(ext(0xFFCE, b""))))
    # A message of exactly the limit cannot fit once a record header is added.
    message = handshake(body(ext(0xFFCE, b"p" * (MAX_CLIENT_HELLO - overhead))))
    assert len(message) == MAX_CLIENT_HELLO
    assert error_of(records(message, [2**14] * 3)[:9]).reason == "too_large"
    message = handshake(body(ext(0xFFCE, b"p" * (MAX_CLIENT_HELLO - 400))))
    assert parse_client_hello(records(message, [2**14] * 3)) is not None


# --- malformed: every length field -----------------------------------------------

MALFORMED: list[tuple[str, bytes]] = [
    ("zero-length record", b"\x16\x03\x01\x00\x00"),
    ("record over 2^14", b"\x16\x03\x01\x40\x01"),
    ("empty ClientHello", record(handshake(b""))),
    ("ClientHello of one byte", record(handshake(b"\x03"))),
    ("legacy_version 2.0", hello(version=0x0200)),
    ("legacy_version 0x0000", hello(version=0x0000)),
    ("session id of 33", hello(session_id=b"s" * 33)),
    ("no cipher suites", hello(suites=b"")),
    ("odd cipher suites", hello(suites=b"\x13\x01\x13")),
    ("no compression methods", hello(compression=b"")),
    ("one byte of extensions length", record(handshake(body() + b"\x00"))),
    ("extensions past the end", record(handshake(body() + b"\x00\x10" + sni(b"a.b")[:5]))),
    ("bytes after extensions", record(handshake(body(sni(b"a.b")) + b"\x00"))),
    ("extension header cut", hello(b"\x00")),
    ("extension data past the end", hello(b"\x00\x00\x00\x09\x00\x07")),
    ("duplicate SNI extension", hello(sni(b"a.example") + sni(b"b.example"))),
    ("duplicate identical SNI extension", hello(sni(b"a.example") + sni(b"a.example"))),
    ("duplicate ALPN extension", hello(alpn_ext(b"h2") + alpn_ext(b"h2"))),
    ("duplicate unknown extension", hello(ext(0x1234, b"") + ext(0x1234, b""))),
    ("two host names", hello(sni(b"a.example", b"b.example"))),
    ("empty server_name extension", hello(ext(0, b""))),
    ("empty server_name_list", hello(ext(0, b"\x00\x00"))),
    ("server_name_list past the end", hello(ext(0, b"\x00\x09\x00\x00\x03abc"))),
    ("server_name_list short", hello(ext(0, b"\x00\x03\x00\x00\x03abc"))),
    ("bytes after server_name_list", hello(ext(0, vec16(b"\x00" + vec16(b"abc")) + b"x"))),
    ("host_name past the end", hello(ext(0, vec16(b"\x00\x00\x09abc")))),
    ("name type only", hello(ext(0, vec16(b"\x00")))),
    ("empty host_name", hello(sni(b""))),
    ("non-ASCII host_name", hello(sni("bücher.example".encode()))),
    ("Latin-1 host_name", hello(sni(b"b\xfccher.example"))),
    ("NUL in host_name", hello(sni(b"good.example\x00.evil.example"))),
    ("space in host_name", hello(sni(b"a b.example"))),
    ("DEL in host_name", hello(sni(b"a\x7f.example"))),
    ("host_name is a dot", hello(sni(b"."))),
    ("host_name with empty label", hello(sni(b"a..example"))),
    ("host_name with two trailing dots", hello(sni(b"a.example.."))),
    ("host_name with leading dot", hello(sni(b".a.example"))),
    ("two names of an unknown type", hello(ext(0, vec16(b"\x01\x00\x01a\x01\x00\x01b")))),
    ("empty ALPN extension", hello(ext(16, b""))),
    ("empty protocol_name_list", hello(ext(16, b"\x00\x00"))),
    ("empty protocol name", hello(alpn_ext(b"h2", b""))),
    ("protocol name past the end", hello(ext(16, vec16(b"\x05h2")))),
    ("bytes after protocol_name_list", hello(ext(16, vec16(vec8(b"h2")) + b"x"))),
    ("empty supported_versions extension", hello(ext(43, b""))),
    ("empty supported_versions", hello(ext(43, b"\x00"))),
    ("odd supported_versions", hello(ext(43, b"\x03\x03\x04\x03"))),
    ("supported_versions past the end", hello(ext(43, b"\x04\x03\x04"))),
    ("bytes after supported_versions", hello(ext(43, b"\x02\x03\x04\x00"))),
    (
        "bytes after the hello in its record",
        record(handshake(body(sni(b"a.example"))) + b"\x16"),
    ),
    (
        "handshake length shorter than the body",
        record(b"\x01" + (10).to_bytes(3) + body(sni(b"a.example"))),
    ),
    ("handshake length 0 in a 5-byte record", b"\x16\x03\x01\x00\x05\x01\x00\x00\x00"),
]


@pytest.mark.parametrize(("case", "stream"), MALFORMED, ids=[c for c, _ in MALFORMED])
def test_malformed(case: str, stream: bytes) -> None:
    err = error_of(stream)
    assert err.reason == "malformed", err
    assert err.detail
    assert str(err).startswith("malformed: ")


def test_handshake_length_past_the_record_waits_for_more() -> None:
    # A length pointing past the end of what has arrived is not an error yet:
    # the rest may be in the next record.
    message = handshake(body(sni(b"a.example")))
    stream = record(message[:-3])
    assert parse_client_hello(stream) is None
    # ...but a record of another type there is.
    assert error_of(stream + record(b"\x01\x00", content_type=21)).reason == "malformed"


@pytest.mark.parametrize(
    "second",
    [
        record(b"\x00\x00\x00", content_type=23),
        record(b"\x00\x00\x00", content_type=21),
        record(b"\x00\x00\x00", content_type=20),
        record(b"\x00\x00\x00", version=0x0205),
        record(b"\x00\x00\x00", version=0x0305),
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x40\x01",
    ],
)
def test_bad_continuation_record(second: bytes) -> None:
    message = handshake(body(sni(b"a.example")))
    stream = record(message[:20]) + second
    assert error_of(stream).reason == "malformed"


def test_trailing_bytes_in_record_decided_early() -> None:
    # The record declares more bytes than the message: known from the headers.
    message = handshake(body(sni(b"a.example")))
    stream = record(message + b"\x00" * 50)
    assert error_of(stream[:9]).reason == "malformed"


def test_truncated_body_at_every_offset() -> None:
    # Cutting the body anywhere (with the lengths in the handshake and record
    # headers adjusted) leaves a field that points past the end, except right
    # after the compression methods, where a hello without extensions is valid.
    full = body(sni(b"a.example") + alpn_ext(b"h2") + versions_ext(TLS13, TLS12))
    no_extensions = len(body())
    assert parse_client_hello(record(handshake(full))) is not None
    for cut in range(len(full)):
        stream = record(handshake(full[:cut]))
        if cut == no_extensions:
            assert parse_client_hello(stream) is not None
        else:
            assert error_of(stream).reason == "malformed", cut


# --- hand-built happy paths ------------------------------------------------------


@pytest.mark.parametrize(
    ("extensions", "server_name", "alpn", "versions"),
    [
        (None, None, (), ()),  # TLS 1.0-style: no extensions field at all
        (b"", None, (), ()),
        (sni(b"EXAMPLE.com."), "example.com", (), ()),
        (sni(b"a"), "a", (), ()),
        (sni(b"*.example"), "*.example", (), ()),  # printable ASCII; policy judges names
        (sni(b"a" * 5000), "a" * 5000, (), ()),
        # Unknown name types are skipped; host_name alongside one is used.
        (ext(0, vec16(b"\x01" + vec16(b"x") + b"\x00" + vec16(b"a.example"))), "a.example", (), ()),
        (ext(0, vec16(b"\x07" + vec16(b"x"))), None, (), ()),
        # GREASE values (RFC 8701) pass through; ALPN names are kept byte for byte.
        (
            ext(0x0A0A, b"")
            + sni(b"a.example")
            + alpn_ext(b"\x0a\x0a", b"h2", b"\xfa\xfa")
            + versions_ext(0x1A1A, TLS13, TLS12)
            + ext(0xFAFA, b"\x00"),
            "a.example",
            ("\n\n", "h2", "\xfa\xfa"),
            (0x1A1A, TLS13, TLS12),
        ),
        (alpn_ext(b"h2", b"http/1.1"), None, ("h2", "http/1.1"), ()),
        (versions_ext(TLS13), None, (), (TLS13,)),
    ],
)
def test_hand_built(
    extensions: bytes | None,
    server_name: str | None,
    alpn: tuple[str, ...],
    versions: tuple[int, ...],
) -> None:
    stream = hello(extensions)
    assert parse_client_hello(stream) == ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=TLS12,
        supported_versions=versions,
        record_bytes=len(stream),
    )


def test_empty_session_id_and_many_compression_methods() -> None:
    stream = hello(sni(b"a.example"), session_id=b"", compression=b"\x01\x00")
    result = parse_client_hello(stream)
    assert result is not None
    assert result.server_name == "a.example"


def test_empty_input_needs_more() -> None:
    assert parse_client_hello(b"") is None
    assert parse_client_hello(bytearray()) is None
    assert parse_client_hello(memoryview(b"")) is None


# --- alerts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_bytes", "description"),
    [
        (ALERT_HANDSHAKE_FAILURE, 40),
        (ALERT_ACCESS_DENIED, 49),
        (ALERT_DECODE_ERROR, 50),
        (ALERT_PROTOCOL_VERSION, 70),
        (ALERT_INTERNAL_ERROR, 80),
        (ALERT_UNRECOGNIZED_NAME, 112),
    ],
)
def test_alerts(record_bytes: bytes, description: int) -> None:
    # RFC 8446 §6: content type alert(21), legacy version 3.3, length 2,
    # level fatal(2), description.
    assert record_bytes == bytes((21, 3, 3, 0, 2, 2, description))
    assert alert(description) == record_bytes


def test_alerts_parse_with_ssl() -> None:
    # OpenSSL, as a client, reports the alert it receives by name.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for alert_bytes, name in [
        (ALERT_ACCESS_DENIED, "ACCESS_DENIED"),
        (ALERT_UNRECOGNIZED_NAME, "UNRECOGNIZED_NAME"),
    ]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname="example.com")
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        incoming.write(alert_bytes)
        with pytest.raises(ssl.SSLError, match=name):
            obj.do_handshake()


@pytest.mark.parametrize("description", [-1, 256])
def test_alert_range(description: int) -> None:
    with pytest.raises(ValueError, match="uint8"):
        alert(description)


# --- property tests --------------------------------------------------------------

# More than hypothesis' default 100: these run in well under a second each.
PROPERTY_EXAMPLES = 400

REAL_STREAMS = [
    capture("example.com", alpn=("h2", "http/1.1")),
    capture("x.eu.cp0.konghq.com", max_version=ssl.TLSVersion.TLSv1_2),
    capture(None),
]


def parse_or_reason(buf: bytes, **kwargs: int) -> ClientHello | str | None:
    """parse_client_hello, with a PeekError turned into its reason; anything
    else it raises fails the test. Checks on the way that the one-record fast
    path answers only where the full parser accepts, and with the same hello."""
    try:
        result: ClientHello | str | None = parse_client_hello(buf, **kwargs)
    except PeekError as exc:
        assert exc.reason in ("not_tls", "malformed", "too_large", "not_client_hello")
        result = exc.reason
    try:
        full: ClientHello | str | None = _parse_records(buf, **kwargs)
    except PeekError as exc:
        full = exc.reason
    fast = _one_record(buf, **kwargs)
    assert fast is None or fast == full, (fast, full)
    assert result == full
    return result


def test_fast_path_takes_real_hellos() -> None:
    for stream in REAL_STREAMS:
        fast = _one_record(stream, max_size=MAX_CLIENT_HELLO)
        assert fast is not None
        assert fast == _parse_records(stream, max_size=MAX_CLIENT_HELLO)


@pytest.mark.parametrize(("case", "stream"), MALFORMED, ids=[c for c, _ in MALFORMED])
def test_fast_path_leaves_malformed_to_the_full_parser(case: str, stream: bytes) -> None:
    assert _one_record(stream, max_size=MAX_CLIENT_HELLO) is None
    assert parse_or_reason(stream) == "malformed"


@settings(max_examples=PROPERTY_EXAMPLES)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    result = parse_or_reason(data)
    assert (result == "not_tls") is (not looks_like_tls(data[:3]))


@settings(max_examples=PROPERTY_EXAMPLES)
@given(st.binary(max_size=600), st.integers(0, 255))
def test_arbitrary_body_in_valid_framing(data: bytes, msg_type: int) -> None:
    stream = record(handshake(data, msg_type=msg_type))
    result = parse_or_reason(stream)
    if isinstance(result, ClientHello):
        assert result.record_bytes == len(stream)
    if msg_type != 1:
        assert result == "not_client_hello"


@settings(max_examples=PROPERTY_EXAMPLES)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 16, 43, 0x0A0A, 0xFFFF]),
            st.binary(max_size=40),
        ),
        max_size=6,
    )
)
def test_arbitrary_extensions(exts: list[tuple[int, bytes]]) -> None:
    parse_or_reason(hello(b"".join(ext(t, d) for t, d in exts)))


@settings(max_examples=PROPERTY_EXAMPLES)
@given(
    st.sampled_from(REAL_STREAMS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_byte_flips_of_a_real_hello(stream: bytes, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(stream)
    for pos, value in flips:
        mutated[pos % len(mutated)] = value
    parse_or_reason(bytes(mutated))


@settings(max_examples=PROPERTY_EXAMPLES)
@given(
    st.sampled_from(REAL_STREAMS),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.binary(max_size=20),
)
def test_splices_of_a_real_hello(stream: bytes, start: int, end: int, insert: bytes) -> None:
    # Delete a range and insert arbitrary bytes there: shifts every later length.
    start, end = sorted((start % len(stream), end % len(stream)))
    parse_or_reason(stream[:start] + insert + stream[end:])


@settings(max_examples=PROPERTY_EXAMPLES)
@given(st.sampled_from(REAL_STREAMS), st.data())
def test_prefixes_and_refragmentation(stream: bytes, data: st.DataObject) -> None:
    message = message_of(stream)
    sizes = data.draw(st.lists(st.integers(1, 600), max_size=8))
    version = data.draw(st.sampled_from([0x0301, 0x0303]))
    fragmented = records(message, sizes, version=version)
    whole = parse_client_hello(fragmented)
    assert whole is not None
    expected = parse_client_hello(stream)
    assert expected is not None
    assert whole.server_name == expected.server_name
    assert whole.alpn == expected.alpn
    assert whole.supported_versions == expected.supported_versions
    assert whole.record_bytes == len(fragmented)
    cut = data.draw(st.integers(0, len(fragmented)))
    prefix = parse_client_hello(fragmented[:cut])
    assert prefix is None or (cut == len(fragmented) and prefix == whole)
    tail = data.draw(st.binary(max_size=50))
    assert parse_client_hello(fragmented + tail) == whole


@given(st.binary(min_size=1, max_size=3000), st.data())
def test_a_full_buffer_is_never_left_undecided(data: bytes, draw: st.DataObject) -> None:
    # Whatever the bytes, once max_size of them are in the answer is final, so
    # the caller's buffer is bounded by max_size.
    max_size = draw.draw(st.integers(0, len(data)))
    framed = record(handshake(data[:-9]))
    for buf in (data, framed + data):
        assert parse_or_reason(buf, max_size=max_size) is not None


@given(st.sampled_from(REAL_STREAMS), st.integers(0, 2000))
def test_result_is_stable_across_arrivals(stream: bytes, cut: int) -> None:
    # Feeding more bytes never changes an answer already given.
    early = parse_or_reason(stream[: cut % (len(stream) + 1)])
    final = parse_or_reason(stream)
    assert early is None or early == final


# --- openssl s_client over a real loopback socket --------------------------------

OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(OPENSSL is None, reason="openssl not on PATH")
@pytest.mark.parametrize("version_flag", [[], ["-tls1_2"], ["-tls1_3"]])
def test_openssl_s_client_hello(version_flag: list[str]) -> None:
    assert OPENSSL is not None
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)
        port = server.getsockname()[1]
        proc = subprocess.Popen(
            [
                OPENSSL,
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "x.eu.cp0.konghq.com",
                "-alpn",
                "h2,http/1.1",
                *version_flag,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                buf = bytearray()
                result = None
                for _ in range(100):  # bounded: at most 100 segments
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                    result = parse_client_hello(buf)
                    if result is not None:
                        break
        finally:
            proc.kill()
            proc.wait(timeout=20)
            assert proc.stdin is not None
            proc.stdin.close()
    assert result is not None, bytes(buf[:64]).hex()
    assert result.server_name == "x.eu.cp0.konghq.com"
    assert result.alpn == ("h2", "http/1.1")
    assert result.record_bytes == len(buf)
    if version_flag == ["-tls1_2"]:
        assert TLS13 not in result.supported_versions
    else:
        assert result.supported_versions[0] == TLS13


@settings(max_examples=PROPERTY_EXAMPLES)
@given(st.binary(max_size=30) | st.from_regex(rb"[a-zA-Z0-9.\-]{0,20}", fullmatch=True))
def test_fast_host_name_check_agrees_with_the_full_one(raw: bytes) -> None:
    try:
        expected: str | None = _host_name(raw)
    except PeekError:
        expected = None
    if _HOST_NAME.fullmatch(raw) is None:
        assert expected is None, raw
    else:
        assert raw.decode("ascii").lower().removesuffix(".") == expected
