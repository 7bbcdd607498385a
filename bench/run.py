"""Benchmark konnect-relay against the direct path, a C reference, squid and tinyproxy.

One command, loopback only, bounded in time, every process it starts stopped
on the way out (even on error or Ctrl-C):

    .venv/bin/python bench/run.py [--smoke] [--only relay,squid,...] [--out bench/out]

The targets: ``direct`` (the load generator straight to the sink),
``c-splice`` (``loadgen refrelay``: a minimal single-threaded C relay that
splices, the ceiling for any relay on this machine, with no policy and no
log), ``uvloop-bare`` (``bench/bare_relay.py``: the least a Python relay on
uvloop does per tunnel, the floor of the relay's architecture), ``relay``,
``relay-w2`` (the relay with ``workers: 2`` on both cores; setup figures
only), ``squid`` and ``tinyproxy``.

What it measures, per proxy, in the same run:

- bulk throughput through 1 and 8 tunnels, upload and download separately;
- tunnel setup rate in a closed loop at concurrency 1 and 64 (connect,
  CONNECT, wait for the 200, a 64-byte request and reply, close): tunnels/s,
  p50 and p99 latency;
- RSS with 0, 1,000 and 5,000 idle tunnels, each verified end to end by a
  one-byte echo, on a fresh proxy process per repetition -> KB per tunnel;
- the proxy's CPU share during each figure (utime+stime of its process tree
  from /proc/PID/stat, in cores: 1.0 = one core busy, so relay-w2 can reach
  2.0), and how busy each core was (/proc/stat, which also counts the softirq
  time where loopback TCP does much of its work).

Method: the proxy under test is pinned to core 0, the load generator and the
sink to core 1 (taskset). The load is ``bench/loadgen.c``, compiled here with
gcc -O2: epoll, sendfile() from a memfd to send and recv(MSG_TRUNC) to
discard, so it moves bytes without copying them and is not the bottleneck
(the direct path, loadgen straight to the sink, shows its limit). Every
figure is the median of the repetitions (3 in full mode, 1 in smoke mode),
and the repetitions interleave the proxies so that drift from other load on
the machine spreads over all of them. The relay runs with its normal
features on (policy, metrics, JSON log to a file) and is reached with
``CONNECT bench.eu.cp0.konghq.com:443``, mapped onto the sink with
``resolver.static``; squid, tinyproxy, c-splice and uvloop-bare get
``CONNECT 127.0.0.1:<sink>`` (the two references dial the sink whatever the
CONNECT names).
relay-w2 is pinned to cores 0 and 1, so it shares core 1 with the load.

Output: ``<out>/results.json`` and ``<out>/results.md`` (tables and the
machine they ran on).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BENCH / "build" / "loadgen"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
BARE_RELAY = BENCH / "bare_relay.py"

# The proxy under test gets core 0, the load (loadgen and sink) core 1.
PROXY_CORE = 0
LOAD_CORE = 1
# The Konnect name the relay is asked for; resolver.static maps it onto the sink.
RELAY_TARGET = "bench.eu.cp0.konghq.com:443"
ALL_PROXIES = (
    "direct",
    "c-splice",
    "uvloop-bare",
    "relay",
    "relay-baseline",
    "relay-w2",
    "squid",
    "tinyproxy",
)
# Column headings where the name alone would mislead.
LABELS = {"c-splice": "c-splice (reference)", "uvloop-bare": "uvloop-bare (reference)"}
# The targets that run the bulk and the idle figures (the setup figures run on all):
# relay-w2 answers a question about tunnel setup only; c-splice holds six
# descriptors per tunnel (two pipes), which the 20,000-fd cap does not allow
# 5,000 times, and most of its per-tunnel memory is in the kernel, not in RSS.
# uvloop-bare is there for the rates (setup, and bulk without splice); its idle
# memory would say little about a relay that keeps state per tunnel.
BULK_TARGETS = frozenset(ALL_PROXIES) - {"relay-w2"}
IDLE_TARGETS = frozenset({"relay", "relay-baseline", "squid", "tinyproxy"})
# relay-baseline: the relay's package from another checkout (--baseline DIR, e.g.
# a `git worktree` of the commit before a change), run exactly like "relay", so a
# change is measured against what it replaces in the same run.
BASELINE: Path | None = None
# Cores each target is pinned to; the load is always on LOAD_CORE.
RELAY_WORKERS = 2
WORKERS_CORES = "0,1"
SETUP_CONCURRENCY = (1, 64)
BULK_TUNNELS = (1, 8)
# A proxy that does not answer a CONNECT within this is broken, not slow.
START_TIMEOUT = 20.0
# Stopping: SIGTERM, then SIGKILL after this (squid's shutdown_lifetime is 0).
STOP_TIMEOUT = 5.0
# Idle tunnels: the caps the kernel and this machine impose (20,000 fds per
# process: a proxy holds two per tunnel, so at most ~9,900 tunnels here).
MAX_IDLE_TUNNELS = 9000
# Background CPU above this share of a core makes the results suspect.
NOISY_BACKGROUND = 0.10
# The project's targets for tunnel setup (one worker on one core, every feature
# on), each checked against this run's figures in a "Setup targets" block:
# rate at c=64 against squid's and against uvloop-bare's (the most the
# architecture allows), p99 at c=1 against squid's and tinyproxy's.
SETUP_TARGET_VS_SQUID = 0.8
SETUP_TARGET_VS_BARE = 0.65
P99_TARGET_VS_SQUID = 1.0
P99_TARGET_VS_TINYPROXY = 1.3


@dataclass(frozen=True, slots=True)
class Profile:
    """How much work each figure does; ``full`` is what the README shows."""

    name: str
    reps: int
    bulk_bytes: int  # per figure, split over its tunnels
    setup_seconds: float
    idle_steps: tuple[int, ...]
    settle: float  # seconds before reading RSS, so deferred work is done
    run_timeout: float  # per loadgen run


FULL = Profile("full", 3, 1 << 30, 3.0, (1000, 5000), 0.5, 180.0)
# Smoke: 64 MiB keeps each bulk run above the 10 ms tick of /proc CPU times.
SMOKE = Profile("smoke", 1, 64 << 20, 0.3, (100, 300), 0.1, 30.0)


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


# --- processes ----------------------------------------------------------------


class Server:
    """A background process in its own process group, pinned to cores ("0", "0,1").

    With ``stdin_pipe`` its stdin is a pipe held open until stop(): loadgen's
    reference relay, like its sink, exits when stdin closes, so it cannot
    outlive this process even if this one is killed.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cores: str,
        workdir: Path,
        stdin_pipe: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.leftovers: list[Path] = []  # files to remove once stopped
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["taskset", "-c", cores, *argv],
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_group(self.proc)
        self._log.close()  # idempotent, as is stop_group
        for path in self.leftovers:
            with contextlib.suppress(OSError):
                path.unlink()


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, SIGKILL it if it outlives STOP_TIMEOUT."""
    if proc.returncode is not None:
        return  # already stopped and reaped: its group id may belong to someone else
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (helpers): make sure none is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (workers, helpers) from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_kb(pids: Sequence[int]) -> int:
    """Sum of VmRSS over the processes (threads share their process's RSS)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def compile_loadgen() -> Path:
    LOADGEN.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BenchError(f"gcc failed:\n{done.stderr}")
    return LOADGEN


# --- the load generator -------------------------------------------------------


def loadgen_argv(mode: str, *args: str) -> list[str]:
    return ["taskset", "-c", str(LOAD_CORE), str(LOADGEN), mode, *args]


def parse_last_json(text: str, what: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{what}: no output")
    record: dict[str, Any] = json.loads(lines[-1])
    if "error" in record:
        raise BenchError(f"{what}: {record['error']}")
    return record


class Sink:
    """``loadgen sink`` on core 1: discards uploads, sends downloads, echoes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            loadgen_argv("sink", "--lifetime", "3600"),
            stdin=subprocess.PIPE,  # the sink exits when this closes
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        if not ready:
            self.stop()
            raise BenchError("sink did not start")
        info = json.loads(self.proc.stdout.readline() or '{"error": "sink exited"}')
        if "port" not in info:
            self.stop()
            raise BenchError(f"sink: {info}")
        self.port: int = info["port"]
        self.pid: int = info["pid"]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_group(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- proxies ------------------------------------------------------------------


@dataclass(slots=True)
class Target:
    """Where the load connects: a proxy (with a CONNECT name) or the sink directly."""

    name: str
    address: str
    connect: str | None
    server: Server | None = None

    def client_args(self) -> list[str]:
        args = ["--to", self.address]
        if self.connect is not None:
            args += ["--connect", self.connect]
        return args

    def pids(self) -> list[int]:
        return process_tree(self.server.pid) if self.server is not None else []


def squid_conf(port: int, sink_port: int, workdir: Path, user: str) -> str:
    return f"""\
# Written by bench/run.py: a plain CONNECT proxy, no cache, no access log.
http_port 127.0.0.1:{port}
acl bench_src src 127.0.0.1/32
acl bench_port port {sink_port}
acl CONNECT method CONNECT
http_access allow bench_src CONNECT bench_port
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log {workdir}/cache.log
pid_filename {workdir}/squid.pid
coredump_dir {workdir}
cache_effective_user {user}
max_filedescriptors 20000
shutdown_lifetime 0 seconds
logfile_rotate 0
pinger_enable off
digest_generation off
icp_port 0
htcp_port 0
"""


def tinyproxy_conf(port: int, sink_port: int, workdir: Path) -> str:
    return f"""\
# Written by bench/run.py: CONNECT to the sink only, from localhost only.
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 12000
Allow 127.0.0.1
ConnectPort {sink_port}
LogLevel Error
LogFile "{workdir}/tinyproxy.log"
PidFile "{workdir}/tinyproxy.pid"
DisableViaHeader Yes
"""


def relay_conf(port: int, admin_port: int, sink_port: int, workers: int = 1) -> str:
    static = json.dumps({RELAY_TARGET: f"127.0.0.1:{sink_port}"})
    return f"""\
# Written by bench/run.py: the default config plus a static mapping onto the sink.
workers: {workers}
listen:
  - address: 127.0.0.1:{port}
admin:
  address: 127.0.0.1:{admin_port}
resolver:
  static: {static}
  allow_private: true
"""


_SQUID_IDS = itertools.count()
SQUID_SHM = ("metadata", "queues", "readers")


def start_target(name: str, sink: Sink, workdir: Path) -> Target:
    """Writes the proxy's config into its own directory and starts it on core 0."""
    if name == "direct":
        return Target(name, f"127.0.0.1:{sink.port}", None)
    port = free_port()
    sink_addr = f"127.0.0.1:{sink.port}"
    pdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    leftovers: list[Path] = []
    cores, stdin_pipe = str(PROXY_CORE), False
    env: dict[str, str] | None = None
    if name == "squid":
        binary = require_binary("squid")
        user = "proxy" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        (pdir / "squid.conf").write_text(squid_conf(port, sink.port, pdir, user))
        if os.geteuid() == 0:
            # squid drops root for cache_effective_user, which must write here.
            entry = pwd.getpwnam(user)
            os.chown(pdir, entry.pw_uid, entry.pw_gid)
        # A service name of its own: squid names its shared memory segments
        # after it, and two instances with the same name refuse to start.
        service = f"konnectbench{os.getpid()}{next(_SQUID_IDS)}"
        argv = [binary, "-N", "-n", service, "-f", str(pdir / "squid.conf")]
        # Left in /dev/shm when squid is killed rather than stopped.
        leftovers = [Path(f"/dev/shm/{service}-cf__{seg}.shm") for seg in SQUID_SHM]
        target = Target(name, f"127.0.0.1:{port}", sink_addr)
    elif name == "tinyproxy":
        binary = require_binary("tinyproxy")
        (pdir / "tinyproxy.conf").write_text(tinyproxy_conf(port, sink.port, pdir))
        pdir.chmod(0o777)  # tinyproxy may drop to nobody before opening its log
        argv = [binary, "-d", "-c", str(pdir / "tinyproxy.conf")]
        target = Target(name, f"127.0.0.1:{port}", sink_addr)
    elif name in ("relay", "relay-w2", "relay-baseline"):
        if not (ROOT / "relay" / "cli.py").exists() or not VENV_PYTHON.exists():
            raise BenchError("relay: relay/cli.py or .venv/bin/python missing")
        if name == "relay-baseline":
            if BASELINE is None or not (BASELINE / "relay" / "cli.py").exists():
                raise BenchError("relay-baseline: give --baseline DIR, a checkout of the relay")
            # Ahead of the installed package on the path: the baseline's code runs.
            env = {**os.environ, "PYTHONPATH": str(BASELINE)}
        conf = pdir / "relay.yaml"
        workers = RELAY_WORKERS if name == "relay-w2" else 1
        conf.write_text(relay_conf(port, free_port(), sink.port, workers))
        argv = [str(VENV_PYTHON), "-m", "relay", "run", "--config", str(conf)]
        target = Target(name, f"127.0.0.1:{port}", RELAY_TARGET)
        if workers > 1:
            cores = WORKERS_CORES
    elif name == "c-splice":
        argv = [str(LOADGEN), "refrelay", "--port", str(port), "--upstream", sink_addr]
        stdin_pipe = True
        target = Target(name, f"127.0.0.1:{port}", sink_addr)
    elif name == "uvloop-bare":
        if not VENV_PYTHON.exists():
            raise BenchError("uvloop-bare: .venv/bin/python missing")
        # The relay's interpreter and uvloop; stops when stdin closes, like c-splice.
        argv = [str(VENV_PYTHON), str(BARE_RELAY), "--port", str(port), "--upstream", sink_addr]
        stdin_pipe = True
        target = Target(name, f"127.0.0.1:{port}", sink_addr)
    else:
        raise BenchError(f"unknown proxy {name!r}")
    target.server = Server(name, argv, cores, pdir, stdin_pipe, env)
    target.server.leftovers = leftovers
    try:
        if name == "relay-w2":
            wait_workers(target.server, RELAY_WORKERS)
        wait_ready(target)
    except BaseException:
        target.server.stop()
        raise
    return target


def require_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise BenchError(f"{name} is not installed (apt-get install {name})")
    return path


def wait_workers(server: Server, workers: int) -> None:
    """Waits for the supervisor's own "listening" line, which it logs once every
    worker listens, and checks that the process tree whose CPU time is counted
    holds the supervisor and all its workers."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            for line in server.log_path.read_text(errors="replace").splitlines():
                if '"event":"listening"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if "worker" in record:
                    continue  # a worker's line, passed through
                if record.get("workers") != workers:
                    got = record.get("workers")
                    raise BenchError(f"{server.name}: {got} workers, not {workers}")
                pids = process_tree(server.pid)
                if len(pids) < 1 + workers:
                    raise BenchError(f"{server.name}: process tree {pids} lacks workers")
                return
        time.sleep(0.05)
    raise BenchError(f"{server.name}: no listening line after {START_TIMEOUT:.0f}s")


def wait_ready(target: Target) -> None:
    """Polls with one full tunnel until the proxy answers, then warms it up."""
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if target.server is not None and not target.server.alive():
            raise BenchError(f"{target.name} exited:\n{target.server.log_tail()}")
        one = ["--concurrency", "1", "--duration", "1", "--max", "1", "--timeout", "5"]
        argv = loadgen_argv("setup", *target.client_args(), *one)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        try:
            probe = parse_last_json(done.stdout, target.name)
            if probe.get("tunnels") == 1:
                break
            last = f"probe tunnel failed: {probe}"
        except BenchError as exc:
            last = str(exc)
        time.sleep(0.05)
    else:
        log = target.server.log_tail() if target.server else ""
        raise BenchError(f"{target.name} not ready after {START_TIMEOUT:.0f}s: {last}\n{log}")
    # Warm-up: first-use allocations and lazy imports are not per-tunnel cost.
    run_loadgen(target, "setup", ["--concurrency", "4", "--duration", "1", "--max", "64"], 30.0)


def run_loadgen(
    target: Target, mode: str, args: Sequence[str], timeout: float, load_pid: int = 0
) -> dict[str, Any]:
    """One loadgen run against the target; returns its JSON record."""
    extra = ["--timeout", str(int(timeout))]
    pids = target.pids()
    if pids:
        extra += ["--watch", ",".join(map(str, pids))]
    if load_pid:
        extra += ["--load-pid", str(load_pid)]
    argv = loadgen_argv(mode, *target.client_args(), *args, *extra)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{target.name} {mode}: loadgen did not finish") from exc
    what = f"{target.name} {mode} {' '.join(args)}"
    record = parse_last_json(done.stdout, what)
    if done.returncode != 0:
        raise BenchError(f"{what}: exit {done.returncode}: {done.stderr.strip()}")
    if target.server is not None and not target.server.alive():
        raise BenchError(f"{target.name} died during {mode}:\n{target.server.log_tail()}")
    return record


# --- figures ------------------------------------------------------------------


def bulk_figure(direction: str, tunnels: int) -> str:
    return f"bulk_{direction}_{tunnels}"


def setup_figure(concurrency: int) -> str:
    return f"setup_c{concurrency}"


def run_bulk(
    target: Target, sink: Sink, prof: Profile, direction: str, tunnels: int
) -> dict[str, Any]:
    per_tunnel = prof.bulk_bytes // tunnels
    args = ["--dir", direction, "--tunnels", str(tunnels), "--bytes", str(per_tunnel)]
    record = run_loadgen(target, "bulk", args, prof.run_timeout, sink.pid)
    record["bytes_per_cpu_s"] = per_cpu_second(record["bytes_per_s"], record["proxy_cpu"])
    return record


def run_setup(target: Target, sink: Sink, prof: Profile, concurrency: int) -> dict[str, Any]:
    args = ["--concurrency", str(concurrency), "--duration", str(prof.setup_seconds)]
    before = wakeup_ipis(LOAD_CORE)
    record = run_loadgen(target, "setup", args, prof.run_timeout, sink.pid)
    after = wakeup_ipis(LOAD_CORE)
    if record["errors"]:
        raise BenchError(f"{target.name} setup c={concurrency}: {record['errors']} failed tunnels")
    record["tunnels_per_cpu_s"] = per_cpu_second(record["tunnels_per_s"], record["proxy_cpu"])
    if before is not None and after is not None and record["tunnels"]:
        record["load_ipis_per_tunnel"] = (after - before) / record["tunnels"]
    return record


# The interrupts one core sends another to wake a task there (/proc/interrupts):
# rescheduling, and function calls (how the scheduler queues a wake-up on an
# idle core). On a virtual machine each one is an exit to the hypervisor.
WAKEUP_IPIS = ("RES:", "CAL:")


def wakeup_ipis(core: int, text: str | None = None) -> int | None:
    """Wake-up interrupts ``core`` has received so far, None where the kernel
    does not show them. Counted around a setup run on the load core: a proxy
    that leaves the load generator's core idle pays for waking it up again, a
    cost of this bench's two-core layout that remote clients do not cause."""
    if text is None:
        try:
            text = Path("/proc/interrupts").read_text()
        except OSError:
            return None
    lines = text.splitlines()
    if not lines:
        return None
    cpus = lines[0].split()
    column = f"CPU{core}"
    if column not in cpus:
        return None
    index = cpus.index(column) + 1  # after the row's name
    total, seen = 0, 0
    for line in lines[1:]:
        fields = line.split()
        if fields and fields[0] in WAKEUP_IPIS and len(fields) > index:
            total += int(fields[index])
            seen += 1
    return total if seen == len(WAKEUP_IPIS) else None


def per_cpu_second(rate: float, cpu: float | None) -> float | None:
    """Work per second of proxy CPU: comparable across proxies when something
    else on the machine took part of the proxy's core (process CPU time only,
    so kernel softirq work the proxy causes is not in the denominator)."""
    return rate / cpu if cpu else None


def run_idle(target: Target, sink: Sink, prof: Profile) -> dict[str, Any]:
    """RSS of a fresh-but-warm proxy with 0 and then each step of idle tunnels."""
    assert target.server is not None
    pids = target.pids()
    time.sleep(prof.settle)
    steps: list[dict[str, Any]] = [{"tunnels": 0, "rss_kb": rss_kb(pids)}]
    limit = str(int(prof.run_timeout))
    args = ["--steps", ",".join(map(str, prof.idle_steps)), "--hold", limit, "--timeout", limit]
    args += ["--watch", ",".join(map(str, pids)), "--load-pid", str(sink.pid)]
    argv = loadgen_argv("idle", *target.client_args(), *args)
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    cpu: float | None = None
    try:
        for want in prof.idle_steps:
            ready, _, _ = select.select([proc.stdout], [], [], prof.run_timeout)
            line = proc.stdout.readline() if ready else ""
            record = parse_last_json(line, f"{target.name} idle {want}")
            if record.get("open") != want:
                raise BenchError(f"{target.name} idle: {record}")
            time.sleep(prof.settle)
            if not target.server.alive():
                raise BenchError(f"{target.name} died holding {want} tunnels")
            rss = rss_kb(target.pids())
            steps.append({"tunnels": want, "rss_kb": rss})
            cpu = record.get("proxy_cpu")
            proc.stdin.write("next\n")
            proc.stdin.flush()
        proc.stdin.close()
        proc.wait(timeout=prof.run_timeout)
    finally:
        stop_group(proc)
        proc.stdout.close()
    base = steps[0]["rss_kb"]
    for step in steps[1:]:
        step["kb_per_tunnel"] = (step["rss_kb"] - base) / step["tunnels"]
    return {
        "steps": steps,
        "kb_per_tunnel": steps[-1]["kb_per_tunnel"],
        "proxy_cpu": cpu,
    }


def median_record(runs: Sequence[dict[str, Any]], keep_runs: bool = True) -> dict[str, Any]:
    """Field-wise median of numeric fields (lists element-wise), plus the runs."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r[key] for r in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and all(v is None or v in numbers for v in values):
            # A None among numbers is a reading too short to measure: skip it.
            out[key] = statistics.median(numbers)
        elif isinstance(first, bool) or first is None:
            out[key] = first
        elif isinstance(first, list) and first and isinstance(first[0], dict):
            out[key] = [median_record([v[i] for v in values], False) for i in range(len(first))]
        elif isinstance(first, list):
            out[key] = [statistics.median(col) for col in zip(*values, strict=True)]
        else:
            out[key] = first
    out.pop("runs", None)
    if keep_runs:
        out["runs"] = list(runs)
    return out


# The fields of a loadgen record that go into results.json.
RECORD_FIELDS = frozenset(
    {
        "bytes",
        "seconds",
        "bytes_per_s",
        "tunnels",
        "errors",
        "tunnels_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "proxy_cpu",
        "load_cpu",
        "core_busy",
        "bytes_per_cpu_s",
        "tunnels_per_cpu_s",
        "load_ipis_per_tunnel",
    }
)


def slim(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k in RECORD_FIELDS}


# --- machine ------------------------------------------------------------------


def first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def core_busy(seconds: float) -> list[float]:
    """Busy share of each core over the interval, from /proc/stat."""

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in vals[:8]]
                out[name] = (sum(v) - v[3] - v[4], sum(v))
        return out

    a = sample()
    time.sleep(seconds)
    b = sample()
    return [
        (b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1]) for k in sorted(a, key=lambda n: int(n[3:]))
    ]


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    relay_python = first_line([str(VENV_PYTHON), "-c", "import sys; print(sys.version.split()[0])"])
    uvloop = first_line([str(VENV_PYTHON), "-c", "import uvloop; print(uvloop.__version__)"])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": relay_python,
        "uvloop": uvloop,
        "relay_commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "squid": first_line(["squid", "-v"]),
        "tinyproxy": first_line(["tinyproxy", "-v"]),
        "gcc": first_line(["gcc", "--version"]),
        "open_files_cap": {"soft": soft, "hard": hard},
    }


# --- the run ------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    profile: Profile
    proxies: list[str]
    bulk: bool = True  # False: setup figures only (``--setup-only``)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def add(self, proxy: str, figure: str, record: dict[str, Any]) -> None:
        self.runs.setdefault(proxy, {}).setdefault(figure, []).append(record)

    def figures(self) -> dict[str, dict[str, Any]]:
        # In ALL_PROXIES order, which the tables' columns follow: a target that
        # skips the bulk figures would otherwise come last.
        return {
            proxy: {fig: median_record(rs) for fig, rs in self.runs[proxy].items()}
            for proxy in self.proxies
            if proxy in self.runs
        }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_throughput(res: Results, sink: Sink, workdir: Path, stack: contextlib.ExitStack) -> None:
    """Bulk and setup figures; all targets up at once, repetitions interleaved."""
    prof = res.profile
    targets = []
    for name in res.proxies:
        target = start_target(name, sink, workdir)
        if target.server is not None:
            stack.callback(target.server.stop)
        targets.append(target)
    for rep in range(prof.reps):
        for direction in ("up", "down") if res.bulk else ():
            for tunnels in BULK_TUNNELS:
                fig = bulk_figure(direction, tunnels)
                for target in targets:
                    if target.name not in BULK_TARGETS:
                        continue
                    rec = slim(run_bulk(target, sink, prof, direction, tunnels))
                    res.add(target.name, fig, rec)
                    rate = rec["bytes_per_s"] / 1e6
                    cpu = fmt_pct(rec["proxy_cpu"])
                    log(f"rep {rep + 1} {target.name:11} {fig:13} {rate:9.0f} MB/s  cpu {cpu}")
        for conc in SETUP_CONCURRENCY:
            fig = setup_figure(conc)
            for target in targets:
                rec = slim(run_setup(target, sink, prof, conc))
                res.add(target.name, fig, rec)
                lat = f"p50 {rec['p50_ms']:.3f} p99 {rec['p99_ms']:.3f} ms"
                cpu = fmt_pct(rec["proxy_cpu"])
                rate = rec["tunnels_per_s"]
                log(f"rep {rep + 1} {target.name:11} {fig:13} {rate:9.0f} /s    {lat}  cpu {cpu}")
    for target in targets:
        if target.server is not None:
            target.server.stop()


def run_memory(res: Results, sink: Sink, workdir: Path) -> None:
    """Idle-tunnel RSS on a fresh process per repetition and proxy."""
    prof = res.profile
    for rep in range(prof.reps):
        for name in res.proxies:
            if name not in IDLE_TARGETS:
                continue  # no proxy (direct), or a figure it skips (see IDLE_TARGETS)
            target = start_target(name, sink, workdir)
            assert target.server is not None
            try:
                rec = run_idle(target, sink, prof)
            finally:
                target.server.stop()
            res.add(name, "idle", rec)
            rss = ", ".join(f"{s['tunnels']}: {s['rss_kb'] / 1024:.1f} MB" for s in rec["steps"])
            per = rec["kb_per_tunnel"]
            log(f"rep {rep + 1} {name:11} idle          {rss}  -> {per:.1f} KB/tunnel")


def run(args: argparse.Namespace) -> dict[str, Any]:
    prof = SMOKE if args.smoke else FULL
    proxies = [p for p in ALL_PROXIES if p in args.only]
    if max(prof.idle_steps) > MAX_IDLE_TUNNELS:
        raise BenchError(f"at most {MAX_IDLE_TUNNELS} idle tunnels under a 20,000-fd cap")
    for tool in ("gcc", "taskset"):
        require_binary(tool)
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs two cores: one for the proxy, one for the load")
    started = datetime.now(UTC)
    t0 = time.monotonic()
    compile_loadgen()
    background = core_busy(0.2 if args.smoke else 1.0)
    res = Results(prof, proxies, bulk=not args.setup_only)
    workdir = Path(tempfile.mkdtemp(prefix="konnect-bench-"))
    workdir.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            sink = Sink()
            stack.callback(sink.stop)
            run_throughput(res, sink, workdir, stack)
            if not args.setup_only:
                run_memory(res, sink, workdir)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    background_after = core_busy(0.2 if args.smoke else 1.0)
    return {
        "schema": 1,
        "mode": prof.name,
        "figures": "setup" if args.setup_only else "all",
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": machine(),
        "method": {
            "proxy_core": PROXY_CORE,
            "load_core": LOAD_CORE,
            "repetitions": prof.reps,
            "statistic": "median",
            "bulk_bytes_per_figure": prof.bulk_bytes,
            "setup_seconds": prof.setup_seconds,
            "setup_request_bytes": 64,
            "idle_steps": list(prof.idle_steps),
            "relay_target": RELAY_TARGET,
            "target_cores": {
                n: WORKERS_CORES if n == "relay-w2" else str(PROXY_CORE)
                for n in proxies
                if n != "direct"
            },
            "relay_w2_workers": RELAY_WORKERS,
            # proxy_cpu is CPU seconds of the process tree per second: 1.0 is one core.
            "proxy_cpu_unit": "cores",
            "background_core_busy": {"before": background, "after": background_after},
        },
        "proxies": res.figures(),
    }


# --- markdown -----------------------------------------------------------------


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def fmt_cores(busy: Sequence[float]) -> str:
    """Busy share of the proxy's core and the load's core, "97/64%"."""
    if len(busy) <= max(PROXY_CORE, LOAD_CORE):
        return "-"
    return f"{100 * busy[PROXY_CORE]:.0f}/{100 * busy[LOAD_CORE]:.0f}%"


def fmt_num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


SETUP_ROWS = (
    ("tunnels/s", "tunnels_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("proxy CPU", "proxy_cpu"),
    ("cores busy", "core_busy"),
    ("load-core wake-ups per tunnel", "load_ipis_per_tunnel"),
)


def setup_cell(key: str, record: dict[str, Any]) -> str:
    if record.get(key) is None:
        return "-"  # not measured (results from before the row existed, no /proc)
    if key == "load_ipis_per_tunnel":
        return f"{record[key]:.2f}"
    if key == "tunnels_per_s":
        return fmt_num(record[key])
    if key == "proxy_cpu":
        return fmt_pct(record[key])
    if key == "core_busy":
        return fmt_cores(record[key])
    return f"{record[key]:.3f}"


def table_head(names: Sequence[str]) -> str:
    cols = [LABELS.get(n, n) for n in names]
    return "| | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols)


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    meth = results["method"]
    figs: dict[str, dict[str, Any]] = results["proxies"]
    names = list(figs)
    bulk_names = [n for n in names if any(f.startswith("bulk_") for f in figs[n])]
    idle_names = [n for n in names if "idle" in figs[n]]
    w2_cores = meth.get("target_cores", {}).get("relay-w2")
    w2_text = f" (relay-w2: cores {w2_cores})" if w2_cores else ""
    out = [
        f"### Benchmark results ({results['mode']} mode, {results['started']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}; "
        f"Python {m['python']}, uvloop {m['uvloop']}; {m['squid']}; {m['tinyproxy']}; "
        f"open files capped at {m['open_files_cap']['hard']:,} per process. "
        f"Proxy pinned to core {meth['proxy_core']}{w2_text}, loadgen and sink to core "
        f"{meth['load_core']}; median of {meth['repetitions']} run(s); "
        f"relay at commit {m['relay_commit']}. Proxy CPU is the CPU time of the proxy's "
        "whole process tree per second of the figure: 100% is one core busy.",
        "",
    ]
    if "c-splice" in figs:
        out += [
            "c-splice (reference) is `loadgen refrelay`: a minimal single-threaded C relay "
            "(epoll, splice through a pipe per direction) with no policy, no log and a fixed "
            "upstream; the least any relay must do here, not a product.",
            "",
        ]
    if "uvloop-bare" in figs:
        out += [
            "uvloop-bare (reference) is `bench/bare_relay.py`: a minimal CONNECT relay in "
            "Python on uvloop (asyncio protocols, `transport.write` each way, no splice) with "
            "no policy, no log, no metrics and a fixed upstream; the least a relay built like "
            "this one must do per tunnel, not a product.",
            "",
        ]
    bg = meth["background_core_busy"]
    noisy = max(bg["before"] + bg["after"], default=0.0)
    if noisy > NOISY_BACKGROUND:
        out += [
            f"**Warning:** other processes kept a core {100 * noisy:.0f}% busy around this run; "
            "absolute figures are low and noisy; ratios from the same run, and the per "
            "CPU-second ratios most of all, still compare.",
            "",
        ]
    size = meth["bulk_bytes_per_figure"]
    size_text = f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / (1 << 20):g} MiB"
    if bulk_names:
        out += [
            f"Bulk throughput ({size_text} per figure): MB/s · proxy CPU · "
            f"busy share of core {meth['proxy_core']} (proxy) / core {meth['load_core']} (load)",
            "",
            table_head(bulk_names),
        ]
    for direction, label in (("up", "upload"), ("down", "download")):
        for tunnels in BULK_TUNNELS if bulk_names else ():
            fig = bulk_figure(direction, tunnels)
            cells = []
            for n in bulk_names:
                r = figs[n].get(fig)
                if r is None:
                    cells.append("-")
                    continue
                cells.append(
                    f"{fmt_num(r['bytes_per_s'] / 1e6)} · {fmt_pct(r['proxy_cpu'])}"
                    f" · {fmt_cores(r['core_busy'])}"
                )
            plural = "s" if tunnels > 1 else ""
            out.append(f"| {label}, {tunnels} tunnel{plural} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Tunnel setup, closed loop for {meth['setup_seconds']:g} s: connect, CONNECT, 200, "
        "64-byte request and reply, close",
        "",
        table_head(names),
    ]
    for conc in SETUP_CONCURRENCY:
        fig = setup_figure(conc)
        for label, key in SETUP_ROWS:
            vals = [setup_cell(key, figs[n][fig]) if fig in figs[n] else "-" for n in names]
            out.append(f"| c={conc} {label} | " + " | ".join(vals) + " |")
    measured = any(
        rec.get("load_ipis_per_tunnel") is not None
        for n in names
        for f, rec in figs[n].items()
        if f.startswith("setup_")
    )
    if measured:
        out += [
            "",
            "Load-core wake-ups: rescheduling and function-call interrupts core "
            f"{meth['load_core']} received per tunnel (/proc/interrupts), each one another "
            "core waking the load generator or the sink from idle. The slower a proxy, the "
            "more often that core is idle when the proxy writes to it, and the proxy's core "
            "pays for each wake-up in kernel time; clients on other hosts do not cost a proxy "
            "this.",
        ]
    if "relay-w2" in figs:
        out += [
            "",
            f"relay-w2 is the relay with `workers: {meth.get('relay_w2_workers', RELAY_WORKERS)}` "
            f"(a supervisor and its workers) allowed on cores {w2_cores} "
            f"(`taskset -c {w2_cores}`): the load generator and the sink still run on core "
            f"{meth['load_core']}, so the relay shares that core with them. Its proxy CPU "
            "counts the supervisor and both workers (up to 200%).",
        ]
    if idle_names:
        out += [
            "",
            "Idle tunnels (each verified end to end), RSS of a fresh proxy process",
            "",
            table_head(idle_names),
        ]
        steps = [0, *meth["idle_steps"]]
        for i, count in enumerate(steps):
            vals = []
            for n in idle_names:
                idle = figs[n]["idle"]
                vals.append(f"{idle['steps'][i]['rss_kb'] / 1024:,.1f}")
            out.append(f"| RSS MB, {count:,} tunnels | " + " | ".join(vals) + " |")
        for i, count in enumerate(steps[1:], start=1):
            vals = []
            for n in idle_names:
                idle = figs[n]["idle"]
                vals.append(f"{idle['steps'][i]['kb_per_tunnel']:.1f}")
            out.append(f"| KB per tunnel at {count:,} | " + " | ".join(vals) + " |")
    ratios = ratio_lines(figs)
    if ratios:
        out += ["", *ratios]
    return "\n".join(out) + "\n"


def ratio(figs: dict[str, dict[str, Any]], a: str, b: str, fig: str, key: str) -> float | None:
    """Target a's figure over target b's, None when either is missing or zero."""
    x = figs.get(a, {}).get(fig, {}).get(key)
    y = figs.get(b, {}).get(fig, {}).get(key)
    return x / y if x and y else None


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def ratio_lines(figs: dict[str, dict[str, Any]]) -> list[str]:
    """The relay against squid (and tinyproxy) on the figures the issue's targets name,
    against the C and the uvloop references, and with two workers against one; and
    the uvloop reference against squid."""
    lines: list[str] = []
    if "relay" in figs and "squid" in figs:
        rows = (
            ("1-tunnel upload", "bulk_up_1", "bytes_per_s"),
            ("1-tunnel upload per proxy CPU-second", "bulk_up_1", "bytes_per_cpu_s"),
            ("1-tunnel download", "bulk_down_1", "bytes_per_s"),
            ("1-tunnel download per proxy CPU-second", "bulk_down_1", "bytes_per_cpu_s"),
            ("8-tunnel upload", "bulk_up_8", "bytes_per_s"),
            ("8-tunnel download", "bulk_down_8", "bytes_per_s"),
            ("setup rate c=64", "setup_c64", "tunnels_per_s"),
            ("setup rate c=64 per proxy CPU-second", "setup_c64", "tunnels_per_cpu_s"),
            ("p99 at c=1 (lower is better)", "setup_c1", "p99_ms"),
            ("KB per idle tunnel (lower is better)", "idle", "kb_per_tunnel"),
        )
        lines += ["Relay / squid (/ tinyproxy), same run:", ""]
        for label, fig, key in rows:
            sq = fmt_ratio(ratio(figs, "relay", "squid", fig, key))
            tp = fmt_ratio(ratio(figs, "relay", "tinyproxy", fig, key))
            lines.append(f"- {label}: {sq} (/ {tp})")
    if "relay" in figs and "c-splice" in figs:
        reference = (
            ("1-tunnel upload", "bulk_up_1", "bytes_per_s"),
            ("1-tunnel download", "bulk_down_1", "bytes_per_s"),
            ("setup rate c=64", "setup_c64", "tunnels_per_s"),
        )
        lines += [*([""] if lines else []), "Relay as a share of c-splice (the C reference):", ""]
        for label, fig, key in reference:
            lines.append(f"- {label}: {fmt_pct(ratio(figs, 'relay', 'c-splice', fig, key))}")
    if "relay" in figs and "uvloop-bare" in figs:
        floor = (
            ("setup rate c=64", "setup_c64", "tunnels_per_s"),
            ("p99 at c=1 (lower is better)", "setup_c1", "p99_ms"),
        )
        lines += [
            *([""] if lines else []),
            "Relay as a share of uvloop-bare (the least a uvloop relay does):",
            "",
        ]
        for label, fig, key in floor:
            lines.append(f"- {label}: {fmt_pct(ratio(figs, 'relay', 'uvloop-bare', fig, key))}")
    if "uvloop-bare" in figs and "squid" in figs:
        bare = fmt_ratio(ratio(figs, "uvloop-bare", "squid", "setup_c64", "tunnels_per_s"))
        lines += [
            *([""] if lines else []),
            f"uvloop-bare / squid, setup rate c=64: {bare} (what a uvloop relay that does "
            f"nothing per tunnel reaches; the relay's target is {SETUP_TARGET_VS_SQUID:.2f}x)",
        ]
    lines += target_lines(figs, bool(lines))
    if "relay" in figs and "relay-baseline" in figs:
        change = (
            ("setup rate c=64", "setup_c64", "tunnels_per_s"),
            ("setup rate c=64 per proxy CPU-second", "setup_c64", "tunnels_per_cpu_s"),
            ("p99 at c=1 (lower is better)", "setup_c1", "p99_ms"),
            ("1-tunnel upload", "bulk_up_1", "bytes_per_s"),
            ("1-tunnel download", "bulk_down_1", "bytes_per_s"),
            ("KB per idle tunnel (lower is better)", "idle", "kb_per_tunnel"),
        )
        lines += [*([""] if lines else []), "Relay / relay-baseline (--baseline), same run:", ""]
        for label, fig, key in change:
            lines.append(
                f"- {label}: {fmt_ratio(ratio(figs, 'relay', 'relay-baseline', fig, key))}"
            )
    if "relay" in figs and "relay-w2" in figs:
        w2 = fmt_ratio(ratio(figs, "relay-w2", "relay", "setup_c64", "tunnels_per_s"))
        lines += [
            *([""] if lines else []),
            f"relay-w2 / relay, setup rate c=64: {w2} (two workers on two cores, one of them "
            "shared with the load, against one worker on a core of its own)",
        ]
    return lines


def target_lines(figs: dict[str, dict[str, Any]], after: bool) -> list[str]:
    """Each setup target with this run's figure and whether it is met; a target
    whose figures are not in the run is left out."""
    checks = (
        # label, other target, figure, key, bound, the ratio must be at least the bound
        ("setup rate c=64 at least", "squid", "setup_c64", "tunnels_per_s",
         SETUP_TARGET_VS_SQUID, True),
        ("setup rate c=64 at least", "uvloop-bare", "setup_c64", "tunnels_per_s",
         SETUP_TARGET_VS_BARE, True),
        ("p99 at c=1 at most", "squid", "setup_c1", "p99_ms", P99_TARGET_VS_SQUID, False),
        ("p99 at c=1 at most", "tinyproxy", "setup_c1", "p99_ms",
         P99_TARGET_VS_TINYPROXY, False),
    )  # fmt: skip
    lines: list[str] = []
    for label, other, fig, key, bound, at_least in checks:
        x = ratio(figs, "relay", other, fig, key)
        if x is None:
            continue
        met = x >= bound if at_least else x <= bound
        lines.append(
            f"- {label} {bound:.2f}x {other}'s: {fmt_ratio(x)}, {'met' if met else 'not met'}"
        )
    if not lines:
        return []
    return [*([""] if after else []), "Setup targets (one worker, every feature on):", "", *lines]


# --- main ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 repetition, tiny sizes, seconds")
    p.add_argument(
        "--only",
        default=",".join(ALL_PROXIES),
        help=f"comma-separated subset of {','.join(ALL_PROXIES)}",
    )
    p.add_argument("--out", default=str(BENCH / "out"), help="directory for results.json/.md")
    p.add_argument(
        "--setup-only",
        action="store_true",
        help="only the tunnel setup figures (no bulk, no idle memory): a setup change in minutes",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="a checkout of the relay to measure as relay-baseline (e.g. git worktree add)",
    )
    args = p.parse_args(argv)
    global BASELINE
    BASELINE = Path(args.baseline).resolve() if args.baseline else None
    if BASELINE is None and args.only == ",".join(ALL_PROXIES):
        args.only = ",".join(p for p in ALL_PROXIES if p != "relay-baseline")
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(ALL_PROXIES))
    if unknown or not only:
        p.error(f"--only: unknown {unknown}; choose from {','.join(ALL_PROXIES)}")
    args.only = only
    return args


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind the stack like Ctrl-C, so every finally runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        with sigterm_as_exit():
            results = run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = to_markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} in {results['duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
