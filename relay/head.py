"""The head phase of a client connection as a sans-IO machine.

Bytes go in (:meth:`HeadReader.feed`), one of three answers comes out:

- :data:`NEED_DATA`: the head is not complete yet;
- :class:`Head`: the request (a ``CONNECT`` head, or on an SNI listener the
  ClientHello's server name on the listener's port), the bytes the client sent
  after it (to forward once the tunnel is up; on an SNI listener the whole
  ClientHello, unchanged) and the client's address (the PROXY header's source
  when one was read);
- :class:`Refusal`: the status, reason and detail to answer with.

The stages chain as the listener asks (PROXY header, then CONNECT head or
ClientHello). Nothing here knows of sockets, transports or timers; the
connection protocol (connection.py) feeds it and acts on the answer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay import connect, proxyproto, tlspeek
from relay.hostport import hostport

__all__ = ["NEED_DATA", "Head", "HeadReader", "NeedData", "Refusal"]


class NeedData:
    """Feed more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(slots=True)  # not frozen: one per connection, frozen costs a setattr per field
class Head:
    request: connect.ConnectRequest
    early: bytes
    client_ip: str
    peer: str


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str
    detail: str
    headers: tuple[tuple[str, str], ...] = ()


class HeadReader:
    """Collects one connection's head; see the module docstring.

    ``sni_port``: on an SNI listener, the port the target is dialled on (the
    listener's ``target_port`` or its bound port); None on a CONNECT listener.
    """

    __slots__ = ("buf", "client_ip", "need_proxy_header", "peer", "sni_port")

    def __init__(
        self, client_ip: str, peer: str, *, proxy_protocol: bool, sni_port: int | None
    ) -> None:
        self.client_ip = client_ip
        self.peer = peer
        self.need_proxy_header = proxy_protocol
        self.sni_port = sni_port
        self.buf: bytes | bytearray = b""

    def feed(self, data: bytes) -> NeedData | Head | Refusal:
        buf: bytes | bytearray
        if not self.buf:
            buf = self.buf = data
        else:  # a head in pieces: grow one buffer instead of copying it per read
            if type(self.buf) is bytes:
                self.buf = bytearray(self.buf)
            self.buf += data
            buf = self.buf
        if self.need_proxy_header:
            try:
                header = proxyproto.parse(buf)
            except proxyproto.ProxyProtocolError as exc:
                return Refusal(400, "bad_proxy_protocol", f"PROXY protocol: {exc.detail}")
            if header is None:
                return NEED_DATA
            self.need_proxy_header = False
            if not header.local and header.source is not None:
                ip = ipaddress.ip_address(header.source[0])
                mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
                self.client_ip = str(mapped or ip)
                self.peer = hostport(self.client_ip, header.source[1])
            buf = self.buf = buf[header.length :]
            if not buf:
                return NEED_DATA
        if self.sni_port is not None:
            return self._hello(buf, self.sni_port)
        try:
            request = connect.parse_head(buf)
        except connect.HeadError as exc:
            return Refusal(exc.status, exc.reason, exc.detail, exc.headers)
        if request is None:
            return NEED_DATA
        early = bytes(buf[request.head_length :])
        self.buf = b""
        return Head(request, early, self.client_ip, self.peer)

    def _hello(self, buf: bytes | bytearray, port: int) -> NeedData | Head | Refusal:
        """SNI listener: the target is the ClientHello's server_name; the hello
        is the early data, forwarded unchanged."""
        try:
            hello = tlspeek.parse_client_hello(buf)
        except tlspeek.PeekError as exc:
            return Refusal(400, exc.reason, f"SNI listener: {exc.detail}")
        if hello is None:
            return NEED_DATA
        if hello.server_name is None:
            return Refusal(400, "no_sni", "SNI listener: the ClientHello carries no server_name")
        request = connect.ConnectRequest(
            host=hello.server_name,
            port=port,
            version="TLS",
            proxy_authorization=None,
            user_agent=None,
            head_length=0,
        )
        early = bytes(buf)
        self.buf = b""
        return Head(request, early, self.client_ip, self.peer)
