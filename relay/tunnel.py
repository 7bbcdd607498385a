"""The byte pump: two transports, two small protocol objects, nothing else.

Each side's protocol receives bytes from its own transport and writes them to
the peer's transport. Backpressure is owned here and is symmetric: when a
transport's write buffer passes its high-water mark asyncio calls
``pause_writing`` on *its* protocol, which pauses reading on the *other*
transport; ``resume_writing`` (below the low-water mark) resumes it. So a
tunnel holds at most about one write buffer per direction whatever the peers
do.

Half-close is a state: EOF from one side is forwarded with ``write_eof`` and
the other direction keeps flowing; the tunnel closes when both sides have
ended (or on error, idle timeout, drain, revocation).

Per chunk the hot path does one ``write`` and one integer addition. Counters
are plain integers that the server folds into Prometheus on scrape and on
close; idle detection compares counters from a periodic sweep instead of
stamping a clock per chunk.

A tunnel between two plain TCP sockets that carries bulk data (one direction
passes ``splice.SWITCH_AFTER`` bytes) leaves the transports: both are paused,
their write buffers drained, their sockets handed to a ``splice.Link`` that
moves the bytes inside the kernel. Counters, close reasons, half-close, idle
timeout and ``close()`` keep their meaning in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay import splice, switch, tlspeek
from relay.deadlines import Waiting
from relay.metrics import HostSeries
from relay.sockets import plain_tcp

if TYPE_CHECKING:
    from relay.moving import Hold

# Per-direction write-buffer watermarks. 256 KiB keeps a 10 Gb/s loopback pipe
# full while bounding a tunnel to ~0.5 MiB of user-space buffering even when a
# peer stops reading entirely.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# Tunnel.switch_at beyond any real count: this tunnel stays on its transports
# (TLS, SSH, Unix sockets, no splice here, or the switch was tried once).
NEVER = 1 << 62
# Tunnel.switch_at while both transports are paused until their write buffers
# are empty, just before the switch.
DRAINING = -1
# Tunnel.switch_at while both transports are paused until their write buffers
# are empty, before the tunnel moves to a successor (moving.py).
MOVING = -2

_ids = itertools.count(1)


class _Side(asyncio.Protocol):
    """Protocol for one transport; forwards what it receives to ``peer``."""

    __slots__ = ("eof", "nbytes", "peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.nbytes = 0
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.peer.write(data)  # type: ignore[union-attr]
        if self.nbytes >= self.tunnel.switch_at:
            self.tunnel.begin_splice()

    def eof_received(self) -> bool:
        self.eof = True
        self.tunnel.side_eof(self)
        return True  # keep the transport half-open; the tunnel decides when to close

    def pause_writing(self) -> None:
        self.peer.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.tunnel.switch_at < 0:
            self.tunnel.buffer_empty()  # limits are (0, 0): this buffer is empty
            return
        self.peer.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.side_lost(self, exc)


# The protocol a transport gets once its socket was handed to a splice.Link:
# its (empty, no-op) connection_lost ends the transport without the tunnel.
_DETACHED = asyncio.Protocol()


class Pending(asyncio.Protocol):
    """Holds a freshly dialled upstream connection until the tunnel starts.

    The client must see the ``200`` before any byte from the destination, and
    an event loop may deliver data as soon as the connection is made, so
    whatever arrives early is kept here (bounded) and handed to the tunnel.
    """

    __slots__ = ("buf", "eof", "exc", "lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.eof = False
        self.lost = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= HIGH_WATER:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc


class PeekHello(asyncio.Protocol):
    """The client's protocol until its TLS ClientHello has been read and checked.

    The bytes are only parsed, never altered: once the hello passes they are
    forwarded as they came and the transport is handed to the tunnel's client
    side. Used for tunnels to Konnect hosts (TLS only, SNI must equal the
    CONNECT host). The parser bounds the buffer (tlspeek.MAX_CLIENT_HELLO).
    """

    __slots__ = ("buf", "expect", "tunnel", "waiting")

    def __init__(self, tunnel: Tunnel, expect: str | None, waiting: Waiting[PeekHello]) -> None:
        self.tunnel = tunnel
        self.expect = expect
        self.buf = b""
        self.waiting = waiting  # limits.tls_peek_timeout, then timed_out()
        waiting.add(self)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        try:
            hello = tlspeek.parse_client_hello(self.buf)
        except tlspeek.PeekError:
            self.fail("not_tls")
            return
        if hello is None:
            return
        name = hello.server_name
        if self.expect is not None and name is not None and name != self.expect:
            self.fail("sni_mismatch", tlspeek.ALERT_ACCESS_DENIED)
            return
        self.cancel_timer()
        tunnel = self.tunnel
        cs = tunnel.client_side
        cs.transport.set_protocol(cs)  # type: ignore[union-attr]
        buf, self.buf = self.buf, b""
        cs.data_received(buf)
        tunnel.resume_upstream()

    def eof_received(self) -> bool:
        self.fail("not_tls")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        self.tunnel.side_lost(self.tunnel.client_side, exc)

    def timed_out(self) -> None:
        self.fail("tls_timeout")

    def cancel_timer(self) -> None:
        self.waiting.discard(self)

    def fail(self, reason: str, alert: bytes = b"") -> None:
        self.cancel_timer()
        transport = self.tunnel.client_side.transport
        if alert and transport is not None and not transport.is_closing():
            transport.write(alert)
        self.tunnel.close(reason)


class Tunnel:
    """One established CONNECT tunnel between a client and a destination."""

    __slots__ = (
        "client",
        "client_side",
        "close_reason",
        "closed_at",
        "egress",
        "folded_down",
        "folded_up",
        "host",
        "id",
        "keepalive_due",
        "label",
        "last_activity",
        "link",
        "listener",
        "lost",
        "mover",
        "on_closed",
        "opened_at",
        "opened_mono",
        "port",
        "seen_bytes",
        "series",
        "switch_at",
        "upstream_side",
        "who",
    )

    def __init__(
        self,
        client: str,
        host: str,
        port: int,
        egress: str,
        on_closed: Callable[[Tunnel], None] | None,
        listener: str = "",
    ) -> None:
        self.id = next(_ids)
        self.client = client
        self.host = host
        self.label = host  # the metrics label (bounded; see connector.REPORT_HOST_LABEL)
        self.series: HostSeries | None = None  # its metrics, once the book has it
        self.port = port
        self.who: tuple[str | None, str | None, str] = (None, None, client)
        self.egress = egress
        self.listener = listener
        self.on_closed = on_closed
        self.client_side = _Side(self)
        self.upstream_side = _Side(self)
        self.opened_at = time.time()
        self.opened_mono = time.monotonic()
        self.last_activity = self.opened_mono
        self.seen_bytes = 0
        self.folded_up = 0
        self.folded_down = 0
        self.close_reason: str | None = None
        self.closed_at: float | None = None
        self.lost = 0
        self.link: splice.Link | None = None
        self.mover: Hold | None = None  # while moving to a successor (moving.py)
        # SO_KEEPALIVE still to be set on the upstream (server's sweep).
        self.keepalive_due = False
        # A side that has carried this many bytes starts the switch to splice.
        self.switch_at = NEVER

    @property
    def bytes_up(self) -> int:
        """Client -> destination."""
        return self.client_side.nbytes

    @property
    def bytes_down(self) -> int:
        """Destination -> client."""
        return self.upstream_side.nbytes

    def start(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        early: bytes,
        pending: Pending,
        leftover: bytes = b"",
        peek: PeekHello | None = None,
    ) -> None:
        """Wire the two transports together. ``early`` are bytes the client sent
        after its request head; ``leftover`` bytes the egress received after its
        own handshake and ``pending.buf`` bytes the destination sent before the
        tunnel started. All are forwarded, none is lost. With ``peek`` the
        client's bytes go through the ClientHello check first."""
        cs, us = self.client_side, self.upstream_side
        cs.peer, us.peer = upstream, client
        if splice.available() and plain_tcp(client) and plain_tcp(upstream):
            self.switch_at = splice.SWITCH_AFTER
        cs.connection_made(client)
        upstream.set_protocol(us)
        us.connection_made(upstream)
        if peek is not None:
            client.set_protocol(peek)
            if early:
                peek.data_received(early)
        else:
            client.set_protocol(cs)
            if early:
                cs.nbytes += len(early)
                upstream.write(early)
        held = leftover + pending.buf if leftover else pending.buf
        if held:
            us.nbytes += len(held)
            client.write(held)
        if pending.lost:
            us.connection_lost(pending.exc)
            return
        if pending.eof:
            us.eof_received()
        # If a write above passed a high-water mark, the transport has called
        # pause_writing and will call resume_writing: leave that side paused.
        # While the ClientHello is being checked the destination stays unread.
        if (peek is None or client.get_protocol() is cs) and self.closed_at is None:
            self.resume_upstream()
        if upstream.get_write_buffer_size() <= HIGH_WATER:
            client.resume_reading()

    def resume_upstream(self) -> None:
        client, upstream = self.client_side.transport, self.upstream_side.transport
        if (
            client is not None
            and upstream is not None
            and not upstream.is_closing()
            and client.get_write_buffer_size() <= HIGH_WATER
        ):
            upstream.resume_reading()

    def begin_splice(self) -> None:
        """A side passed SWITCH_AFTER: move to the in-kernel pump (switch.py)."""
        switch.begin(self)

    def buffer_empty(self) -> None:
        """A write buffer emptied while switching to splice or moving out."""
        if self.switch_at == DRAINING:
            switch.complete(self)
        elif self.mover is not None:
            self.mover.flushed()

    def link_eof(self, from_client: bool) -> None:
        if self.close_reason is None:
            self.close_reason = "client_eof" if from_client else "upstream_eof"

    def link_closed(self) -> None:
        self.lost = 2
        cb, self.on_closed = self.on_closed, None
        if cb is not None:
            cb(self)

    def side_eof(self, side: _Side) -> None:
        other = self.upstream_side if side is self.client_side else self.client_side
        if self.close_reason is None:
            self.close_reason = "client_eof" if side is self.client_side else "upstream_eof"
        if other.eof:
            self.close()
            return
        peer = side.peer
        if peer is not None and peer.can_write_eof():
            peer.write_eof()
        else:
            self.close()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if self.close_reason is None:
            if exc is not None:
                # Who reset it, or an egress's reason ("egress_lost": the bastion dropped).
                self.close_reason = self.lost_reason(exc, side is self.client_side)
            else:
                self.close_reason = "client_eof" if side is self.client_side else "upstream_eof"
        if self.closed_at is None:
            self.close(abort=exc is not None)
        self.lost += 1
        if self.lost == 2:
            cb, self.on_closed = self.on_closed, None
            if cb is not None:
                cb(self)

    @staticmethod
    def lost_reason(exc: BaseException, client: bool) -> str:
        """The close reason for a connection that failed: an egress's own
        (egress_lost: the SSH bastion dropped), a reset or broken pipe saying
        which side ended it (client_reset, upstream_reset), else error."""
        reason = getattr(exc, "close_reason", None)
        if reason is not None:
            return str(reason)
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return "client_reset" if client else "upstream_reset"
        return "error"

    def close(self, reason: str | None = None, *, abort: bool = False) -> None:
        """Close both sides. ``abort`` drops unsent bytes (error, idle, drain)."""
        if reason is not None and self.close_reason is None:
            self.close_reason = reason
        if self.close_reason is None:
            self.close_reason = "error"
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        if self.link is not None:
            self.link.close(abort)
            return
        for side in (self.client_side, self.upstream_side):
            transport = side.transport
            if transport is not None and not (transport.is_closing() and not abort):
                if abort:
                    transport.abort()
                else:
                    transport.close()

    def keepalive(self) -> None:
        """SO_KEEPALIVE on the upstream TCP connection, wherever it lives now."""
        self.keepalive_due = False
        if self.link is not None:
            sock = self.link.upstream
        elif self.upstream_side.transport is not None:
            sock = self.upstream_side.transport.get_extra_info("socket")
        else:
            return
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile: nothing to keep alive
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def activity(self, now: float) -> float:
        """When bytes last moved, as far as the sweep knows (``now`` if they
        moved since it last looked); changes nothing."""
        total = self.client_side.nbytes + self.upstream_side.nbytes
        return now if total != self.seen_bytes else self.last_activity

    def idle_for(self, now: float) -> float:
        """Seconds since the sweep last saw a byte move (sweep granularity)."""
        total = self.client_side.nbytes + self.upstream_side.nbytes
        if self.link is not None:
            self.link.tidy(now)
        if total != self.seen_bytes:
            self.seen_bytes = total
            self.last_activity = now
        return now - self.last_activity
