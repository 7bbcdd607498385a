"""A worker slot of the supervisor, its restart backoff, and the views of the
workers' admin endpoints that the supervisor's own admin endpoint serves."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from relay.aggregate import aggregate, cumulative, render
from relay.config import SECONDS, Settings
from relay.egress import Dialer, make_dialers
from relay.files import write_atomically
from relay.handover import Channel
from relay.konnect_ips_feed import Feed
from relay.log import EventLog
from relay.metrics import SupervisorMetrics
from relay.resolver import resolver_for

if TYPE_CHECKING:
    from relay.supervisor import Supervisor

# A one-off crash costs half a second of one worker's share of new connections.
BACKOFF_START = 0.5 * SECONDS
# A worker that dies at once (a broken host, an exhausted resource) is retried
# no faster than this, so the supervisor does not spin and the log stays readable.
BACKOFF_CAP = 30 * SECONDS
# A worker that ran this long before crashing crashed for a new reason: its
# next restart is quick again.
BACKOFF_RESET = 60 * SECONDS
# Per worker: one wedged worker must not make the whole scrape miss
# Prometheus' default scrape_timeout (10 s).
SCRAPE_TIMEOUT = 2 * SECONDS
# /tunnels of a worker holding 100,000 tunnels is ~30 MiB of JSON.
MAX_SCRAPE_BODY = 64 * 1024 * 1024
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Worker log lines are one JSON object each; a reload_failed line listing
# every error of a large config is the longest.
MAX_LOG_LINE = 1024 * 1024


@dataclass(slots=True)
class Backoff:
    """Exponential restart delay: ``start``, doubling up to ``cap``; back to
    ``start`` once a worker has run ``reset_after`` seconds."""

    start: float = BACKOFF_START
    cap: float = BACKOFF_CAP
    reset_after: float = BACKOFF_RESET
    current: float = 0.0

    def __post_init__(self) -> None:
        self.current = self.start

    def next(self, uptime: float) -> float:
        """The delay before restarting a worker that ran ``uptime`` seconds."""
        if uptime >= self.reset_after:
            self.current = self.start
        delay = self.current
        self.current = min(self.current * 2, self.cap)
        return delay


@dataclass(slots=True, eq=False)
class Worker:
    """One worker slot; its process is replaced when it dies."""

    index: int
    admin_socket: str
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    generation: int = 0  # config generation the process has loaded
    spawns: int = 0  # bumped per process, so a late scrape of a dead one is dropped
    proxy: list[str] = field(default_factory=list)
    last_cumulative: list[Metric] = field(default_factory=list)
    reload_waiter: asyncio.Future[bool] | None = None
    control: Channel | None = None  # to its process (workers_upgrade.py)

    @property
    def alive(self) -> bool:
        return self.running is not None

    @property
    def running(self) -> asyncio.subprocess.Process | None:
        """The process while it runs, else None."""
        proc = self.proc
        return proc if proc is not None and proc.returncode is None else None


def child_setup(parent: int, prctl: Any) -> None:
    """In the worker, between fork and exec: die with the supervisor (SIGTERM,
    so its tunnels get drain_timeout), even if it is SIGKILLed."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class WorkerViews:
    """The workers' admin endpoints, queried and merged: /metrics summed (with
    what dead workers last reported, so totals never go backwards), /tunnels
    concatenated with a ``worker`` field."""

    def __init__(self, workers: Sequence[Worker], metrics: SupervisorMetrics) -> None:
        self.workers = workers
        self.metrics = metrics
        self.retired: list[Metric] = []  # cumulative samples of dead workers

    def retire(self, worker: Worker) -> None:
        """A worker's process ended: keep its last cumulative samples."""
        self.retired = aggregate([self.retired, worker.last_cumulative])
        worker.last_cumulative = []

    async def query(self, worker: Worker, path: str) -> bytes | None:
        """GET ``path`` from a worker's admin socket; None when it does not answer."""
        if not worker.alive:
            return None
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(worker.admin_socket)
                try:
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n".encode())
                    data = bytearray()
                    while chunk := await reader.read(256 * 1024):
                        data += chunk
                        if len(data) > MAX_SCRAPE_BODY:
                            raise ValueError("worker answer too large")
                finally:
                    writer.close()
        except (OSError, TimeoutError, ValueError):
            self.metrics.scrape_errors.inc()
            return None
        head, sep, body = bytes(data).partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/1.1 200 "):
            self.metrics.scrape_errors.inc()
            return None
        return body

    async def scrape(self) -> bytes:
        bodies = await asyncio.gather(*(self.scrape_one(w) for w in self.workers))
        own = list(self.metrics.registry.collect())
        return render(aggregate([self.retired, *bodies], own))

    async def scrape_one(self, worker: Worker) -> list[Metric]:
        spawns = worker.spawns
        body = await self.query(worker, "/metrics")
        if body is None:
            return []
        try:
            families = list(text_string_to_metric_families(body.decode()))
        except (ValueError, UnicodeDecodeError):
            self.metrics.scrape_errors.inc()
            return []
        if worker.spawns == spawns:  # the same process is still there
            worker.last_cumulative = cumulative(families)
        return families

    async def status(self, draining: bool) -> dict[str, Any] | None:
        """/status over the workers: the first one's, with the counts summed."""
        bodies = await asyncio.gather(*(self.query(w, "/status") for w in self.workers))
        views = [json.loads(b) for b in bodies if b is not None]
        if not views:
            return None
        out = dict(views[0])
        for key in ("tunnels", "pending"):
            out[key] = sum(v[key] for v in views)
        out["open_files"] = {k: sum(v["open_files"][k] for v in views) for k in ("open", "limit")}
        denied: dict[str, int] = {}
        for v in views:
            for reason, n in v["denied"].items():
                denied[reason] = denied.get(reason, 0) + n
        out.update(ready=not draining and all(v["ready"] for v in views), denied=denied)
        out.update(workers=len(views), actions=False)  # actions: a worker's, not here
        return out

    async def tunnels(self, path: str = "/tunnels") -> bytes:
        """The workers' lists at ``path`` (/tunnels, /clients, with the query),
        each entry with its ``worker``."""
        bodies = await asyncio.gather(*(self.query(w, path) for w in self.workers))
        out: list[Any] = []
        for worker, body in zip(self.workers, bodies, strict=True):
            try:
                entries = json.loads(body) if body is not None else []
            except ValueError:
                entries = []
            out.extend({**entry, "worker": worker.index} for entry in entries)
        return json.dumps(out, indent=1).encode()


class WorkerFeed:
    """resolver.konnect_ips for the workers: fetched once, here, through the
    supervisor's own dialers (only while the feed fetches); every accepted
    document goes to the workers through ``path`` and a SIGUSR1."""

    def __init__(
        self,
        settings: Settings,
        workers: Sequence[Worker],
        path: str,
        log: Callable[..., None],
        metrics: SupervisorMetrics,
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.path = path
        self.log = log
        self.dialers: dict[str, Dialer] = {}
        self.feed = Feed(
            settings,
            self.dialer_for,
            log,
            metrics.konnect_ips,
            on_pins=lambda pins: None,
            on_document=self.hand_over,
        )

    def dialer_for(self, host: str, port: int) -> Dialer | None:
        return self.settings.dialer_for(self.dialers, host, port)

    async def _dialers(self, settings: Settings) -> None:
        for dialer in self.dialers.values():
            await dialer.close()
        self.dialers = {}
        if settings.konnect_ips.enabled and settings.konnect_ips.fetch:
            self.dialers = make_dialers(settings.egress_config, resolver_for(settings))
            for dialer in self.dialers.values():
                await dialer.start()

    async def start(self) -> None:
        await self._dialers(self.settings)
        await self.feed.start()

    async def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        await self._dialers(settings)
        await self.feed.reconfigure(settings)

    async def close(self) -> None:
        await self.feed.close()
        for dialer in self.dialers.values():
            await dialer.close()

    def hand_over(self, data: bytes, fetched_at: float) -> None:
        """Pass an accepted document to the workers (file, then SIGUSR1)."""
        try:
            write_atomically(self.path, data, mode=0o600, mtime=fetched_at)
        except OSError as exc:
            self.log("konnect_ips_cache_failed", cache_file=self.path, error=str(exc))
            return
        for worker in self.workers:
            self.tell(worker)

    def joined(self, worker: Worker) -> None:
        """A worker now listens: it may have read the file before it was written."""
        if self.feed.document:
            self.tell(worker)

    @staticmethod
    def tell(worker: Worker) -> None:
        # Only a worker that listens has its SIGUSR1 handler (the signal's
        # default action would end it); one that starts later reads the file.
        proc = worker.running
        if worker.ready and proc is not None:
            proc.send_signal(signal.SIGUSR1)


# Worker lines held back until every worker listens (so the supervisor's own
# "listening" line comes first); a worker that never gets there releases them.
MAX_HELD_LINES = 1000


class WorkerOutput:
    """The workers' log lines, passed through into the supervisor's batched
    writes with ``"worker": i``; ``on_event(worker, record)`` hears the few
    lifecycle events the supervisor follows."""

    def __init__(self, log: EventLog, on_event: Callable[[Worker, dict[str, Any]], None]) -> None:
        self.log = log
        self.on_event = on_event
        self.held: list[str] | None = []

    def emit(self, line: str) -> None:
        if self.held is not None:
            self.held.append(line)
            if len(self.held) >= MAX_HELD_LINES:
                self.release_held()
            return
        # Into the supervisor's own batch, in order with its own lines: one
        # write per batch, not two system calls per worker line.
        self.log.write_line(line)

    def release_held(self) -> None:
        held, self.held = self.held, None
        for line in held or ():
            self.emit(line)

    def worker_line(self, worker: Worker, raw: bytes) -> None:
        """Pass a worker's log line through with ``"worker": i``; act on the
        few events the supervisor follows."""
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not (text.startswith("{") and text.endswith("}")):
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            record = {"ts": now, "event": "worker_output", "worker": worker.index, "line": text}
            self.emit(json.dumps(record, separators=(",", ":")) + "\n")
            return
        # No JSON round trip per line: the worker's request and tunnel events
        # pass through as they are; only lifecycle events are parsed.
        closing = "" if text == "{}" else ","
        self.emit(f'{text[:-1]}{closing}"worker":{worker.index}}}\n')
        head = text[:96]
        for event in ('"event":"listening"', '"event":"reloaded"', '"event":"reload_failed"'):
            if event in head:
                try:
                    record = json.loads(text)
                except ValueError:
                    return
                self.on_event(worker, record)
                return


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

    async def start(self, worker: Worker, handover: socket.socket | None = None) -> None:
        """Start the slot's process, with a control channel (an upgrade's, see
        workers_upgrade.py); with ``handover``, as the successor of the old
        supervisor's worker at the other end."""
        from relay.handover import HANDOVER_ENV, Channel
        from relay.workers_upgrade import CONTROL_ENV

        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", HANDOVER_ENV)}
        Path(worker.admin_socket).unlink(missing_ok=True)
        parent, prctl = os.getpid(), self.sup._prctl
        worker.generation = self.sup.generation
        control, theirs = Channel.pair()
        fds = [theirs.fileno()]
        env[CONTROL_ENV] = str(theirs.fileno())
        if handover is not None:
            handover.set_inheritable(True)
            fds.append(handover.fileno())
            env[HANDOVER_ENV] = str(handover.fileno())
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self.argv(worker),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=MAX_LOG_LINE,
                pass_fds=fds,
                preexec_fn=lambda: child_setup(parent, prctl),
            )
        except BaseException:
            control.close()
            raise
        finally:
            theirs.close()
        if worker.control is not None:
            worker.control.close()
        worker.control = control
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
        adopted = worker.running is not None  # started by an upgrade's handover
        while not (self.sup.draining or self.sup.retiring):
            if not adopted:
                worker.started = self.sup.loop.time()
            try:
                if not adopted:
                    await self.start(worker)
                adopted = False
            except OSError as exc:
                self.sup.log("worker_spawn_failed", worker=worker.index, error=str(exc))
                status = 1
            else:
                if self.sup.draining and worker.proc is not None:
                    worker.proc.terminate()
                status = await self.pump(worker)
                self.exited(worker, status)
            if self.sup.draining or self.sup.retiring:
                return
            if not (self.sup.announced or self.sup.successor_mode):
                # (A successor's new worker that failed its handover is restarted.)
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
