"""A bounded HTTPS GET over any of the relay's dialers.

The relay fetches a few documents of its own (Konnect's ingress address list)
and must do so the way its tunnels leave the host: directly, through the
corporate parent proxy, or through the SSH bastion. A dialer hands back an
``asyncio.Transport`` of any of those kinds, which the event loop's own TLS
(``start_tls``) does not accept for an SSH channel, so TLS runs here in memory
(``ssl.SSLObject`` over two ``MemoryBIO``s) on top of whatever transport the
dialer returned, and HTTP/1.1 is spoken by h11. The server's certificate and
name are always verified.

Everything is bounded: the body (``limit``), the response head (h11's
``max_incomplete_event_size``), and the whole exchange (``timeout``).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from relay import __version__
from relay.egress import Dialer, DialError

# h11's own default: a response head is a status line and a few headers.
MAX_HEAD_SIZE = 16 * 1024
# TLS records are at most 16 KiB of plaintext (RFC 8446 §5.1).
READ_SIZE = 16 * 1024


class FetchError(Exception):
    """The document could not be fetched; ``reason`` is a bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{url!r} is not an https:// URL")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.hostname, parts.port or 443, path)


class _Exchange(asyncio.Protocol):
    """TLS in memory and one HTTP/1.1 request on a dialled transport."""

    def __init__(
        self, ctx: ssl.SSLContext, target: Target, limit: int, done: asyncio.Future[bytes]
    ) -> None:
        self.target = target
        self.limit = limit
        self.done = done
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=target.host)
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.status = 0
        self.body = bytearray()

    # --- transport events ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._step()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        self._step()

    def eof_received(self) -> bool:
        self.incoming.write_eof()
        self._step()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("closed", f"connection closed before the response was complete{_why(exc)}")

    # --- the exchange -------------------------------------------------------

    def _step(self) -> None:
        if self.done.done():
            return
        try:
            if not self.handshaken:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    return
                finally:
                    self._flush()
                self.handshaken = True
                self._send_request()
            self._read()
        except ssl.SSLCertVerificationError as exc:
            self._fail("tls", f"certificate verify failed: {exc.verify_message}")
        except ssl.SSLError as exc:
            self._fail("tls", f"TLS failed: {exc.reason or exc}")
        except h11.RemoteProtocolError as exc:
            self._fail("http", f"bad HTTP response: {exc}")
        finally:
            self._flush()

    def _send_request(self) -> None:
        t = self.target
        host = t.host if t.port == 443 else f"{t.host}:{t.port}"
        request = h11.Request(
            method="GET",
            target=t.path,
            headers=[
                ("Host", host),
                ("User-Agent", f"konnect-relay/{__version__}"),
                ("Accept", "application/json"),
                ("Connection", "close"),
            ],
        )
        self.tls.write(self.http.send(request) + self.http.send(h11.EndOfMessage()))

    def _read(self) -> None:
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLEOFError:
                chunk = b""  # a peer that closes without close_notify: h11 judges
            self.http.receive_data(chunk)
            if not self._events():
                return
            if not chunk:
                return

    def _events(self) -> bool:
        """Handle what h11 parsed; False once the exchange is over."""
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                return True
            if isinstance(event, h11.Response):
                self.status = event.status_code
                if self.status != 200:
                    reason = event.reason.decode("latin-1", "replace")[:80]
                    self._fail("http_status", f"HTTP {self.status} {reason}".rstrip())
                    return False
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > self.limit:
                        self._fail("too_large", f"Content-Length {int(value)} is over {self.limit}")
                        return False
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.limit:
                    self._fail("too_large", f"body is over {self.limit} bytes")
                    return False
            elif isinstance(event, h11.EndOfMessage):
                if not self.done.done():
                    self.done.set_result(bytes(self.body))
                return False
            elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                self._fail("closed", "connection closed before the response was complete")
                return False

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, reason: str, detail: str) -> None:
        if not self.done.done():
            self.done.set_exception(FetchError(reason, detail))


def _why(exc: Exception | None) -> str:
    return f": {exc}" if exc is not None else ""


async def https_get(
    dialer: Dialer,
    url: str,
    *,
    ca_file: str | None,
    timeout: float,
    limit: int,
) -> bytes:
    """GET ``url`` through ``dialer``; the body of a 200, or FetchError."""
    target = Target.parse(url)
    ctx = ssl.create_default_context(cafile=ca_file)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    exchange = _Exchange(ctx, target, limit, done)
    try:
        async with asyncio.timeout(timeout):
            try:
                dialled = await dialer.dial(target.host, target.port, exchange)
            except DialError as exc:
                raise FetchError(exc.reason, f"{url}: {exc.detail}") from None
            if dialled.leftover:
                exchange.data_received(dialled.leftover)
            try:
                return await done
            except FetchError as exc:
                raise FetchError(exc.reason, f"{url}: {exc.detail}") from None
    except TimeoutError:
        raise FetchError("timeout", f"{url}: not fetched within {timeout:g} s") from None
    finally:
        if exchange.transport is not None:
            exchange.transport.abort()
