"""A tunnel moving to another process: held, exported, let go or taken back;
and on the other side, adopted.

A tunnel between two plain TCP sockets is two kernel sockets and a few
numbers, so it can move to a successor without either peer noticing (see
upgrade.py). The steps are the splice switch's (switch.py): both sides stop
being read, the write buffers (or, once spliced, the pipes) are left to
empty, and then nothing is held in the relay but the sockets themselves.
Their descriptors go to the successor with the tunnel's state; once the
successor has confirmed, this process closes its copies without a FIN (the
connections live on in the successor's). Until then it can resume the tunnel
as if nothing happened.

What cannot move stays and drains: a client side on a TLS listener (the TLS
session's keys live in this process's OpenSSL state), an upstream inside an
``https://`` parent proxy's TLS or an SSH bastion channel, a tunnel still
waiting for its ClientHello, and one that is closing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay import splice
from relay import tunnel as t
from relay.sockets import plain_tcp

if TYPE_CHECKING:
    from relay.book import TunnelBook
    from relay.tunnel import Tunnel


def movable(tunnel: Tunnel) -> bool:
    """Whether the tunnel can move now: open, both sides plain TCP, on its
    transports (not peeking, not switching to splice) or spliced."""
    if tunnel.closed_at is not None:
        return False
    link = tunnel.link
    if link is not None:
        return not link.closing
    cs, us = tunnel.client_side, tunnel.upstream_side
    client, upstream = cs.transport, us.transport
    return (
        client is not None
        and upstream is not None
        and tunnel.switch_at >= 0
        and not client.is_closing()
        and not upstream.is_closing()
        and client.get_protocol() is cs
        and upstream.get_protocol() is us
        and plain_tcp(client)
        and plain_tcp(upstream)
    )


def why_not(tunnel: Tunnel) -> str:
    """Why a tunnel stays (for the log): tls, peeking or closing."""
    if tunnel.closed_at is not None or (tunnel.link is not None and tunnel.link.closing):
        return "closing"
    client = tunnel.client_side.transport
    if client is not None and isinstance(client.get_protocol(), t.PeekHello):
        return "tls_peek"
    if tunnel.switch_at == t.DRAINING:
        return "switching"
    return "not_plain_tcp"


class Hold:
    """One tunnel on its way out: ``begin()`` stops reading it; ``ready`` is
    called once nothing of it is buffered in this process (most of the
    time at once, from begin())."""

    __slots__ = ("ready", "switch_at", "tunnel")

    def __init__(self, tunnel: Tunnel, ready: Callable[[Hold], None]) -> None:
        self.tunnel = tunnel
        self.ready = ready
        self.switch_at = tunnel.switch_at

    def begin(self) -> None:
        tunnel = self.tunnel
        tunnel.mover = self
        link = tunnel.link
        if link is not None:
            link.hold(self._link_flushed)
            return
        client, upstream = tunnel.client_side.transport, tunnel.upstream_side.transport
        assert client is not None and upstream is not None
        client.pause_reading()
        upstream.pause_reading()
        if client.get_write_buffer_size() or upstream.get_write_buffer_size():
            # As for the splice switch: with limits (0, 0) a transport calls
            # resume_writing exactly when its buffer is empty.
            tunnel.switch_at = t.MOVING
            client.set_write_buffer_limits(0, 0)
            upstream.set_write_buffer_limits(0, 0)
        else:
            self.ready(self)

    def _link_flushed(self) -> None:
        self.ready(self)

    def flushed(self) -> None:
        """A write buffer emptied (Tunnel.buffer_empty): ready once both are."""
        client, upstream = self.tunnel.client_side.transport, self.tunnel.upstream_side.transport
        if client is None or upstream is None:
            return
        if not (client.get_write_buffer_size() or upstream.get_write_buffer_size()):
            self.ready(self)

    def fds(self) -> list[int]:
        """The tunnel's two socket descriptors: client, upstream."""
        link = self.tunnel.link
        if link is not None:
            return [link.client.fileno(), link.upstream.fileno()]
        out = []
        for side in (self.tunnel.client_side, self.tunnel.upstream_side):
            assert side.transport is not None
            out.append(side.transport.get_extra_info("socket").fileno())
        return out

    def resume(self) -> None:
        """Take the tunnel back: it carries on here as before."""
        tunnel = self.tunnel
        tunnel.mover = None
        link = tunnel.link
        if link is not None:
            link.unhold()
            return
        if tunnel.switch_at == t.MOVING:
            tunnel.switch_at = self.switch_at
        client, upstream = tunnel.client_side.transport, tunnel.upstream_side.transport
        if client is None or upstream is None or tunnel.closed_at is not None:
            return
        for transport in (client, upstream):
            transport.set_write_buffer_limits(t.HIGH_WATER, t.LOW_WATER)
        tunnel.resume_upstream()
        if upstream.get_write_buffer_size() <= t.HIGH_WATER and not client.is_closing():
            client.resume_reading()

    def release(self, book: TunnelBook) -> None:
        """The successor owns the tunnel: close our copies (no FIN: the
        connections live on in the successor's descriptors) and forget it."""
        tunnel = self.tunnel
        tunnel.mover = None
        tunnel.on_closed = None
        link = tunnel.link
        if link is not None:
            link.detach()
        else:
            for side in (tunnel.client_side, tunnel.upstream_side):
                transport = side.transport
                if transport is not None:
                    # Buffer empty, reading paused: close() closes only our descriptor.
                    transport.set_protocol(t._DETACHED)
                    transport.close()
                side.transport = side.peer = None
        tunnel.closed_at = time.monotonic()
        book.moved_out(tunnel)


def export(tunnel: Tunnel, now: float) -> dict[str, Any]:
    """What the successor needs to carry the tunnel on, JSON-ready."""
    return {
        "id": tunnel.id,
        "client": tunnel.client,
        "who": list(tunnel.who),
        "host": tunnel.host,
        "port": tunnel.port,
        "label": tunnel.label,
        "egress": tunnel.egress,
        "listener": tunnel.listener,
        # Wall-clock times: both processes share that clock, not the monotonic one.
        "opened_at": tunnel.opened_at,
        "last_activity_at": tunnel.activity(now) + (time.time() - now),
        "up": tunnel.bytes_up,
        "down": tunnel.bytes_down,
        "keepalive": tunnel.keepalive_due,
        "close_reason": tunnel.close_reason,
    }


def _returning(holder: t.Pending) -> Callable[[], t.Pending]:
    return lambda: holder


def adopted(state: dict[str, Any], on_closed: Callable[[Tunnel], None]) -> Tunnel:
    """The tunnel object for a moved tunnel's state (its sockets come next)."""
    now, wall = time.monotonic(), time.time()
    tunnel = t.Tunnel(
        str(state["client"]),
        str(state["host"]),
        int(state["port"]),
        str(state["egress"]),
        on_closed,
        str(state["listener"]),
    )
    tunnel.id = int(state["id"])
    tunnel.label = str(state["label"])
    user, cert, source = state["who"]
    tunnel.who = (user, cert, str(source))
    tunnel.opened_at = float(state["opened_at"])
    tunnel.opened_mono = now - (wall - tunnel.opened_at)
    tunnel.client_side.nbytes = tunnel.folded_up = int(state["up"])
    tunnel.upstream_side.nbytes = tunnel.folded_down = int(state["down"])
    tunnel.seen_bytes = tunnel.bytes_up + tunnel.bytes_down
    tunnel.last_activity = now - (wall - float(state["last_activity_at"]))
    tunnel.keepalive_due = bool(state["keepalive"])
    tunnel.close_reason = state["close_reason"]
    return tunnel


async def attach(tunnel: Tunnel, client_fd: int, upstream_fd: int) -> None:
    """Put a moved tunnel's sockets on this loop and start pumping. A side
    that had ended before the move reads its end of stream again, and the
    tunnel carries on half-closed as before. Raises OSError (every
    descriptor closed) when the loop will not take a socket."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    holders = []
    fds = [client_fd, upstream_fd]
    try:
        while fds:
            sock = socket.socket(fileno=fds[0])
            # Holds what arrives until both sockets of the tunnel are in place.
            holder = t.Pending()
            try:
                transport, _ = await loop.connect_accepted_socket(_returning(holder), sock)
            except BaseException:
                sock.detach()  # the descriptor is closed below, once
                raise
            fds.pop(0)  # the transport owns it now
            transport.pause_reading()
            transports.append(transport)
            holders.append(holder)
    except (OSError, ValueError):
        for transport in transports:
            transport.abort()
        for fd in fds:
            os.close(fd)
        raise
    client, upstream = transports
    cs, us = tunnel.client_side, tunnel.upstream_side
    cs.peer, us.peer = upstream, client
    # Both sides' held bytes are delivered first: a switch to splice started
    # by the first could detach the transports before the second's arrive.
    tunnel.switch_at = t.NEVER
    for side, transport in ((cs, client), (us, upstream)):
        side.connection_made(transport)
        transport.set_protocol(side)
    for side, holder in ((cs, holders[0]), (us, holders[1])):
        if holder.buf:
            side.data_received(holder.buf)
    for side, holder in ((cs, holders[0]), (us, holders[1])):
        if holder.lost:
            side.connection_lost(holder.exc)
        elif holder.eof:
            side.eof_received()
    if splice.available() and tunnel.closed_at is None:
        tunnel.switch_at = splice.SWITCH_AFTER
    if tunnel.closed_at is None:
        tunnel.resume_upstream()
        if upstream.get_write_buffer_size() <= t.HIGH_WATER and not client.is_closing():
            client.resume_reading()
