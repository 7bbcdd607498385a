"""The benchmark's smoke mode runs end to end, so bench/ never rots.

Runs ``bench/run.py --smoke`` (a few seconds: one repetition, tiny sizes) in a
subprocess and checks that results.json holds every figure for every target
with plausible numbers. The full benchmark is not part of the test run.

The two reference relays (``loadgen refrelay``, the ``c-splice`` target, and
``bench/bare_relay.py``, the ``uvloop-bare`` target) are also checked for
correctness on their own, by the same tests against real sockets: a reference
that dropped or reordered bytes would be a fast wrong answer.

squid and tinyproxy are Debian packages; without them the test skips locally
and fails in CI (``CI`` set), where they must be installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import recv_all, recv_exactly

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
BARE_RELAY = ROOT / "bench" / "bare_relay.py"
TARGETS = ("direct", "c-splice", "uvloop-bare", "relay", "relay-w2", "squid", "tinyproxy")
# relay-w2 runs the setup figures only; direct and the references have no idle figure.
BULK_TARGETS = ("direct", "c-splice", "uvloop-bare", "relay", "squid", "tinyproxy")
IDLE_TARGETS = ("relay", "squid", "tinyproxy")
# Cores a target may keep busy: its proxy_cpu can reach this many times 1.0.
CORES = {"relay-w2": 2}
BULK = ("bulk_up_1", "bulk_up_8", "bulk_down_1", "bulk_down_8")
SETUP = ("setup_c1", "setup_c64")
# Smoke mode takes ~15 s here; the margin covers a loaded CI runner.
SMOKE_TIMEOUT = 150


def missing_tools() -> list[str]:
    return [t for t in ("squid", "tinyproxy", "gcc", "taskset") if shutil.which(t) is None]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = missing_tools()
    if missing:
        reason = f"benchmark needs {', '.join(missing)} (apt-get install squid tinyproxy)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if (os.cpu_count() or 1) < 2:
        pytest.skip("benchmark pins the proxy and the load to two different cores")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def results(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    return data


def is_share(x: Any, cores: int = 1) -> bool:
    """A CPU share in cores: between 0 and the cores the target may use (a little
    over, from tick rounding).

    Smoke runs last tens of milliseconds, a few 10 ms ticks, so a share of 0 is
    a possible reading; the full run lasts seconds per figure.
    """
    return isinstance(x, int | float) and 0 <= x <= 1.5 * cores


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_every_target_is_measured(results: dict[str, Any]) -> None:
    assert results["mode"] == "smoke"
    assert list(results["proxies"]) == list(TARGETS)  # the tables' column order
    machine = results["machine"]
    assert machine["cores"] >= 2
    assert machine["open_files_cap"]["hard"] > 0
    assert "Squid" in machine["squid"]
    assert "tinyproxy" in machine["tinyproxy"]


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", BULK_TARGETS)
@pytest.mark.parametrize("figure", BULK)
def test_bulk_figure(results: dict[str, Any], target: str, figure: str) -> None:
    fig = results["proxies"][target][figure]
    tunnels = int(figure.rsplit("_", 1)[1])
    assert fig["tunnels"] == tunnels
    assert fig["bytes"] == results["method"]["bulk_bytes_per_figure"] // tunnels * tunnels
    assert fig["seconds"] > 0
    assert fig["bytes_per_s"] > 0
    assert is_share(fig["load_cpu"])
    if target == "direct":
        assert fig["proxy_cpu"] is None
    else:
        assert is_share(fig["proxy_cpu"])


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("figure", SETUP)
def test_setup_figure(results: dict[str, Any], target: str, figure: str) -> None:
    fig = results["proxies"][target][figure]
    assert fig["errors"] == 0
    assert fig["tunnels"] > 0
    assert fig["tunnels_per_s"] > 0
    assert 0 < fig["p50_ms"] <= fig["p99_ms"] <= fig["max_ms"]
    interrupts = Path("/proc/interrupts")
    if interrupts.exists() and {"RES:", "CAL:"} <= set(interrupts.read_text().split()):
        # Wake-ups of the load core: counted, a plausible handful per tunnel at most
        # (connect, 200, reply and close each wake a peer at most once or twice).
        assert 0 <= fig["load_ipis_per_tunnel"] < 20
    if target == "direct":
        assert fig["proxy_cpu"] is None
    else:
        assert is_share(fig["proxy_cpu"], CORES.get(target, 1))
        assert fig["proxy_cpu"] > 0  # hundreds of tunnels over 0.3 s: many ticks


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize("target", IDLE_TARGETS)
def test_idle_figure(results: dict[str, Any], target: str) -> None:
    fig = results["proxies"][target]["idle"]
    steps = results["method"]["idle_steps"]
    assert [s["tunnels"] for s in fig["steps"]] == [0, *steps]
    assert all(s["rss_kb"] > 0 for s in fig["steps"])
    assert all(isinstance(s["kb_per_tunnel"], int | float) for s in fig["steps"][1:])
    assert fig["kb_per_tunnel"] == fig["steps"][-1]["kb_per_tunnel"]


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
@pytest.mark.parametrize(
    ("target", "figures"),
    [
        ("direct", (*BULK, *SETUP)),
        ("c-splice", (*BULK, *SETUP)),
        ("uvloop-bare", (*BULK, *SETUP)),
        ("relay-w2", SETUP),
    ],
)
def test_targets_skip_figures(
    results: dict[str, Any], target: str, figures: tuple[str, ...]
) -> None:
    assert sorted(results["proxies"][target]) == sorted(figures)


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_workers_run_on_two_cores(results: dict[str, Any]) -> None:
    method = results["method"]
    assert method["target_cores"]["relay-w2"] == "0,1"
    cores = method["target_cores"]
    assert cores["relay"] == cores["c-splice"] == cores["uvloop-bare"] == "0"
    assert method["relay_w2_workers"] == 2


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_markdown_compares_with_the_reference_and_workers(run_dir: Path) -> None:
    md = (run_dir / "results.md").read_text()
    assert md.count("|") > 50
    lines = md.splitlines()
    columns = (
        "| | direct | c-splice (reference) | uvloop-bare (reference) | relay | relay-w2 "
        "| squid | tinyproxy |"
    )
    assert columns in lines  # the setup table
    bulk_columns = (
        "| | direct | c-splice (reference) | uvloop-bare (reference) | relay | squid | tinyproxy |"
    )
    assert bulk_columns in lines
    assert "Relay / squid (/ tinyproxy), same run:" in md
    assert "Relay as a share of c-splice (the C reference):" in md
    shares = [line for line in lines if line.startswith("- setup rate c=64: ")]
    assert len(shares) == 3  # against squid, c-splice and uvloop-bare
    assert all(line.endswith("%") for line in shares[1:])
    assert "relay-w2 / relay, setup rate c=64: " in md


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_markdown_compares_with_the_uvloop_floor(run_dir: Path) -> None:
    lines = (run_dir / "results.md").read_text().splitlines()
    start = lines.index("Relay as a share of uvloop-bare (the least a uvloop relay does):")
    assert re.fullmatch(r"- setup rate c=64: \d+%", lines[start + 2])
    assert re.fullmatch(r"- p99 at c=1 \(lower is better\): \d+%", lines[start + 3])
    bare = [line for line in lines if line.startswith("uvloop-bare / squid, setup rate c=64: ")]
    assert len(bare) == 1
    assert re.match(r"uvloop-bare / squid, setup rate c=64: \d+\.\d\dx \(", bare[0])
    assert "target is 0.80x" in bare[0]
    start = lines.index("Setup targets (one worker, every feature on):")
    targets = lines[start + 2 : start + 6]
    expected = (
        r"- setup rate c=64 at least 0\.80x squid's: \d+\.\d\dx, (not )?met",
        r"- setup rate c=64 at least 0\.65x uvloop-bare's: \d+\.\d\dx, (not )?met",
        r"- p99 at c=1 at most 1\.00x squid's: \d+\.\d\dx, (not )?met",
        r"- p99 at c=1 at most 1\.30x tinyproxy's: \d+\.\d\dx, (not )?met",
    )
    for line, pattern in zip(targets, expected, strict=True):
        assert re.fullmatch(pattern, line), line
    assert any(
        line.startswith("uvloop-bare (reference) is `bench/bare_relay.py`") for line in lines
    )


# --- the reference relays -----------------------------------------------------------

OK = b"HTTP/1.1 200 Connection Established\r\n\r\n"
HEAD = b"CONNECT ignored.example:443 HTTP/1.1\r\nHost: ignored.example:443\r\n\r\n"
# Bounds every socket wait in these tests.
WAIT = 10.0
# Enough to need many splice calls and a full pipe each way.
BULK_BYTES = 24 << 20
# More than every socket buffer between the upstream and a client that reads
# nothing can hold (tcp_rmem may let one grow to 32 MiB): an upstream that gets
# this much out means the relay buffers without bound.
UNBOUNDED_BYTES = 256 << 20
# An upstream that cannot send for this long is held back by the relay.
STALLED = 1.0
REFERENCES = ("c-splice", "uvloop-bare")

# Starts a reference relay dialling 127.0.0.1:<port>; the context yields its port.
StartRelay = Callable[[int], contextlib.AbstractContextManager[int]]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """loadgen compiled as the benchmark does, with warnings as errors."""
    if shutil.which("gcc") is None:
        if os.environ.get("CI"):
            pytest.fail("gcc is missing")
        pytest.skip("needs gcc")
    binary = tmp_path_factory.mktemp("loadgen") / "loadgen"
    src = ROOT / "bench" / "loadgen.c"
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return binary


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    """The listening socket the reference relay dials."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(WAIT)
        yield sock


@contextlib.contextmanager
def serving(argv: list[str]) -> Iterator[int]:
    """A reference relay that prints {"port", "pid"} and stops when stdin closes;
    yields its port and checks that it lived to the end and exited cleanly."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready, f"{argv[1]} did not start"
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid
        yield int(info["port"])
        assert proc.poll() is None, f"{argv[1]} died"
    finally:
        proc.stdin.close()  # how the benchmark stops it
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0


@pytest.fixture(params=REFERENCES)
def reference(request: pytest.FixtureRequest) -> StartRelay:
    """Each reference relay in turn, as the benchmark runs it."""
    if request.param == "c-splice":
        loadgen: Path = request.getfixturevalue("loadgen")
        argv = [str(loadgen), "refrelay"]
    else:
        argv = [sys.executable, str(BARE_RELAY)]
    return lambda port: serving([*argv, "--upstream", f"127.0.0.1:{port}"])


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.settimeout(WAIT)
    return sock


def connected(sock: socket.socket) -> None:
    """Send the CONNECT head through a reference relay and read its 200."""
    sock.sendall(HEAD)
    assert recv_exactly(sock, len(OK)) == OK


def test_reference_forwards_bytes_behind_the_head_and_the_clients_half_close(
    reference: StartRelay, upstream: socket.socket
) -> None:
    with reference(upstream.getsockname()[1]) as port, client(port) as c:
        c.sendall(HEAD + b"early bytes")  # one write: the relay reads them with the head
        assert recv_exactly(c, len(OK)) == OK
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(WAIT)
            assert recv_exactly(conn, 11) == b"early bytes"
            conn.sendall(b"reply")
            assert recv_exactly(c, 5) == b"reply"
            c.shutdown(socket.SHUT_WR)  # EOF goes upstream, the other way stays open
            assert conn.recv(1) == b""
            conn.sendall(b"after the client's EOF")
        assert recv_all(c) == b"after the client's EOF"


def test_reference_forwards_the_upstreams_half_close(
    reference: StartRelay, upstream: socket.socket
) -> None:
    with reference(upstream.getsockname()[1]) as port, client(port) as c:
        connected(c)
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(b"last words")
            conn.shutdown(socket.SHUT_WR)  # EOF goes to the client, which may still send
            assert recv_all(c) == b"last words"
            c.sendall(b"after the upstream's EOF")
            assert recv_exactly(conn, 24) == b"after the upstream's EOF"
            c.shutdown(socket.SHUT_WR)  # both directions done: the tunnel ends
            assert conn.recv(1) == b""
        assert c.recv(1) == b""


def test_reference_moves_bytes_intact_both_ways(
    reference: StartRelay, upstream: socket.socket
) -> None:
    payload = os.urandom(BULK_BYTES)
    got_upstream: list[bytes] = []

    def echo_after_eof() -> None:
        # Reads everything, then sends it back: each direction runs on its own.
        conn, _ = upstream.accept()
        with conn:
            conn.settimeout(WAIT)
            data = recv_all(conn)
            got_upstream.append(data)
            conn.sendall(data)

    thread = threading.Thread(target=echo_after_eof, daemon=True)
    thread.start()
    with reference(upstream.getsockname()[1]) as port, client(port) as c:
        connected(c)
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        back = recv_all(c)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert got_upstream == [payload]
    assert len(back) == len(payload)
    assert back == payload


def test_reference_stops_reading_the_upstream_for_a_client_that_does_not_read(
    reference: StartRelay, upstream: socket.socket
) -> None:
    chunk = bytes(1 << 16)
    with reference(upstream.getsockname()[1]) as port, client(port) as c:
        connected(c)
        conn, _ = upstream.accept()
        with conn:
            conn.setblocking(False)
            sent = 0
            while sent < UNBOUNDED_BYTES:
                _, writable, _ = select.select([], [conn], [], STALLED)
                if not writable:
                    break  # the relay stopped reading: every buffer on the way is full
                with contextlib.suppress(BlockingIOError):
                    sent += conn.send(chunk)
            assert sent < UNBOUNDED_BYTES
            conn.setblocking(True)
            conn.shutdown(socket.SHUT_WR)
            # Once the client reads, the relay reads again: everything arrives.
            assert len(recv_all(c)) == sent


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="not-connect"),
        pytest.param(b"CONNECT x:443 HTTP/1.1\r\nX: " + b"a" * 9000, id="head-too-long"),
        pytest.param(b"CONNECT x:443 HTTP/1.1\r\n", id="eof-inside-head"),
    ],
)
def test_reference_closes_a_bad_head_without_dialling(
    reference: StartRelay, upstream: socket.socket, head: bytes
) -> None:
    with reference(upstream.getsockname()[1]) as port:
        with client(port) as c:
            c.sendall(head)
            if not head.endswith(b"\r\n\r\n") and len(head) < 8192:
                c.shutdown(socket.SHUT_WR)
            try:
                answer = recv_all(c)
            except ConnectionResetError:  # closed with the rest of the head unread
                answer = b""
            assert answer == b""
        dialled, _, _ = select.select([upstream], [], [], 0)
        assert not dialled
        with client(port) as c:  # and it still serves the next one
            connected(c)


def test_reference_closes_when_the_upstream_refuses(reference: StartRelay) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        refused_port = closed.getsockname()[1]
    with reference(refused_port) as port, client(port) as c:
        c.sendall(HEAD)
        assert recv_all(c) == b""
