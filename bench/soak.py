"""Soak test: many simulated Kong data planes hold WebSocket-over-mTLS sessions
through the relay for a set time, and every byte is checked both ways.

Not a CI test (tests/integration/test_faults.py runs it for a few seconds at a
tiny size). Loopback only; bounded in size and time; it stops by itself.

Three processes besides the relay, so that no process holds more than one
side of the tunnels (the machine caps each process at 20,000 open files):

- ``--role cp``: a fake Konnect control plane, TLS with a required client
  certificate (trustme CA), serving WebSockets on any path. Every binary
  message is ``sha256(payload) || payload``; the CP checks the digest and
  echoes ``flag || message`` (flag 1: digest matched, 0: it did not). It pings
  every session every ``--ping-interval`` seconds, as Kong's CP does.
- ``--role client``: ``--data-planes`` data planes x 3 sessions (Kong's
  ``/v1/outlet``, ``/v2/outlet`` RPC and ``/v1/analytics/reqlog`` telemetry)
  through the relay with ``proxy=``. Each session pings every
  ``--ping-interval`` seconds and waits for the pong; the RPC session sends a
  message per ping; telemetry sends a burst of 1-3 messages every 1-4 s. Each
  echo must equal what was sent and carry flag 1, else its bytes count as
  corrupted. A session that drops reconnects after 5-10 s (Kong's delay).
- ``--role setup`` (with ``--setup-load C``): C closed loops of short tunnels
  beside the sessions, as decK or curl open them: connect, ``CONNECT`` a
  non-Konnect host the relay allows (no ClientHello check), read the ``200``,
  send a probe that a sink in the same process echoes and closes on, read the
  EOF, close. Every outcome other than that is counted as a failure with its
  stage (connect, answer, echo) and time.
- the orchestrator (no ``--role``): makes the certificates, starts the CP, the
  relay (``python -m relay run --pid-file``), the client and the setup load,
  samples the relay's RSS and open fds every ``--sample-interval`` seconds and
  scrapes its /metrics, then writes a JSON report and prints a markdown
  summary. With ``--upgrades K`` it runs ``python -m relay upgrade`` K times,
  ``--upgrade-every`` seconds apart, once the relay holds every session; the
  process in the pid file changes each time and sampling follows it. Per
  upgrade it records the command's outcome, the relay's ``handed_over`` and
  ``upgraded`` lines, whether the predecessor exited within its drain time,
  and the successor's open fds against 2 per live tunnel plus the relay's fds
  before any client.

The orchestrator makes itself a child subreaper: each successor is started by
its predecessor and would be orphaned when that exits; adopted, it can be
waited for (its exit status) and stopped at the end like the first relay.

Usage::

    .venv/bin/python bench/soak.py                      # 500 x 3 tunnels, 10 min
    .venv/bin/python bench/soak.py --duration 180 --out /tmp/soak
    .venv/bin/python bench/soak.py --data-planes 1667 --duration 240 --ramp 60 \
        --upgrades 3 --upgrade-every 50 --setup-load 32 --out /tmp/soak-upgrade
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
CP_HOST = "soak.eu.cp0.konghq.com"
TP_HOST = "soak.eu.tp0.konghq.com"
# (host, path) of a data plane's sessions, as Kong opens them (one worker).
SESSIONS = (
    ("outlet", CP_HOST, "/v1/outlet"),
    ("rpc", CP_HOST, "/v2/outlet"),
    ("telemetry", TP_HOST, "/v1/analytics/reqlog"),
)
DIGEST = 32  # SHA-256 prefix of every message
# Kong declares the peer dead 45 s after the last ping: 30 s interval + 15 s.
PONG_TIMEOUT = 15.0
# Kong waits 5-10 s before reconnecting a dropped session.
RECONNECT_DELAY = (5.0, 10.0)
# Telemetry message sizes: a batch of request logs.
TELEMETRY_SIZE = (512, 8 * 1024)
RPC_SIZE = (64, 512)
MAX_MESSAGE = 1024 * 1024
OPEN_TIMEOUT = 30.0  # a handshake queued behind a ramp of hundreds
# The held-tunnel minimum is taken from this long after the ramp on.
SETTLE = 2.0
# Replies still in flight when the run ends get this long to arrive.
DRAIN = 10.0
# RTT samples kept for percentiles (a 10 min run at the default size makes ~300k).
MAX_RTT_SAMPLES = 1_000_000
# The orchestrator kills everything this long after the planned end.
OVERRUN = 120.0
# The setup load's target: not a Konnect host, so the relay checks no ClientHello
# and the tunnel is plain TCP (it can move in an upgrade from its first byte).
SINK_HOST = "sink.soak.test"
SETUP_TARGET = f"{SINK_HOST}:443"
SETUP_PROBE = 32  # bytes each setup tunnel carries both ways
# One setup tunnel from connect to EOF: an upgrade pauses tunnels for seconds.
SETUP_TIMEOUT = 30.0
# A setup tunnel this slow is kept with its time, to be placed in an upgrade window.
SETUP_SLOW = 1.0
MAX_EVENTS_KEPT = 1000  # setup failures, slow setups, session drops kept with their times
MAX_SETUP_SAMPLES = 1_000_000
# The relay's limits.drain_timeout here: a predecessor exits within it plus EXIT_GRACE.
DRAIN_TIMEOUT = 5.0
EXIT_GRACE = 10.0
# Upgrades begin this long after the relay holds every session.
UPGRADE_WARMUP = 10.0
# `konnect-relay upgrade --timeout` default is 120 s; the command gets this long.
UPGRADE_COMMAND_TIMEOUT = 150.0
# The log lines an upgrade produces, looked for this long after the command.
UPGRADE_LINES_TIMEOUT = 15.0
UPGRADE_EVENTS = ("upgrading", "handed_over", "upgraded", "upgrade_failed", "upgrade_refused")
PR_SET_CHILD_SUBREAPER = 36


def run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the relay depends on uvloop
        return asyncio.run(coro)
    return uvloop.run(coro)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout: the orchestrator reads these."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


# --- certificates -------------------------------------------------------------------


def make_certs(directory: Path) -> None:
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("*.eu.cp0.konghq.com", "*.eu.tp0.konghq.com")
    client = ca.issue_cert("dp.soak.test", common_name="soak-dp")
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": b"".join(p.bytes() for p in server.cert_chain_pems),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": b"".join(p.bytes() for p in client.cert_chain_pems),
        "client.key": client.private_key_pem.bytes(),
    }
    for name, blob in files.items():
        (directory / name).write_bytes(blob)


def server_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(certs / "client.pem", certs / "client.key")
    return ctx


# --- the fake control plane -----------------------------------------------------------


async def control_plane(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    stats = collections.Counter[str]()

    async def handler(ws: ServerConnection) -> None:
        stats["sessions"] += 1
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                if isinstance(message, str):
                    stats["text_messages"] += 1
                    await ws.send(b"\x00" + message.encode())
                    continue
                good = hashlib.sha256(message[DIGEST:]).digest() == message[:DIGEST]
                if not good:
                    stats["bad_digest"] += 1
                    stats["bad_bytes"] += len(message)
                stats["messages"] += 1
                stats["bytes"] += len(message)
                await ws.send((b"\x01" if good else b"\x00") + message)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(
        handler,
        "127.0.0.1",
        0,
        ssl=server_context(Path(args.certs)),
        ping_interval=args.ping_interval,
        ping_timeout=PONG_TIMEOUT,
        max_size=MAX_MESSAGE,
        backlog=4096,
    ) as server:
        emit({"event": "cp_ready", "port": server.sockets[0].getsockname()[1]})
        await stop.wait()
    emit({"event": "cp_stats", **stats})


# --- the simulated data planes --------------------------------------------------------


class Fleet:
    """Every session of every simulated data plane, and the figures they produce."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = client_context(Path(args.certs))
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.held = 0
        self.opened = 0
        self.reconnects = 0
        self.connect_failures = 0
        # Sessions that were up and ended before the run did (an upgrade must cause none).
        self.dropped = 0
        self.drops: list[tuple[float, str]] = []  # (wall time, why), for the upgrade windows
        self.errors = collections.Counter[str]()
        self.sent = 0
        self.echoed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.corrupted_bytes = 0
        self.corrupted_messages = 0
        self.pings_sent = 0
        self.pings_answered = 0
        self.ping_rtt_max = 0.0
        self.rtts: list[float] = []
        # Per wall-clock second an echo came back in: [echoes, max RTT, RTTs >= 1 s],
        # so the report can tell an upgrade's pause from a busy machine's.
        self.rtt_seconds: dict[int, list[float]] = {}
        self.held_samples: list[tuple[float, int]] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def pause(self, seconds: float) -> bool:
        """Sleep unless the run is ending; True when it is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def slot(self, dp: int, kind: str, host: str, path: str, delay: float) -> None:
        """One session slot: connect, run, and reconnect after a drop, until the end."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        if await self.pause(delay):
            return
        established_before = False
        while not self.stopping.is_set():
            established = False
            try:
                async with connect(
                    f"wss://{host}{path}?node_id=dp-{dp}",
                    proxy=self.args.proxy,
                    ssl=self.ctx,
                    ping_interval=None,  # pings are sent and timed below
                    open_timeout=OPEN_TIMEOUT,
                    max_size=MAX_MESSAGE,
                    close_timeout=DRAIN,
                ) as ws:
                    if established_before:
                        self.reconnects += 1
                    established_before = established = True
                    self.opened += 1
                    self.held += 1
                    try:
                        await self.session(ws, kind)
                    finally:
                        self.held -= 1
                if self.stopping.is_set():
                    return
                self.errors["closed_by_peer"] += 1
                self.drop(kind, "closed_by_peer")
            except (OSError, TimeoutError, WebSocketException, SessionError) as exc:
                if self.stopping.is_set():
                    return
                self.errors[type(exc).__name__] += 1
                if established:
                    self.drop(kind, f"{type(exc).__name__}: {exc}")
                if not established_before:
                    self.connect_failures += 1
            if await self.pause(random.uniform(*self.args.reconnect_delay)):
                return

    def drop(self, kind: str, why: str) -> None:
        self.dropped += 1
        if len(self.drops) < MAX_EVENTS_KEPT:
            self.drops.append((time.time(), f"{kind}: {why}"))

    async def session(self, ws: Any, kind: str) -> None:
        in_flight: collections.deque[tuple[bytes, float]] = collections.deque()
        empty = asyncio.Event()
        empty.set()

        async def receive() -> None:
            async for reply in ws:
                if not in_flight:
                    raise SessionError("a reply nobody asked for")
                frame, sent_at = in_flight.popleft()
                if isinstance(reply, bytes) and reply[:1] == b"\x01" and reply[1:] == frame:
                    self.echoed += 1
                    self.bytes_down += len(reply) - 1
                    rtt = time.monotonic() - sent_at
                    if len(self.rtts) < MAX_RTT_SAMPLES:
                        self.rtts.append(rtt)
                    second = self.rtt_seconds.setdefault(int(time.time()), [0, 0.0, 0])
                    second[0] += 1
                    second[1] = max(second[1], rtt)
                    second[2] += rtt >= 1.0
                else:
                    self.corrupted_messages += 1
                    self.corrupted_bytes += len(frame)
                if not in_flight:
                    empty.set()

        async def send(low: int, high: int) -> None:
            payload = random.randbytes(random.randint(low, high))
            frame = hashlib.sha256(payload).digest() + payload
            in_flight.append((frame, time.monotonic()))
            empty.clear()
            await ws.send(frame)
            self.sent += 1
            self.bytes_up += len(frame)

        async def ping() -> None:
            interval = self.args.ping_interval
            if await self.pause(random.uniform(0, interval)):
                return
            while True:
                if kind == "rpc":
                    await send(*RPC_SIZE)
                started = time.monotonic()
                pong = await ws.ping()
                self.pings_sent += 1
                await asyncio.wait_for(pong, PONG_TIMEOUT)
                self.pings_answered += 1
                self.ping_rtt_max = max(self.ping_rtt_max, time.monotonic() - started)
                if await self.pause(interval):
                    return

        async def telemetry() -> None:
            low, high = self.args.telemetry_interval
            while not await self.pause(random.uniform(low, high)):
                for _ in range(random.randint(1, 3)):
                    await send(*TELEMETRY_SIZE)

        async def work() -> None:
            if kind == "outlet":
                await send(*RPC_SIZE)  # Kong's basic_info on connect
            jobs = [ping()] + ([telemetry()] if kind == "telemetry" else [])
            await asyncio.gather(*jobs)

        loop = asyncio.get_running_loop()
        receiver = loop.create_task(receive())
        worker = loop.create_task(work())
        try:
            done, _ = await asyncio.wait([receiver, worker], return_when=asyncio.FIRST_COMPLETED)
            if receiver in done:
                receiver.result()  # raises why the session ended
                raise SessionError("closed by the control plane")
            worker.result()
            # The run is ending: let the replies in flight arrive, then close.
            async with asyncio.timeout(DRAIN):
                await empty.wait()
        finally:
            for task in (worker, receiver):
                task.cancel()
            await asyncio.gather(worker, receiver, return_exceptions=True)

    def progress(self) -> dict[str, Any]:
        return {
            "event": "progress",
            "t": round(self.elapsed(), 1),
            "held": self.held,
            "opened": self.opened,
            "reconnects": self.reconnects,
            "dropped": self.dropped,
            "sent": self.sent,
            "echoed": self.echoed,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "corrupted_bytes": self.corrupted_bytes,
        }

    def report(self) -> dict[str, Any]:
        after = self.args.ramp + SETTLE
        held_after = [n for t, n in self.held_samples if t >= after]
        rtts = sorted(self.rtts)

        def pct(p: float) -> float | None:
            return round(rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1000, 3) if rtts else None

        return {
            "event": "client_report",
            "target": self.args.data_planes * len(SESSIONS),
            "held_min_after_ramp": min(held_after) if held_after else None,
            "held_max": max((n for _, n in self.held_samples), default=0),
            "opened": self.opened,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "dropped": self.dropped,
            "drops": self.drops,
            "errors": dict(self.errors),
            "sent": self.sent,
            "echoed": self.echoed,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "corrupted_bytes": self.corrupted_bytes,
            "corrupted_messages": self.corrupted_messages,
            "pings_sent": self.pings_sent,
            "pings_answered": self.pings_answered,
            "ping_rtt_max_ms": round(self.ping_rtt_max * 1000, 3),
            "rtt_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "rtt_by_second": [
                [t, int(n), round(top * 1000, 1), int(slow)]
                for t, (n, top, slow) in sorted(self.rtt_seconds.items())
            ],
        }


class SessionError(Exception):
    """A session ended in a way a data plane would treat as a failure."""


async def client(args: argparse.Namespace) -> None:
    fleet = Fleet(args)
    n = args.data_planes * len(SESSIONS)
    slots = [
        fleet.slot(dp, kind, host, path, args.ramp * (dp * len(SESSIONS) + i) / max(n, 1))
        for dp in range(args.data_planes)
        for i, (kind, host, path) in enumerate(SESSIONS)
    ]
    runner = asyncio.gather(*slots)
    next_report = args.sample_interval
    deadline = args.duration
    while (now := fleet.elapsed()) < deadline:
        await asyncio.sleep(min(1.0, deadline - now))
        fleet.held_samples.append((fleet.elapsed(), fleet.held))
        if fleet.elapsed() >= next_report:
            emit(fleet.progress())
            next_report += args.sample_interval
    fleet.held_samples.append((fleet.elapsed(), fleet.held))
    fleet.stopping.set()
    try:
        async with asyncio.timeout(DRAIN + 5):
            await runner
    except TimeoutError:
        fleet.errors["stop_timeout"] += 1
    emit(fleet.progress())
    emit(fleet.report())


# --- the setup load -----------------------------------------------------------------


class SetupLoad:
    """Short tunnels opened in closed loops while the sessions run: the traffic
    that keeps a relay's accept, dial and close paths busy through an upgrade
    (a listener handed over, dials finishing, tunnels moving seconds old)."""

    def __init__(self, args: argparse.Namespace) -> None:
        proxy = urlsplit(args.proxy)
        self.host, self.port = proxy.hostname or "127.0.0.1", proxy.port or 3128
        self.request = f"CONNECT {SETUP_TARGET} HTTP/1.1\r\nHost: {SETUP_TARGET}\r\n\r\n".encode()
        self.pause = args.setup_pause
        self.concurrency = args.setup_load
        self.started = time.monotonic()
        self.attempted = 0
        self.answered = 0  # HTTP/1.1 200 received
        self.completed = 0  # 200, probe echoed, EOF
        self.failed = collections.Counter[str]()  # by stage and cause
        self.failures: list[tuple[float, str]] = []  # (wall time, cause)
        self.slow: list[tuple[float, float]] = []  # (wall time it began, seconds)
        self.latencies: list[float] = []
        self.sink_connections = 0
        self.sink_short = 0  # the probe did not arrive whole

    async def sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Echo the probe, then close first: TIME_WAIT lands on this listening
        side and the relay's, not on the client's ephemeral ports."""
        self.sink_connections += 1
        try:
            writer.write(await reader.readexactly(SETUP_PROBE))
        except (OSError, asyncio.IncompleteReadError):
            self.sink_short += 1
        finally:
            writer.close()

    def fail(self, began: float, cause: str) -> None:
        self.failed[cause] += 1
        if len(self.failures) < MAX_EVENTS_KEPT:
            self.failures.append((began, cause))

    async def one(self) -> None:
        began, started = time.time(), time.monotonic()
        self.attempted += 1
        stage = "connect"
        try:
            async with asyncio.timeout(SETUP_TIMEOUT):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    stage = "answer"
                    writer.write(self.request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = head.split(b"\r\n", 1)[0]
                    if not status.startswith(b"HTTP/1.1 200"):
                        self.fail(began, f"answer: {status[9:12].decode(errors='replace')}")
                        return
                    self.answered += 1
                    stage = "echo"
                    probe = random.randbytes(SETUP_PROBE)
                    writer.write(probe)
                    if await reader.readexactly(SETUP_PROBE) != probe:
                        self.fail(began, "echo: mismatch")
                        return
                    if await reader.read(1):
                        self.fail(began, "echo: bytes after the echo")
                        return
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except asyncio.IncompleteReadError:
            self.fail(began, f"{stage}: closed")
        except TimeoutError:
            self.fail(began, f"{stage}: timeout")
        except (OSError, asyncio.LimitOverrunError) as exc:
            self.fail(began, f"{stage}: {type(exc).__name__}")
        else:
            self.completed += 1
            took = time.monotonic() - started
            if len(self.latencies) < MAX_SETUP_SAMPLES:
                self.latencies.append(took)
            if took >= SETUP_SLOW and len(self.slow) < MAX_EVENTS_KEPT:
                self.slow.append((began, round(took, 3)))

    async def loop(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            await self.one()
            if self.pause:
                await asyncio.sleep(self.pause)

    def progress(self) -> dict[str, Any]:
        return {
            "event": "setup_progress",
            "t": round(time.monotonic() - self.started, 1),
            "attempted": self.attempted,
            "answered": self.answered,
            "completed": self.completed,
            "failed": sum(self.failed.values()),
        }

    def report(self, ran_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 3) if lat else None

        return {
            "event": "setup_report",
            "concurrency": self.concurrency,
            "pause_s": self.pause,
            "ran_s": round(ran_s, 1),
            "attempted": self.attempted,
            "answered_200": self.answered,
            "completed": self.completed,
            "failed": sum(self.failed.values()),
            "failed_by": dict(self.failed),
            "failures": self.failures,
            "slow": self.slow,
            "rate_per_s": round(self.attempted / ran_s, 1) if ran_s > 0 else None,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
            "sink_connections": self.sink_connections,
            "sink_short": self.sink_short,
        }


async def setup_load(args: argparse.Namespace) -> None:
    load = SetupLoad(args)
    # The sink's listening socket comes from the orchestrator, which needed its
    # port for the relay's config before this process started.
    server = await asyncio.start_server(
        load.sink, sock=socket.socket(fileno=args.sink_fd), backlog=4096
    )
    emit({"event": "setup_ready"})
    stop_at = time.monotonic() + args.duration
    runner = asyncio.gather(*(load.loop(stop_at) for _ in range(args.setup_load)))
    next_report = time.monotonic() + args.sample_interval
    while not runner.done():
        await asyncio.wait([runner], timeout=max(0.0, next_report - time.monotonic()))
        if time.monotonic() >= next_report:
            emit(load.progress())
            next_report += args.sample_interval
    await runner  # every tunnel in flight at the end ends within SETUP_TIMEOUT
    ran = time.monotonic() - load.started
    server.close()
    emit(load.progress())
    emit(load.report(ran))


# --- the orchestrator ---------------------------------------------------------------


class Child:
    """A subprocess whose stdout JSON lines are read by a thread.

    ``keep`` picks the records held for ``wait_for``/``after`` (every line still
    goes to ``log``): the relay writes two lines per tunnel, and a setup load
    makes thousands of them a second. ``skim`` names the event of a line that
    needs no parsing (only counting), or None."""

    def __init__(
        self,
        argv: list[str],
        log: Path | None = None,
        keep: Callable[[dict[str, Any]], bool] | None = None,
        skim: Callable[[str], str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )
        self.lines: list[dict[str, Any]] = []
        self.keep = keep
        self.skim = skim
        self.events = collections.Counter[str]()
        # Lines that are not JSON: with a relay and its successor writing to one
        # pipe, a line broken by the other's write would show up here.
        self.unparsed = 0
        self.unparsed_samples: list[str] = []
        self.cond = threading.Condition()
        self.log = log.open("w") if log is not None else None
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log = self.log
            if log is not None:
                with contextlib.suppress(ValueError):  # closed by stop() meanwhile
                    log.write(line)
            skimmed = self.skim(line) if self.skim is not None else None
            if skimmed is not None:
                with self.cond:
                    self.events[skimmed] += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line.strip():
                    self.unparsed += 1
                    if len(self.unparsed_samples) < 5:
                        self.unparsed_samples.append(line[:300])
                continue
            if not isinstance(record, dict):
                continue
            with self.cond:
                self.events[str(record.get("event"))] += 1
                if self.keep is None or self.keep(record):
                    self.lines.append(record)
                self.cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-200]

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for record in self.lines:
                    if record.get("event") == event:
                        return record
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(self.stderr[-20:])
                    raise SystemExit(f"{event!r} not seen from {self.proc.args!r}: {tail}")
                self.cond.wait(min(left, 0.5))

    def mark(self) -> int:
        """How many records are kept so far: ``after`` looks only past it."""
        with self.cond:
            return len(self.lines)

    def after(self, mark: int, events: tuple[str, ...], timeout: float) -> dict[str, Any] | None:
        """The first record of one of ``events`` kept after ``mark``, waiting up
        to ``timeout``; None without one. It does not give up when the process
        exits: a relay's successor writes on the same pipe."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for record in self.lines[mark:]:
                    if record.get("event") in events:
                        return record
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def since(self, mark: int, event: str) -> list[dict[str, Any]]:
        with self.cond:
            return [r for r in self.lines[mark:] if r.get("event") == event]

    def last(self, event: str) -> dict[str, Any] | None:
        with self.cond:
            for kept in self.lines[::-1]:
                if kept.get("event") == event:
                    return kept
        return None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for reader in self.readers:  # the last lines, before the log is closed
            reader.join(5)
        log, self.log = self.log, None
        if log is not None:
            log.close()


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux prctl): a successor outlives the relay
    that started it, and this process then waits for it and stops it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Relays:
    """The relay across upgrades: the process the pid file names now, and
    every process it has named. The first is ``child``; the others are
    adopted by this process (a subreaper) once their predecessor exits."""

    def __init__(self, child: Child, pid_file: Path) -> None:
        self.child = child
        self.pid_file = pid_file
        self.pid = child.proc.pid
        self.seen = [self.pid]
        self.exits: dict[int, int | None] = {}  # pid: exit status (None: not ours to reap)
        self.lock = threading.Lock()

    def current(self) -> int:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):  # not written yet, or removed at the end
            return self.pid
        with self.lock:
            if pid != self.pid:
                self.pid = pid
                if pid not in self.seen:
                    self.seen.append(pid)
        return pid

    def status(self) -> tuple[int, int, int] | None:
        """(pid, RSS KiB, open fds) of the current relay; None when it could
        not be read (a predecessor exiting between the pid file and /proc)."""
        for _ in range(3):
            pid = self.current()
            with contextlib.suppress(OSError):
                return (pid, *proc_status(pid))
            time.sleep(0.05)
        return None

    def wait_exit(self, pid: int, timeout: float) -> tuple[bool, int | None]:
        """Whether ``pid`` has exited within ``timeout``, and its exit status
        when this process could reap it."""
        if pid in self.exits:
            return True, self.exits[pid]
        if pid == self.child.proc.pid:
            try:
                rc: int | None = self.child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False, None
            self.exits[pid] = rc
            return True, rc
        deadline = time.monotonic() + timeout
        while True:
            try:
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    rc = os.waitstatus_to_exitcode(status)
                    self.exits[pid] = rc
                    return True, rc
            except ChildProcessError:  # not adopted (yet): its parent still runs
                if not alive(pid):
                    self.exits[pid] = None
                    return True, None
            if time.monotonic() >= deadline:
                return False, None
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM every relay process still running, wait, SIGKILL the stuck."""
        running = [pid for pid in self.seen if pid not in self.exits]
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in running:
            gone, _ = self.wait_exit(pid, 30.0)
            if not gone:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.wait_exit(pid, 10.0)
        self.child.stop()  # every writer of its pipe is gone: the log is complete


def relay_line_kept(record: dict[str, Any]) -> bool:
    """The relay's lines the orchestrator keeps: all but the two of every
    tunnel, of which it keeps refusals and the sessions' closes (a dropped
    session's cause on the relay's side)."""
    event = record.get("event")
    if event == "request":
        return bool(record.get("status") != 200)
    if event == "tunnel_closed":
        return not str(record.get("target", "")).startswith(SINK_HOST)
    return True


def relay_line_skimmed(line: str) -> str | None:
    """The event of a setup tunnel's line, counted unparsed (parsing 15,000
    lines a second would take a good part of a core the relay needs); a line
    broken by another process's write would not start and end as one does."""
    if f'"target":"{SETUP_TARGET}"' not in line or not line.endswith("}\n"):
        return None
    if line.startswith('{"ts":') and '"event":"tunnel_closed"' in line:
        return "tunnel_closed"
    if line.startswith('{"ts":') and '"event":"request"' in line and '"status":200,' in line:
        return "request"
    return None


SESSION_HOSTS = frozenset(host for _, host, _ in SESSIONS)


def scrape(admin: str) -> dict[str, float]:
    """The relay's tunnel series summed over hosts; the same again prefixed
    ``session_`` for the sessions' hosts and ``setup_`` for the setup load's."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "konnect_relay_tunnel_bytes_total":
                key = f"bytes_{s.labels['direction']}"
            elif s.name == "konnect_relay_tunnels_closed_total":
                key = f"closed_{s.labels['reason']}"
            elif s.name in (
                "konnect_relay_tunnels_active",
                "konnect_relay_tunnels_opened_total",
                "konnect_relay_tunnel_reconnects_total",
                "konnect_relay_requests_denied_total",
                "konnect_relay_pending_requests",
            ):
                key = s.name.removeprefix("konnect_relay_")
            else:
                continue
            totals[key] += s.value
            host = s.labels.get("host")
            if host in SESSION_HOSTS:
                totals[f"session_{key}"] += s.value
            elif host == SINK_HOST:
                totals[f"setup_{key}"] += s.value
    return dict(totals)


def try_scrape(admin: str) -> dict[str, float] | None:
    """scrape(), or None: during an upgrade the admin listener is moving."""
    try:
        return scrape(admin)
    except (OSError, ValueError):
        return None


def closed_by_reason(metrics: dict[str, float] | None, prefix: str) -> dict[str, int]:
    if metrics is None:
        return {}
    head = f"{prefix}closed_"
    return {k.removeprefix(head): int(v) for k, v in metrics.items() if k.startswith(head) and v}


def relay_config(cp_port: int, sink_port: int | None = None, workers: int = 1) -> dict[str, Any]:
    target = f"127.0.0.1:{cp_port}"
    static = {CP_HOST: target, TP_HOST: target}
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "konnect": {"regions": ["eu"], "control_planes": ["soak"]},
        "resolver": {"static": static, "allow_private": True},
        "limits": {"drain_timeout": DRAIN_TIMEOUT},
    }
    if sink_port is not None:
        static[SINK_HOST] = f"127.0.0.1:{sink_port}"
        config["allow"] = [SETUP_TARGET]
    if workers > 1:
        # The RSS and fds sampled are then the supervisor's (the pid file's),
        # not the workers' that hold the tunnels.
        config["workers"] = workers
    return config


# --- upgrades ---------------------------------------------------------------------


class Upgrades(threading.Thread):
    """``--upgrades`` runs of ``konnect-relay upgrade``: the first
    UPGRADE_WARMUP s after the relay holds every session, then one every
    ``--upgrade-every`` s (start to start), each measured by ``one``."""

    def __init__(
        self,
        args: argparse.Namespace,
        relays: Relays,
        admin: str,
        started: float,
        target: int,
        baseline_fds: int,
    ) -> None:
        super().__init__(daemon=True)
        self.args = args
        self.relays = relays
        self.admin = admin
        self.started = started
        self.target = target
        self.baseline = baseline_fds
        self.runs: list[dict[str, Any]] = []
        self.all_up_s: float | None = None
        self.problem: str | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # recorded: the report says the upgrades did not all run
            self.problem = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        args = self.args
        # The last upgrade, its predecessor's exit included, ends before the clients stop.
        latest = self.started + args.duration - upgrade_margin()
        while True:
            m = try_scrape(self.admin) or {}
            if m.get("session_tunnels_active", 0) >= self.target:
                break
            if time.monotonic() >= latest or self.stopping.wait(1.0):
                self.problem = "the relay never held every session before the upgrades were due"
                return
        self.all_up_s = round(time.monotonic() - self.started, 1)
        next_at = time.monotonic() + UPGRADE_WARMUP
        for n in range(1, args.upgrades + 1):
            if self.stopping.wait(max(0.0, next_at - time.monotonic())):
                return
            if time.monotonic() > latest:
                self.problem = (
                    f"upgrade {n} of {args.upgrades} would end after the clients stop: "
                    "a longer --duration or a shorter --upgrade-every"
                )
                return
            begun = time.monotonic()
            self.runs.append(self.one(n))
            next_at = begun + args.upgrade_every

    def one(self, n: int) -> dict[str, Any]:
        """One upgrade: the command's outcome, the relay's own lines about it,
        the predecessor's exit, and the successor's fds."""
        relays, child = self.relays, self.relays.child
        predecessor = relays.current()
        before = self.fds(predecessor, tries=1)
        mark = child.mark()
        began_wall, began = time.time(), time.monotonic()
        argv = [sys.executable, "-m", "relay", "upgrade", "--pid-file", str(relays.pid_file)]
        try:
            done = subprocess.run(
                argv,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=UPGRADE_COMMAND_TIMEOUT,
            )
            rc: int | None = done.returncode
            said = f"{done.stdout.strip()} {done.stderr.strip()}".strip()
        except subprocess.TimeoutExpired:
            rc, said = None, f"no exit within {UPGRADE_COMMAND_TIMEOUT:g} s"
        command_s = time.monotonic() - began
        successor = relays.current()
        handed = child.after(mark, ("handed_over", "upgrade_failed"), UPGRADE_LINES_TIMEOUT)
        upgraded = None
        if handed is not None and handed.get("event") == "handed_over":
            upgraded = child.after(mark, ("upgraded",), UPGRADE_LINES_TIMEOUT)
        exited, exit_rc, exited_after = False, None, None
        if successor != predecessor:
            exited, exit_rc = relays.wait_exit(predecessor, DRAIN_TIMEOUT + EXIT_GRACE)
            if exited:
                exited_after = round(time.monotonic() - began, 3)
        after = self.fds(successor, tries=5)

        def pick(record: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
            return {k: record.get(k) for k in keys} if record is not None else None

        return {
            "n": n,
            "t": round(began - self.started, 1),
            "began_wall": began_wall,
            "ended_wall": time.time(),
            "predecessor": predecessor,
            "successor": successor,
            "exit_code": rc,
            "command_s": round(command_s, 3),
            "command_said": said[-1000:],
            "handed_over": pick(
                handed if handed and handed.get("event") == "handed_over" else None,
                ("successor", "moved", "spliced", "stayed", "stayed_by", "handover_s"),
            ),
            "upgraded": pick(
                upgraded,
                ("moved", "stayed", "stayed_by", "handover_s", "tunnels", "predecessor_lost"),
            ),
            "upgrade_failed": child.since(mark, "upgrade_failed"),
            "upgrade_refused": child.since(mark, "upgrade_refused"),
            "predecessor_exited": exited,
            "predecessor_exit_code": exit_rc,
            "predecessor_exited_after_s": exited_after,
            "predecessor_fds": before,
            "successor_fds": after,
        }

    def fds(self, pid: int, tries: int) -> dict[str, Any]:
        """Open fds of ``pid`` against 2 per live tunnel plus the relay's fds
        before any client. Setup tunnels open and close between the reads (2
        fds each, and 1 for a connection still sending its head), so the
        closest of ``tries`` reads is kept and a leak is a difference beyond
        2 x the setup concurrency plus the pending heads."""
        reads: list[dict[str, int]] = []
        error = "no read"
        for i in range(tries):
            if i:
                time.sleep(0.2)
            try:
                first = len(os.listdir(f"/proc/{pid}/fd"))
                m = scrape(self.admin)
                second = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                continue
            tunnels = int(m.get("tunnels_active", 0))
            fds = round((first + second) / 2)
            expected = 2 * tunnels + self.baseline
            reads.append(
                {
                    "fds": fds,
                    "tunnels": tunnels,
                    "pending": int(m.get("pending_requests", 0)),
                    "expected": expected,
                    "diff": fds - expected,
                }
            )
        if not reads:
            return {"pid": pid, "error": error}
        best = min(reads, key=lambda r: abs(r["diff"]))
        # +2: the scrape's own connection, open during one of the two reads.
        tolerance = 2 * self.args.setup_load + best["pending"] + 2
        return {
            "pid": pid,
            **best,
            "baseline": self.baseline,
            "tolerance": tolerance,
            "ok": abs(best["diff"]) <= tolerance,
            "diffs": [r["diff"] for r in reads],
        }


def upgrade_margin() -> float:
    """How long before the end the last upgrade may start: its handover and
    its predecessor's drain then end while the sessions still run."""
    return DRAIN_TIMEOUT + EXIT_GRACE + 15.0


# --- the run and its report -------------------------------------------------------


def orchestrate(args: argparse.Namespace) -> int:
    import yaml

    out = (Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="soak-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    certs.mkdir(exist_ok=True)
    make_certs(certs)
    if args.upgrades:
        planned = args.ramp + SETTLE + UPGRADE_WARMUP + (args.upgrades - 1) * args.upgrade_every
        if planned > args.duration - upgrade_margin():
            raise SystemExit(
                f"soak: {args.upgrades} upgrades {args.upgrade_every:g} s apart after the ramp "
                f"need --duration >= {planned + upgrade_margin():g}"
            )
        if not become_subreaper():
            print("soak: not a subreaper: successors' exit status will be unknown", file=sys.stderr)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--certs", str(certs), "--ping-interval", str(args.ping_interval)]
    children: list[Child] = []
    relays: Relays | None = None
    upgrades: Upgrades | None = None
    sink: socket.socket | None = None
    setup: Child | None = None
    setup_report: dict[str, Any] | None = None
    before_stop: dict[str, float] | None = None
    scrape_errors = 0
    try:
        cp = Child([*me, "--role", "cp", *common])
        children.append(cp)
        cp_port = cp.wait_for("cp_ready", 30)["port"]
        if args.setup_load:
            # Bound here so that the relay's config can name its port; the
            # setup process inherits it.
            sink = socket.create_server(("127.0.0.1", 0), backlog=4096)
        sink_port = sink.getsockname()[1] if sink is not None else None
        (out / "relay.yaml").write_text(
            yaml.safe_dump(relay_config(cp_port, sink_port, args.workers))
        )
        pid_file = out / "relay.pid"
        pid_file.unlink(missing_ok=True)
        relay = Child(
            [
                sys.executable,
                "-m",
                "relay",
                "run",
                "--config",
                str(out / "relay.yaml"),
                "--pid-file",
                str(pid_file),
            ],
            log=out / "relay.log",
            keep=relay_line_kept,
            skim=relay_line_skimmed,
            cwd=ROOT,
        )
        relays = Relays(relay, pid_file)
        listening = relay.wait_for("listening", 30)
        admin = listening["admin"]
        proxy = f"http://{listening['proxy'][0]}"
        samples: list[dict[str, Any]] = []
        fleet: Child | None = None

        def sample(t: float) -> None:
            nonlocal scrape_errors
            assert relays is not None
            status = relays.status()
            m = try_scrape(admin)
            if m is None:
                scrape_errors += 1
            progress = (fleet.last("progress") if fleet is not None else None) or {}
            record: dict[str, Any] = {
                "t": round(t, 1),
                "relay_pid": status[0] if status else None,
                "relay_rss_kib": status[1] if status else None,
                "relay_fds": status[2] if status else None,
                "tunnels_active": int(m.get("tunnels_active", 0)) if m else None,
                "client_held": progress.get("held"),
                "bytes_relayed": (
                    int(m.get("bytes_upstream", 0) + m.get("bytes_downstream", 0)) if m else None
                ),
            }
            if args.setup_load and m:
                record["session_tunnels_active"] = int(m.get("session_tunnels_active", 0))
                record["setup_opened"] = int(m.get("setup_tunnels_opened_total", 0))
            samples.append(record)

        started = time.monotonic()
        sample(0.0)
        baseline = samples[0]["relay_fds"]
        if baseline is None:
            raise SystemExit("soak: cannot read the relay's open files")
        fleet = Child(
            [
                *me,
                "--role",
                "client",
                *common,
                "--proxy",
                proxy,
                "--data-planes",
                str(args.data_planes),
                "--duration",
                str(args.duration),
                "--ramp",
                str(args.ramp),
                "--sample-interval",
                str(args.sample_interval),
                "--telemetry-interval",
                *map(str, args.telemetry_interval),
                "--reconnect-delay",
                *map(str, args.reconnect_delay),
            ]
        )
        children.append(fleet)
        if sink is not None:
            setup = Child(
                [
                    *me,
                    "--role",
                    "setup",
                    "--certs",
                    str(certs),
                    "--proxy",
                    proxy,
                    "--sink-fd",
                    str(sink.fileno()),
                    "--setup-load",
                    str(args.setup_load),
                    "--setup-pause",
                    str(args.setup_pause),
                    "--duration",
                    str(args.duration),
                    "--sample-interval",
                    str(args.sample_interval),
                ],
                pass_fds=[sink.fileno()],
            )
            children.append(setup)
            sink.close()
            sink = None
        target = args.data_planes * len(SESSIONS)
        if args.upgrades:
            upgrades = Upgrades(args, relays, admin, started, target, baseline)
            upgrades.start()
        hard_stop = started + args.duration + OVERRUN
        next_sample = started + args.sample_interval
        # The relay's closed-tunnel count just before the clients close theirs.
        before_stop_at = started + args.duration - 1.0
        while fleet.proc.poll() is None and time.monotonic() < hard_stop:
            wake = next_sample if before_stop is not None else min(next_sample, before_stop_at)
            with contextlib.suppress(subprocess.TimeoutExpired):
                fleet.proc.wait(max(0.0, wake - time.monotonic()))
            if fleet.proc.poll() is not None:
                break
            now = time.monotonic()
            if before_stop is None and now >= before_stop_at:
                before_stop = try_scrape(admin) or {}
            if now >= next_sample:
                sample(now - started)
                next_sample += args.sample_interval
        report = fleet.wait_for("client_report", 30)
        if setup is not None:
            setup_report = setup.wait_for("setup_report", SETUP_TIMEOUT + 30)
        if upgrades is not None:
            upgrades.stopping.set()
            upgrades.join(UPGRADE_COMMAND_TIMEOUT + 60)
        final_metrics = scrape(admin)
        sample(time.monotonic() - started)
        cp.stop()
        cp_stats = cp.wait_for("cp_stats", 10)
    finally:
        if relays is not None:
            relays.stop()
        for child in reversed(children):
            child.stop()
        if sink is not None:
            sink.close()

    client_rc = fleet.proc.returncode
    extra = {
        "setup_report": setup_report,
        "upgrades": upgrades,
        "relays": relays,
        "before_stop": before_stop,
        "scrape_errors": scrape_errors,
    }
    result = summarise(args, report, cp_stats, final_metrics, samples, client_rc, extra)
    json_path = Path(args.json) if args.json else out / "soak.json"
    json_path.write_text(json.dumps(result, indent=1))
    markdown = render(result)
    (out / "soak.md").write_text(markdown)
    print(markdown)
    print(f"\nJSON: {json_path}  relay log: {out / 'relay.log'}")
    return 0 if not result["checks_failed"] else 1


def within(events: list[Any], run: dict[str, Any]) -> list[Any]:
    """The (wall time, ...) events that fall in an upgrade's window: from the
    command's start to the successor's fd check after the predecessor exited."""
    return [e for e in events if run["began_wall"] <= e[0] <= run["ended_wall"]]


def in_window(second: int, run: dict[str, Any]) -> bool:
    """Whether echoes that came back in wall-clock ``second`` may have been
    held by an upgrade: its window, from a second before (seconds are whole)
    to two after (a held echo comes back once its tunnel is attached)."""
    return bool(run["began_wall"] - 1 <= second <= run["ended_wall"] + 2)


def rtt_outside(report: dict[str, Any], runs: list[dict[str, Any]], after: float) -> dict[str, Any]:
    """Echo RTTs of the seconds after the ramp and outside every upgrade window:
    what the machine's load alone does to them."""
    seconds = report.get("rtt_by_second", [])
    start = seconds[0][0] + after if seconds else 0
    outside = [s for s in seconds if s[0] >= start and not any(in_window(s[0], r) for r in runs)]
    return {
        "echoes": sum(s[1] for s in outside),
        "max_ms": max((s[2] for s in outside), default=None),
        "over_1s": sum(s[3] for s in outside),
    }


def summarise(
    args: argparse.Namespace,
    report: dict[str, Any],
    cp_stats: dict[str, Any],
    metrics: dict[str, float],
    samples: list[dict[str, Any]],
    client_rc: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    extra = extra or {}
    rss = [s["relay_rss_kib"] for s in samples if s["relay_rss_kib"] is not None]
    fds = [s["relay_fds"] for s in samples if s["relay_fds"] is not None]
    result: dict[str, Any] = {
        "config": {
            "data_planes": args.data_planes,
            "sessions_per_data_plane": [k for k, _, _ in SESSIONS],
            "duration_s": args.duration,
            "ramp_s": args.ramp,
            "ping_interval_s": args.ping_interval,
            "telemetry_interval_s": args.telemetry_interval,
            "sample_interval_s": args.sample_interval,
            "upgrades": args.upgrades,
            "upgrade_every_s": args.upgrade_every,
            "setup_load": args.setup_load,
            "setup_pause_s": args.setup_pause,
        },
        "tunnels": {
            "target": report["target"],
            "held_min_after_ramp": report["held_min_after_ramp"],
            "held_max": report["held_max"],
            "opened": report["opened"],
        },
        "reconnects": report["reconnects"],
        "connect_failures": report["connect_failures"],
        "errors": report["errors"],
        # An altered upstream message comes back with flag 0 and is counted
        # by the client; the CP's own count says which direction it was.
        "corrupted_bytes": report["corrupted_bytes"],
        "corrupted_messages": report["corrupted_messages"],
        "corrupted_upstream_messages": cp_stats.get("bad_digest", 0),
        "messages": {
            "sent": report["sent"],
            "echoed": report["echoed"],
            "rtt_ms": report["rtt_ms"],
            "cp_checked": cp_stats.get("messages", 0),
        },
        "bytes": {"up": report["bytes_up"], "down": report["bytes_down"]},
        "pings": {
            "sent": report["pings_sent"],
            "answered": report["pings_answered"],
            "max_rtt_ms": report["ping_rtt_max_ms"],
        },
        "relay": {
            "rss_kib": {"start": rss[0], "max": max(rss), "end": rss[-1]},
            "fds": {"start": fds[0], "max": max(fds), "end": fds[-1]},
            "metrics": metrics,
        },
        "client_exit": client_rc,
        "samples": samples,
    }
    before_stop = extra.get("before_stop")
    # Closed while the sessions ran: the client's drops, and the relay's count
    # for the sessions' hosts just before the clients closed theirs.
    result["tunnels_closed"] = {
        "client_dropped": report.get("dropped", 0),
        "relay_sessions_before_stop": (
            sum(closed_by_reason(before_stop, "session_").values())
            if before_stop is not None
            else None
        ),
        "relay_sessions_before_stop_by_reason": closed_by_reason(before_stop, "session_"),
        "relay_sessions_at_end_by_reason": closed_by_reason(metrics, "session_"),
        "relay_all_at_end_by_reason": closed_by_reason(metrics, ""),
    }
    result["session_drops"] = report.get("drops", [])[:100]
    result["echo_rtt_by_second"] = report.get("rtt_by_second", [])
    setup = extra.get("setup_report")
    if setup is not None:
        failed_by = setup["failed_by"]
        result["setup_load"] = {
            k: v for k, v in setup.items() if k not in ("event", "failures", "slow")
        } | {
            "failed_connects": sum(v for k, v in failed_by.items() if not k.startswith("echo")),
            "failed_after_200": sum(v for k, v in failed_by.items() if k.startswith("echo")),
            "relay_opened": int(metrics.get("setup_tunnels_opened_total", 0)),
            "failures": setup["failures"][:100],
            "slow_count": len(setup["slow"]),
        }
    upgrades: Upgrades | None = extra.get("upgrades")
    relays: Relays | None = extra.get("relays")
    if upgrades is not None:
        runs = upgrades.runs
        seconds = report.get("rtt_by_second", [])
        for run in runs:
            run["session_drops_in_window"] = len(within(report.get("drops", []), run))
            inside = [s for s in seconds if in_window(s[0], run)]
            run["echo_rtt_in_window"] = {
                "echoes": sum(s[1] for s in inside),
                "max_ms": max((s[2] for s in inside), default=None),
                "over_1s": sum(s[3] for s in inside),
            }
            if setup is not None:
                run["setup_failures_in_window"] = within(setup["failures"], run)
                slow = within(setup["slow"], run)
                run["setup_slow_in_window"] = len(slow)
                run["setup_slowest_in_window_s"] = max((s[1] for s in slow), default=None)
        result["echo_rtt_outside_upgrades"] = rtt_outside(report, runs, args.ramp + SETTLE)
        result["upgrades"] = {
            "asked": args.upgrades,
            "every_s": args.upgrade_every,
            "all_sessions_up_s": upgrades.all_up_s,
            "problem": upgrades.problem,
            "runs": runs,
        }
    if relays is not None:
        child = relays.child
        result["relay_log"] = {
            "events": dict(child.events),
            "unparsed_lines": child.unparsed,
            "unparsed_samples": child.unparsed_samples,
            "stderr_tail": child.stderr[-20:],
        }
        result["relay_processes"] = {str(pid): relays.exits.get(pid) for pid in relays.seen}
    result["scrape_errors"] = extra.get("scrape_errors", 0)
    result["checks_failed"] = checks(result)
    return result


def checks(r: dict[str, Any]) -> list[str]:
    """What went wrong, each in a few words; empty when the soak passed."""
    bad = []
    if r["corrupted_bytes"]:
        bad.append(f"{r['corrupted_bytes']} corrupted bytes")
    if r["tunnels"]["held_min_after_ramp"] != r["tunnels"]["target"]:
        bad.append("not every session held after the ramp")
    if r["client_exit"] != 0:
        bad.append(f"client exit {r['client_exit']}")
    ups = r.get("upgrades")
    if ups is not None:
        if len(ups["runs"]) != ups["asked"]:
            bad.append(f"{len(ups['runs'])} of {ups['asked']} upgrades ran: {ups['problem']}")
        for run in ups["runs"]:
            n = run["n"]
            if run["exit_code"] != 0:
                bad.append(f"upgrade {n}: exit {run['exit_code']}: {run['command_said']}")
            if run["handed_over"] is None or run["upgraded"] is None:
                bad.append(f"upgrade {n}: no handed_over/upgraded line")
            if not run["predecessor_exited"]:
                bad.append(f"upgrade {n}: predecessor {run['predecessor']} still running")
            elif run["predecessor_exit_code"] not in (0, None):
                bad.append(f"upgrade {n}: predecessor exit {run['predecessor_exit_code']}")
            if not run["successor_fds"].get("ok"):
                bad.append(f"upgrade {n}: successor fds {run['successor_fds']}")
        closed = r["tunnels_closed"]
        if closed["client_dropped"]:
            bad.append(f"{closed['client_dropped']} sessions dropped")
        if closed["relay_sessions_before_stop"]:
            bad.append(
                f"{closed['relay_sessions_before_stop']} session tunnels closed by the relay"
            )
        if r.get("relay_log", {}).get("unparsed_lines"):
            bad.append(f"{r['relay_log']['unparsed_lines']} relay log lines not JSON")
    setup = r.get("setup_load")
    if setup is not None and setup["failed"]:
        bad.append(f"{setup['failed']} setup tunnels failed: {setup['failed_by']}")
    return bad


def render(r: dict[str, Any]) -> str:
    c, t, m = r["config"], r["tunnels"], r["messages"]
    rss, fds = r["relay"]["rss_kib"], r["relay"]["fds"]
    rm = r["relay"]["metrics"]
    mib = 1024 * 1024
    # With a setup load, the relay's figures for the sessions' hosts only.
    prefix = "session_" if "setup_load" in r else ""
    relay_opened = rm.get(f"{prefix}tunnels_opened_total", 0)
    relay_reconnects = rm.get(f"{prefix}tunnel_reconnects_total", 0)
    up, down = r["bytes"]["up"] / mib, r["bytes"]["down"] / mib
    rtt = " / ".join(f"{m['rtt_ms'][k]} ms" for k in ("p50", "p99", "max"))
    rows = [
        ("data planes x sessions", f"{c['data_planes']} x {len(c['sessions_per_data_plane'])}"),
        ("duration (ramp)", f"{c['duration_s']:g} s ({c['ramp_s']:g} s)"),
        ("tunnels held (min after ramp / target)", f"{t['held_min_after_ramp']} / {t['target']}"),
        ("tunnels opened (relay counted)", f"{t['opened']} ({relay_opened:g})"),
        ("reconnects (relay counted)", f"{r['reconnects']} ({relay_reconnects:g})"),
        ("messages echoed and verified / sent", f"{m['echoed']} / {m['sent']}"),
        ("payload bytes up / down", f"{up:.1f} / {down:.1f} MiB"),
        ("corrupted bytes", f"{r['corrupted_bytes']}"),
        ("pings answered / sent", f"{r['pings']['answered']} / {r['pings']['sent']}"),
        ("echo RTT p50 / p99 / max", rtt),
        (
            "relay RSS start / max / end",
            f"{rss['start'] / 1024:.1f} / {rss['max'] / 1024:.1f} / {rss['end'] / 1024:.1f} MiB",
        ),
        ("relay open fds start / max / end", f"{fds['start']} / {fds['max']} / {fds['end']}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"),
    ]
    ups, setup = r.get("upgrades"), r.get("setup_load")
    if ups is not None or setup is not None:
        closed = r["tunnels_closed"]
        by = closed["relay_sessions_before_stop_by_reason"]
        reasons = f" ({', '.join(f'{k}: {v}' for k, v in by.items())})" if by else ""
        rows += [
            ("sessions dropped while running (client)", f"{closed['client_dropped']}"),
            (
                "session tunnels closed while running (relay)",
                f"{closed['relay_sessions_before_stop']}{reasons}",
            ),
        ]
    if setup is not None:
        lat = " / ".join(f"{setup['latency_ms'][k]} ms" for k in ("p50", "p99", "max"))
        failed = ", ".join(f"{k}: {v}" for k, v in setup["failed_by"].items()) or "none"
        rows += [
            (
                f"setup load c={setup['concurrency']}: attempted / 200 / completed",
                f"{setup['attempted']} / {setup['answered_200']} / {setup['completed']} "
                f"({setup['rate_per_s']}/s)",
            ),
            (
                "setup tunnels failed (before the 200 / after it)",
                f"{setup['failed_connects']} / {setup['failed_after_200']}",
            ),
            ("setup failures by cause", failed),
            ("setup tunnel p50 / p99 / max (connect to EOF)", lat),
        ]
    if ups is not None:
        done = sum(1 for u in ups["runs"] if u["exit_code"] == 0)
        rows.append(("upgrades succeeded / asked", f"{done} / {ups['asked']}"))
        quiet = r["echo_rtt_outside_upgrades"]
        rows.append(
            (
                "echo RTT after the ramp, outside upgrades: max / echoes >= 1 s",
                f"{quiet['max_ms']} ms / {quiet['over_1s']} of {quiet['echoes']}",
            )
        )
    rows.append(("checks failed", "; ".join(r["checks_failed"]) or "none"))
    lines = ["| soak | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if ups is not None and ups["runs"]:
        lines += [
            "",
            "| upgrade | at (s) | exit | command (s) | handover_s old / new | moved | stayed "
            "| old relay exited (s, status) | new relay fds / 2 x tunnels + base (diff) "
            "| in window: setup failed / slow, sessions dropped | echo RTT max, >= 1 s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for u in ups["runs"]:
            h, g, f = u["handed_over"] or {}, u["upgraded"] or {}, u["successor_fds"]
            rtt_in = u["echo_rtt_in_window"]
            stayed_by = h.get("stayed_by") or {}
            stayed = f"{h.get('stayed')}" + (f" ({stayed_by})" if stayed_by else "")
            exited = (
                f"yes ({u['predecessor_exited_after_s']}, {u['predecessor_exit_code']})"
                if u["predecessor_exited"]
                else "no"
            )
            fd_text = (
                f"{f['fds']} / {f['expected']} ({f['diff']:+d})" if "fds" in f else f.get("error")
            )
            window = (
                f"{len(u.get('setup_failures_in_window', []))} / "
                f"{u.get('setup_slow_in_window', 0)}, {u['session_drops_in_window']}"
            )
            lines.append(
                f"| {u['n']} | {u['t']:g} | {u['exit_code']} | {u['command_s']:.2f} "
                f"| {h.get('handover_s')} / {g.get('handover_s')} | {h.get('moved')} "
                f"| {stayed} | {exited} | {fd_text} | {window} "
                f"| {rtt_in['max_ms']} ms, {rtt_in['over_1s']} |"
            )
    with_pid = ups is not None
    head = "| t (s) | tunnels active | relay RSS (MiB) | relay fds |"
    lines += ["", head + (" relay pid |" if with_pid else ""), "|---|---|---|---|"]
    if with_pid:
        lines[-1] += "---|"
    step = max(1, len(r["samples"]) // 12)
    shown = r["samples"][::step]
    if shown[-1] is not r["samples"][-1]:
        shown.append(r["samples"][-1])
    for s in shown:
        rss_mib = f"{s['relay_rss_kib'] / 1024:.1f}" if s["relay_rss_kib"] is not None else "-"
        line = f"| {s['t']:g} | {s['tunnels_active']} | {rss_mib} | {s['relay_fds']} |"
        lines.append(line + (f" {s['relay_pid']} |" if with_pid else ""))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["cp", "client", "setup"], help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--proxy", help=argparse.SUPPRESS)
    p.add_argument("--sink-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data-planes", type=int, default=500, help="simulated data planes (500)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds to run (600)")
    p.add_argument("--ramp", type=float, default=30.0, help="seconds over which sessions start")
    p.add_argument(
        "--ping-interval", type=float, default=30.0, help="seconds between pings (Kong: 30)"
    )
    p.add_argument(
        "--telemetry-interval",
        type=float,
        nargs=2,
        default=[1.0, 4.0],
        metavar=("MIN", "MAX"),
        help="seconds between telemetry bursts (1 4)",
    )
    p.add_argument(
        "--reconnect-delay",
        type=float,
        nargs=2,
        default=list(RECONNECT_DELAY),
        metavar=("MIN", "MAX"),
        help="seconds before a dropped session reconnects (Kong: 5 10)",
    )
    p.add_argument("--sample-interval", type=float, default=10.0, help="relay sampling period")
    p.add_argument("--workers", type=int, default=1, help="the relay's workers: N (1)")
    p.add_argument(
        "--upgrades",
        type=int,
        default=0,
        metavar="K",
        help="run `konnect-relay upgrade` K times once every session is up (0)",
    )
    p.add_argument(
        "--upgrade-every",
        type=float,
        default=60.0,
        metavar="S",
        help=f"seconds between upgrades, the first {UPGRADE_WARMUP:g} s after all sessions are up",
    )
    p.add_argument(
        "--setup-load",
        type=int,
        default=0,
        metavar="C",
        help=f"C closed loops of short CONNECT tunnels to {SETUP_TARGET} throughout (0: none)",
    )
    p.add_argument(
        "--setup-pause",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds each setup loop waits between tunnels (0: as fast as they go)",
    )
    p.add_argument("--out", help="directory for the report, the relay log and the certificates")
    p.add_argument("--json", help="write the JSON report here (default: OUT/soak.json)")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.data_planes < 1 or args.duration <= 0 or args.sample_interval <= 0:
        raise SystemExit("soak: --data-planes, --duration and --sample-interval must be > 0")
    if args.upgrades < 0 or args.upgrade_every <= 0 or args.setup_load < 0 or args.setup_pause < 0:
        raise SystemExit(
            "soak: --upgrades, --setup-load and --setup-pause must be >= 0, --upgrade-every > 0"
        )
    if args.role == "cp":
        run_loop(control_plane(args))
        return 0
    if args.role == "client":
        run_loop(client(args))
        return 0
    if args.role == "setup":
        run_loop(setup_load(args))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
