"""Upgrading in place, the successor's side: take the predecessor's listening
sockets and tunnels (handover.py has the conversation, upgrade.py the
predecessor's side).

The successor holds every tunnel it is given without reading it until it has
told the predecessor ``took_over``: until then the predecessor may take them
back. If the predecessor disappears midway (killed), whatever was passed
already is the successor's: nobody else holds it any more.

``HANDOVER_FAULT_ENV`` names a file whose content, when the file exists, is a
step at which this successor fails on purpose (``hello``, ``listeners``,
``accepting``, ``tunnels``, ``done``; ``stall``: stop answering;
``kill_predecessor``: kill the predecessor after the first batch; ``step@i``: only
in worker i). It is
how the tests show that a failure at each step loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import moving, tunnel
from relay.handover import PROTOCOL, Channel, ChannelClosed, close_fds
from relay.notify import notify

if TYPE_CHECKING:
    from relay.server import Relay
    from relay.tunnel import Tunnel

HANDOVER_FAULT_ENV = "KONNECT_RELAY_HANDOVER_FAULT_FILE"


def _fault(worker: int | None) -> str | None:
    """The step to fail at; ``step@i``: only in worker i (workers: N)."""
    path = os.environ.get(HANDOVER_FAULT_ENV)
    if not path:
        return None
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    step, _, only = text.partition("@")
    if only and (worker is None or only != str(worker)):
        return None
    return step or None


class Successor:
    """Takes over from the relay at the other end of ``channel``."""

    def __init__(
        self, relay: Relay, channel: Channel, pid_file: str | None, worker: int | None = None
    ) -> None:
        self.relay = relay
        self.channel = channel
        self.pid_file = pid_file
        self.fault = _fault(worker)
        self.adopted: list[tuple[Tunnel, int, int]] = []
        self.closed_meanwhile: set[int] = set()
        self.lost = False  # the predecessor went away midway
        self.done: dict[str, Any] = {}

    async def _crash_at(self, step: str) -> None:
        if self.fault == "stall" and step == "tunnels":
            await self.relay.stopped.wait()  # never answers; the predecessor times out
        if self.fault == step:
            os.kill(os.getpid(), signal.SIGKILL)

    async def start(self) -> None:
        """Take the listeners and start serving on them; raise OSError (the
        cause is sent to the predecessor first) when that cannot be done."""
        relay, channel = self.relay, self.channel
        relay.log.shared = True  # the predecessor writes to the same stdout
        self._watch_predecessor()
        await self._crash_at("hello")
        await channel.send(
            {"type": "hello", "protocol": PROTOCOL, "pid": os.getpid(), "workers": 1}
        )
        message, fds = await channel.expect("listeners")
        await self._crash_at("listeners")
        inherited: dict[tuple[str, int], list[list[socket.socket]]] = {}
        socks = [socket.socket(fileno=fd) for fd in fds]
        for entry in message["listeners"]:
            host, port = entry["address"]
            group, socks = socks[: entry["sockets"]], socks[entry["sockets"] :]
            inherited.setdefault((str(host), int(port)), []).append(group)
        relay.book.adopt_memory(message.get("memory", {}), time.monotonic())
        tunnel._ids = itertools.count(int(message["ids_from"]))
        theirs = message.get("admin")
        admin = relay.settings.admin
        # The admin listener comes with `done` when it is the same address.
        deferred = theirs is not None and admin is not None and tuple(theirs) == admin
        try:
            await relay.start(inherited=inherited, defer_admin=deferred)
        except OSError as exc:
            await channel.send({"type": "failed", "cause": f"cannot listen: {exc}"})
            raise
        finally:
            for groups in inherited.values():  # the ones no listen: entry wanted
                for group in groups:
                    for sock in group:
                        sock.close()
        self.deferred_admin = deferred
        await channel.send({"type": "accepting"})
        await self._crash_at("accepting")

    def _watch_predecessor(self) -> None:
        """Stop sharing the log stream's writes once the predecessor has exited."""
        log, loop = self.relay.log, asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(os.getppid())
        except OSError:
            return  # it is gone already, or no pidfd here: keep writing in pieces

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            log.shared = False

        loop.add_reader(fd, exited)

    async def receive(self) -> None:
        """Tunnels until ``done`` (or the predecessor is gone)."""
        channel = self.channel
        timeout = self.relay.settings.limits.upgrade_timeout
        while True:
            try:
                async with asyncio.timeout(timeout):
                    message, fds = await channel.recv()
            except ChannelClosed:
                self.lost = True
                return
            except TimeoutError:
                # The predecessor still holds every tunnel it sent: give up
                # (it takes them back when the channel closes).
                with contextlib.suppress(ChannelClosed):
                    await channel.send({"type": "failed", "cause": "the predecessor stalled"})
                raise OSError(f"the predecessor sent nothing for {timeout:g} s") from None
            kind = message["type"]
            if kind == "tunnels":
                await self._crash_at("tunnels")
                states = message["tunnels"]
                if len(fds) != 2 * len(states):
                    close_fds(fds)
                    await channel.send({"type": "failed", "cause": "descriptors missing"})
                    raise OSError("a tunnels message without two descriptors per tunnel")
                for i, state in enumerate(states):
                    t = moving.adopted(state, self.relay.book.closed)
                    self.adopted.append((t, fds[2 * i], fds[2 * i + 1]))
                await channel.send({"type": "adopted", "count": len(states)})
                if self.fault == "kill_predecessor":  # the predecessor dies midway
                    os.kill(os.getppid(), signal.SIGKILL)
            elif kind == "done":
                await self._crash_at("done")
                self.done = message
                self.closed_meanwhile = set(message.get("closed", ()))
                if self.deferred_admin:
                    sock = socket.socket(fileno=fds[0]) if fds else None
                    await self.relay.start_admin(sock)
                else:
                    close_fds(fds)
                self.relay.metrics.add_carried(message.get("metrics", {}))
                return
            else:
                close_fds(fds)
                raise OSError(f"unexpected handover message {kind!r}")

    async def take_over(self) -> None:
        """Write the pid file, tell systemd and the predecessor, start the tunnels."""
        relay = self.relay
        if self.lost and self.deferred_admin:
            await relay.start_admin(None)  # the predecessor is gone, and its port with it
        if self.deferred_admin:
            relay.announce(upgraded=True)
        if self.pid_file:
            Path(self.pid_file).write_text(f"{os.getpid()}\n")
        notify(f"MAINPID={os.getpid()}\nREADY=1")
        if not self.lost:
            with contextlib.suppress(ChannelClosed):
                await self.channel.send({"type": "took_over", "pid": os.getpid()})
        self.channel.close()
        moved = 0
        for t, client_fd, upstream_fd in self.adopted:
            if t.id in self.closed_meanwhile:
                close_fds([client_fd, upstream_fd])
                continue
            relay.book.moved_in(t)
            try:
                await moving.attach(t, client_fd, upstream_fd)
            except (OSError, ValueError):
                t.close("error")
                relay.book.closed(t)  # its tunnel_closed line, reason error
                continue
            moved += 1
        self.adopted.clear()
        begun = self.done.get("begun_at")
        relay.log(
            "upgraded",
            moved=moved,
            stayed=self.done.get("stayed"),
            stayed_by=self.done.get("stayed_by"),
            handover_s=round(time.time() - float(begun), 3) if begun else None,
            predecessor_lost=self.lost or None,
            tunnels=len(relay.book),
        )
