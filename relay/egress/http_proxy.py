"""Parent-proxy egress: each tunnel is a ``CONNECT`` through a corporate proxy.

Many restricted networks have no route out except an HTTP proxy. For every
tunnel this dialer connects to the parent (TLS when its URL is ``https://``),
asks it for ``CONNECT host:port`` with ``Proxy-Authorization`` when the URL
carries credentials, reads the parent's response head and, on a 2xx, hands
the connection to the caller's protocol. Bytes the parent sent after its head
belong to the tunnel and are returned as ``leftover``.

The relay does no DNS of its own for the destination in this mode: the parent
resolves names (hosts in restricted networks often cannot resolve public
names). A ``resolver.static`` entry, where one matches, decides what the parent
is asked for. The parent's own address is operator configuration and is not
subject to the private-range rule that guards destinations.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl

from relay.addresses import parse_proxy_url
from relay.egress import Dialer, DialError, Dialled, HttpProxySettings, classify
from relay.hostport import hostport
from relay.resolver import Resolver, static_target

# The parent's response head is read into memory before the tunnel starts; a
# CONNECT answer is a status line and a few headers. 16 KiB is h11's default
# for an incomplete event and well above what squid, mitmproxy or a corporate
# appliance send (squid's error pages are bodies, which follow the head).
MAX_HEAD_SIZE = 16 * 1024
# The reason phrase of a refusal goes into a log line and a 502 body.
MAX_REASON_LENGTH = 120

# RFC 9112 §4:
#   status-line = HTTP-version SP status-code SP [ reason-phrase ]
#   HTTP-version = "HTTP" "/" DIGIT "." DIGIT
#   status-code  = 3DIGIT
#   reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )
# Only HTTP/1.0 and HTTP/1.1 answer a CONNECT. The SP before an empty reason
# phrase is optional here: some appliances omit it and nothing is ambiguous.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")


class ParentHeadError(ValueError):
    """The parent's response head is not a usable HTTP/1.x response."""


def parse_response_head(buf: bytes | bytearray) -> tuple[int, str, int] | None:
    """(status, reason, head length) once ``buf`` holds a whole response head,
    None while it is incomplete; raise ParentHeadError when it cannot be one.

    RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator, so
    the head ends at the first empty line whichever terminator was used.
    """
    end = -1
    for terminator in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        i = buf.find(terminator)
        if i >= 0 and (end < 0 or i + len(terminator) < end):
            end = i + len(terminator)
    if end < 0:
        if len(buf) > MAX_HEAD_SIZE:
            raise ParentHeadError(f"response head exceeds {MAX_HEAD_SIZE // 1024} KiB")
        if not b"HTTP/1.".startswith(bytes(buf[:7])):
            raise ParentHeadError(f"not an HTTP/1.x response: {_printable(bytes(buf[:40]))}")
        return None
    if end > MAX_HEAD_SIZE:
        raise ParentHeadError(f"response head exceeds {MAX_HEAD_SIZE // 1024} KiB")
    line = bytes(buf[: buf.find(b"\n")]).rstrip(b"\r")
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise ParentHeadError(f"malformed status line: {_printable(line)}")
    reason = (match.group(3) or b"").decode("latin-1").strip()
    return int(match.group(2)), reason, end


def _printable(data: bytes) -> str:
    text = data[:MAX_REASON_LENGTH].decode("latin-1")
    return "".join(c if c.isprintable() else "?" for c in text)


def build_request(authority: str, credentials: tuple[str, str | None] | None) -> bytes:
    """The CONNECT request head sent to the parent (Basic auth: RFC 7617 §2, UTF-8)."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if credentials is not None:
        user, password = credentials
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _ParentHandshake(asyncio.Protocol):
    """Sends the CONNECT, collects the parent's head, then gets out of the way.

    On a 2xx the transport is handed to the caller's protocol right here, in
    the same callback that completed the head: every later byte goes to that
    protocol, and what arrived with the head is kept as ``leftover``. Nothing
    can fall between the two (an event loop such as uvloop may deliver data
    as soon as the connection is made, before any coroutine runs again).
    """

    __slots__ = ("buf", "done", "protocol", "request", "transport")

    def __init__(
        self,
        request: bytes,
        protocol: asyncio.Protocol,
        done: asyncio.Future[tuple[int, str, bytes]],
    ) -> None:
        self.request = request
        self.protocol = protocol
        self.done = done
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return  # refused or abandoned: the dialer is closing this transport
        self.buf += data
        try:
            head = parse_response_head(self.buf)
        except ParentHeadError as exc:
            self.done.set_exception(
                DialError("parent_error", f"parent proxy sent a bad response: {exc}")
            )
            return
        if head is None:
            return
        status, reason, length = head
        if not 200 <= status < 300:
            self.done.set_exception(
                DialError(
                    "parent_refused",
                    f"parent proxy answered {status} {_printable(reason.encode('latin-1'))}",
                )
            )
            return
        transport = self.transport
        assert transport is not None
        transport.set_protocol(self.protocol)
        self.protocol.connection_made(transport)
        self.done.set_result((status, reason, bytes(self.buf[length:])))

    def eof_received(self) -> bool:
        self._lost("parent proxy closed the connection before answering CONNECT")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self._lost(f"parent proxy closed the connection before answering CONNECT{why}")

    def _lost(self, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(DialError("parent_closed", detail))


class HttpProxyDialer(Dialer):
    """Reaches destinations through a parent HTTP proxy with ``CONNECT``."""

    name = "http_proxy"

    def __init__(self, model: HttpProxySettings, resolver: Resolver) -> None:
        url = parse_proxy_url(model.url)
        self.resolver = resolver
        self.host = url.host
        self.port = url.port
        self.where = hostport(url.host, url.port)
        self.connect_timeout = model.connect_timeout
        self.credentials = (url.username, url.password) if url.username is not None else None
        self.ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            ctx = ssl.create_default_context(cafile=model.ca_file)
            if not model.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl = ctx

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        target = static_target(self.resolver.static, host, port) or (host, port)
        authority = hostport(*target)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, str, bytes]] = loop.create_future()
        handshake = _ParentHandshake(build_request(authority, self.credentials), protocol, done)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connect_parent(handshake)
                _status, _reason, leftover = await done
        except TimeoutError:
            self._abort(handshake)
            raise DialError(
                "timeout",
                f"parent proxy {self.where} did not answer CONNECT {authority} "
                f"within {self.connect_timeout:g} s",
                504,
            ) from None
        except ssl.SSLError as exc:
            self._abort(handshake)
            if isinstance(exc, ssl.SSLCertVerificationError):
                text = f"certificate verify failed: {exc.verify_message}"
            else:
                text = exc.reason or str(exc)
            raise DialError(
                "parent_tls", f"TLS to parent proxy {self.where} failed: {text}"
            ) from None
        except OSError as exc:
            self._abort(handshake)
            raise DialError(
                "parent_closed", f"parent proxy {self.where} dropped the connection: {exc}"
            ) from None
        except BaseException:
            self._abort(handshake)
            raise
        assert handshake.transport is not None
        return Dialled(handshake.transport, f"{authority} via {self.where}", leftover)

    async def _connect_parent(self, handshake: _ParentHandshake) -> None:
        """TCP (and TLS) to the parent, by its configured name: the event loop
        resolves it and tries its addresses in turn."""
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: handshake,
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
        except socket.gaierror as exc:
            raise DialError(
                "dns_failure", f"DNS lookup of parent proxy {self.host} failed: {exc.strerror}"
            ) from None
        except ssl.SSLError:
            raise
        except OSError as exc:
            raise classify(exc, f"parent proxy {self.where}") from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A parent that vanished behind a NAT is noticed on a silent tunnel.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    @staticmethod
    def _abort(handshake: _ParentHandshake) -> None:
        if handshake.transport is not None:
            handshake.transport.abort()
