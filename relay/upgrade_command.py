"""``konnect-relay upgrade``: check that the relay can take the signal, send
SIGUSR2, and wait for the outcome it writes beside its pid file (upgrade.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# How often the command looks at the status and pid files.
POLL_EVERY = 0.1


def handles_upgrades(pid: int) -> bool:
    """Whether the process catches SIGUSR2 (/proc/PID/status, SigCgt): a relay
    from before upgrades existed would die of the signal's default action."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR2 - 1)))
    return False


def _alive(pid: int) -> bool:
    """Running (a zombie, exited and not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _read_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def _status(path: str, pid: int) -> dict[str, Any] | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("pid") == pid else None


def wait_for_upgrade(pid_file: str, status_file: str, timeout: float) -> int:
    """Exit status of ``konnect-relay upgrade``: 0 once the successor has
    written its pid to ``pid_file``, 1 with the cause otherwise."""
    pid = _read_pid(pid_file)
    if pid is None or not _alive(pid):
        print(f"upgrade: no running relay named by {pid_file}", file=sys.stderr)
        return 1
    if not handles_upgrades(pid):
        print(
            f"upgrade: the process {pid} does not handle upgrades (SIGUSR2): a relay "
            "older than `konnect-relay upgrade`, or one with workers; it was not "
            "signalled. Restart it instead (systemctl restart).",
            file=sys.stderr,
        )
        return 1
    Path(status_file).unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    print(f"upgrade: sent SIGUSR2 to {pid}, waiting for its successor")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = _status(status_file, pid)
        state = record.get("state") if record else None
        if state == "failed" and record is not None:
            print(
                f"upgrade: failed at step {record.get('step')}: {record.get('cause')}; "
                f"the relay {pid} carries on with every listener and tunnel",
                file=sys.stderr,
            )
            return 1
        if state == "done" and record is not None:
            successor = record.get("successor")
            failed = record.get("failed_workers")
            if _read_pid(pid_file) == successor and failed:
                workers = sorted(int(i) for i in failed)
                print(
                    f"upgrade: {successor} took over from {pid}, but workers {workers} "
                    f"failed after the commit: their tunnels stay with {pid} and drain "
                    f"(limits.drain_timeout); {record.get('moved')} tunnels moved",
                    file=sys.stderr,
                )
                return 1
            if _read_pid(pid_file) == successor:
                print(
                    f"upgrade: {successor} took over from {pid}: "
                    f"{record.get('moved')} tunnels moved, {record.get('stayed')} "
                    f"stay with {pid} until they end (limits.drain_timeout)"
                )
                return 0
        if state not in ("done", "failed") and not _alive(pid):
            now = _read_pid(pid_file)
            taken = (
                f"; {now} took over what had passed to it"
                if now not in (None, pid) and now is not None and _alive(now)
                else ""
            )
            print(f"upgrade: the relay {pid} exited during the upgrade{taken}", file=sys.stderr)
            return 1
        time.sleep(POLL_EVERY)
    print(f"upgrade: no outcome within {timeout:g} s (see the relay's log)", file=sys.stderr)
    return 1
