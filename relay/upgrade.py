"""Upgrading in place, the running relay's side: start a successor, hand it
the listening sockets and every tunnel that can move, then drain the rest.

``konnect-relay upgrade`` (or SIGUSR2) starts ``python -m relay`` with this
process's arguments, so it runs the code now installed. The successor loads
and validates its config, then the two follow the conversation in
handover.py:

1. This relay stops accepting and passes its listening sockets; the successor
   accepts on them at once. Connections that arrive in between wait in the
   sockets' queues: none is refused.
2. Tunnels between two plain TCP sockets pass in batches: each is held (both
   sides unread, write buffers or pipes emptied, moving.py), its two
   descriptors and state sent, and the successor confirms. Rounds go on for
   a while so that dials finishing and ClientHellos being checked here end up
   moving too.
3. ``done`` carries the metrics totals (the successor's counters continue
   from them) and the admin listener; ``took_over`` says the successor wrote
   the pid file. Only then does this process close its copies of the moved
   tunnels' sockets, and only then does the successor start reading them.

Until ``took_over`` every moved tunnel is paused in both processes and still
ours: a successor that fails to start, fails validation, crashes or stalls
past ``limits.upgrade_timeout`` is killed and this relay resumes every tunnel
and accepts again, having lost nothing (``upgrade_failed``). What cannot move
(moving.py) stays and drains as in any shutdown.

The outcome is also written next to the pid file (``<pid-file>.upgrade``, a
JSON object) for ``konnect-relay upgrade`` to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from relay import moving, tunnel
from relay.files import write_atomically
from relay.handover import HANDOVER_ENV, PROTOCOL, Channel, ChannelClosed, HandoverFailed

if TYPE_CHECKING:
    from relay.listeners import Handed
    from relay.server import Relay

# Tunnels per batch: two descriptors each, under SCM_MAX_FD (253).
BATCH = 120
# How long a tunnel may take to empty its write buffers before it is sent; a
# peer that reads nothing keeps its tunnel here, to drain.
HOLD_TIMEOUT = 1.0
# How long to look again for tunnels that became movable (a dial finishing,
# a ClientHello passing its check, buffers emptying), and how often.
ROUNDS_FOR = 2.0
ROUND_EVERY = 0.05


async def exited(pid: int, timeout: float) -> None:
    """Wait (without blocking the loop) until process ``pid`` has exited (its
    parent reaps it)."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone already
        return
    gone: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(timeout):
            await gone
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def spawn_successor(argv: list[str]) -> tuple[Channel, subprocess.Popen[bytes]]:
    """``python -m relay`` with ``argv`` (the code now installed), and our end
    of the handover channel it inherits."""
    channel, theirs = Channel.pair()
    try:
        # subprocess, not the loop's: uvloop's pass_fds leaves copies of
        # stdout and stderr open in the child.
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", *argv],
            stdin=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
            env={**os.environ, HANDOVER_ENV: str(theirs.fileno())},
        )
    except BaseException:
        channel.close()
        raise
    finally:
        theirs.close()
    return channel, proc


def failure_cause(exc: Exception, step: str) -> str:
    """What ``upgrade_failed`` says about ``exc``; an exception nobody expected
    (a bug) is printed too, and everything still resumes."""
    if isinstance(exc, TimeoutError):
        return f"no answer within limits.upgrade_timeout at step {step}"
    if isinstance(exc, (HandoverFailed, ChannelClosed, OSError, ValueError)):
        return str(exc) or type(exc).__name__
    traceback.print_exc()
    return f"internal error: {exc!r}"


def status_path(pid_file: str) -> str:
    return f"{pid_file}.upgrade"


def report(pid_file: str | None, state: str, **fields: Any) -> None:
    """The outcome beside the pid file, for `konnect-relay upgrade` to read."""
    if pid_file:
        record = {"state": state, "pid": os.getpid(), **fields}
        with contextlib.suppress(OSError):
            write_atomically(status_path(pid_file), json.dumps(record).encode() + b"\n", mode=0o644)


class Upgrade:
    """One upgrade of ``relay``; ``argv`` are the arguments it was started with.

    A worker (workers: N) does not start its successor: its supervisor's
    successor does, and hands this worker the channel to it (``given``: the
    channel and the successor's pid). ``gate`` is then awaited before ``done``:
    the supervisor commits only once every worker got that far (workers_upgrade.py).
    """

    def __init__(
        self,
        relay: Relay,
        argv: list[str],
        pid_file: str | None,
        *,
        given: tuple[Channel, int] | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.relay = relay
        self.argv = argv
        self.pid_file = pid_file
        self.given = given
        self.gate = gate
        self.loop = asyncio.get_running_loop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.successor: int | None = None  # its pid
        self.channel: Channel | None = None
        self.handed: list[Handed] = []
        self.admin_sock: Any = None
        self.held: list[moving.Hold] = []  # sent, still ours until took_over
        self.stayed: Counter[str] = Counter()
        self.step = "start"
        self.succeeded = False

    def report(self, state: str, **fields: Any) -> None:
        report(self.pid_file, state, **fields)

    async def run(self) -> bool:
        """The whole upgrade; True once the successor has taken over."""
        relay = self.relay
        begun, begun_wall = self.loop.time(), time.time()
        relay.log("upgrading", pid=os.getpid(), tunnels=len(relay.book))
        self.report("running")
        try:
            await self._handover(begun_wall)
        except asyncio.CancelledError:
            await _fail(self, "cancelled: the relay is stopping")
            raise
        except Exception as exc:
            await _fail(self, failure_cause(exc, self.step))
            return False
        finally:
            if self.channel is not None:
                self.channel.close()
        spliced = sum(1 for hold in self.held if hold.tunnel.link is not None)
        for hold in self.held:
            hold.release(relay.book)
        for h in self.handed:
            for sock in h.socks:
                sock.close()
        if self.admin_sock is not None:
            self.admin_sock.close()
        self.succeeded = True
        relay.log(
            "handed_over",
            successor=self.successor,
            moved=len(self.held),
            spliced=spliced,
            stayed=len(relay.book),
            stayed_by=dict(self.stayed),
            handover_s=round(self.loop.time() - begun, 3),
        )
        self.report("done", successor=self.successor, moved=len(self.held), stayed=len(relay.book))
        return True

    async def _handover(self, begun_wall: float) -> None:
        relay = self.relay
        timeout = relay.settings.limits.upgrade_timeout
        if self.given is not None:
            self.channel, self.successor = self.given
        else:
            self.channel, self.proc = spawn_successor(self.argv)
            self.successor = self.proc.pid
        channel = self.channel
        self.step = "hello"
        async with asyncio.timeout(timeout):
            hello, _ = await channel.expect("hello")
        if hello.get("protocol") != PROTOCOL:
            raise HandoverFailed(
                f"the successor speaks handover protocol {hello.get('protocol')}, "
                f"this relay {PROTOCOL}"
            )
        if self.given is None and hello.get("workers", 1) != 1:
            raise HandoverFailed(
                f"the new config has {hello['workers']} workers, this relay 1: "
                "changing workers needs a restart"
            )
        self.step = "listeners"
        now = time.monotonic()
        self.handed = relay.listeners.hand_over()
        fds = [sock.fileno() for h in self.handed for sock in h.socks]
        # Tunnels opened here from now on come from connections accepted
        # already, and each of those holds a descriptor: the successor's ids
        # start past any this process can still give.
        ids_from = next(tunnel._ids) + relay.fd_limit
        admin = relay.settings.admin
        await channel.send(
            {
                "type": "listeners",
                "listeners": [
                    {"address": list(h.slot.address), "sockets": len(h.socks)} for h in self.handed
                ],
                "admin": list(admin) if admin is not None and relay.admin_path is None else None,
                "ids_from": ids_from,
                "memory": relay.book.memory_state(now),
            },
            fds,
        )
        async with asyncio.timeout(timeout):
            await channel.expect("accepting")
        self.step = "tunnels"
        await self._move_tunnels(channel, timeout)
        self.step = "done"
        # A held tunnel closed meanwhile (an admin action): the successor drops it.
        closed = [h.tunnel.id for h in self.held if h.tunnel.closed_at is not None]
        self.held = [h for h in self.held if h.tunnel.closed_at is None]
        relay.book.fold_all()
        stayed = [t for t in relay.book.tunnels.values() if t.mover is None]
        for t in stayed:
            self.stayed[moving.why_not(t) if not moving.movable(t) else "not_ready"] += 1
        if self.gate is not None:
            self.step = "commit"
            await self.gate()  # every worker of the supervisor is this far
            self.step = "done"
        self.admin_sock = relay.admin.hand_over() if relay.admin_path is None else None
        await channel.send(
            {
                "type": "done",
                "metrics": relay.metrics.carried(),
                "moved": len(self.held),
                "stayed": len(stayed),
                "stayed_by": dict(self.stayed),
                "closed": closed,
                "begun_at": begun_wall,
            },
            [self.admin_sock.fileno()] if self.admin_sock is not None else [],
        )
        async with asyncio.timeout(timeout):
            await channel.expect("took_over")

    async def _move_tunnels(self, channel: Channel, timeout: float) -> None:
        """Batches until nothing more can move, or ROUNDS_FOR has passed."""
        book = self.relay.book
        until = self.loop.time() + ROUNDS_FOR
        while True:
            candidates = [t for t in book.tunnels.values() if t.mover is None and moving.movable(t)]
            for start in range(0, len(candidates), BATCH):
                ready = await self._hold([*candidates[start : start + BATCH]])
                if not ready:
                    continue
                now = time.monotonic()
                states = [moving.export(h.tunnel, now) for h in ready]
                fds = [fd for h in ready for fd in h.fds()]
                self.held.extend(ready)
                await channel.send({"type": "tunnels", "tunnels": states}, fds)
                async with asyncio.timeout(timeout):
                    answer, _ = await channel.expect("adopted")
                if answer.get("count") != len(ready):
                    raise HandoverFailed(
                        f"the successor adopted {answer.get('count')} of {len(ready)} tunnels"
                    )
            relay = self.relay
            settling = relay.connector.dialing or len(relay.pending) or len(relay.hellos)
            waiting = any(t.mover is None and moving.movable(t) for t in book.tunnels.values())
            if (not settling and not waiting) or self.loop.time() >= until:
                return
            await asyncio.sleep(ROUND_EVERY)

    async def _hold(self, tunnels: list[tunnel.Tunnel]) -> list[moving.Hold]:
        """Hold each tunnel; those whose buffers emptied within HOLD_TIMEOUT
        (the others are resumed, and tried again in a later round)."""
        ready: list[moving.Hold] = []
        pending: set[moving.Hold] = set()
        done = self.loop.create_future()

        def on_ready(hold: moving.Hold) -> None:
            if hold in pending:
                pending.discard(hold)
                ready.append(hold)
                if not pending and not done.done():
                    done.set_result(None)

        for t in tunnels:
            if moving.movable(t):
                hold = moving.Hold(t, on_ready)
                pending.add(hold)
                hold.begin()
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_TIMEOUT):
                    await done
        for hold in list(pending):
            pending.discard(hold)
            hold.resume()
        return [h for h in ready if h.tunnel.closed_at is None]


async def _fail(self: Upgrade, cause: str) -> None:
    """Kill the successor and carry on with everything."""
    relay = self.relay
    proc = self.proc
    if proc is not None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            await exited(proc.pid, 5.0)
            proc.poll()
        if proc.returncode is not None and proc.returncode > 0 and self.step == "hello":
            cause = f"{cause} (the successor exited with status {proc.returncode})"
    elif self.successor is not None:  # a worker's, started by the supervisor's successor
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.successor, signal.SIGKILL)
        await exited(self.successor, 5.0)
    resumed = 0
    for hold in self.held:
        try:
            hold.resume()
            resumed += 1
        except Exception:  # one tunnel's trouble must not keep the rest
            traceback.print_exc()
    self.held.clear()
    try:
        if self.handed:
            await relay.listeners.take_back(self.handed)
        if self.admin_sock is not None and relay.settings.admin is not None:
            await relay.admin.start(*relay.settings.admin, sock=self.admin_sock)
            self.admin_sock = None
    except OSError as exc:
        cause = f"{cause}; and listening again failed: {exc}"
    relay.log(
        "upgrade_failed",
        step=self.step,
        cause=cause,
        successor=self.successor,
        tunnels_resumed=resumed,
        tunnels=len(relay.book),
    )
    self.report("failed", step=self.step, cause=cause)


def begin(
    relay: Relay,
    argv: list[str],
    pid_file: str | None,
    *,
    given: tuple[Channel, int] | None = None,
    gate: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Task[bool] | None:
    """SIGUSR2 (or, in a worker, its supervisor): start an upgrade of
    ``relay`` (see Upgrade); None when one is running already or the relay
    is draining."""
    if relay.upgrade is not None or relay.draining:
        relay.log("upgrade_refused", detail="an upgrade is running, or the relay is draining")
        return None
    if os.getpid() == 1:
        # A container's PID 1: when it exits the container ends, successor and all.
        cause = "the relay is PID 1 (a container): deploy a new container (a rolling update)"
        relay.log("upgrade_failed", step="start", cause=cause)
        report(pid_file, "failed", step="start", cause=cause)
        return None
    upgrade = relay.upgrade = Upgrade(relay, argv, pid_file, given=given, gate=gate)
    relay.log.shared = True  # the successor writes to the same stdout

    async def run() -> bool:
        try:
            return await upgrade.run()
        finally:
            relay.handed_over = upgrade.succeeded
            relay.upgrade = None

    relay.upgrade_task = relay.tasks.spawn(run())
    return relay.upgrade_task
