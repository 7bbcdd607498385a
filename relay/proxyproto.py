"""Sans-IO parser of the PROXY protocol header, versions 1 and 2.

When the relay sits behind an L4 load balancer (HAProxy, an AWS NLB, ...), every
connection comes from the balancer's address, and per-client policy, limits and
reconnect counting would all see one client. The balancer can instead prepend a
PROXY protocol header naming the real client. The relay accepts one only on a
listener configured for it and only from trusted source addresses: the spec
(§1) forbids guessing whether a header is present, since anyone allowed to send
one can claim any address.

The caller accumulates the first bytes of a connection and calls `parse` with the
whole buffer each time more arrive. The answer is `None` (need more bytes), a
`ProxyHeader` whose `length` says where the client's own bytes start (they are
not consumed), or a `ProxyProtocolError`. A buffer that cannot be the start of a
header is refused at its first wrong byte, and `parse` never asks for more than
`MAX_HEADER` bytes: a `None` answer always means `len(buf) < MAX_HEADER`.

Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (cited
below as "spec §N"). The parser is strict wherever the spec says "exactly" or
"must": one space between fields, no leading zeros, CRLF and nothing else to end
a v1 line, a v2 length that covers the addresses and whole TLVs.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEADER",
    "MAX_V2_LENGTH",
    "V1_MAX",
    "V2_HEADER_SIZE",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse",
]

# spec §2.1: "If the CRLF sequence is not found in the first 107 characters, the
# receiver should declare the line invalid" (the longest UNKNOWN line).
V1_MAX: Final = 107
V1_PREFIX: Final = b"PROXY "

# spec §2.2: 12-byte signature, then version/command, family/transport and a
# 16-bit big-endian length of what follows.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_SIZE: Final = 16

# Total v2 header size accepted (16-byte fixed part + address block + TLVs). The
# largest address block is 216 bytes (AF_UNIX) and the TLVs real senders attach
# (ALPN, authority <= 255, unique id <= 128, SSL with version/cipher/CN, the AWS,
# Azure and GCP endpoint ids) add a few hundred more; the spec (§2) designs both
# versions to fit in 536 bytes. 4 KiB leaves room for custom TLVs while bounding
# what the relay buffers for a connection it cannot yet attribute to anyone; the
# 16-bit length field would otherwise allow 64 KiB.
MAX_V2_LENGTH: Final = 4096

MAX_HEADER: Final = max(V1_MAX, MAX_V2_LENGTH)

# spec §2.2, 13th byte: version in the high nibble (only 2), command in the low.
V2_VERSION: Final = 0x2
V2_CMD_LOCAL: Final = 0x0
V2_CMD_PROXY: Final = 0x1

# spec §2.2, 14th byte: address family (high nibble) and transport (low nibble).
# The values the spec lists; every other byte "must be rejected as invalid".
FAM_UNSPEC: Final = 0x00
FAM_TCP4: Final = 0x11
FAM_UDP4: Final = 0x12
FAM_TCP6: Final = 0x21
FAM_UDP6: Final = 0x22
FAM_UNIX_STREAM: Final = 0x31
FAM_UNIX_DGRAM: Final = 0x32

# Address block sizes: 2*4 + 2*2, 2*16 + 2*2, 2*108.
_ADDRESS_SIZE: Final = {FAM_TCP4: 12, FAM_TCP6: 36, FAM_UNIX_STREAM: 216}
_DGRAM: Final = frozenset({FAM_UDP4, FAM_UDP6, FAM_UNIX_DGRAM})

TLV_HEADER_SIZE: Final = 3  # spec §2.2: type (1 byte), length (2 bytes, big-endian)

# spec §2.1, the v1 line is US-ASCII:
#   "PROXY" SP ( "TCP4" / "TCP6" ) SP src SP dst SP sport SP dport CRLF
#   "PROXY" SP "UNKNOWN" [ SP <anything but CRLF> ] CRLF
# IPv4: four decimal integers 0-255, "heading zeroes are not permitted"; ports
# likewise 0-65535 without heading zeroes. IPv6 is left to ipaddress once its
# characters are known to be hex digits, colons and (for an embedded IPv4 tail,
# which inet_ntop writes for v4-mapped addresses) dots: no zone id, no brackets.
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_IPV6_CHARS: Final = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")
# Printable US-ASCII: what a v1 line may hold before its CRLF.
_V1_TEXT: Final = re.compile(rb"[\x20-\x7e]*")


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY protocol header: drop the connection.

    `detail` says what was wrong, for logs; it quotes no input bytes.
    """

    detail: str

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the header says about the connection."""

    version: int
    """1 or 2."""
    local: bool
    """True for a v2 LOCAL command, a v2 UNSPEC or AF_UNIX family, or v1 UNKNOWN:
    no client address is given, use the real peer address."""
    source: tuple[str, int] | None
    """The client's (address, port), address in ipaddress' normal form; None if local."""
    destination: tuple[str, int] | None
    """The address the client connected to, as the balancer saw it; None if local."""
    length: int
    """Bytes of the buffer the header takes; the client's own data starts here."""


def parse(buf: bytes | bytearray) -> ProxyHeader | None:
    """Parse a PROXY protocol header at the start of `buf`.

    Returns None while `buf` is a proper prefix of a header that may still turn
    out valid, the header once complete, or raises `ProxyProtocolError`.
    """
    data = bytes(buf[:MAX_HEADER])
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    n = min(len(data), len(V1_PREFIX))
    if data[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError("not a PROXY protocol header")
    lf = data.find(b"\n", 0, V1_MAX)
    if lf < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line has no CRLF within {V1_MAX} bytes")
        # Refuse now what no more bytes could make valid: anything but printable
        # text, or a CR that is not the last byte so far (its LF may follow).
        body = data[:-1] if data.endswith(b"\r") else data
        if _V1_TEXT.fullmatch(body) is None:
            raise ProxyProtocolError("PROXY v1 line has a control or non-ASCII byte")
        return None
    # spec §2.1: "The receiver must not tolerate a single CR or LF character to
    # end the line when a complete CRLF sequence is expected."
    if lf == 0 or data[lf - 1] != 0x0D:
        raise ProxyProtocolError("PROXY v1 line ends in a bare LF")
    line = data[: lf - 1]
    if _V1_TEXT.fullmatch(line) is None:
        raise ProxyProtocolError("PROXY v1 line has a control or non-ASCII byte")
    length = lf + 1
    text = line.decode("ascii")
    fields = text.split(" ")
    if fields[1] == "UNKNOWN":
        # spec §2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyHeader(1, True, None, None, length)
    if fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6 or "" in fields:
        raise ProxyProtocolError(
            "PROXY v1 line must be PROXY TCPn src dst sport dport, one space apart"
        )
    family = fields[1]
    src = _v1_address(fields[2], family, "source")
    dst = _v1_address(fields[3], family, "destination")
    sport = _v1_port(fields[4], "source")
    dport = _v1_port(fields[5], "destination")
    return ProxyHeader(1, False, (src, sport), (dst, dport), length)


def _v1_address(text: str, family: str, which: str) -> str:
    if family == "TCP4":
        if _IPV4.fullmatch(text) is None:
            raise ProxyProtocolError(f"PROXY v1 {which} address is not a plain IPv4 address")
        return text
    if _IPV6_CHARS.fullmatch(text) is None:
        raise ProxyProtocolError(f"PROXY v1 {which} address is not an IPv6 address")
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1 {which} address is not an IPv6 address") from None


def _v1_port(text: str, which: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 {which} port is not a number 0-65535")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(data) <= n:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != V2_VERSION:
        raise ProxyProtocolError(f"PROXY v2 header has version {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (V2_CMD_LOCAL, V2_CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2 header has unknown command {command}")
    if len(data) < V2_HEADER_SIZE:
        return None
    family = data[13]
    total = V2_HEADER_SIZE + int.from_bytes(data[14:16], "big")
    if total > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"PROXY v2 header is longer than {MAX_V2_LENGTH} bytes")

    if command == V2_CMD_LOCAL:
        # spec §2.2: for LOCAL the receiver "must use the real connection
        # endpoints and discard the protocol block including the family which is
        # ignored", skipping `len` bytes whatever they are.
        return None if len(data) < total else ProxyHeader(2, True, None, None, total)

    if family == FAM_UNSPEC:
        # spec §2.2: "The receiver should ignore address information."
        return None if len(data) < total else ProxyHeader(2, True, None, None, total)
    if family in _DGRAM:
        raise ProxyProtocolError("PROXY v2 header describes a datagram (UDP) connection")
    size = _ADDRESS_SIZE.get(family)
    if size is None:
        raise ProxyProtocolError(f"PROXY v2 header has unknown address family 0x{family:02x}")
    if total - V2_HEADER_SIZE < size:
        raise ProxyProtocolError("PROXY v2 length is shorter than its address block")
    # spec §2.2: "The receiver must not start to parse an address before the
    # whole address block is received."
    if len(data) < total:
        return None
    _check_tlvs(data, V2_HEADER_SIZE + size, total)
    block = data[V2_HEADER_SIZE : V2_HEADER_SIZE + size]
    if family == FAM_TCP4:
        src = str(ipaddress.IPv4Address(block[0:4]))
        dst = str(ipaddress.IPv4Address(block[4:8]))
        ports = block[8:12]
    elif family == FAM_TCP6:
        src = str(ipaddress.IPv6Address(block[0:16]))
        dst = str(ipaddress.IPv6Address(block[16:32]))
        ports = block[32:36]
    else:
        # AF_UNIX: a path names no client the policy could use; the balancer is
        # local, so its own (real) peer address is as good as any.
        return ProxyHeader(2, True, None, None, total)
    sport = int.from_bytes(ports[0:2], "big")
    dport = int.from_bytes(ports[2:4], "big")
    return ProxyHeader(2, False, (src, sport), (dst, dport), total)


def _check_tlvs(data: bytes, start: int, end: int) -> None:
    """The bytes after the addresses must be whole TLVs (spec §2.2: type, 16-bit
    length, value), ending exactly at the end of the header. Their contents are
    not interpreted."""
    pos = start
    while pos < end:
        if end - pos < TLV_HEADER_SIZE:
            raise ProxyProtocolError("PROXY v2 header ends inside a TLV header")
        value_end = pos + TLV_HEADER_SIZE + int.from_bytes(data[pos + 1 : pos + 3], "big")
        if value_end > end:
            raise ProxyProtocolError("PROXY v2 TLV runs past the end of the header")
        pos = value_end
