"""High availability: HAProxy (TCP mode, PROXY protocol v2) in front of two relays.

The example deploy/haproxy/haproxy.cfg is run as shipped, with only its
addresses moved to loopback ports. Clients hold tunnels through HAProxy and
echo bytes through them, as data planes do; one relay is killed with SIGKILL;
its clients must be tunnelling again through the other relay well within
Kong's 5-10 s reconnect delay, the other relay's clients must not notice, and
the surviving relay must log each client's own address (from the PROXY
header), not HAProxy's.
"""

from __future__ import annotations

import csv
import io
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, echo, echoes, open_tunnel, tcp_peer
from tests.support.peers import find_binary
from tests.support.relay import WAIT, RelayProcess, StartRelay, free_port, peer_config, wait_until

EXAMPLE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
CLIENTS = 6
# Kong waits 5-10 s before it reconnects; the relay layer must be back well before.
MAX_GAP = 5.0
# Between two echoes a client pauses this long: a steady trickle like
# telemetry, without spinning the two cores the test machine has.
PACE = 0.05
# Long enough for HAProxy to see /readyz fail (fall 2 x inter 500 ms) first.
DRAIN = 3.0


def haproxy_config(front: int, relays: list[tuple[int, int]], sock: Path) -> str:
    """The example file with loopback addresses and a stats socket for the test."""
    text = EXAMPLE.read_text()
    text = text.replace("\nglobal\n", f"\nglobal\n    stats socket {sock} level admin\n", 1)
    text, n = re.subn(r"(?m)^(\s+bind) :3128$", rf"\1 127.0.0.1:{front}", text)
    assert n == 1
    for i, (port, admin) in enumerate(relays, 1):
        text, n = re.subn(
            rf"(?m)^(\s+server relay-{i}) \S+ check port \d+$",
            rf"\1 127.0.0.1:{port} check port {admin}",
            text,
        )
        assert n == 1, f"relay-{i} line not found in {EXAMPLE}"
    return text


class HAProxy:
    """``haproxy -db`` (foreground) with the generated config; log to a file."""

    def __init__(self, binary: str, tmp: Path, relays: list[tuple[int, int]]) -> None:
        front = free_port()
        self.front = ("127.0.0.1", front)
        self.socket = tmp / "haproxy.sock"
        self.config = tmp / "haproxy.cfg"
        self.config.write_text(haproxy_config(front, relays, self.socket))
        check = subprocess.run(
            [binary, "-c", "-f", str(self.config)], capture_output=True, text=True, timeout=WAIT
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = (tmp / "haproxy.log").open("w")
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_until(
            lambda: self.socket.exists() or self.proc.poll() is not None, what="haproxy started"
        )
        assert self.proc.poll() is None, (tmp / "haproxy.log").read_text()

    def stat(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...) from ``show stat``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "konnect_relays"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.log.close()


@pytest.fixture
def haproxy_bin() -> str:
    return find_binary("haproxy")


@dataclass
class Client:
    """A data plane's tunnel: held open, echoing, reopened at once when it breaks."""

    target: tuple[str, int]
    ports: list[int] = field(default_factory=list)  # local port of each tunnel
    last_ok: float = 0.0
    down_since: float | None = None
    outages: list[float] = field(default_factory=list)  # last echo before -> first after
    recovered: list[float] = field(default_factory=list)  # when each outage ended
    errors: int = 0
    echoed: int = 0

    def run(self, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            try:
                with open_tunnel(self.target) as sock:
                    sock.settimeout(2.0)
                    self.ports.append(sock.getsockname()[1])
                    while not stop.is_set():
                        n += 1
                        if not echoes(sock, os.urandom(16).hex().encode() + b"#%d" % n):
                            raise ConnectionError("short or altered echo")
                        now = time.monotonic()
                        if self.down_since is not None:
                            self.outages.append(now - self.last_ok)
                            self.recovered.append(now)
                            self.down_since = None
                        self.last_ok = now
                        self.echoed += 1
                        stop.wait(PACE)
            except (OSError, AssertionError):
                self.errors += 1
                if self.down_since is None:
                    self.down_since = time.monotonic()
                stop.wait(PACE)


class Fleet:
    """The client threads; ``halt`` stops them (before HAProxy goes away)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, target: tuple[str, int]) -> list[Client]:
        made = [Client(target) for _ in range(CLIENTS)]
        for c in made:
            t = threading.Thread(target=c.run, args=(self.stop,), daemon=True)
            t.start()
            self.threads.append(t)
        return made

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    yield f
    f.halt()


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
def test_failover_through_haproxy(
    haproxy_bin: str,
    start_relay: StartRelay,
    fleet: Fleet,
    tmp_path: Path,
    stop: str,
) -> None:
    """SIGKILL: the relay's tunnels drop at once. SIGTERM: the relay drains, its
    /readyz turns 503 and HAProxy takes it out of rotation while its tunnels
    still flow; at drain_timeout they close (reason ``drain``). Either way its
    clients are tunnelling through the other relay again at once."""
    listen = [
        {"address": "127.0.0.1:0", "proxy_protocol": True, "trusted_proxies": ["127.0.0.0/8"]}
    ]
    with tcp_peer(echo) as (port, _):
        cfg = peer_config(port, listen=listen, limits={"drain_timeout": DRAIN})
        relays = [start_relay(cfg), start_relay(cfg)]
        ports = [(r.proxy[1], int(r.admin.rpartition(":")[2])) for r in relays]
        haproxy = HAProxy(haproxy_bin, tmp_path, ports)
        try:
            wait_until(
                lambda: haproxy.stat() == {"relay-1": "UP", "relay-2": "UP", "BACKEND": "UP"},
                what="both relays UP in HAProxy",
            )
            running = fleet.start(haproxy.front)
            wait_until(lambda: all(c.echoed >= 5 for c in running), what="every client echoing")
            # Each client's own address, as each relay logged it.
            by_relay = [logged_clients(r) for r in relays]
            victim, survivor = relays
            on_victim = [c for c in running if f"127.0.0.1:{c.ports[0]}" in by_relay[0]]
            on_survivor = [c for c in running if f"127.0.0.1:{c.ports[0]}" in by_relay[1]]
            assert on_victim and on_survivor, by_relay  # leastconn spread them
            assert len(on_victim) + len(on_survivor) == CLIENTS

            stopped_at = time.monotonic()
            if stop == "sigkill":
                victim.proc.kill()
            else:
                victim.proc.terminate()
                # Out of rotation through /readyz while still alive and draining.
                wait_until(lambda: haproxy.stat().get("relay-1") == "DOWN", what="relay-1 DOWN")
                assert victim.proc.poll() is None
                taken_out = time.monotonic() - stopped_at
                assert all(c.down_since is None for c in on_victim)
            assert victim.proc.wait(WAIT) == (-9 if stop == "sigkill" else 0)
            wait_until(
                lambda: all(c.recovered and c.down_since is None for c in on_victim),
                what="the stopped relay's clients echoing again",
            )
            recovered_in = max(c.recovered[0] for c in on_victim) - stopped_at
            echoed = {id(c): c.echoed for c in running}
            wait_until(
                lambda: all(c.echoed >= echoed[id(c)] + 5 for c in running),
                what="steady echoing after failover",
            )
            wait_until(lambda: haproxy.stat().get("relay-1") == "DOWN", what="relay-1 DOWN")
            fleet.halt()
        finally:
            haproxy.stop()

    gaps = [gap for c in on_victim for gap in c.outages]
    print(
        f"{stop}: {len(on_victim)} tunnels moved; outage per client (s): "
        f"{[round(g, 3) for g in gaps]}; all echoing again {recovered_in:.3f} s after the signal"
        + (f"; relay-1 DOWN in HAProxy after {taken_out:.3f} s" if stop == "sigterm" else "")
    )
    assert len(gaps) == len(on_victim)
    assert max(gaps) < MAX_GAP
    # The other relay's clients never noticed.
    assert all(c.outages == [] and c.errors == 0 and len(c.ports) == 1 for c in on_survivor), (
        on_survivor
    )
    if stop == "sigterm":
        for _ in on_victim:
            closed = victim.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert closed["reason"] == "drain"
    # The survivor logged the moved clients by their own address (PROXY v2
    # header), not by HAProxy's source port.
    for c in on_victim:
        assert len(c.ports) == 2
        moved = f"127.0.0.1:{c.ports[1]}"
        survivor.wait_event(
            lambda e, moved=moved: (
                e["event"] == "request" and e.get("status") == 200 and e["client"] == moved
            )
        )


def logged_clients(relay: RelayProcess) -> set[str]:
    """Client addresses in the relay's ``request`` lines for tunnels it opened."""
    return {
        e["client"] for e in relay.drain() if e["event"] == "request" and e.get("status") == 200
    }
