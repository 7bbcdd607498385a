"""What kind of socket a transport has, and what state a TCP socket is in:
the facts the splice switch (splice.py) and a tunnel's move (moving.py) need."""

from __future__ import annotations

import socket
from typing import Any


def plain_tcp(transport: Any) -> bool:
    """True for a transport that owns a plain TCP socket: no TLS layer (a TLS
    listener, a TLS parent proxy), no SSH channel, no Unix socket. Only these
    can be taken over; anything else stays on the transport path."""
    kind = type(transport).__name__
    if kind == "TCPTransport":
        return True  # uvloop's: TCP only, never TLS (its TLS transport is another class)
    if kind != "_SelectorSocketTransport":  # asyncio's, for TCP and Unix sockets
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return False
    # An IP peer's address is a tuple, a Unix one a string. (Not the "socket"
    # extra: uvloop creates and keeps an object per transport for it, memory
    # every idle tunnel would carry.)
    return isinstance(transport.get_extra_info("peername"), tuple)


# tcp_states.h. A socket whose peer ended with a FIN sits in CLOSE_WAIT until
# we send ours; one the peer reset is in TCP_CLOSE. (Once we have sent our FIN,
# the peer's FIN moves the socket to TIME_WAIT, whose user-side state is
# TCP_CLOSE too: only before our FIN does TCP_CLOSE mean a reset.)
_TCP_CLOSE = 7


def was_reset(sock: socket.socket) -> bool:
    """Whether an end of stream on a socket we have not shut down was really a
    reset. A socket reports a reset once, and splice() can swallow that report:
    when a splice into the socket moved some bytes before the send that hit
    the reset, it returns the count and the error is gone. The next read then
    sees a plain end of stream."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return True
    return info[0] == _TCP_CLOSE
