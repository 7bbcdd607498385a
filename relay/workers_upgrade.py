"""Upgrading in place with ``workers: N``: worker by worker, committed together.

The supervisor that gets SIGUSR2 starts its successor (the same arguments,
the code now installed) with a handover channel, as a single relay does
(handover.py). The successor loads its config, takes the supervisor's port
reservations, and then, for each worker slot in turn, starts its new worker
with a channel whose other end it sends back; the old supervisor passes that
end to its old worker over the worker's control channel (``CONTROL_ENV``).
Old and new worker then talk exactly as a single relay and its successor do
(upgrade.py, successor.py): listening socket, tunnels in batches, all held.

Each old worker stops at its ``gate``, just before ``done``, and says
``ready``. Only when every worker is ready does the old supervisor send
``commit`` to all of them; they finish (``done`` / ``took_over``), and the
supervisors do the same for the admin listener and their own totals. Until
the commit nothing has changed hands: a failure anywhere (a worker that
fails, a successor that crashes, a timeout) sends ``abort``, kills the
successor (its new workers die with it) and every old worker resumes its
tunnels and accepts again. After the commit the old workers drain what could
not move and exit; the old supervisor waits for them, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.handover import (
    PROTOCOL,
    Channel,
    ChannelClosed,
    HandoverFailed,
    close_fds,
)
from relay.notify import notify
from relay.upgrade import Upgrade, begin, exited, failure_cause, report, spawn_successor

if TYPE_CHECKING:
    from relay.server import Relay
    from relay.supervisor import Supervisor
    from relay.workers import Worker

# A worker's end of its control channel to the supervisor: a descriptor number.
CONTROL_ENV = "KONNECT_RELAY_CONTROL"


# --- in a worker ---------------------------------------------------------------------


async def serve_control(
    relay: Relay, channel: Channel, argv: list[str], handed_over: Callable[[], None]
) -> None:
    """A worker's control channel: ``hand_over`` (with the channel to the new
    worker), then ``commit`` or ``abort``; it answers ``ready`` at its gate,
    then ``handed_over`` or ``failed``."""
    loop = asyncio.get_running_loop()
    commit: asyncio.Future[bool] | None = None
    while True:
        try:
            message, fds = await channel.recv()
        except ChannelClosed:
            return
        except OSError as exc:
            relay.log("control_message_refused", detail=str(exc))
            continue
        kind = message["type"]
        if kind == "hand_over" and len(fds) == 1:
            decided: asyncio.Future[bool] = loop.create_future()
            commit = decided
            attempt = message.get("upgrade")  # echoed, so a late answer is not taken for a new one

            async def gate(decided: asyncio.Future[bool] = decided, attempt: Any = attempt) -> None:
                await channel.send({"type": "ready", "upgrade": attempt})
                if not await decided:
                    raise HandoverFailed("the supervisor aborted the upgrade")

            given = (Channel(socket.socket(fileno=fds[0])), int(message["pid"]))
            task = begin(relay, argv, None, given=given, gate=gate)
            upgrade = relay.upgrade
            if task is None or upgrade is None:
                given[0].close()
                refused = {"type": "failed", "cause": "this worker refused", "upgrade": attempt}
                await channel.send(refused)
                continue

            def answer(t: asyncio.Task[bool], u: Upgrade = upgrade, a: Any = attempt) -> None:
                relay.tasks.spawn(_answer(relay, channel, t, u, a, handed_over))

            task.add_done_callback(answer)
        elif kind in ("commit", "abort") and commit is not None and not commit.done():
            commit.set_result(kind == "commit")
        else:
            close_fds(fds)


async def _answer(
    relay: Relay,
    channel: Channel,
    task: asyncio.Task[bool],
    upgrade: Upgrade,
    attempt: Any,
    handed_over: Callable[[], None],
) -> None:
    ok = not task.cancelled() and task.exception() is None and task.result()
    answer: dict[str, Any] = (
        {"type": "handed_over", "moved": len(upgrade.held), "stayed": len(relay.book)}
        if ok
        else {"type": "failed", "cause": f"worker failed at step {upgrade.step} (see its log)"}
    )
    answer["upgrade"] = attempt
    with contextlib.suppress(ChannelClosed, OSError):
        await channel.send(answer)
    if ok:
        handed_over()  # drain what stayed, then exit


# --- in the supervisor that is upgraded -------------------------------------------------


class SupervisorUpgrade:
    """The old supervisor's side (see the module docstring)."""

    def __init__(self, sup: Supervisor, argv: list[str]) -> None:
        self.sup = sup
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.told: list[Worker] = []  # workers sent hand_over
        self.admin_sock: socket.socket | None = None
        self.step = "start"
        self.moved = self.stayed = 0  # tunnels, over every worker
        self.failed: dict[int, str] = {}  # workers that failed after the commit
        self.attempt = f"{os.getpid()}-{time.monotonic_ns()}"  # tags the workers' answers

    async def run(self) -> bool:
        sup = self.sup
        sup.log("upgrading", pid=os.getpid(), workers=len(sup.workers))
        report(sup.pid_file, "running")
        try:
            await self._handover()
        except asyncio.CancelledError:
            await _fail(self, "cancelled: the relay is stopping")
            raise
        except Exception as exc:  # also a bug: the workers at their gate must not wait on
            await _fail(self, failure_cause(exc, self.step))
            return False
        finally:
            if self.channel is not None:
                self.channel.close()
        if self.admin_sock is not None:
            self.admin_sock.close()
        assert self.proc is not None
        sup.log(
            "handed_over",
            successor=self.proc.pid,
            workers=len(self.told),
            moved=self.moved,
            stayed=self.stayed,
            failed_workers=self.failed or None,
        )
        report(
            sup.pid_file,
            "done",
            successor=self.proc.pid,
            moved=self.moved,
            stayed=self.stayed,
            failed_workers=self.failed or None,
        )
        return True

    async def _handover(self) -> None:
        sup = self.sup
        timeout = sup.settings.limits.upgrade_timeout
        self.channel, self.proc = spawn_successor(self.argv)
        channel = self.channel
        self.step = "hello"
        async with asyncio.timeout(timeout):
            hello, _ = await channel.expect("hello")
        if hello.get("protocol") != PROTOCOL:
            raise HandoverFailed(f"the successor speaks handover protocol {hello.get('protocol')}")
        if hello.get("workers") != len(sup.workers):
            raise HandoverFailed(
                f"the new config has {hello.get('workers')} workers, this relay "
                f"{len(sup.workers)}: changing workers needs a restart"
            )
        self.step = "supervisor"
        keys = list(sup.ports.sockets)
        admin = sup.settings.admin
        await channel.send(
            {"type": "supervisor", "ports": keys, "admin": list(admin) if admin else None},
            [sup.ports.sockets[k].fileno() for k in keys],
        )
        for worker in sup.workers:
            self.step = f"worker {worker.index}"
            if worker.control is None or not worker.ready:
                raise HandoverFailed(f"worker {worker.index} is not running")
            await channel.send({"type": "spawn", "index": worker.index})
            async with asyncio.timeout(timeout):
                started, fds = await channel.expect("worker")
            if len(fds) != 1:
                close_fds(fds)
                raise HandoverFailed("the successor sent no channel for its worker")
            try:
                await worker.control.send(
                    {"type": "hand_over", "pid": started["pid"], "upgrade": self.attempt}, fds
                )
            finally:
                close_fds(fds)
            self.told.append(worker)
            async with asyncio.timeout(timeout):
                await self._reply(worker, "ready")
        self.step = "commit"
        for worker in self.told:
            assert worker.control is not None
            await worker.control.send({"type": "commit"})
        for worker in self.told:
            assert worker.control is not None
            try:
                async with asyncio.timeout(timeout):
                    answer = await self._reply(worker, "handed_over")
            except (HandoverFailed, ChannelClosed, TimeoutError, OSError) as exc:
                # That worker took its tunnels back; it drains below, like a
                # restart's, while the others' are the successor's already.
                self.failed[worker.index] = str(exc) or type(exc).__name__
                continue
            self.moved += int(answer.get("moved", 0))
            self.stayed += int(answer.get("stayed", 0))
        if len(self.failed) == len(self.told):
            self.step = "commit"
            raise HandoverFailed(f"every worker failed after the commit: {self.failed}")
        # Past the commit: the old workers only drain from here on.
        sup.retiring = True
        self.step = "done"
        self.admin_sock = sup.admin.hand_over()
        await channel.send(
            {"type": "done", "metrics": carried(sup)},
            [self.admin_sock.fileno()] if self.admin_sock is not None else [],
        )
        async with asyncio.timeout(timeout):
            await channel.expect("took_over")

    async def _reply(self, worker: Worker, kind: str) -> dict[str, Any]:
        """The worker's answer to this upgrade (one to an earlier, failed
        upgrade may still be queued: skipped)."""
        assert worker.control is not None
        while True:
            message, fds = await worker.control.recv()
            close_fds(fds)
            if message.get("upgrade") != self.attempt:
                continue
            if message["type"] == kind:
                return message
            raise HandoverFailed(str(message.get("cause", f"expected {kind!r}")))


async def _fail(self: SupervisorUpgrade, cause: str) -> None:
    """Abort before the commit: every old worker takes everything back."""
    sup = self.sup
    if self.step != "done":  # before the commit every old worker takes everything back
        for worker in self.told:
            if worker.control is not None:
                with contextlib.suppress(ChannelClosed, OSError):
                    await worker.control.send({"type": "abort"})
    proc = self.proc
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await exited(proc.pid, 5.0)
        proc.poll()
    if self.admin_sock is not None and sup.settings.admin is not None:
        with contextlib.suppress(OSError):
            sup.admin_address = await sup.admin.start(*sup.settings.admin, sock=self.admin_sock)
        self.admin_sock = None
    sup.log("upgrade_failed", step=self.step, cause=cause, workers=len(sup.workers))
    report(sup.pid_file, "failed", step=self.step, cause=cause)


def carried(sup: Supervisor) -> dict[str, Any]:
    """The supervisor's own totals, and what workers that died had counted."""
    from relay.aggregate import render

    counters = {}
    for counter in (sup.metrics.restarts, sup.metrics.scrape_errors, sup.metrics.reloads):
        for family in counter.collect():
            counters[family.name] = [
                (s.labels, s.value) for s in family.samples if s.name.endswith("_total")
            ]
    return {"counters": counters, "retired": render(sup.views.retired).decode()}


def add_carried(sup: Supervisor, state: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from relay.aggregate import aggregate

    counters = {sup.metrics.restarts, sup.metrics.scrape_errors, sup.metrics.reloads}
    by_name = {family.name: c for c in counters for family in c.collect()}
    for name, samples in state.get("counters", {}).items():
        counter = by_name.get(name)
        if counter is None:
            continue
        for labels, value in samples:
            with contextlib.suppress(ValueError):
                (counter.labels(**labels) if labels else counter).inc(float(value))
    retired = list(text_string_to_metric_families(state.get("retired", "")))
    sup.views.retired = aggregate([sup.views.retired, retired])


# --- in the successor supervisor ------------------------------------------------------


async def take_over(sup: Supervisor, channel: Channel) -> None:
    """Start each new worker as the old supervisor asks, each with its channel
    to the old worker; then the admin listener, the pid file, systemd."""
    await channel.send(
        {"type": "hello", "protocol": PROTOCOL, "pid": os.getpid(), "workers": len(sup.workers)}
    )
    message, fds = await channel.expect("supervisor")
    sup.ports.adopt(message["ports"], [socket.socket(fileno=fd) for fd in fds])
    sup.write_worker_config(sup.settings, sup.document)
    theirs = message.get("admin")
    deferred = theirs is not None and tuple(theirs) == sup.settings.admin
    if not deferred:
        await sup.start_admin(None)
    timeout = sup.settings.limits.upgrade_timeout
    while True:
        async with asyncio.timeout(timeout):
            message, fds = await channel.recv()
        if message["type"] == "spawn":
            worker = sup.workers[int(message["index"])]
            ours, theirs_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            worker.started = sup.loop.time()
            try:
                await sup.runner.start(worker, handover=theirs_end)
            finally:
                theirs_end.close()
            sup.keepers.append(sup.tasks.spawn(sup.runner.keep(worker)))
            assert worker.proc is not None
            try:
                await channel.send({"type": "worker", "pid": worker.proc.pid}, [ours.fileno()])
            finally:
                ours.close()
        elif message["type"] == "done":
            add_carried(sup, message.get("metrics", {}))
            if deferred:
                sock = socket.socket(fileno=fds[0]) if fds else None
                await sup.start_admin(sock)
            else:
                close_fds(fds)
            break
        else:
            close_fds(fds)
            raise HandoverFailed(f"unexpected message {message['type']!r}")
    sup.announce(upgraded=True)
    notify(f"MAINPID={os.getpid()}\nREADY=1")
    with contextlib.suppress(ChannelClosed):
        await channel.send({"type": "took_over", "pid": os.getpid()})
    channel.close()
