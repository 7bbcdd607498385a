"""Kong Gateway's own clustering client through the relay: the kongclient harness
(Kong's fork of lua-resty-websocket, every vendored version, with Kong 3.9's
clustering code in nginx + lua) run as it is, and every scenario of its README
asserted from its ``out/results.json``."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import CONSOLE_SCRIPT
from tests.support.relay import FREE_PORT_FLOOR, require_tool

HARNESS = Path(
    os.environ.get("KONGCLIENT_DIR") or Path(__file__).parents[3] / "shared" / "kongclient"
)

# The README's scenario table (a-hold only runs with --hold). Each runs once per
# vendored version, except c-curl, which runs once with curl instead of Kong's client.
SCENARIOS = (
    "a",
    "b",
    "b-wrong",
    "b-missing",
    "b-kong3.7",
    "c",
    "c-auth",
    "d",
    "d-port",
    "e",
    "e-ip",
    "n-sni",
    "n-verify",
    "n-mtls",
    "n-proxy-verify",
    "m-https-plain",
    "m-http-tls",
)
CURL_SCENARIO = ("c-curl", "curl")

# The harness listens on KC_PORT_BASE + 28 .. + 80 + (number of versions): below
# free_port()'s range (FREE_PORT_FLOOR up to the ephemeral range), which the other
# tests draw from, and clear of every port a test names (3128, 5555, 8443, 9464).
KC_PORT_BASE = 17100
RUN_TIMEOUT = 300  # s; a run takes about 35-60 s
STOP_GRACE = 30  # s for the harness to end its processes after an interrupt
LOG_TAIL = 30  # lines of each relay log in a failure message

# Files run.sh looks for, and the Debian packages that provide them.
LUA_FILES = {
    "/usr/lib/nginx/modules/ngx_http_lua_module.so": "libnginx-mod-http-lua",
    "/usr/lib/nginx/modules/ngx_stream_module.so": "libnginx-mod-stream",
    "/usr/share/lua/5.1/resty/core.lua": "lua-resty-core",
    "/usr/share/lua/5.1/resty/lrucache.lua": "lua-resty-lrucache",
    "/usr/share/lua/5.1/socket/url.lua": "lua-socket",
    "/usr/lib/*/lua/5.1/cjson.so": "lua-cjson",
}


def require(present: bool, what: str) -> None:
    """As require_tool for what is not a command: fails under CI, skips elsewhere."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{what}; CI must provide it")
        pytest.skip(what)


def copy_harness(dest: Path) -> Path:
    """The harness in a writable copy (shared/ is read-only), without state of earlier runs."""
    shutil.copytree(HARNESS, dest, ignore=shutil.ignore_patterns("venv", "run", "out"))
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    # run.sh creates venv/ with websockets and trustme unless venv/bin/python has
    # them: this interpreter has both (test extras), so no package index is needed.
    python = dest / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return dest


def run_harness(harness: Path) -> tuple[int, str, str]:
    """run.sh to the end, or interrupted after RUN_TIMEOUT s (then it stops what it
    started; whatever is left of its process group is killed)."""
    env = dict(os.environ, RELAY_BIN=str(CONSOLE_SCRIPT), KC_PORT_BASE=str(KC_PORT_BASE))
    with subprocess.Popen(
        [str(harness / "run.sh")],
        cwd=harness,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # run.py's finally ends its processes by PID
            try:
                out, err = proc.communicate(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            err += f"\n(run.sh interrupted after {RUN_TIMEOUT} s)"
        return proc.returncode, out, err


def relay_log_tails(harness: Path) -> str:
    parts = []
    for log in sorted((harness / "run").glob("relay-r*.log")):
        lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        parts.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
    return "\n".join(parts)


def report(harness: Path, rc: int, out: str, err: str, problems: list[str]) -> str:
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    summary = [line for line in out.splitlines() if line.startswith("kongclient:")]
    return "\n".join(
        [
            f"run.sh exit {rc}: {summary[-1] if summary else 'no summary line'}",
            *problems,
            *fails,
            f"--- stderr (tail)\n{err[-2000:]}",
            relay_log_tails(harness),
        ]
    )


@pytest.mark.timeout(RUN_TIMEOUT + STOP_GRACE + 60)
def test_kong_clustering_client_every_scenario_and_version(tmp_path: Path) -> None:
    require(HARNESS.is_dir(), f"kongclient harness not found at {HARNESS} (KONGCLIENT_DIR)")
    for tool in ("nginx", "dnsmasq", "curl"):
        require_tool(tool)
    for pattern, package in LUA_FILES.items():
        require(bool(glob.glob(pattern)), f"{pattern} missing (Debian package {package})")
    versions = [
        line.split()[0]
        for line in (HARNESS / "vendor" / "VERSIONS").read_text().splitlines()
        if line.strip()
    ]
    assert len(versions) == 4, versions

    harness = copy_harness(tmp_path / "kongclient")
    rc, out, err = run_harness(harness)

    results_file = harness / "out" / "results.json"
    assert results_file.exists(), report(harness, rc, out, err, ["no out/results.json"])
    data: dict[str, Any] = json.loads(results_file.read_text())
    meta, results = data["meta"], data["results"]

    problems = []
    if meta.get("dns") is not True:
        problems.append("dnsmasq did not run: scenario e was left out")
    if sorted(meta.get("versions", {})) != sorted(versions):
        problems.append(f"versions run {sorted(meta.get('versions', {}))} != {versions}")
    if not all(port < FREE_PORT_FLOOR for port in meta.get("ports", {}).values()):
        problems.append(f"ports {meta.get('ports')} reach into free_port()'s range")
    expected = sorted([(s, v) for s in SCENARIOS for v in versions] + [CURL_SCENARIO])
    ran = sorted((r["scenario"], r["version"]) for r in results)
    if not results:
        problems.append("no scenario ran")
    elif ran != expected:
        missing = sorted(set(expected) - set(ran))
        extra = sorted(set(ran) - set(expected))
        dupes = sorted({k for k in ran if ran.count(k) > 1})
        problems.append(f"results: missing {missing}, unexpected {extra}, repeated {dupes}")
    for r in results:
        if r["pass"] is not True:
            problems.append(f"{r['scenario']} {r['version']}: {r.get('problems') or r}")

    assert not problems and rc == 0, report(harness, rc, out, err, problems)
    assert f"kongclient: {len(expected)} passed, 0 failed" in out.splitlines(), out
