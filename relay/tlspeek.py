"""Sans-IO peek at a TLS ClientHello: server_name, ALPN and versions, no decryption.

The relay never terminates TLS, but two features need to know where a client's TLS
session is headed before any byte goes upstream:

- a CONNECT tunnel to Konnect may be required to carry TLS whose SNI equals the
  CONNECT host, so a tunnel cannot be used to reach some other name behind the
  same address;
- an SNI-routing listener has no CONNECT request at all and takes its target from
  the SNI.

The caller accumulates the first bytes a client sends and calls
`parse_client_hello` with the whole buffer each time more arrive. The answer is
`None` (need more bytes), a `ClientHello`, or a `PeekError` whose `reason` is one
of a small fixed set, fit for a log field and a metric label. The caller forwards
the same bytes unchanged; this module copies only what it returns (names) and, when
a client fragments its hello across several records, the hello itself.

The parser is strict where leniency would leave room for two readings of one hello
(duplicate extensions, two host names, bytes after the message) and lenient where
real clients differ (record version 3.0 to 3.4, hellos without extensions, unknown
and GREASE extensions). Every length is checked against the bytes that remain, so
no exception other than `PeekError` escapes for any input.
"""

from __future__ import annotations

import re
import struct
from typing import Final, NamedTuple

from relay.tlsreader import PeekError, PeekReason, Reader

__all__ = [
    "ALERT_ACCESS_DENIED",
    "ALERT_DECODE_ERROR",
    "ALERT_HANDSHAKE_FAILURE",
    "ALERT_INTERNAL_ERROR",
    "ALERT_PROTOCOL_VERSION",
    "ALERT_UNRECOGNIZED_NAME",
    "MAX_CLIENT_HELLO",
    "ClientHello",
    "PeekError",
    "PeekReason",
    "alert",
    "looks_like_tls",
    "parse_client_hello",
]

# A ClientHello is usually 200-600 bytes; post-quantum hybrid key shares
# (X25519MLKEM768, ~1.2 KB per share) bring browsers' hellos to ~2 KB. Records are
# at most 16 KiB (RFC 8446 §5.1) and a hello may span several, so 32 KiB holds any
# real hello with room to spare while bounding what the relay buffers per
# connection before it has decided anything. Counted in stream bytes, record
# headers included.
MAX_CLIENT_HELLO: Final = 32 * 1024

# RFC 8446 §5.1: "The length MUST NOT exceed 2^14 bytes."
MAX_RECORD_PAYLOAD: Final = 2**14

RECORD_HEADER_SIZE: Final = 5
HANDSHAKE_HEADER_SIZE: Final = 4

# RFC 8446 §B.1 content types, §B.3 handshake types, §4.2 extension types;
# RFC 6066 §3 server_name, RFC 7301 §3.1 ALPN.
CONTENT_TYPE_ALERT: Final = 21
CONTENT_TYPE_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
EXT_SUPPORTED_VERSIONS: Final = 43
NAME_TYPE_HOST_NAME: Final = 0


class ClientHello(NamedTuple):
    """What the relay needs from a ClientHello; the rest stays opaque.
    (A named tuple: built once per tunnel, and cheaper than a dataclass.)"""

    server_name: str | None
    """host_name from server_name, ASCII, lowercased, trailing dot dropped; None if absent."""
    alpn: tuple[str, ...]
    """ALPN protocol names in the client's order, decoded as Latin-1 (byte for byte)."""
    legacy_version: int
    """ClientHello.legacy_version, e.g. 0x0303 (TLS 1.2; TLS 1.3 also sends this)."""
    supported_versions: tuple[int, ...]
    """supported_versions in the client's order (GREASE included); () if absent."""
    record_bytes: int
    """Stream bytes taken by the records that carry the whole ClientHello."""


def looks_like_tls(first: bytes | bytearray | memoryview) -> bool:
    """Whether the first 1-3 bytes of a stream can start a TLS handshake record.

    False as soon as the bytes rule TLS out; an empty prefix rules nothing out.
    `parse_client_hello(buf)` raises "not_tls" exactly when
    `looks_like_tls(buf[:3])` is False.
    """
    n = len(first)
    if n >= 1 and first[0] != CONTENT_TYPE_HANDSHAKE:
        return False
    if n >= 2 and first[1] != 3:
        return False
    return not (n >= 3 and first[2] > 4)


def parse_client_hello(
    buf: bytes | bytearray | memoryview, *, max_size: int = MAX_CLIENT_HELLO
) -> ClientHello | None:
    """Parse the ClientHello at the start of `buf`, the bytes a client sent so far.

    Returns None while more bytes are needed, the `ClientHello` once the records
    carrying it are complete (bytes after them are ignored), or raises `PeekError`.
    Decisions are made as early as the bytes allow: "not_tls" from the first three
    bytes, "not_client_hello" from the sixth, "too_large" from a length field.
    With `len(buf) >= max_size` the answer is never None.
    """
    hello = _one_record(buf, max_size)
    return hello if hello is not None else _parse_records(buf, max_size)


def _parse_records(
    buf: bytes | bytearray | memoryview, max_size: int = MAX_CLIENT_HELLO
) -> ClientHello | None:
    """The full parser: any number of records, every error with its detail."""
    n = len(buf)
    # Handshake bytes: (start, end) of each record's fragment present in buf, the
    # total the complete records declare, and the message size once its header is in.
    fragments: list[tuple[int, int]] = []
    declared = 0
    message_size = -1
    pos = 0
    first = True

    # RFC 8446 §5.1 record layer:
    #   struct {
    #       ContentType type;                        /* 22 = handshake */
    #       ProtocolVersion legacy_record_version;   /* 0x0301 or 0x0303 in practice */
    #       uint16 length;                           /* <= 2^14 */
    #       opaque fragment[TLSPlaintext.length];
    #   } TLSPlaintext;
    # "Handshake messages MUST NOT be interleaved with other record types", so the
    # hello is the concatenated fragments of consecutive handshake records.
    while True:
        head = buf[pos : pos + 3]
        if not looks_like_tls(head):
            if first:
                raise PeekError("not_tls", f"stream starts with {bytes(head).hex()}")
            raise PeekError("malformed", f"record at {pos} is not a handshake record")
        if pos + RECORD_HEADER_SIZE > max_size:
            raise PeekError("too_large", f"ClientHello records exceed {max_size} bytes")
        if pos + RECORD_HEADER_SIZE > n:
            return None
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        if length == 0:
            # RFC 8446 §5.1: "MUST NOT send zero-length fragments of Handshake types".
            raise PeekError("malformed", f"zero-length handshake record at {pos}")
        if length > MAX_RECORD_PAYLOAD:
            raise PeekError("malformed", f"record length {length} exceeds 2^14")
        record_end = pos + RECORD_HEADER_SIZE + length
        if record_end > max_size:
            raise PeekError("too_large", f"ClientHello records exceed {max_size} bytes")
        fragments.append((pos + RECORD_HEADER_SIZE, min(record_end, n)))
        declared += length
        first = False

        if message_size < 0:
            message_size = _message_size(buf, fragments, max_size)
        if 0 <= message_size < declared:
            # RFC 8446 §5.1: a message preceding a key change must end its record;
            # no client sends anything after its ClientHello in the same record.
            raise PeekError("malformed", "bytes after the ClientHello in its last record")
        if record_end > n:
            return None
        if declared == message_size:
            break
        pos = record_end

    if len(fragments) == 1:
        start, end = fragments[0]
        body = Reader(buf, start + HANDSHAKE_HEADER_SIZE, end)
    else:
        # Fragmented hello: one copy, bounded by max_size.
        joined = b"".join(buf[s:e] for s, e in fragments)
        body = Reader(joined, HANDSHAKE_HEADER_SIZE, len(joined))
    return _parse_body(body, record_end)


def _one_record(
    buf: bytes | bytearray | memoryview, max_size: int = MAX_CLIENT_HELLO
) -> ClientHello | None:
    """The common case in one pass: one complete record holding exactly one
    well-formed ClientHello. Returns None for anything else (more records, bytes
    missing, any oddity or error), and the full parser then gives the answer:
    this path only ever returns what the full parser would (a property test
    holds the two together), so every error and its detail come from one place.
    Index arithmetic and fixed-layout unpacks, no cursor objects: ~4x cheaper
    per tunnel."""
    n = len(buf)
    if n < 9:
        return None
    # Record header (type, version, length) and handshake header (type, 24-bit
    # length as a byte and a u16) in one unpack.
    ctype, major, minor, length, htype, hhigh, hlow = _RECORD_AND_HANDSHAKE(buf)
    end = RECORD_HEADER_SIZE + length
    if (
        ctype != CONTENT_TYPE_HANDSHAKE
        or major != 3
        or minor > 4
        or end > n
        or end > max_size
        or length > MAX_RECORD_PAYLOAD
        or htype != HANDSHAKE_CLIENT_HELLO
        or (hhigh << 16 | hlow) + 9 != end
    ):
        return None
    # The body, as in _parse_body: version, random, session id, suites, compression.
    if end < 9 + 35:
        return None
    legacy_version, sid = _VERSION_AND_SESSION(buf, 9)
    p = 9 + 35 + sid
    if legacy_version >> 8 != 3 or sid > 32 or p + 2 > end:
        return None
    suites = (buf[p] << 8) | buf[p + 1]
    p += 2 + suites
    if suites < 2 or suites % 2 or p + 1 > end:
        return None
    methods = buf[p]
    p += 1 + methods
    if methods < 1 or p > end:
        return None
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if p < end:
        if p + 2 > end or p + 2 + ((buf[p] << 8) | buf[p + 1]) != end:
            return None
        p += 2
        types: list[int] = []  # a repeated type is checked once, after the walk
        try:
            # The walk checks each extension's end only where it reads inside it;
            # one that runs past the block leaves p beyond end, caught below.
            while p < end:
                ext_type, size = _two_u16(buf, p)
                p += 4 + size
                types.append(ext_type)
                if ext_type not in _FAST_READS:
                    continue
                q, s = p, p - size  # the extension's data is buf[s:q]
                if q > end:
                    return None
                if ext_type == EXT_SERVER_NAME:
                    # One host_name entry filling the list filling the extension.
                    if (
                        s + 5 > q
                        or buf[s + 2] != NAME_TYPE_HOST_NAME
                        or s + 2 + ((buf[s] << 8) | buf[s + 1]) != q
                        or s + 5 + ((buf[s + 3] << 8) | buf[s + 4]) != q
                    ):
                        return None
                    raw = bytes(buf[s + 5 : q])
                    if _HOST_NAME.fullmatch(raw) is None:
                        return None  # the full parser says what is wrong
                    server_name = raw.decode("ascii").lower().removesuffix(".")
                elif ext_type == EXT_ALPN:
                    # A non-empty list filling the extension, of non-empty names.
                    if s + 2 >= q or s + 2 + ((buf[s] << 8) | buf[s + 1]) != q:
                        return None
                    names = []
                    i = s + 2
                    while i < q:
                        j = i + 1 + buf[i]
                        if j == i + 1 or j > q:
                            return None
                        names.append(bytes(buf[i + 1 : j]).decode("latin-1"))
                        i = j
                    alpn = tuple(names)
                else:  # EXT_SUPPORTED_VERSIONS
                    count = buf[s] if s < q else 0
                    if count < 2 or count % 2 or s + 1 + count != q:
                        return None
                    versions = struct.unpack_from(f">{count // 2}H", buf, s + 1)
        except struct.error:
            return None  # an extension header past the bytes there are
        if p != end or len(set(types)) != len(types):
            return None  # an extension past the block, or a repeated type
    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        record_bytes=end,
    )


# The extensions the fast path reads; it only walks past the others.
_FAST_READS = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS})

# Extension type and length in one call: the walk over a hello's extensions is
# most of the fast path's work.
_two_u16 = struct.Struct(">HH").unpack_from
# The 9 bytes of record header and handshake header; legacy_version, the
# 32-byte random skipped, and the session id's length.
_RECORD_AND_HANDSHAKE = struct.Struct(">BBBHBBH").unpack_from
_VERSION_AND_SESSION = struct.Struct(">H32xB").unpack_from

# What _host_name accepts, in one match: labels of printable ASCII other than
# the dot, single dots between them, at most one trailing dot.
_HOST_NAME = re.compile(rb"[!-\-/-~]+(?:\.[!-\-/-~]+)*\.?")


def _message_size(
    buf: bytes | bytearray | memoryview, fragments: list[tuple[int, int]], max_size: int
) -> int:
    """Size of the handshake message (header included), or -1 until its header is in.

    RFC 8446 §4:
        struct {
            HandshakeType msg_type;    /* 1 = client_hello */
            uint24 length;
            ...
        } Handshake;
    The header itself may be split across records.
    """
    header = bytearray()
    for start, end in fragments:
        header += buf[start : min(end, start + HANDSHAKE_HEADER_SIZE - len(header))]
        if len(header) == HANDSHAKE_HEADER_SIZE:
            break
    if header and header[0] != HANDSHAKE_CLIENT_HELLO:
        raise PeekError("not_client_hello", f"handshake message type {header[0]}")
    if len(header) < HANDSHAKE_HEADER_SIZE:
        return -1
    size = HANDSHAKE_HEADER_SIZE + ((header[1] << 16) | (header[2] << 8) | header[3])
    if size + RECORD_HEADER_SIZE > max_size:
        raise PeekError("too_large", f"ClientHello of {size} bytes exceeds {max_size}")
    return size


def _parse_body(r: Reader, record_bytes: int) -> ClientHello:
    # RFC 8446 §4.1.2:
    #   struct {
    #       ProtocolVersion legacy_version = 0x0303;    /* TLS v1.2 */
    #       Random random;                              /* 32 bytes */
    #       opaque legacy_session_id<0..32>;
    #       CipherSuite cipher_suites<2..2^16-2>;
    #       opaque legacy_compression_methods<1..2^8-1>;
    #       Extension extensions<8..2^16-1>;
    #   } ClientHello;
    # RFC 5246 §7.4.1.2: before TLS 1.3 the extensions field may be absent
    # altogether ("bytes following the compression_methods").
    legacy_version = r.u16("legacy_version")
    if legacy_version >> 8 != 3:
        raise PeekError("malformed", f"legacy_version {legacy_version:#06x}")
    r.skip(32, "random")
    if r.vector8("legacy_session_id").remaining > 32:
        raise PeekError("malformed", "legacy_session_id longer than 32 bytes")
    suites = r.vector16("cipher_suites").remaining
    if suites < 2 or suites % 2:
        raise PeekError("malformed", f"cipher_suites of {suites} bytes")
    if r.vector8("legacy_compression_methods").remaining < 1:
        raise PeekError("malformed", "empty legacy_compression_methods")

    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if r.remaining:
        extensions = r.vector16("extensions")
        r.expect_end("ClientHello")
        # RFC 8446 §4.2:
        #   struct {
        #       ExtensionType extension_type;    /* uint16 */
        #       opaque extension_data<0..2^16-1>;
        #   } Extension;
        # "There MUST NOT be more than one extension of the same type": a second
        # server_name could be read differently by the relay and the server.
        seen: set[int] = set()
        while extensions.remaining:
            ext_type = extensions.u16("extension_type")
            data = extensions.vector16("extension_data")
            if ext_type in seen:
                raise PeekError("malformed", f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _parse_server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(data)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(data)

    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        record_bytes=record_bytes,
    )


def _parse_server_name(r: Reader) -> str | None:
    # RFC 6066 §3:
    #   struct {
    #       NameType name_type;                  /* host_name(0) */
    #       select (name_type) {
    #           case host_name: HostName;        /* opaque HostName<1..2^16-1> */
    #       } name;
    #   } ServerName;
    #   struct {
    #       ServerName server_name_list<1..2^16-1>
    #   } ServerNameList;
    # "The ServerNameList MUST NOT contain more than one name of the same
    # name_type." Only host_name is defined; other types are skipped, assuming
    # the same 16-bit length prefix as crypto/tls does.
    names = r.vector16("server_name_list")
    r.expect_end("server_name")
    if not names.remaining:
        raise PeekError("malformed", "empty server_name_list")
    host: str | None = None
    seen: set[int] = set()
    while names.remaining:
        name_type = names.u8("name_type")
        name = names.take(names.u16("server name"), "server name")
        if name_type in seen:
            raise PeekError("malformed", f"more than one server name of type {name_type}")
        seen.add(name_type)
        if name_type == NAME_TYPE_HOST_NAME:
            host = _host_name(name)
    return host


def _host_name(raw: bytes) -> str:
    # RFC 6066 §3: "HostName" is the ASCII form of a DNS name ("A-labels" for
    # IDNs), without a trailing dot. Control characters, spaces and NUL are
    # refused too: they cannot be in a DNS name and would let the relay and a
    # server see different names.
    if not raw:
        raise PeekError("malformed", "empty host_name")
    if min(raw) < 0x21 or max(raw) > 0x7E:
        raise PeekError("malformed", "host_name is not printable ASCII")
    host = raw.decode("ascii").lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or "" in host.split("."):
        raise PeekError("malformed", "host_name has an empty label")
    return host


def _parse_alpn(r: Reader) -> tuple[str, ...]:
    # RFC 7301 §3.1:
    #   opaque ProtocolName<1..2^8-1>;
    #   struct {
    #       ProtocolName protocol_name_list<2..2^16-1>
    #   } ProtocolNameList;
    # Names are opaque bytes (RFC 8701 GREASE ones are not ASCII), so they are
    # decoded as Latin-1, which maps every byte string one to one.
    names = r.vector16("protocol_name_list")
    r.expect_end("application_layer_protocol_negotiation")
    if not names.remaining:
        raise PeekError("malformed", "empty protocol_name_list")
    protocols: list[str] = []
    while names.remaining:
        name = names.take(names.u8("protocol name"), "protocol name")
        if not name:
            raise PeekError("malformed", "empty protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)


def _parse_supported_versions(r: Reader) -> tuple[int, ...]:
    # RFC 8446 §4.2.1, in a ClientHello:
    #   ProtocolVersion versions<2..254>;
    versions = r.vector8("supported_versions")
    r.expect_end("supported_versions")
    if versions.remaining < 2 or versions.remaining % 2:
        raise PeekError("malformed", f"supported_versions of {versions.remaining} bytes")
    return tuple(versions.u16("version") for _ in range(versions.remaining // 2))


def alert(description: int) -> bytes:
    """A complete plaintext fatal alert record (RFC 8446 §6, §5.1).

    The record version is 0x0303 as RFC 8446 §5.1 asks of every record but an
    initial ClientHello; TLS 1.0-1.2 clients accept it before a version is agreed.
    """
    if not 0 <= description <= 255:
        raise ValueError(f"alert description {description} is not a uint8")
    # AlertLevel fatal(2), then the description; length 2.
    return bytes((CONTENT_TYPE_ALERT, 3, 3, 0, 2, 2, description))


# RFC 8446 §6: AlertDescription values the relay has a use for.
ALERT_HANDSHAKE_FAILURE: Final = alert(40)
ALERT_ACCESS_DENIED: Final = alert(49)
ALERT_DECODE_ERROR: Final = alert(50)
ALERT_PROTOCOL_VERSION: Final = alert(70)
ALERT_INTERNAL_ERROR: Final = alert(80)
ALERT_UNRECOGNIZED_NAME: Final = alert(112)
