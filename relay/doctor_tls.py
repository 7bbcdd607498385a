"""The doctor's TLS handshake over any transport a dialer returns.

The handshake runs over memory BIOs fed by a small protocol rather than
through ``loop.start_tls``: uvloop's ``start_tls`` accepts only its own TCP,
Unix and TLS transports, and a dialer may hand back another kind (an SSH
channel), so the doctor drives TLS itself over whatever transport it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime
from typing import cast

# Enough of a non-TLS answer to recognise it ("HTTP/1.1 400 Bad Request").
MAX_SHOWN_BYTES = 24
# RFC 8446 §5.1: ContentType handshake(22) and alert(21) start every record a
# TLS server sends in answer to a ClientHello.
_TLS_RECORD_TYPES = (21, 22)
# OpenSSL X509_V_ERR_HOSTNAME_MISMATCH: the chain is fine, the name is not in it.
_HOSTNAME_MISMATCH = 62


class Failed(Exception):
    """One step failed: ``verdict`` goes in the table, ``detail`` below it."""

    def __init__(self, verdict: str, detail: str = "") -> None:
        super().__init__(verdict)
        self.verdict = verdict
        self.detail = detail


class Probe(asyncio.Protocol):
    """Collects what the server sends into the TLS engine's input BIO."""

    __slots__ = ("_wakeup", "closed", "eof", "first", "incoming", "loop", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.incoming = ssl.MemoryBIO()
        self.first = b""
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._wakeup: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses,
        # so this is a cast, not an isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if len(self.first) < MAX_SHOWN_BYTES:
            self.first += data[: MAX_SHOWN_BYTES - len(self.first)]
        self.incoming.write(data)
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def wait(self) -> None:
        """Until more bytes or the end of the stream arrive."""
        if self.eof:
            return
        self._wakeup = self.loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None


def _flush(outgoing: ssl.MemoryBIO, transport: asyncio.WriteTransport) -> None:
    data = outgoing.read()
    if data and not transport.is_closing():
        transport.write(data)


def _not_tls(probe: Probe) -> Failed | None:
    if probe.first and probe.first[0] not in _TLS_RECORD_TYPES:
        return Failed(
            "not TLS",
            f"the server answered the ClientHello with {probe.first!r}: not a TLS "
            "server (an HTTP port, or a proxy that expects a request)",
        )
    return None


def _tls_failure(exc: ssl.SSLError, probe: Probe, verified_against: str) -> Failed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = str(exc.verify_message)
        if exc.verify_code == _HOSTNAME_MISMATCH:
            return Failed("hostname mismatch", message)
        return Failed(
            f"certificate verify failed: {message}",
            f"verified against {verified_against}; a TLS-inspecting middlebox presents "
            "its own CA's certificates (pass that CA with --cafile to confirm)",
        )
    failure = _not_tls(probe)
    if failure is not None:
        return failure
    reason = (exc.reason or str(exc)).lower().replace("_", " ")
    detail = ""
    if "alert" in reason:
        detail = (
            "the server refused the handshake; over TLS 1.2 a server that demands a "
            "client certificate answers this way (doctor sends none)"
        )
    return Failed(f"TLS handshake failed: {reason}", detail)


async def tls_handshake(
    transport: asyncio.WriteTransport,
    probe: Probe,
    context: ssl.SSLContext,
    host: str,
    verified_against: str,
) -> tuple[str, datetime]:
    """Verify ``host``'s certificate over ``transport``; (TLS version, notAfter).
    Ends with ``close_notify``; raise Failed with the cause."""
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(probe.incoming, outgoing, server_hostname=host)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            _flush(outgoing, transport)  # the alert tells the server why
            raise _tls_failure(exc, probe, verified_against) from None
        _flush(outgoing, transport)
        if probe.eof and not probe.incoming.pending:
            raise _not_tls(probe) or Failed(
                "connection closed during TLS handshake",
                "closed without a TLS answer: a firewall or proxy that filters by SNI?"
                if not probe.first
                else "",
            )
        await probe.wait()
    _flush(outgoing, transport)  # our Finished (TLS 1.3: the handshake ends with it)
    version = tls.version() or "?"
    cert = tls.getpeercert()
    if not cert or "notAfter" not in cert:
        raise Failed("TLS handshake failed: no server certificate")
    not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(str(cert["notAfter"])), UTC)
    # unwrap() writes our close_notify, then wants the peer's: not awaited.
    with contextlib.suppress(ssl.SSLError):
        tls.unwrap()
    _flush(outgoing, transport)
    return version, not_after
