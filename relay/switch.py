"""The switch of a tunnel from its transports to the in-kernel pump (splice.py).

A tunnel between two plain TCP sockets that carries bulk data leaves the event
loop's transports: both are paused, their write buffers drained, their
sockets handed to a ``splice.Link``. Nothing read is lost or reordered: every
byte read before the pause has been written by the time the pipes start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay import splice
from relay import tunnel as t

if TYPE_CHECKING:
    from relay.tunnel import Tunnel


def begin(tunnel: Tunnel) -> None:
    """Called once, when a side passes SWITCH_AFTER: pause both transports
    and switch as soon as both write buffers are empty. A tunnel that is
    closing, half-closed or still peeking stays on its transports."""
    if tunnel.switch_at < 0:  # switching already, or moving out (moving.py)
        return
    tunnel.switch_at = t.NEVER
    cs, us = tunnel.client_side, tunnel.upstream_side
    client, upstream = cs.transport, us.transport
    if (
        client is None
        or upstream is None
        or tunnel.closed_at is not None
        or cs.eof
        or us.eof
        or client.is_closing()
        or upstream.is_closing()
        or client.get_protocol() is not cs
        or upstream.get_protocol() is not us
    ):
        return
    client.pause_reading()
    upstream.pause_reading()
    if client.get_write_buffer_size() or upstream.get_write_buffer_size():
        # With limits (0, 0) a transport calls resume_writing exactly when
        # its buffer becomes empty (pause_writing first, if it was not
        # paused already): that is when complete() tries again (Tunnel.buffer_empty).
        tunnel.switch_at = t.DRAINING
        client.set_write_buffer_limits(0, 0)
        upstream.set_write_buffer_limits(0, 0)
        return
    complete(tunnel)


def complete(tunnel: Tunnel) -> None:
    """Hand both sockets to a splice.Link once nothing is buffered. Reading
    is paused, so every byte read so far has been written: the pipes start
    from the sockets' own queues and nothing is lost or reordered."""
    cs, us = tunnel.client_side, tunnel.upstream_side
    client, upstream = cs.transport, us.transport
    if client is None or upstream is None or tunnel.closed_at is not None:
        return
    if client.is_closing() or upstream.is_closing():
        return
    if client.get_write_buffer_size() or upstream.get_write_buffer_size():
        return  # the other buffer is still draining; its resume_writing calls again
    tunnel.switch_at = t.NEVER
    try:
        link = splice.Link.take(tunnel, client, upstream, cs, us)
    except OSError:
        # No descriptor for the duplicates: carry on with the transports.
        for transport in (client, upstream):
            transport.set_write_buffer_limits(t.HIGH_WATER, t.LOW_WATER)
            transport.resume_reading()
        return
    for transport in (client, upstream):
        # Write buffer empty, reading paused: close() only closes the
        # loop's descriptor; the connection lives on in the duplicate.
        transport.set_protocol(t._DETACHED)
        transport.close()
    cs.transport = us.transport = cs.peer = us.peer = None
    tunnel.link = link
    link.start()
