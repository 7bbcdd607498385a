"""Multi-process mode: one supervisor, ``workers: N`` relays on the same ports.

One event loop uses one core. With ``workers: N`` (``auto``: the CPUs this
process may run on) the process started by ``konnect-relay run`` becomes a
supervisor that serves no tunnel itself: it starts N worker processes, each a
complete relay (``python -m relay run --worker-index i``) that binds the same
listen addresses with SO_REUSEPORT. The kernel spreads new connections over
the workers' listening sockets by a hash of the 4-tuple; a tunnel stays on the
worker that accepted it for its whole life, so workers share no state.

Ports written as ``:0`` would give every worker its own random port under
SO_REUSEPORT, so the supervisor binds each such address once itself (with
SO_REUSEPORT, never listening, hence never chosen for a connection), keeps that
socket for its lifetime so the port stays reserved across worker restarts, and
hands the workers a generated config (in a private 0700 run directory) that
names the concrete ports. The same file is what a worker re-reads on SIGHUP.

The supervisor serves the one admin endpoint on ``admin.address``; each worker
serves its own on a Unix socket in the run directory, which the supervisor
queries: /metrics sums the workers' samples by (name, labels) (counters,
histograms and most gauges; 0/1 state gauges take the minimum), keeps the
cumulative samples a dead worker last reported so totals never go backwards
when it is replaced, and adds the supervisor's own families; /tunnels
concatenates the workers' lists with a ``worker`` field.

Lifecycle: a worker that exits unexpectedly is restarted with exponential
backoff; one that fails before the relay as a whole was ready is fatal, as a
single relay that cannot listen is. SIGHUP is validated here first and only
forwarded when the new config is valid; SIGTERM/SIGINT drain every worker.
Workers' JSON log lines are passed through to stdout with ``"worker": i``.
systemd hears from the supervisor only (workers get no NOTIFY_SOCKET), so
``NotifyAccess=main`` is enough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from relay import config
from relay.admin import AdminServer, Handler, Query, Reply, json_reply, text
from relay.config import SECONDS, Settings
from relay.handover import HANDOVER_ENV, Channel, ChannelClosed, HandoverFailed
from relay.log import EventLog
from relay.metrics import SupervisorMetrics
from relay.notify import notify
from relay.status import file_routes
from relay.tasks import TaskSet
from relay.workerconf import PortReservations, worker_count, worker_document, write_worker_file
from relay.workers import Worker, WorkerFeed, WorkerOutput, WorkerRunner, WorkerViews
from relay.workers_upgrade import take_over

# Beyond limits.drain_timeout: a worker aborts leftover tunnels at its deadline
# and may linger up to server.CLOSE_LINGER (10 s) for them to close.
DRAIN_GRACE = 10 * SECONDS
# A worker answers SIGHUP with "reloaded" or "reload_failed"; a new SSH egress
# connection is part of a reload and may take a few seconds.
RELOAD_TIMEOUT = 30 * SECONDS
# Worker exit statuses that a drain accepts as clean: 0 after its own drain,
# or SIGTERM's default action when it arrived before the worker set handlers.
CLEAN_EXITS = frozenset({0, -signal.SIGTERM})


# --- workers ---------------------------------------------------------------------------


def _monotonic_usec() -> int:
    return time.monotonic_ns() // 1000


class Supervisor:
    """The parent process of ``workers: N``."""

    def __init__(
        self,
        settings: Settings,
        document: dict[str, Any],
        config_path: str | None,
        pid_file: str | None = None,
        log: EventLog | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.document = document
        self.config_path = config_path
        self.pid_file = pid_file
        self.argv = argv or []  # what a successor is started with (workers_upgrade.py)
        self.log = log if log is not None else EventLog()
        self.metrics = SupervisorMetrics()
        self.loop = asyncio.get_running_loop()
        self.log.loop = self.loop  # batched writes, as in a worker
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.rundir = tempfile.mkdtemp(prefix="konnect-relay-", dir=runtime)  # mode 0700
        self.worker_config = os.path.join(self.rundir, "worker.yaml")
        self.ports = PortReservations()
        self.workers = [
            Worker(i, os.path.join(self.rundir, f"worker-{i}.sock"))
            for i in range(worker_count(settings))
        ]
        self.metrics.workers.labels("configured").set(len(self.workers))
        self.generation = 0
        self.views = WorkerViews(self.workers, self.metrics)
        self.output = WorkerOutput(self.log, self.lifecycle)
        self.runner = WorkerRunner(self)
        self.announced = False
        self.admin = AdminServer(admin_routes(self))
        self.admin_address: str | None = None
        self.draining = False
        self.retiring = False  # an upgrade committed: the workers only drain, none restarts
        self.handed_over = False  # a successor took over: drain, exit, leave the pid file
        self.successor_mode = False  # taking over from an old supervisor
        self.upgrade_task: asyncio.Task[bool] | None = None
        self.fatal: str | None = None
        self.stop = asyncio.Event()
        self.tasks = TaskSet(self.loop)
        self.keepers: list[asyncio.Task[None]] = []
        self.reload_lock = asyncio.Lock()
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self.konnect_ips = WorkerFeed(
            settings,
            self.workers,
            os.path.join(self.rundir, "konnect-ips.json"),
            self.log,
            self.metrics,
        )

    def lifecycle(self, worker: Worker, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "listening":
            worker.ready = True
            proxy = record.get("proxy")
            worker.proxy = [str(a) for a in proxy] if isinstance(proxy, list) else []
            self.count_workers()
            self.konnect_ips.joined(worker)
            if worker.generation < self.generation and worker.proc is not None:
                # started before the latest reload rewrote its config
                worker.generation = self.generation
                worker.proc.send_signal(signal.SIGHUP)
            if not (self.announced or self.successor_mode) and all(w.ready for w in self.workers):
                self.announce()
        elif event in ("reloaded", "reload_failed"):
            waiter = worker.reload_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(event == "reloaded")

    def announce(self, *, upgraded: bool = False) -> None:
        """Every worker listens: the relay as a whole is ready (after an
        upgrade, the successor tells systemd it is the main process now)."""
        self.announced = True
        self.log(
            "listening",
            proxy=self.workers[0].proxy,
            admin=self.admin_address,
            egress=self.settings.egress,
            config=self.settings.source,
            workers=len(self.workers),
            **({"upgraded": True} if upgraded else {}),
        )
        self.output.release_held()
        if self.pid_file:
            Path(self.pid_file).write_text(f"{os.getpid()}\n")
        notify(f"MAINPID={os.getpid()}\nREADY=1" if upgraded else "READY=1")

    def count_workers(self) -> None:
        self.metrics.workers.labels("up").set(sum(w.alive for w in self.workers))
        self.metrics.workers.labels("ready").set(sum(w.ready for w in self.workers))

    # --- worker processes -----------------------------------------------------------------

    def write_worker_config(self, settings: Settings, document: dict[str, Any]) -> None:
        """Generate the workers' file: written aside and renamed, so a worker
        never reads half of it."""
        listen = self.ports.concrete(settings)
        doc = worker_document(
            document, listen, self.konnect_ips.path if settings.konnect_ips.enabled else None
        )
        write_worker_file(self.worker_config, doc, settings.source)

    # --- reload ----------------------------------------------------------------------------

    def on_sigusr2(self) -> None:
        """`konnect-relay upgrade`: hand every worker over (workers_upgrade.py)."""
        from relay.workers_upgrade import SupervisorUpgrade

        if self.draining or (self.successor_mode and not self.announced):
            self.log("upgrade_refused", detail="the relay is draining or still starting")
            return
        if self.upgrade_task is not None and not self.upgrade_task.done():
            self.log("upgrade_refused", detail="an upgrade is running")
            return
        self.log.shared = True  # the successor writes to the same stdout
        self.upgrade_task = self.tasks.spawn(SupervisorUpgrade(self, self.argv).run())
        self.upgrade_task.add_done_callback(self._upgraded)

    def _upgraded(self, task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            self.handed_over = True
            self.stop.set()

    def on_sighup(self) -> None:
        self.tasks.spawn(self.reload())

    async def reload(self) -> bool:
        """Validate the config here; forward SIGHUP only when it is valid."""
        async with self.reload_lock:
            if self.draining:
                return False
            notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")
            try:
                ok = await _reload(self)
            finally:
                if not self.draining:
                    notify("READY=1")
            self.metrics.reloads.labels("ok" if ok else "error").inc()
            return ok

    # --- run and drain -------------------------------------------------------------------

    async def start_admin(self, sock: socket.socket | None = None) -> None:
        if self.settings.admin is not None:
            self.admin_address = await self.admin.start(*self.settings.admin, sock=sock)

    async def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        self.loop.add_signal_handler(signal.SIGUSR2, self.on_sigusr2)
        handover = os.environ.pop(HANDOVER_ENV, None)
        try:
            try:
                if handover is None:
                    await self.start_admin()
                    self.write_worker_config(self.settings, self.document)
            except OSError as exc:
                print(f"cannot listen: {exc}", file=sys.stderr)
                return 1
            await self.konnect_ips.start()
            if handover is not None:
                self.successor_mode = True
                self.log.shared = True  # the old supervisor writes to the same stdout
                try:
                    await take_over(self, Channel.inherited(int(handover)))
                except (OSError, ValueError, TimeoutError, HandoverFailed, ChannelClosed) as exc:
                    print(f"upgrade: {exc}", file=sys.stderr)
                    self.draining = True  # the new workers go with this process
                    return 1
            else:
                self.keepers = [self.tasks.spawn(self.runner.keep(w)) for w in self.workers]
            await self.stop.wait()
            clean = await self.drain()
            if self.fatal is not None:
                print(f"konnect-relay: {self.fatal}", file=sys.stderr)
                return 1
            return 0 if clean else 1
        finally:
            await self.close()

    async def drain(self) -> bool:
        """Forward SIGTERM to every worker; wait up to drain_timeout + DRAIN_GRACE,
        then SIGKILL. True when every worker drained and exited cleanly."""
        self.draining = True
        if self.upgrade_task is not None and not self.upgrade_task.done():
            self.upgrade_task.cancel()  # the successor is killed, every worker resumes
            with contextlib.suppress(asyncio.CancelledError):
                await self.upgrade_task
        if not self.handed_over:  # else systemd follows the successor already
            notify("STOPPING=1")
        self.output.release_held()
        timeout = self.settings.limits.drain_timeout
        self.log("draining", workers=sum(w.alive for w in self.workers), timeout_s=timeout)
        statuses: list[int] = []
        for worker in self.workers:
            if (proc := worker.running) is not None:
                proc.terminate()
        _, late = await asyncio.wait(self.keepers, timeout=timeout + DRAIN_GRACE)
        if late:
            for worker in self.workers:
                if (proc := worker.running) is not None:
                    self.log("worker_killed", worker=worker.index, pid=proc.pid)
                    proc.kill()
            await asyncio.wait(late)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is not None:
                statuses.append(worker.proc.returncode)
        return not late and all(s in CLEAN_EXITS for s in statuses)

    async def close(self) -> None:
        await self.konnect_ips.close()
        for task in self.keepers:
            task.cancel()
        if self.keepers:
            await asyncio.wait(self.keepers)
        self.admin.close()
        self.tasks.cancel()
        await self.tasks.wait()
        self.ports.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        if self.pid_file and not self.handed_over:
            Path(self.pid_file).unlink(missing_ok=True)
        self.log("stopped")
        self.log.flush()


async def _reload(self: Supervisor) -> bool:
    try:
        settings, document = config.load_document(self.config_path)
    except config.ConfigError as exc:
        self.log("reload_failed", config=exc.source, errors=exc.errors)
        return False
    wanted = worker_count(settings)
    if wanted != len(self.workers):
        self.log(
            "workers_unchanged",
            running=len(self.workers),
            configured=wanted,
            detail="the number of workers changes on restart, not on reload",
        )
    if settings.admin != self.settings.admin:
        self.log(
            "admin_unchanged",
            admin=self.admin_address,
            detail="the supervisor's admin address changes on restart, not on reload",
        )
    try:
        self.write_worker_config(settings, document)
    except OSError as exc:
        self.log("reload_failed", config=settings.source, errors=[f"listen: {exc}"])
        return False
    self.settings, self.document = settings, document
    await self.konnect_ips.reconfigure(settings)
    self.generation += 1
    waiters: dict[int, asyncio.Future[bool]] = {}
    for worker in self.workers:
        proc = worker.running
        if worker.ready and proc is not None:
            worker.generation = self.generation
            worker.reload_waiter = waiters[worker.index] = self.loop.create_future()
            proc.send_signal(signal.SIGHUP)
        # a worker not yet listening reads the new file as it starts
    if waiters:
        await asyncio.wait(list(waiters.values()), timeout=RELOAD_TIMEOUT)
    failed = [i for i, f in waiters.items() if not (f.done() and f.result())]
    for worker in self.workers:
        worker.reload_waiter = None
    self.log(
        "reloaded" if not failed else "reload_failed",
        config=settings.source,
        workers=sorted(waiters),
        failed=failed,
    )
    return not failed


# --- admin -----------------------------------------------------------------------------


def admin_routes(sup: Supervisor) -> dict[str, Handler]:
    """The supervisor's admin table: the workers' views, merged."""

    async def metrics(query: Query) -> Reply:
        return Reply(200, await sup.views.scrape(), CONTENT_TYPE_LATEST)

    async def healthz(query: Query) -> Reply:
        if not any(w.alive for w in sup.workers):
            return text(503, "no worker running\n")
        return text(200, "ok\n")

    async def readyz(query: Query) -> Reply:
        if sup.draining:
            return text(503, "draining\n")
        if not any(w.ready for w in sup.workers):
            return text(503, "no worker ready\n")
        return text(200, "ready\n")

    async def status(query: Query) -> Reply:
        view = await sup.views.status(sup.draining)
        return text(503, "no worker running\n") if view is None else json_reply(view)

    def merged(path: str) -> Handler:
        async def handler(query: Query) -> Reply:
            suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
            return Reply(200, await sup.views.tunnels(path + suffix), "application/json")

        return handler

    return {
        "/metrics": metrics,
        "/healthz": healthz,
        "/readyz": readyz,
        "/tunnels": merged("/tunnels"),
        "/clients": merged("/clients"),
        "/refusals": merged("/refusals"),
        "/status": status,
        **file_routes(),
    }


def run(settings: Settings, document: dict[str, Any], args: argparse.Namespace) -> int:
    """``konnect-relay run`` with ``workers`` > 1: supervise the worker processes.
    ``document`` is the parsed file ``settings`` were built from (the workers'
    file is generated from it, every key as written)."""
    import uvloop

    async def main() -> int:
        return await Supervisor(
            settings, document, args.config, args.pid_file, argv=getattr(args, "argv", None)
        ).run()

    return uvloop.run(main())
