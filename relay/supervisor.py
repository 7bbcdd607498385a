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
import ctypes
import os
import shutil
import signal
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
from relay.log import EventLog
from relay.metrics import SupervisorMetrics
from relay.notify import notify
from relay.status import file_routes
from relay.tasks import TaskSet
from relay.upgrade import report
from relay.workerconf import PortReservations, worker_count, worker_document, write_worker_file
from relay.workers import Backoff, Worker, WorkerFeed, WorkerOutput, WorkerViews, child_setup

# Beyond limits.drain_timeout: a worker aborts leftover tunnels at its deadline
# and may linger up to server.CLOSE_LINGER (10 s) for them to close.
DRAIN_GRACE = 10 * SECONDS
# A worker answers SIGHUP with "reloaded" or "reload_failed"; a new SSH egress
# connection is part of a reload and may take a few seconds.
RELOAD_TIMEOUT = 30 * SECONDS
# Worker log lines are one JSON object each; a reload_failed line listing
# every error of a large config is the longest.
MAX_LOG_LINE = 1024 * 1024
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
    ) -> None:
        self.settings = settings
        self.document = document
        self.config_path = config_path
        self.pid_file = pid_file
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
            if not self.announced and all(w.ready for w in self.workers):
                self.announce()
        elif event in ("reloaded", "reload_failed"):
            waiter = worker.reload_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(event == "reloaded")

    def announce(self) -> None:
        """Every worker listens: the relay as a whole is ready."""
        self.announced = True
        self.log(
            "listening",
            proxy=self.workers[0].proxy,
            admin=self.admin_address,
            egress=self.settings.egress,
            config=self.settings.source,
            workers=len(self.workers),
        )
        self.output.release_held()
        if self.pid_file:
            Path(self.pid_file).write_text(f"{os.getpid()}\n")
        notify("READY=1")

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
        """`konnect-relay upgrade`: not with workers (README: Upgrading)."""
        cause = "not available with workers: N > 1; restart the relay instead"
        self.log("upgrade_failed", step="start", cause=cause)
        report(self.pid_file, "failed", step="start", cause=cause)

    def on_sighup(self) -> None:
        self.tasks.spawn(self.reload())

    async def reload(self) -> bool:
        """Validate the config here; forward SIGHUP only when it is valid."""
        async with self.reload_lock:
            if self.draining:
                return False
            notify(f"RELOADING=1\nMONOTONIC_USEC={_monotonic_usec()}")
            try:
                ok = await self._reload()
            finally:
                if not self.draining:
                    notify("READY=1")
            self.metrics.reloads.labels("ok" if ok else "error").inc()
            return ok

    async def _reload(self) -> bool:
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

    # --- run and drain -------------------------------------------------------------------

    async def start_admin(self) -> None:
        if self.settings.admin is not None:
            self.admin_address = await self.admin.start(*self.settings.admin)

    async def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
        self.loop.add_signal_handler(signal.SIGUSR2, self.on_sigusr2)
        try:
            try:
                await self.start_admin()
                self.write_worker_config(self.settings, self.document)
            except OSError as exc:
                print(f"cannot listen: {exc}", file=sys.stderr)
                return 1
            await self.konnect_ips.start()
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
        if self.pid_file:
            Path(self.pid_file).unlink(missing_ok=True)
        self.log("stopped")
        self.log.flush()


class WorkerRunner:
    """Runs the supervisor's worker slots: start a process, pass its output
    through, restart it with backoff when it exits unexpectedly."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def argv(self, worker: Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "relay",
            "run",
            "--config",
            self.sup.worker_config,
            "--worker-index",
            str(worker.index),
            "--admin-socket",
            worker.admin_socket,
            "--reuse-port",
        ]

    async def start(self, worker: Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        Path(worker.admin_socket).unlink(missing_ok=True)
        parent, prctl = os.getpid(), self.sup._prctl
        worker.generation = self.sup.generation
        worker.proc = await asyncio.create_subprocess_exec(
            *self.argv(worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=MAX_LOG_LINE,
            preexec_fn=lambda: child_setup(parent, prctl),
        )
        self.sup.count_workers()
        self.sup.log("worker_started", worker=worker.index, pid=worker.proc.pid)

    async def pump(self, worker: Worker) -> int:
        """Pass the worker's stdout through until it ends; its exit status."""
        proc = worker.proc
        assert proc is not None and proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # longer than MAX_LOG_LINE: dropped by the reader
                self.sup.log("worker_line_too_long", worker=worker.index, limit=MAX_LOG_LINE)
                continue
            if not line:
                break
            self.sup.output.worker_line(worker, line)
        return await proc.wait()

    def exited(self, worker: Worker, status: int) -> None:
        proc = worker.proc
        worker.ready = False
        worker.spawns += 1
        self.sup.views.retire(worker)
        if worker.reload_waiter is not None and not worker.reload_waiter.done():
            worker.reload_waiter.set_result(False)
        self.sup.count_workers()
        how: dict[str, object] = {"code": status}
        if status < 0:
            try:
                how = {"signal": signal.Signals(-status).name}
            except ValueError:
                how = {"signal": -status}
        self.sup.log(
            "worker_exited",
            worker=worker.index,
            pid=proc.pid if proc is not None else None,
            uptime_s=round(self.sup.loop.time() - worker.started, 3),
            expected=self.sup.draining,
            **how,
        )

    async def keep(self, worker: Worker) -> None:
        """Run one worker slot: start, pass output through, restart on exit."""
        backoff = Backoff()
        while not self.sup.draining:
            worker.started = self.sup.loop.time()
            try:
                await self.start(worker)
            except OSError as exc:
                self.sup.log("worker_spawn_failed", worker=worker.index, error=str(exc))
                status = 1
            else:
                if self.sup.draining and worker.proc is not None:
                    worker.proc.terminate()
                status = await self.pump(worker)
                self.exited(worker, status)
            if self.sup.draining:
                return
            if not self.sup.announced:
                self.sup.fatal = f"worker {worker.index} exited with status {status} while starting"
                self.sup.stop.set()
                return
            delay = backoff.next(self.sup.loop.time() - worker.started)
            self.sup.log("worker_restarting", worker=worker.index, delay_s=delay)
            try:
                async with asyncio.timeout(delay):
                    await self.sup.stop.wait()
                return  # told to stop while waiting
            except TimeoutError:
                pass
            self.sup.metrics.restarts.inc()

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
        return await Supervisor(settings, document, args.config, args.pid_file).run()

    return uvloop.run(main())
