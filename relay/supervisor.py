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
import copy
import ctypes
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
)
from prometheus_client import generate_latest as render_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay import config
from relay.admin import AdminServer, Handler, Reply, text
from relay.config import SECONDS, Settings
from relay.egress import Dialer, make_dialers
from relay.hostport import hostport
from relay.konnect_ips_feed import Feed, write_atomically
from relay.log import EventLog
from relay.metrics import SupervisorMetrics
from relay.notify import notify
from relay.resolver import resolver_for
from relay.tasks import TaskSet

# A one-off crash costs half a second of one worker's share of new connections.
BACKOFF_START = 0.5 * SECONDS
# A worker that dies at once (a broken host, an exhausted resource) is retried
# no faster than this, so the supervisor does not spin and the log stays readable.
BACKOFF_CAP = 30 * SECONDS
# A worker that ran this long before crashing crashed for a new reason: its
# next restart is quick again.
BACKOFF_RESET = 60 * SECONDS
# Beyond limits.drain_timeout: a worker aborts leftover tunnels at its deadline
# and may linger up to server.CLOSE_LINGER (10 s) for them to close.
DRAIN_GRACE = 10 * SECONDS
# Per worker: one wedged worker must not make the whole scrape miss
# Prometheus' default scrape_timeout (10 s).
SCRAPE_TIMEOUT = 2 * SECONDS
# /tunnels of a worker holding 100,000 tunnels is ~30 MiB of JSON.
MAX_SCRAPE_BODY = 64 * 1024 * 1024
# A worker answers SIGHUP with "reloaded" or "reload_failed"; a new SSH egress
# connection is part of a reload and may take a few seconds.
RELOAD_TIMEOUT = 30 * SECONDS
# Worker log lines are one JSON object each; a reload_failed line listing
# every error of a large config is the longest.
MAX_LOG_LINE = 1024 * 1024
# Worker exit statuses that a drain accepts as clean: 0 after its own drain,
# or SIGTERM's default action when it arrived before the worker set handlers.
CLEAN_EXITS = frozenset({0, -signal.SIGTERM})
# 0/1 state gauges: the aggregate is 1 only while every worker reports 1.
MIN_GAUGES = frozenset({"konnect_relay_ready", "konnect_relay_egress_up"})
# Sample types whose value only grows while a process lives.
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})
# Worker lines held back until every worker listens (so the supervisor's own
# "listening" line comes first); a worker that never gets there releases them.
MAX_HELD_LINES = 1000
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# As in metrics.py: the *_created series double the exposition and no dashboard
# uses them (the switch is process-wide; the supervisor imports no relay metrics).
disable_created_metrics()  # type: ignore[no-untyped-call]


def worker_count(settings: Settings) -> int:
    """``workers`` resolved: ``auto`` is the number of CPUs this process may use
    (its affinity mask, which honours cpusets and taskset), at most MAX_WORKERS."""
    value = settings.raw.workers
    if value == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, config.MAX_WORKERS))
    return int(value)


# --- restart backoff ----------------------------------------------------------


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


# --- metrics aggregation -------------------------------------------------------

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _combine(family: Metric) -> str:
    if family.type == "gauge":
        if family.name in MIN_GAUGES:
            return "min"
        if family.name.endswith("_info"):
            return "max"  # constant 1 per process
    return "sum"


def aggregate(sources: Iterable[Iterable[Metric]], own: Iterable[Metric] = ()) -> list[Metric]:
    """Merge metric families from several processes by (sample name, labels).

    Counters, histograms and gauges are summed, except MIN_GAUGES (minimum) and
    ``*_info`` (maximum). Families in ``own`` are the supervisor's and are taken
    as they are; a worker family of the same name is dropped (the supervisor
    counts config reloads once, not once per worker).
    """
    own = list(own)
    owned = {f.name for f in own}
    merged: dict[str, tuple[Metric, dict[SampleKey, float]]] = {}
    for families in sources:
        for family in families:
            if family.name in owned:
                continue
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (family, {})
            how = _combine(entry[0])
            values = entry[1]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = values.get(key)
                if old is None:
                    values[key] = sample.value
                elif how == "min":
                    values[key] = min(old, sample.value)
                elif how == "max":
                    values[key] = max(old, sample.value)
                else:
                    values[key] = old + sample.value
    out = []
    for first, values in merged.values():
        family = Metric(first.name, first.documentation, first.type, first.unit)
        for (name, labels), value in values.items():
            family.add_sample(name, dict(labels), value)
        out.append(family)
    return out + own


def cumulative(families: Iterable[Metric]) -> list[Metric]:
    """The families whose samples only grow (what a dead worker leaves behind)."""
    return [f for f in families if f.type in CUMULATIVE_TYPES]


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    """Prometheus text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Snapshot(families))
    return render_latest(registry)


def load_document(path: str | None) -> tuple[Settings, dict[str, Any]]:
    """Like config.load, also returning the parsed YAML mapping the workers'
    file is generated from (so it keeps every key exactly as written)."""
    if path is None:
        source, text = "<embedded default>", config.default_text()
    else:
        source = path
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise config.ConfigError([f"{source}: cannot read: {exc}"], source) from None
    data = config.parse_yaml(text, source)
    settings = config.build(data, source)
    return settings, data if isinstance(data, dict) else {}


def worker_document(
    data: dict[str, Any], listen: Sequence[str], konnect_ips_file: str | None = None
) -> dict[str, Any]:
    """The workers' config: the operator's, with concrete listen addresses, one
    worker each and no TCP admin listener (theirs is a Unix socket). With
    ``konnect_ips_file`` the workers read Konnect's ingress list from that file
    (the supervisor fetches it once for all of them) instead of fetching it."""
    doc = copy.deepcopy(data)
    if konnect_ips_file is not None:
        resolver = doc.setdefault("resolver", {})
        resolver["konnect_ips"] = {
            **resolver.get("konnect_ips", {}),
            "fetch": False,
            "cache_file": konnect_ips_file,
        }
    entries = doc.get("listen")
    if isinstance(entries, list):
        for entry, address in zip(entries, listen, strict=True):
            entry["address"] = address
    else:
        doc["listen"] = [{"address": address} for address in listen]
    doc["workers"] = 1
    doc["admin"] = {"address": None}
    return doc


class PortReservations:
    """Concrete ports for ``listen:`` entries written with port 0.

    The reserving socket has SO_REUSEPORT (so workers can bind beside it) and
    never listens (so the kernel never hands it a connection).
    """

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}

    def concrete(self, settings: Settings) -> list[str]:
        """Listen addresses with every port 0 replaced; an entry that was in the
        previous config keeps its port, entries that are gone release theirs."""
        out: list[str] = []
        keep: dict[str, socket.socket] = {}
        fresh: list[socket.socket] = []
        seen: dict[str, int] = {}
        try:
            for spec, (host, port) in zip(settings.raw.listen, settings.listen, strict=True):
                if port != 0:
                    out.append(spec.address)
                    continue
                text = spec.model_dump_json()
                seen[text] = seen.get(text, 0) + 1
                key = f"{seen[text]}:{text}"  # identical entries each get a port
                sock = self.sockets.get(key)
                if sock is None:
                    sock = self._reserve(host)
                    fresh.append(sock)
                keep[key] = sock
                out.append(hostport(host, sock.getsockname()[1]))
        except OSError:
            for sock in fresh:
                sock.close()
            raise
        for key, sock in self.sockets.items():
            if keep.get(key) is not sock:
                sock.close()
        self.sockets = keep
        return out

    @staticmethod
    def _reserve(host: str) -> socket.socket:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # as asyncio's create_server binds it: [::] is IPv6 only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets = {}


# --- workers ---------------------------------------------------------------------------


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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def _child_setup(parent: int, prctl: Any) -> None:
    """In the worker, between fork and exec: die with the supervisor (SIGTERM,
    so its tunnels get drain_timeout), even if it is SIGKILLed."""
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


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
        self.retired: list[Metric] = []  # cumulative samples of dead workers
        self.held: list[str] | None = []  # worker lines until the relay as a whole listens
        self.announced = False
        self.admin = AdminServer(self.admin_routes())
        self.admin_address: str | None = None
        self.draining = False
        self.fatal: str | None = None
        self.stop = asyncio.Event()
        self.tasks = TaskSet(self.loop)
        self.keepers: list[asyncio.Task[None]] = []
        self.reload_lock = asyncio.Lock()
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        # resolver.konnect_ips: fetched here, once for every worker, through
        # the supervisor's own dialers; each accepted document goes to the
        # workers through this file and a SIGUSR1.
        self.konnect_ips_file = os.path.join(self.rundir, "konnect-ips.json")
        self.dialers: dict[str, Dialer] = {}
        self.feed = Feed(
            settings,
            self.dialer_for,
            self.log,
            self.metrics.konnect_ips,
            on_pins=lambda pins: None,
            on_document=self.hand_konnect_ips,
        )

    def dialer_for(self, host: str, port: int) -> Dialer | None:
        via = self.settings.route(host, port)
        return None if via == "deny" else self.dialers.get(via)

    async def start_dialers(self, settings: Settings) -> None:
        """The egresses the feed fetches through (only while it fetches)."""
        for dialer in self.dialers.values():
            await dialer.close()
        self.dialers = {}
        if settings.konnect_ips.enabled and settings.konnect_ips.fetch:
            self.dialers = make_dialers(settings, resolver_for(settings))
            for dialer in self.dialers.values():
                await dialer.start()

    def hand_konnect_ips(self, data: bytes, fetched_at: float) -> None:
        """Pass an accepted document to the workers (file, then SIGUSR1)."""
        try:
            write_atomically(self.konnect_ips_file, data, fetched_at)
        except OSError as exc:
            self.log("konnect_ips_cache_failed", cache_file=self.konnect_ips_file, error=str(exc))
            return
        for worker in self.workers:
            self.tell_konnect_ips(worker)

    def tell_konnect_ips(self, worker: Worker) -> None:
        # Only a worker that listens has its SIGUSR1 handler (the signal's
        # default action would end it); one that starts later reads the file.
        if worker.ready and worker.alive and worker.proc is not None:
            worker.proc.send_signal(signal.SIGUSR1)

    # --- output ------------------------------------------------------------------

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
                self.lifecycle(worker, record)
                return

    def lifecycle(self, worker: Worker, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "listening":
            worker.ready = True
            proxy = record.get("proxy")
            worker.proxy = [str(a) for a in proxy] if isinstance(proxy, list) else []
            self.count_workers()
            if self.feed.document:
                self.tell_konnect_ips(worker)  # in case it read the file before it was written
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
        self.release_held()
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
            document, listen, self.konnect_ips_file if settings.konnect_ips.enabled else None
        )
        tmp = self.worker_config + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"# generated by the konnect-relay supervisor from {settings.source}\n")
            yaml.safe_dump(doc, out, sort_keys=False)
        os.replace(tmp, self.worker_config)

    def worker_argv(self, worker: Worker) -> list[str]:
        return [
            sys.executable,
            "-m",
            "relay",
            "run",
            "--config",
            self.worker_config,
            "--worker-index",
            str(worker.index),
            "--admin-socket",
            worker.admin_socket,
            "--reuse-port",
        ]

    async def start_worker(self, worker: Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        Path(worker.admin_socket).unlink(missing_ok=True)
        parent, prctl = os.getpid(), self._prctl
        worker.generation = self.generation
        worker.spawns += 1
        worker.proc = await asyncio.create_subprocess_exec(
            *self.worker_argv(worker),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=MAX_LOG_LINE,
            preexec_fn=lambda: _child_setup(parent, prctl),
        )
        worker.started = self.loop.time()
        self.count_workers()
        self.log("worker_started", worker=worker.index, pid=worker.proc.pid)

    async def pump(self, worker: Worker) -> int:
        """Pass the worker's stdout through until it ends; its exit status."""
        proc = worker.proc
        assert proc is not None and proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # longer than MAX_LOG_LINE: dropped by the reader
                self.log("worker_line_too_long", worker=worker.index, limit=MAX_LOG_LINE)
                continue
            if not line:
                break
            self.worker_line(worker, line)
        return await proc.wait()

    def exited(self, worker: Worker, status: int) -> None:
        proc = worker.proc
        worker.ready = False
        worker.spawns += 1
        self.retired = aggregate([self.retired, worker.last_cumulative])
        worker.last_cumulative = []
        if worker.reload_waiter is not None and not worker.reload_waiter.done():
            worker.reload_waiter.set_result(False)
        self.count_workers()
        how: dict[str, object] = {"code": status}
        if status < 0:
            try:
                how = {"signal": signal.Signals(-status).name}
            except ValueError:
                how = {"signal": -status}
        self.log(
            "worker_exited",
            worker=worker.index,
            pid=proc.pid if proc is not None else None,
            uptime_s=round(self.loop.time() - worker.started, 3),
            expected=self.draining,
            **how,
        )

    async def keep(self, worker: Worker) -> None:
        """Run one worker slot: start, pass output through, restart on exit."""
        backoff = Backoff()
        while not self.draining:
            worker.started = self.loop.time()
            try:
                await self.start_worker(worker)
            except OSError as exc:
                self.log("worker_spawn_failed", worker=worker.index, error=str(exc))
                status = 1
            else:
                if self.draining and worker.proc is not None:
                    worker.proc.terminate()
                status = await self.pump(worker)
                self.exited(worker, status)
            if self.draining:
                return
            if not self.announced:
                self.fatal = f"worker {worker.index} exited with status {status} while starting"
                self.stop.set()
                return
            delay = backoff.next(self.loop.time() - worker.started)
            self.log("worker_restarting", worker=worker.index, delay_s=delay)
            try:
                async with asyncio.timeout(delay):
                    await self.stop.wait()
                return  # told to stop while waiting
            except TimeoutError:
                pass
            self.metrics.restarts.inc()

    # --- admin -----------------------------------------------------------------------------

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

    async def tunnels(self) -> bytes:
        bodies = await asyncio.gather(*(self.query(w, "/tunnels") for w in self.workers))
        out: list[Any] = []
        for worker, body in zip(self.workers, bodies, strict=True):
            try:
                entries = json.loads(body) if body is not None else []
            except ValueError:
                entries = []
            out.extend({**entry, "worker": worker.index} for entry in entries)
        return json.dumps(out, indent=1).encode()

    def admin_routes(self) -> dict[str, Handler]:
        async def metrics() -> Reply:
            return Reply(200, await self.scrape(), CONTENT_TYPE_LATEST)

        async def healthz() -> Reply:
            if not any(w.alive for w in self.workers):
                return text(503, "no worker running\n")
            return text(200, "ok\n")

        async def readyz() -> Reply:
            if self.draining:
                return text(503, "draining\n")
            if not any(w.ready for w in self.workers):
                return text(503, "no worker ready\n")
            return text(200, "ready\n")

        async def tunnels() -> Reply:
            return Reply(200, await self.tunnels(), "application/json")

        return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz, "/tunnels": tunnels}

    # --- reload ----------------------------------------------------------------------------

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
            settings, document = load_document(self.config_path)
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
        await self.start_dialers(settings)
        await self.feed.reconfigure(settings)
        self.generation += 1
        waiters: dict[int, asyncio.Future[bool]] = {}
        for worker in self.workers:
            if worker.ready and worker.proc is not None and worker.alive:
                worker.generation = self.generation
                worker.reload_waiter = waiters[worker.index] = self.loop.create_future()
                worker.proc.send_signal(signal.SIGHUP)
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
        try:
            try:
                await self.start_admin()
                self.write_worker_config(self.settings, self.document)
            except OSError as exc:
                print(f"cannot listen: {exc}", file=sys.stderr)
                return 1
            await self.start_dialers(self.settings)
            await self.feed.start()
            self.keepers = [self.tasks.spawn(self.keep(w)) for w in self.workers]
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
        self.release_held()
        timeout = self.settings.limits.drain_timeout
        self.log("draining", workers=sum(w.alive for w in self.workers), timeout_s=timeout)
        statuses: list[int] = []
        for worker in self.workers:
            if worker.alive and worker.proc is not None:
                worker.proc.terminate()
        _, late = await asyncio.wait(self.keepers, timeout=timeout + DRAIN_GRACE)
        if late:
            for worker in self.workers:
                if worker.alive and worker.proc is not None:
                    self.log("worker_killed", worker=worker.index, pid=worker.proc.pid)
                    worker.proc.kill()
            await asyncio.wait(late)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is not None:
                statuses.append(worker.proc.returncode)
        return not late and all(s in CLEAN_EXITS for s in statuses)

    async def close(self) -> None:
        await self.feed.close()
        for dialer in self.dialers.values():
            await dialer.close()
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


async def _main(args: argparse.Namespace) -> int:
    # The file is read again for the mapping the workers' file is made from.
    try:
        settings, document = load_document(args.config)
    except config.ConfigError as exc:
        print(f"{exc.source}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    supervisor = Supervisor(settings, document, args.config, args.pid_file)
    return await supervisor.run()


def run(settings: Settings, args: argparse.Namespace) -> int:
    """``konnect-relay run`` with ``workers`` > 1: supervise the worker processes.

    ``settings`` only decided that; the file is read again (and validated
    again) for the YAML mapping the workers' file is generated from."""
    import uvloop

    return uvloop.run(_main(args))
