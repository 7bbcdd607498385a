"""The handover channel between a running relay and its successor.

``konnect-relay upgrade`` (or SIGUSR2) makes the running relay start a
successor from the code now installed; the two talk over a private
``SOCK_SEQPACKET`` Unix socket pair. The predecessor keeps one end, the
successor inherits the other (its descriptor number is in the environment
variable ``HANDOVER_ENV``). Every message is a JSON object; the descriptors it
moves (listening sockets, a tunnel's two sockets) travel with it as
``SCM_RIGHTS`` ancillary data, so they arrive together or not at all.

The conversation, each step answered before the next begins::

    successor    hello {protocol, pid}            (config loaded and valid)
    predecessor  listeners {...} + sockets        (it has stopped accepting)
    successor    accepting                        (it accepts on them now)
    predecessor  tunnels {tunnels: [...]} + fds   (a batch; both sides paused)
    successor    adopted {ids}                    (it owns them from here on)
    ...
    predecessor  done {metrics, admin} + admin socket
    successor    took_over {pid}                  (pid file written)

Either side may send ``failed {cause}`` instead of its next message. A
successor must not read a byte of a tunnel before it has sent ``adopted``; the
predecessor reads none after it sent the batch, and takes a batch back only
while no ``adopted`` for it arrived. So a tunnel is never pumped by two
processes.

A packet is at most ``PACKET`` bytes (a Unix datagram's limit is the send
buffer, ~208 KiB by default): a longer message is sent as several packets,
each but the last marked as continued, the descriptors with the first.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
from typing import Any

# The successor's end of the channel: a descriptor number.
HANDOVER_ENV = "KONNECT_RELAY_HANDOVER"
# Bumped whenever a message changes meaning; both sides must speak the same.
PROTOCOL = 1
# Bytes per packet, below the default Unix socket send buffer.
PACKET = 60 * 1024
# Descriptors per message: SCM_MAX_FD (253) in the kernel.
MAX_FDS = 250
# A message a peer may send us, at most (the largest is the metrics state of
# a relay with thousands of host series).
MAX_MESSAGE = 64 * 1024 * 1024
_MORE = b"+"
_LAST = b"."


class ChannelClosed(Exception):
    """The other side closed the channel (it exited, or crashed)."""


class Channel:
    """One end of the handover socket pair, driven by the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """Our end, and the successor's (inheritable, for ``pass_fds``)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        return cls(ours), theirs

    @classmethod
    def inherited(cls, fd: int) -> Channel:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise OSError(f"descriptor {fd} is not a handover channel: {exc}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise OSError(f"descriptor {fd} is not a handover channel")
        sock.set_inheritable(False)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    async def _ready(self, writing: bool) -> None:
        fd = self.sock.fileno()
        done: asyncio.Future[None] = self.loop.create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        if writing:
            self.loop.add_writer(fd, wake)
        else:
            self.loop.add_reader(fd, wake)
        try:
            await done
        finally:
            if writing:
                self.loop.remove_writer(fd)
            else:
                self.loop.remove_reader(fd)

    async def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send one message; ``fds`` travel with it (the caller keeps its copies)."""
        if fds and len(fds) > MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one message (at most {MAX_FDS})")
        data = json.dumps(message, separators=(",", ":")).encode()
        chunks = [data[i : i + PACKET] for i in range(0, len(data), PACKET)] or [b""]
        for n, chunk in enumerate(chunks):
            packet = (_MORE if n + 1 < len(chunks) else _LAST) + chunk
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                if fds and n == 0
                else []
            )
            while True:
                try:
                    self.sock.sendmsg([packet], ancillary)
                    break
                except BlockingIOError:
                    await self._ready(writing=True)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise ChannelClosed(str(exc)) from None

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it (now ours)."""
        parts: list[bytes] = []
        fds: list[int] = []
        size = 0
        while True:
            try:
                data, got, flags, _ = socket.recv_fds(self.sock, PACKET + 1, MAX_FDS)
            except BlockingIOError:
                await self._ready(writing=False)
                continue
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from None
            fds.extend(got)
            if not data:
                close_fds(fds)
                raise ChannelClosed("the other side closed the channel")
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                close_fds(fds)
                raise OSError("a handover message was truncated")
            size += len(data) - 1
            if size > MAX_MESSAGE:
                close_fds(fds)
                raise OSError(f"a handover message over {MAX_MESSAGE} bytes")
            parts.append(data[1:])
            if data[:1] == _LAST:
                break
        try:
            message = json.loads(b"".join(parts))
        except ValueError as exc:
            close_fds(fds)
            raise OSError(f"a handover message is not JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            close_fds(fds)
            raise OSError("a handover message without a type")
        return message, fds

    async def expect(self, kind: str) -> tuple[dict[str, Any], list[int]]:
        """The next message, which must be ``kind`` (a ``failed`` one raises
        HandoverFailed with the other side's cause)."""
        message, fds = await self.recv()
        if message["type"] == kind:
            return message, fds
        close_fds(fds)
        if message["type"] == "failed":
            raise HandoverFailed(str(message.get("cause", "no cause given")))
        raise HandoverFailed(f"expected {kind!r}, got {message['type']!r}")


class HandoverFailed(Exception):
    """The handover cannot go on; the message says why."""


def close_fds(fds: list[int]) -> None:
    """Close descriptors a message brought that nothing will use."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def refuse(fd: int, cause: str) -> None:
    """Tell the predecessor why this successor will not start (before any
    event loop: a config that does not load). The predecessor carries on."""
    message = _LAST + json.dumps({"type": "failed", "cause": cause[: PACKET // 2]}).encode()
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        sock.sendmsg([message])
        sock.close()
