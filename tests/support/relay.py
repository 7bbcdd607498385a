"""What the integration tests share: certificates, a background event loop,
the fake control plane's state, and the relay as a real subprocess
(``RelayProcess``) with the configs the tests start it with."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

CP_HOST = "dp-test.eu.cp0.konghq.com"


# A non-Konnect name the test config allows: tunnels to it carry plain bytes
# (Konnect names require TLS).
RAW_HOST = "raw.example.test"


TP_HOST = "dp-test.eu.tp0.konghq.com"


WAIT = 10.0  # upper bound for any single wait in the tests


def require_tool(name: str) -> str:
    """Path of an external tool; fails under CI (where .ci/run installs it), skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} not installed")
    return path


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_pem: Path  # cert + key in one file (curl --cert)
    server_sha256: str
    client_sha256: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def cert_sha256(pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER form: the fingerprint /whoami reports."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


@dataclass
class ListenerCerts:
    """The relay's own TLS listener: its certificate (for ``localhost``), a
    client certificate from the test CA, and one from a CA nobody trusts."""

    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


class LoopThread:
    """An asyncio loop in a thread, for fake servers the tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@dataclass
class FakeControlPlane:
    """TLS server demanding a client certificate from the test CA.

    HTTP ``GET /whoami`` answers JSON with the SHA-256 of the client certificate
    it saw; a WebSocket on ``/v1/outlet`` echoes every message prefixed with that
    fingerprint. Both prove the relay did not touch the mTLS session.
    """

    port: int
    seen: list[str] = field(default_factory=list)


def wait_until(pred: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``pred`` (bounded): for state that no event announces, e.g. a closed fd."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as a socket address."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value}, labels sorted by name."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


class RelayProcess:
    """``python -m relay run --config FILE`` with stdout parsed as JSON events.

    ``config`` is written to ``tmp/relay.yaml``. ``command`` replaces the
    ``python -m relay run --config FILE`` part (the console script, the
    embedded default); ``args`` are appended to it; ``prefix`` runs it under a
    wrapper that execs it, so the pid stays the relay's (``prlimit``,
    ``unshare``); ``env`` replaces the environment. ``pid_file`` adds
    ``--pid-file tmp/relay.pid`` (for ``konnect-relay reload``) and waits for it.
    Every raw stdout line is kept in ``lines`` so a test can search the whole
    log, not only the events it waited for.
    """

    def __init__(
        self,
        config: dict[str, Any],
        tmp: Path,
        *,
        args: Sequence[str] = (),
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        pid_file: bool = False,
    ) -> None:
        self.config_path = tmp / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.pid_file = tmp / "relay.pid"
        if command is None:
            command = [sys.executable, "-m", "relay", "run", "--config", str(self.config_path)]
        if pid_file:
            args = [*args, "--pid-file", str(self.pid_file)]
        self.proc = subprocess.Popen(
            [*prefix, *command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            first = self.wait_event(lambda e: e["event"] == "listening")
            if pid_file:
                # The pid file is written just after the "listening" line.
                wait_until(self.pid_file.exists, what="pid file")
        except AssertionError:
            self.stop()  # reap the process and close its pipes before failing
            raise
        self.proxy = address(first["proxy"][0])
        self.proxy_url = f"http://{first['proxy'][0]}"
        self.admin = first["admin"]
        # Descriptors at rest, before any client: the fault tests' baseline.
        self.start_fds = self.open_fds()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                self.events.put({"event": "non-json", "line": line})

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        for event in self.seen:
            if pred(event):
                self.seen.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            # Ended: the process exited and its stdout is at its end (a
            # successor, konnect-relay upgrade, writes to the same pipe).
            ended = self.proc.poll() is not None and not self._reader.is_alive()
            if remaining <= 0 or (ended and self.events.empty()):
                err = ""
                if (
                    self.proc.poll() is not None
                    and self.proc.stderr
                    and not self.proc.stderr.closed
                ):
                    # What is there: a successor (konnect-relay upgrade) may
                    # hold the pipe open after this process exited.
                    fd = self.proc.stderr.fileno()
                    os.set_blocking(fd, False)
                    try:
                        err = os.read(fd, 1 << 16).decode(errors="replace")
                    except BlockingIOError:
                        err = ""
                raise AssertionError(f"event not seen within {timeout} s; stderr: {err}")
            try:
                event = self.events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if pred(event):
                return event
            self.seen.append(event)

    def request_event(self, client: str, timeout: float = WAIT) -> dict[str, Any]:
        """The ``request`` log event of the connection from ``client`` (ip:port)."""
        return self.wait_event(
            lambda e: e["event"] == "request" and e.get("client") == client, timeout
        )

    def drain(self) -> list[dict[str, Any]]:
        """Every event logged so far and not yet waited for (waits for none)."""
        while True:
            try:
                self.seen.append(self.events.get_nowait())
            except queue.Empty:
                return self.seen

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=WAIT) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        """Samples of konnect_relay_* as {'name{labels}': value}."""
        return parse_samples(self.get("/metrics")[1])

    def sample(self, name: str, **labels: str) -> float:
        """One metric sample, 0 when the series does not exist (yet)."""
        key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return self.metrics().get(f"{name}{{{key}}}", 0.0)

    def wait_sample(self, name: str, value: float, **labels: str) -> None:
        """Poll the admin endpoint until a sample reaches ``value`` (bounded)."""
        wait_until(lambda: self.sample(name, **labels) == value, what=f"{name}{labels} == {value}")

    def rewrite(self, config: dict[str, Any] | str) -> None:
        """Replace the config file (a mapping, or YAML text as it is) for a reload."""
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)

    def sighup(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)

    def reload_command(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """``konnect-relay reload --pid-file`` (start with ``pid_file=True``)."""
        return subprocess.run(
            [sys.executable, "-m", "relay", "reload", "--pid-file", str(self.pid_file), *extra],
            capture_output=True,
            text=True,
            timeout=WAIT * 2,
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._reader.join(WAIT)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return self.proc.returncode


def merge_config(cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """``cfg`` with ``overrides``; a mapping merges into a mapping one level deep."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def relay_config(**overrides: Any) -> dict[str, Any]:
    """A test config: ephemeral ports, loopback allowed, Konnect names mapped by tests."""
    cfg: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "allow": [RAW_HOST],
        "resolver": {"static": {}, "allow_private": True},
        "limits": {"drain_timeout": 2},
    }
    return merge_config(cfg, **overrides)


def peer_config(port: int, **overrides: Any) -> dict[str, Any]:
    """The test config with RAW_HOST leading to a peer on 127.0.0.1:``port``."""
    return relay_config(resolver={"static": {RAW_HOST: f"127.0.0.1:{port}"}}, **overrides)


StartRelay = Callable[..., RelayProcess]


def assert_canonical_lines(lines: list[str]) -> None:
    """Every JSON log line is exactly what the line encoder writes for its
    object: also the ones the relay builds from templates for speed."""
    for line in lines:
        if line.startswith("{"):
            assert line == json.dumps(json.loads(line), separators=(",", ":")) + "\n", line


# Ports handed out by free_port: below the kernel's ephemeral range, which
# every outgoing connection draws from. A port from that range (what binding to
# port 0 gives) can be taken by some connection's source port between the
# probe here and the relay's bind ("address already in use").
FREE_PORT_FLOOR = 20000


FREE_PORT_TRIES = 200


def free_port() -> int:
    """A loopback TCP port that nothing listens on and no outgoing connection
    will take: for tests that must name a port before the relay binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    rng = random.Random()
    for _ in range(FREE_PORT_TRIES):
        port = rng.randrange(FREE_PORT_FLOOR, max(low, FREE_PORT_FLOOR + 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port below {low} after {FREE_PORT_TRIES} tries")
