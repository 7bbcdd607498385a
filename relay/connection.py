"""A client connection until its tunnel is established (or it is refused).

The protocol keeps only I/O and one explicit phase; what the bytes mean is the
head machine's (head.py), what to do about a request is admission's, how to
reach the destination is the connector's.

Phases (one field, ``phase``; one deadline at a time, ``deadline``):

- HANDSHAKE: accepted on a TLS listener; deadline limits.head_timeout;
  then HEAD, or CLOSED when the handshake fails or never ends;
- HEAD: reading the head; deadline limits.head_timeout (from accept); then
  VERIFYING, DIALING, LINGERING or CLOSED;
- VERIFYING: credentials are checked on the argon2 pool; then DIALING,
  LINGERING or CLOSED;
- DIALING: admitted, the connector dials; deadline limits.connect_timeout;
  then CLOSED (the tunnel owns the transport) or LINGERING;
- LINGERING: refused, answer and FIN sent, input dropped; deadline
  LINGER_TIMEOUT; then CLOSED;
- CLOSED: the transport is gone or handed on.

The head deadline runs from accept, so on a TLS listener it covers the
handshake too (the event loop calls ``connection_made`` only after it).
A phase's deadline is its membership in one of the relay's ``Waiting`` sets
(deadlines.py: one timer per phase), not a timer per connection.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from relay import connect, tlspeek
from relay.egress import Dialing
from relay.head import Head, HeadReader, Refusal
from relay.hostport import hostport
from relay.listeners import Listener, cert_name
from relay.tunnel import HIGH_WATER

if TYPE_CHECKING:
    from relay.server import Relay

# How long a refused client's remaining input is read and dropped before close.
LINGER_TIMEOUT = 2.0


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    HEAD = "head"
    VERIFYING = "verifying"
    DIALING = "dialing"
    LINGERING = "lingering"
    CLOSED = "closed"


def format_target(host: str, port: int) -> str:
    """host:port for logs and messages; userinfo a client put in its target is
    never repeated (it may be a credential)."""
    if "@" in host:
        host = "(userinfo withheld)@" + host.rpartition("@")[2]
    return hostport(host, port)


class ClientConnection(asyncio.Protocol):
    """One client connection through the phases in the module docstring."""

    __slots__ = (
        "buf",
        "cert",
        "client_eof",
        "client_ip",
        "expired",
        "identity",
        "listener",
        "over_limit",
        "peer",
        "phase",
        "reader",
        "relay",
        "task",
        "transport",
        "user",
    )

    def __init__(self, relay: Relay, listener: Listener) -> None:
        self.relay = relay
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.reader: HeadReader | None = None
        self.buf: bytes | bytearray = b""  # bytes after the head, while dialling
        self.client_ip = ""
        self.peer = ""
        self.cert: str | None = None
        self.user: str | None = None
        self.identity = ""
        self.task: Dialing | asyncio.Task[None] | None = None  # credential check or dial
        self.expired = False  # DIALING's deadline passed (not the client going away)
        self.client_eof = False  # EOF after the head: forwarded once the tunnel is up
        self.over_limit: tuple[str, str] | None = None
        self.phase = Phase.HEAD
        if listener.ssl is not None:
            # The event loop creates this protocol when it accepts and calls
            # connection_made only after the TLS handshake: the handshake already
            # counts as a pending head (limits, fd budget, head_timeout).
            self.phase = Phase.HANDSHAKE
            self.over_limit = relay.admission_at_accept()
            if self.over_limit is None:
                self._wait_head()

    # --- transport events -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        self.peer = format_target(self.client_ip, int(peer[1])) if peer else "unknown"
        relay = self.relay
        listener = self.listener
        if listener.ssl is not None:
            self.cert = cert_name(transport.get_extra_info("peercert"))
            self.phase = Phase.HEAD
        if listener.proxy_protocol and not listener.trusts(self.client_ip):
            relay.metrics.requests_denied.labels("untrusted_proxy").inc()
            detail = "PROXY protocol listener: source is not in trusted_proxies"
            self.log_request("", False, 0, "untrusted_proxy", detail=detail)
            self._end_wait()
            self.phase = Phase.CLOSED
            transport.abort()  # type: ignore[attr-defined]
            return
        self.reader = HeadReader(
            self.client_ip,
            self.peer,
            proxy_protocol=listener.proxy_protocol,
            sni_port=(listener.target_port or listener.port) if listener.sni else None,
        )
        if listener.ssl is None:
            self.over_limit = relay.admission_at_accept()
            if self.over_limit is None:
                self._wait_head()
        if self.over_limit is not None:
            self.refuse(503, *self.over_limit)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is Phase.HEAD:
            assert self.reader is not None
            answer = self.reader.feed(data)
            if type(answer) is Head:
                self._end_wait()
                self.client_ip, self.peer = answer.client_ip, answer.peer
                self.buf = answer.early
                self.phase = Phase.VERIFYING  # until admission says otherwise
                self.relay.connector.on_head(self, answer.request)
            elif type(answer) is Refusal:
                self.refuse(answer.status, answer.reason, answer.detail, answer.headers)
        elif phase is Phase.VERIFYING or phase is Phase.DIALING:
            # Bytes after the head are kept for the tunnel. Reading goes on (so a
            # client that resets is noticed and the dial cancelled) until the
            # buffer holds a write buffer's worth.
            if not self.buf:
                self.buf = data
            else:
                if type(self.buf) is bytes:
                    self.buf = bytearray(self.buf)
                self.buf += data
            if len(self.buf) >= HIGH_WATER:
                self.transport.pause_reading()  # type: ignore[union-attr]
        # LINGERING: the refused client's remaining bytes are read and dropped

    def eof_received(self) -> bool:
        if self.phase is Phase.VERIFYING or self.phase is Phase.DIALING:
            self.client_eof = True  # a half-close to forward once the tunnel is up
            return True
        if self.phase is Phase.HEAD:  # gave up before a complete head: an early close
            self.phase = Phase.CLOSED
            self.relay.early.in_head(self.listener.name, self.peer, self.reader, "closed")
        self._end_wait()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is Phase.HEAD:
            how = "reset" if exc else "lost"
            self.relay.early.in_head(self.listener.name, self.peer, self.reader, how)
        self._end_wait()
        self._cancel_deadline()
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client went away while the relay was verifying or dialling
        self.phase = Phase.CLOSED
        self.transport = None

    def _wait_head(self) -> None:
        self.relay.pending.add(self)  # limits.head_timeout from now

    def _end_wait(self) -> None:
        """Leave the head phase: no longer pending, its deadline off."""
        self.relay.pending.discard(self)

    def _cancel_deadline(self) -> None:
        """Leave DIALING's or LINGERING's wait."""
        phase = self.phase
        if phase is Phase.DIALING:
            self.relay.dials.discard(self)
        elif phase is Phase.LINGERING:
            self.relay.lingering.discard(self)

    @property
    def deadline(self) -> float | None:
        """When the current phase's wait ends (loop time), None without one."""
        relay, phase = self.relay, self.phase
        if phase is Phase.HEAD or phase is Phase.HANDSHAKE:
            return relay.pending.deadline(self)
        if phase is Phase.DIALING:
            return relay.dials.deadline(self)
        if phase is Phase.LINGERING:
            return relay.lingering.deadline(self)
        return None

    def head_timeout(self) -> None:
        limit = self.relay.settings.limits.head_timeout
        if self.phase is Phase.HANDSHAKE:
            # The event loop ran the handshake and never handed over a transport:
            # it failed (no or an unknown client certificate, a client speaking
            # plain HTTP) or is still running. The loop reports neither, and
            # gives no client address; this is where it shows.
            self.relay.pending.discard(self)
            self.phase = Phase.CLOSED
            self.relay.metrics.requests_denied.labels("tls_handshake").inc()
            detail = f"TLS handshake failed or not complete within {limit:g} s"
            self.log_request("", False, 0, "tls_handshake", detail=detail)
            self.relay.early.note(self.listener.name, "tls_handshake", "unknown", detail)
            return
        self.refuse(408, "head_timeout", f"request head not received within {limit:g} s")

    def dialing(self) -> None:
        """Enter DIALING: the connector dials (``task``), within limits.connect_timeout."""
        self.phase = Phase.DIALING
        self.relay.dials.add(self)

    def expire(self) -> None:
        """limits.connect_timeout passed while dialling: stop the dial."""
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def handed_over(self) -> None:
        """The tunnel owns the transport now."""
        self._cancel_deadline()
        self.task = None
        self.phase = Phase.CLOSED

    # --- answers --------------------------------------------------------------------

    def refuse(
        self,
        status: int,
        reason: str,
        detail: str,
        headers: Iterable[tuple[str, str]] = (),
        target: str = "",
        **extra: Any,
    ) -> None:
        """Answer with an error status and close; log and count the refusal."""
        self._end_wait()
        self._cancel_deadline()
        relay = self.relay
        relay.metrics.requests_denied.labels(reason).inc()
        self.log_request(target, False, status, reason, detail=detail, **extra)
        who = self.identity or self.client_ip
        relay.book.memory.refused(who, self.peer, reason, target, status)
        transport = self.transport
        self.phase = Phase.CLOSED
        if transport is None or transport.is_closing():
            return
        if not self.listener.sni:
            transport.write(connect.response(status, detail, headers))
        elif reason == "no_sni":
            transport.write(tlspeek.ALERT_UNRECOGNIZED_NAME)
        elif 400 < status < 500:
            transport.write(tlspeek.ALERT_ACCESS_DENIED)
        elif status >= 500:
            transport.write(tlspeek.ALERT_INTERNAL_ERROR)
        if transport.can_write_eof():
            # Lingering close: closing with unread input would make the kernel
            # send a reset that can destroy the answer before the client reads
            # it. Send FIN, drop what the client still sends, close on its EOF.
            transport.write_eof()
            self.phase = Phase.LINGERING
            transport.resume_reading()
            relay.lingering.add(self)  # LINGER_TIMEOUT, then linger_over()
        else:
            transport.close()

    def linger_over(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def log_request(
        self, target: str, allowed: bool, status: int, reason: str, **fields: Any
    ) -> None:
        """The one decision line per request (no header value but the target)."""
        self.relay.log(
            "request",
            client=self.peer,
            listener=self.listener.name,
            identity=self.identity or None,
            target=target,
            allowed=allowed,
            status=status,
            reason=reason,
            **fields,
        )
