"""Real egress peers for the tests, each on 127.0.0.1 with a free port.

Parents: mitmproxy's ``mitmdump`` (regular mode, TLS passthrough for every
host, ``proxyauth``) and squid. Bastions: OpenSSH's ``sshd`` with a host key
and an authorized key generated here, and an in-process asyncssh server. Each
can be killed (SIGKILL for the external ones: no goodbye to the relay) and
started again on the same port, for the fault tests.

Outside CI a missing tool skips the test; under CI (``CI`` set, where
``.ci/run`` installs everything) it fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.relay import WAIT, LoopThread, free_port

ROOT = Path(__file__).resolve().parents[2]
PROXY_USER, PROXY_PASSWORD = "user", "pass"
# SIGTERM, then SIGKILL after this: a peer that is still draining a flood
# (mitmdump, one Python thread) need not finish it.
STOP_GRACE = 2.0


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def find_mitmdump() -> str:
    """The repo's .venv-mitm (made by .ci/run), else mitmdump on PATH or in a
    sibling virtualenv."""
    candidates = [
        ROOT / ".venv-mitm" / "bin" / "mitmdump",
        ROOT.parent / "mitm-venv" / "bin" / "mitmdump",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("mitmdump")
    if found is None:
        skip_or_fail("mitmdump not found (.ci/run installs it into .venv-mitm)")
    assert found is not None
    return found


def find_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        skip_or_fail(f"{name} is not installed (Debian package: .ci/run installs it)")
    assert found is not None
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


# The peer runs under a shell that holds it on a leash. The shell's stdin is a
# pipe from the test process, which the kernel closes when the test run ends
# however it ends (a CI timeout kills pytest before any fixture teardown); a
# watcher then stops the peer. The shell itself waits for the peer, so a
# killed peer is reaped at once (squid refuses to start while the pid in its
# pid file exists, a zombie's included). (A background job's stdin is
# /dev/null, hence fd 3.) A parent-death signal would not do: squid changes
# its user id, which clears it.
LEASH = """\
exec 3<&0
"$@" </dev/null 3<&- & child=$!
{ read -r _ <&3; kill -TERM "$child"; sleep 2; kill -KILL "$child"; } 2>/dev/null &
exec 3<&-
watcher=$!
wait "$child"; status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"""


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _bastion_egress(bastion: Any, **extra: Any) -> dict[str, Any]:
    """The relay's ``egress.ssh`` section for a bastion peer (sshd or asyncssh)."""
    return {
        "host": "127.0.0.1",
        "port": bastion.port,
        "username": bastion.user,
        "client_keys": [str(bastion.client_key)],
        "known_hosts": str(bastion.known_hosts),
        **extra,
    }


class Process:
    """An external peer: started in its own process group, its output read by
    a thread (so it never blocks on a full pipe), ready once a line matches."""

    ready: re.Pattern[str]
    port: int

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self._queue = queue.Queue()
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", LEASH, "sh", *self.argv()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + WAIT * 2
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise AssertionError(f"{self.name} not ready; output:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.stop()
                raise AssertionError(f"{self.name} exited; output:\n{self.output()}")
            if self.ready.search(line):
                break
        # squid prints its "Accepting" line a few milliseconds before it
        # listens: the port itself is the proof.
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=WAIT).close()
                return
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(
                        f"{self.name} never listened; output:\n{self.output()}"
                    ) from None
                time.sleep(0.01)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def kill(self) -> None:
        """SIGKILL the peer and every process below it (sshd's per-connection
        children run in sessions of their own). The leash shell is left to
        reap the peer, so no zombie keeps its pid (squid refuses to start
        while the pid in its pid file exists), and then exits."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            signal_all(descendants(proc.pid), signal.SIGKILL)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(WAIT)
        self._finish()

    def stop(self) -> None:
        """SIGTERM the peer; SIGKILL whatever is left after STOP_GRACE."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            family = descendants(proc.pid)
            signal_all(family, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            signal_all(family, signal.SIGKILL)  # whatever outlived its parent
        self._finish()

    def _finish(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(WAIT)
        # Closing the pipe under a reader still blocked in read() would block
        # too; a reader still alive here is a daemon thread and ends with EOF.
        stdout = self.proc.stdout if self.proc is not None else None
        if stdout is not None and (reader is None or not reader.is_alive()):
            stdout.close()
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        """Stop, and remove whatever the peer leaves behind."""
        self.stop()


# --- parents -----------------------------------------------------------------------


class Mitmdump(Process):
    """mitmdump as a corporate parent: regular (HTTP CONNECT) mode, TLS passed
    through for every host (``ignore_hosts='.*'``: it never sees inside the
    tunnel), Basic proxy auth required."""

    ready = re.compile(r"proxy listening at")

    def __init__(self, confdir: Path, password: str = PROXY_PASSWORD) -> None:
        super().__init__("mitmdump")
        self.binary = find_mitmdump()
        self.confdir = confdir
        self.port = free_port()
        self.password = password

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
            "--set",
            "ignore_hosts=.*",
            "--set",
            f"proxyauth={PROXY_USER}:{self.password}",
            "--set",
            "termlog_verbosity=info",
            "--set",
            "flow_detail=0",
        ]

    def url(self, user: str = PROXY_USER, password: str = PROXY_PASSWORD) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"


SQUID_SHM = ("metadata", "queues", "readers")
_squid_ids = iter(range(1_000_000))


class Squid(Process):
    """squid 5 as a second parent: CONNECT from localhost to any port, no cache.

    squid drops root for ``cache_effective_user``, which must be able to write
    its log directory, so that directory is a fresh one under /tmp owned by
    that user (pytest's own tmp tree is not traversable by it)."""

    ready = re.compile(r"Accepting HTTP Socket connections")

    def __init__(self) -> None:
        super().__init__("squid")
        self.binary = find_binary("squid")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="relay-test-squid-"))
        self.user = "proxy" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.services: list[str] = []
        self.conf = self.dir / "squid.conf"
        self.conf.write_text(
            f"""\
http_port 127.0.0.1:{self.port}
acl test_src src 127.0.0.1/32
acl CONNECT method CONNECT
http_access allow test_src CONNECT
http_access deny all
cache deny all
cache_mem 0 MB
access_log stdio:{self.dir}/access.log
cache_store_log none
cache_log {self.dir}/cache.log
pid_filename {self.dir}/squid.pid
coredump_dir {self.dir}
cache_effective_user {self.user}
shutdown_lifetime 0 seconds
logfile_rotate 0
pinger_enable off
digest_generation off
icp_port 0
htcp_port 0
"""
        )

    def argv(self) -> list[str]:
        # A service name per start: squid names its shared memory segments
        # after it, and a killed squid leaves them behind.
        service = f"relaytest{os.getpid()}x{next(_squid_ids)}"
        self.services.append(service)
        return [self.binary, "-N", "-d", "1", "-n", service, "-f", str(self.conf)]

    def access_log(self) -> str:
        path = self.dir / "access.log"
        return path.read_text() if path.exists() else ""

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cleanup(self) -> None:
        self.stop()
        for service in self.services:
            for seg in SQUID_SHM:
                Path(f"/dev/shm/{service}-cf__{seg}.shm").unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- bastions ----------------------------------------------------------------------


def ssh_keygen(path: Path) -> str:
    """A fresh ed25519 key pair at ``path``; returns the public key line."""
    keygen = find_binary("ssh-keygen")
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "relay-test", "-f", str(path)],
        check=True,
        timeout=WAIT,
    )
    return Path(f"{path}.pub").read_text().strip()


class Sshd(Process):
    """OpenSSH's sshd as the bastion: key auth only, TCP forwarding allowed."""

    ready = re.compile(r"Server listening on")

    def __init__(self, tmp: Path) -> None:
        super().__init__("sshd")
        if os.geteuid() != 0:
            skip_or_fail("sshd needs root (privilege separation); CI runs as root")
        self.binary = find_binary("sshd")
        # Debian's sshd refuses to start without its privilege-separation
        # directory, which only the ssh service's init script creates.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.dir = tmp
        self.port = free_port()
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        host_pub = ssh_keygen(tmp / "host_key")
        client_pub = ssh_keygen(tmp / "client_key")
        (tmp / "authorized_keys").write_text(client_pub + "\n")
        self.client_key = tmp / "client_key"
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        self.conf = tmp / "sshd_config"
        self.conf.write_text(
            f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {tmp}/host_key
AuthorizedKeysFile {tmp}/authorized_keys
PidFile {tmp}/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
PermitTTY no
X11Forwarding no
MaxSessions 100
MaxStartups 100
LogLevel VERBOSE
"""
        )

    def argv(self) -> list[str]:
        return [self.binary, "-D", "-e", "-f", str(self.conf)]

    egress = _bastion_egress


class AsyncsshBastion:
    """An asyncssh server in the tests' background loop, allowing direct-tcpip."""

    def __init__(self, loop_thread: LoopThread, tmp: Path) -> None:
        import asyncssh

        self.loop_thread = loop_thread
        self.port = free_port()
        self.user = "relay"
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = tmp / "asyncssh_client_key"
        client_key.write_private_key(str(self.client_key))
        self.authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        self.known_hosts = tmp / "asyncssh_known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode()}"
        )
        self.conns: set[Any] = set()
        self.accepted = 0
        self.acceptor: Any = None

    async def _start(self) -> None:
        import asyncssh

        bastion = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self.conn = conn
                bastion.conns.add(conn)
                bastion.accepted += 1

            def connection_lost(self, exc: Exception | None) -> None:
                bastion.conns.discard(self.conn)

            def connection_requested(
                self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
            ) -> bool:
                return True

        self.acceptor = await asyncssh.listen(
            "127.0.0.1",
            self.port,
            server_host_keys=[self.host_key],
            authorized_client_keys=self.authorized,
            server_factory=Server,
            reuse_address=True,
        )

    async def _kill(self) -> None:
        for conn in list(self.conns):
            conn.abort()
        if self.acceptor is not None:
            self.acceptor.close()
            await self.acceptor.wait_closed()
            self.acceptor = None

    def start(self) -> None:
        self.loop_thread.run(self._start())

    def kill(self) -> None:
        self.loop_thread.run(self._kill())

    stop = kill

    def restart(self) -> None:
        self.kill()
        self.start()

    egress = _bastion_egress
