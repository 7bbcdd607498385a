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
from pathlib import Path
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


async def exited(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait (without blocking the loop) until ``proc`` has exited, and reap it."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # reaped already
        proc.poll()
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
    proc.poll()


def status_path(pid_file: str) -> str:
    return f"{pid_file}.upgrade"


def report(pid_file: str | None, state: str, **fields: Any) -> None:
    """The outcome beside the pid file, for `konnect-relay upgrade` to read."""
    if pid_file:
        record = {"state": state, "pid": os.getpid(), **fields}
        with contextlib.suppress(OSError):
            write_atomically(status_path(pid_file), json.dumps(record).encode() + b"\n", mode=0o644)


class Upgrade:
    """One upgrade of ``relay``; ``argv`` are the arguments it was started with."""

    def __init__(self, relay: Relay, argv: list[str], pid_file: str | None) -> None:
        self.relay = relay
        self.argv = argv
        self.pid_file = pid_file
        self.loop = asyncio.get_running_loop()
        self.proc: subprocess.Popen[bytes] | None = None
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
        except (HandoverFailed, ChannelClosed, TimeoutError, OSError, ValueError) as exc:
            cause = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                cause = f"no answer within limits.upgrade_timeout at step {self.step}"
            await self._fail(cause)
            return False
        except asyncio.CancelledError:
            await self._fail("cancelled: the relay is stopping")
            raise
        except Exception as exc:  # a bug: still, everything resumes here
            traceback.print_exc()
            await self._fail(f"internal error: {exc!r}")
            return False
        finally:
            if self.channel is not None:
                self.channel.close()
        assert self.proc is not None
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
            successor=self.proc.pid,
            moved=len(self.held),
            spliced=spliced,
            stayed=len(relay.book),
            stayed_by=dict(self.stayed),
            handover_s=round(self.loop.time() - begun, 3),
        )
        self.report("done", successor=self.proc.pid, moved=len(self.held), stayed=len(relay.book))
        return True

    async def _handover(self, begun_wall: float) -> None:
        relay = self.relay
        timeout = relay.settings.limits.upgrade_timeout
        self.channel, theirs = Channel.pair()
        channel = self.channel
        try:
            # subprocess, not the loop's: uvloop's pass_fds leaves copies of
            # stdout and stderr open in the child.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", *self.argv],
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                env={**os.environ, HANDOVER_ENV: str(theirs.fileno())},
            )
        finally:
            theirs.close()
        self.step = "hello"
        async with asyncio.timeout(timeout):
            hello, _ = await channel.expect("hello")
        if hello.get("protocol") != PROTOCOL:
            raise HandoverFailed(
                f"the successor speaks handover protocol {hello.get('protocol')}, "
                f"this relay {PROTOCOL}"
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

    async def _fail(self, cause: str) -> None:
        """Kill the successor and carry on with everything."""
        relay = self.relay
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await exited(proc, 5.0)
            if proc.returncode is not None and proc.returncode > 0 and self.step == "hello":
                cause = f"{cause} (the successor exited with status {proc.returncode})"
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
            successor=proc.pid if proc is not None else None,
            tunnels_resumed=resumed,
            tunnels=len(relay.book),
        )
        self.report("failed", step=self.step, cause=cause)


# --- `konnect-relay upgrade`: signal, then wait for the outcome -----------------------

# How often the command looks at the status and pid files.
POLL_EVERY = 0.1


def handles_upgrades(pid: int) -> bool:
    """Whether the process catches SIGUSR2 (/proc/PID/status, SigCgt): a relay
    from before upgrades existed would die of the signal's default action."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR2 - 1)))
    return False


def _alive(pid: int) -> bool:
    """Running (a zombie, exited and not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _read_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _status(path: str, pid: int) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("pid") == pid else None


def wait_for_upgrade(pid_file: str, status_file: str, timeout: float) -> int:
    """Exit status of ``konnect-relay upgrade``: 0 once the successor has
    written its pid to ``pid_file``, 1 with the cause otherwise."""
    pid = _read_pid(pid_file)
    if pid is None or not _alive(pid):
        print(f"upgrade: no running relay named by {pid_file}", file=sys.stderr)
        return 1
    if not handles_upgrades(pid):
        print(
            f"upgrade: the process {pid} does not handle upgrades (SIGUSR2): a relay "
            "older than `konnect-relay upgrade`, or one with workers; it was not "
            "signalled. Restart it instead (systemctl restart).",
            file=sys.stderr,
        )
        return 1
    Path(status_file).unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    print(f"upgrade: sent SIGUSR2 to {pid}, waiting for its successor")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _status(status_file, pid)
        state = record.get("state") if record else None
        if state == "failed" and record is not None:
            print(
                f"upgrade: failed at step {record.get('step')}: {record.get('cause')}; "
                f"the relay {pid} carries on with every listener and tunnel",
                file=sys.stderr,
            )
            return 1
        if state == "done" and record is not None:
            successor = record.get("successor")
            if _read_pid(pid_file) == successor:
                print(
                    f"upgrade: {successor} took over from {pid}: "
                    f"{record.get('moved')} tunnels moved, {record.get('stayed')} "
                    f"stay with {pid} until they end (limits.drain_timeout)"
                )
                return 0
        if state not in ("done", "failed") and not _alive(pid):
            now = _read_pid(pid_file)
            taken = (
                f"; {now} took over what had passed to it"
                if now not in (None, pid) and now is not None and _alive(now)
                else ""
            )
            print(f"upgrade: the relay {pid} exited during the upgrade{taken}", file=sys.stderr)
            return 1
        time.sleep(POLL_EVERY)
    print(f"upgrade: no outcome within {timeout:g} s (see the relay's log)", file=sys.stderr)
    return 1


def begin(relay: Relay, argv: list[str], pid_file: str | None) -> asyncio.Task[bool] | None:
    """SIGUSR2: start an upgrade of ``relay``; None when one is running
    already or the relay is draining."""
    if relay.upgrade is not None or relay.draining:
        relay.log("upgrade_refused", detail="an upgrade is running, or the relay is draining")
        return None
    if os.getpid() == 1:
        # A container's PID 1: when it exits the container ends, successor and all.
        cause = "the relay is PID 1 (a container): deploy a new container (a rolling update)"
        relay.log("upgrade_failed", step="start", cause=cause)
        report(pid_file, "failed", step="start", cause=cause)
        return None
    upgrade = relay.upgrade = Upgrade(relay, argv, pid_file)
    relay.log.shared = True  # the successor writes to the same stdout

    async def run() -> bool:
        try:
            return await upgrade.run()
        finally:
            relay.handed_over = upgrade.succeeded
            relay.upgrade = None

    relay.upgrade_task = relay.tasks.spawn(run())
    return relay.upgrade_task
