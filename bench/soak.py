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
- the orchestrator (no ``--role``): makes the certificates, starts the CP, the
  relay (``python -m relay run``) and the client, samples the relay's RSS and
  open fds every ``--sample-interval`` seconds and scrapes its /metrics, then
  writes a JSON report and prints a markdown summary.

Usage::

    .venv/bin/python bench/soak.py                      # 500 x 3 tunnels, 10 min
    .venv/bin/python bench/soak.py --duration 180 --out /tmp/soak
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
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

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
                    established_before = True
                    self.opened += 1
                    self.held += 1
                    try:
                        await self.session(ws, kind)
                    finally:
                        self.held -= 1
                if self.stopping.is_set():
                    return
                self.errors["closed_by_peer"] += 1
            except (OSError, TimeoutError, WebSocketException, SessionError) as exc:
                if self.stopping.is_set():
                    return
                self.errors[type(exc).__name__] += 1
                if not established_before:
                    self.connect_failures += 1
            if await self.pause(random.uniform(*self.args.reconnect_delay)):
                return

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
                    if len(self.rtts) < MAX_RTT_SAMPLES:
                        self.rtts.append(time.monotonic() - sent_at)
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


# --- the orchestrator ---------------------------------------------------------------


class Child:
    """A subprocess whose stdout JSON lines are read by a thread."""

    def __init__(self, argv: list[str], log: Path | None = None, **kwargs: Any) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
        )
        self.lines: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.log = log.open("w") if log is not None else None
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.log is not None:
                self.log.write(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.cond:
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
                    raise SystemExit(f"{event!r} not seen from {self.proc.args}: {tail}")
                self.cond.wait(min(left, 0.5))

    def last(self, event: str) -> dict[str, Any] | None:
        with self.cond:
            for record in reversed(self.lines):
                if record.get("event") == event:
                    return record
        return None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def scrape(admin: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "konnect_relay_tunnel_bytes_total":
                totals[f"bytes_{s.labels['direction']}"] += s.value
            elif s.name == "konnect_relay_tunnels_closed_total":
                totals[f"closed_{s.labels['reason']}"] += s.value
            elif s.name in (
                "konnect_relay_tunnels_active",
                "konnect_relay_tunnels_opened_total",
                "konnect_relay_tunnel_reconnects_total",
                "konnect_relay_requests_denied_total",
            ):
                totals[s.name.removeprefix("konnect_relay_")] += s.value
    return dict(totals)


def relay_config(cp_port: int) -> dict[str, Any]:
    target = f"127.0.0.1:{cp_port}"
    return {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "konnect": {"regions": ["eu"], "control_planes": ["soak"]},
        "resolver": {"static": {CP_HOST: target, TP_HOST: target}, "allow_private": True},
        "limits": {"drain_timeout": 5},
    }


def orchestrate(args: argparse.Namespace) -> int:
    import yaml

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    certs = out / "certs"
    certs.mkdir(exist_ok=True)
    make_certs(certs)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--certs", str(certs), "--ping-interval", str(args.ping_interval)]
    children: list[Child] = []
    try:
        cp = Child([*me, "--role", "cp", *common])
        children.append(cp)
        cp_port = cp.wait_for("cp_ready", 30)["port"]
        (out / "relay.yaml").write_text(yaml.safe_dump(relay_config(cp_port)))
        relay = Child(
            [sys.executable, "-m", "relay", "run", "--config", str(out / "relay.yaml")],
            log=out / "relay.log",
            cwd=ROOT,
        )
        children.append(relay)
        listening = relay.wait_for("listening", 30)
        admin = listening["admin"]
        samples: list[dict[str, Any]] = []
        fleet: Child | None = None

        def sample(t: float) -> None:
            rss, fds = proc_status(relay.proc.pid)
            m = scrape(admin)
            progress = (fleet.last("progress") if fleet is not None else None) or {}
            samples.append(
                {
                    "t": round(t, 1),
                    "relay_rss_kib": rss,
                    "relay_fds": fds,
                    "tunnels_active": int(m.get("tunnels_active", 0)),
                    "client_held": progress.get("held"),
                    "bytes_relayed": int(m.get("bytes_upstream", 0) + m.get("bytes_downstream", 0)),
                }
            )

        started = time.monotonic()
        sample(0.0)
        fleet = Child(
            [
                *me,
                "--role",
                "client",
                *common,
                "--proxy",
                f"http://{listening['proxy'][0]}",
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
        hard_stop = started + args.duration + OVERRUN
        next_sample = started + args.sample_interval
        while fleet.proc.poll() is None and time.monotonic() < hard_stop:
            with contextlib.suppress(subprocess.TimeoutExpired):
                fleet.proc.wait(max(0.0, next_sample - time.monotonic()))
            if time.monotonic() >= next_sample and fleet.proc.poll() is None:
                sample(time.monotonic() - started)
                next_sample += args.sample_interval
        report = fleet.wait_for("client_report", 30)
        final_metrics = scrape(admin)
        sample(time.monotonic() - started)
        cp.stop()
        cp_stats = cp.wait_for("cp_stats", 10)
    finally:
        for child in reversed(children):
            child.stop()

    client_rc = fleet.proc.returncode
    result = summarise(args, report, cp_stats, final_metrics, samples, client_rc)
    json_path = Path(args.json) if args.json else out / "soak.json"
    json_path.write_text(json.dumps(result, indent=1))
    markdown = render(result)
    (out / "soak.md").write_text(markdown)
    print(markdown)
    print(f"\nJSON: {json_path}  relay log: {out / 'relay.log'}")
    ok = (
        result["corrupted_bytes"] == 0
        and result["tunnels"]["held_min_after_ramp"] == result["tunnels"]["target"]
        and client_rc == 0
    )
    return 0 if ok else 1


def summarise(
    args: argparse.Namespace,
    report: dict[str, Any],
    cp_stats: dict[str, Any],
    metrics: dict[str, float],
    samples: list[dict[str, Any]],
    client_rc: int | None,
) -> dict[str, Any]:
    rss = [s["relay_rss_kib"] for s in samples]
    fds = [s["relay_fds"] for s in samples]
    return {
        "config": {
            "data_planes": args.data_planes,
            "sessions_per_data_plane": [k for k, _, _ in SESSIONS],
            "duration_s": args.duration,
            "ramp_s": args.ramp,
            "ping_interval_s": args.ping_interval,
            "telemetry_interval_s": args.telemetry_interval,
            "sample_interval_s": args.sample_interval,
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


def render(r: dict[str, Any]) -> str:
    c, t, m = r["config"], r["tunnels"], r["messages"]
    rss, fds = r["relay"]["rss_kib"], r["relay"]["fds"]
    rm = r["relay"]["metrics"]
    mib = 1024 * 1024
    relay_opened = rm.get("tunnels_opened_total", 0)
    relay_reconnects = rm.get("tunnel_reconnects_total", 0)
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
    lines = ["| soak | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| t (s) | tunnels active | relay RSS (MiB) | relay fds |", "|---|---|---|---|"]
    step = max(1, len(r["samples"]) // 12)
    shown = r["samples"][::step]
    if shown[-1] is not r["samples"][-1]:
        shown.append(r["samples"][-1])
    for s in shown:
        rss_mib = s["relay_rss_kib"] / 1024
        lines.append(f"| {s['t']:g} | {s['tunnels_active']} | {rss_mib:.1f} | {s['relay_fds']} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["cp", "client"], help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--proxy", help=argparse.SUPPRESS)
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
    p.add_argument("--out", help="directory for the report, the relay log and the certificates")
    p.add_argument("--json", help="write the JSON report here (default: OUT/soak.json)")
    return p


def main() -> int:
    args = parser().parse_args()
    if args.data_planes < 1 or args.duration <= 0 or args.sample_interval <= 0:
        raise SystemExit("soak: --data-planes, --duration and --sample-interval must be > 0")
    if args.role == "cp":
        run_loop(control_plane(args))
        return 0
    if args.role == "client":
        run_loop(client(args))
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
