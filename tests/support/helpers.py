"""Helpers the integration tests share: raw CONNECT over sockets, peers the
relay dials, TLS driven through memory BIOs, and the command-line clients
(curl, openssl s_client, ``python -m relay``) as the tests run them.

Fixtures and the relay subprocess itself live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import doctor
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    WAIT,
    Certs,
    ListenerCerts,
    RelayProcess,
    require_tool,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "konnect-relay"
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
WHOAMI = f"GET /whoami HTTP/1.1\r\nHost: {CP_HOST}\r\nConnection: close\r\n\r\n"

Address = tuple[str, int]


# --- raw CONNECT ------------------------------------------------------------------------


def connect_head(target: str, auth: str | None = None, version: str = "HTTP/1.1") -> bytes:
    head = f"CONNECT {target} {version}\r\nHost: {target}\r\n"
    if auth is not None:
        head += f"Proxy-Authorization: {auth}\r\n"
    return head.encode() + b"\r\n"


def dial(addr: Address, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``addr`` from ``source`` (any loopback address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(addr)
    return sock


def read_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def connect_via(
    relay: RelayProcess | Address, target: str, version: str = "HTTP/1.1", extra: bytes = b""
) -> tuple[socket.socket, bytes]:
    """Send a CONNECT head (plus ``extra`` in the same packet) to the relay's
    first listener or to an address; return the socket and everything
    received up to the end of the response head."""
    addr = relay.proxy if isinstance(relay, RelayProcess) else relay
    sock = socket.create_connection(addr, timeout=WAIT)
    try:
        sock.sendall(connect_head(target, version=version) + extra)
        return sock, read_head(sock)
    except BaseException:
        sock.close()
        raise


def open_tunnel(relay: RelayProcess | Address, target: str = f"{RAW_HOST}:443") -> socket.socket:
    """A CONNECT that must succeed; returns the tunnel's socket."""
    sock, head = connect_via(relay, target)
    if head != ESTABLISHED:
        sock.close()
        raise AssertionError(head)
    return sock


def connect_reply(relay: RelayProcess, target: str) -> bytes:
    """A CONNECT the relay answers and closes (a refusal): the whole reply."""
    sock, head = connect_via(relay, target)
    with sock:
        return head + recv_all(sock)


def start_dial(relay: RelayProcess, base: int) -> socket.socket:
    """A CONNECT to RAW_HOST whose dial is in progress: the relay holds the
    client's socket and its own connecting socket (``base`` fds at rest)."""
    sock = socket.create_connection(relay.proxy, timeout=WAIT)
    sock.sendall(connect_head(f"{RAW_HOST}:443"))
    wait_until(lambda: relay.open_fds() == base + 2, what="relay dialling")
    assert relay.metrics()["konnect_relay_pending_requests{}"] == 0
    return sock


def echoes(sock: socket.socket, payload: bytes = b"ping") -> bool:
    """Send ``payload`` through a tunnel to an echo peer and compare what comes back."""
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


def flood(sock: socket.socket, limit: int, stall: float, closed_ok: bool = False) -> int:
    """Send to a tunnel whose far end does not read, until ``limit`` bytes or
    until ``sock`` stays unwritable for ``stall`` s (backpressure reached the
    client); the bytes sent. ``closed_ok``: a reset or broken pipe (the relay
    already ended the tunnel) ends the flood too. Leaves ``sock`` non-blocking."""
    sent, chunk = 0, b"x" * 65536
    sock.setblocking(False)
    while sent < limit:
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            break
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            if not closed_ok:
                raise
            break
    return sent


def is_dead(sock: socket.socket) -> bool:
    """True once the relay closed the tunnel: EOF or reset."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- peers the relay dials ----------------------------------------------------------------


class AcceptCount(list[int]):
    """``[n]``: connections a tcp_peer accepted; ``wait_for`` blocks until n is reached."""

    def __init__(self) -> None:
        super().__init__([0])
        self.cond = threading.Condition()

    def bump(self) -> None:
        with self.cond:
            self[0] += 1
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self[0] >= n, timeout)


@contextmanager
def tcp_peer(handler: Callable[[socket.socket], None]) -> Iterator[tuple[int, AcceptCount]]:
    """A plain TCP server on loopback running ``handler`` per connection in a
    thread; yields (port, accept_count_box)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(WAIT)
    accepted = AcceptCount()
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def serve() -> None:
        while not stop.is_set():
            r, _, _ = select.select([srv], [], [], 0.05)
            if not r:
                continue
            conn, _ = srv.accept()
            accepted.bump()
            conn.settimeout(WAIT)
            t = threading.Thread(target=_run, args=(conn,), daemon=True)
            threads.append(t)
            t.start()

    def _run(conn: socket.socket) -> None:
        with conn, suppress(OSError):
            handler(conn)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    try:
        yield srv.getsockname()[1], accepted
    finally:
        stop.set()
        loop.join(WAIT)
        srv.close()
        for t in threads:
            t.join(WAIT)


def echo(conn: socket.socket) -> None:
    """A tcp_peer handler that sends back everything it reads."""
    while data := conn.recv(65536):
        conn.sendall(data)


def hold(conn: socket.socket) -> None:
    """A destination that keeps the connection until the relay closes it."""
    conn.recv(1)


@contextmanager
def slow_acceptor() -> Iterator[tuple[int, socket.socket]]:
    """A loopback listener whose accept queue is full: a connect to it hangs (the
    kernel drops the SYNs). Accepting the queued filler frees the queue, and the
    hanging connect completes at its next SYN retransmission (about 1 s)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)  # Linux queues backlog + 1 = one connection
    port = srv.getsockname()[1]
    filler = socket.socket()
    filler.setblocking(False)
    with suppress(BlockingIOError):
        filler.connect(("127.0.0.1", port))
    try:
        yield port, srv
    finally:
        filler.close()
        srv.close()


@contextmanager
def silent_udp() -> Iterator[int]:
    """A bound loopback UDP port nobody reads: a nameserver that never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- TLS in memory: full control of what goes on the wire ---------------------------------


class MemoryTLS:
    """A TLS client over memory BIOs, so a test decides how the bytes travel."""

    def __init__(self, ctx: ssl.SSLContext, server_hostname: str | None) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)

    def hello(self) -> bytes:
        """The ClientHello this client wants to send (sending it is up to the test)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def finish_handshake(self, sock: socket.socket) -> None:
        """Complete a handshake whose ClientHello was already sent over ``sock``."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                if out := self.outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "relay closed during the handshake"
                self.incoming.write(data)

    def whoami(self, sock: socket.socket) -> bytes:
        """GET /whoami over the session; the reply up to the end of its JSON body."""
        self.tls.write(WHOAMI.encode())
        sock.sendall(self.outgoing.read())
        body = b""
        while b"client_cert_sha256" not in body or not body.endswith(b"}"):
            data = sock.recv(65536)
            assert data, f"closed before the /whoami answer; got {body!r}"
            self.incoming.write(data)
            try:
                while chunk := self.tls.read(65536):
                    body += chunk
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                continue
        return body


def whoami_over(sock: socket.socket, certs: Certs, server_hostname: str = CP_HOST) -> str:
    """mTLS to the fake control plane over an open tunnel (a plain socket, or
    an SSLSocket to a TLS listener: TLS inside TLS); the fingerprint it saw."""
    client = MemoryTLS(certs.client_context(), server_hostname)
    with sock:
        sock.sendall(client.hello())
        client.finish_handshake(sock)
        reply = client.whoami(sock)
    body = reply.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["client_cert_sha256"])


def split_records(hello: bytes, size: int = 40) -> bytes:
    """The ClientHello re-framed as TLS records of ``size`` bytes of it each
    (RFC 8446 §5.1 lets a handshake message span records)."""
    header, body = hello[:5], hello[5:]
    assert header[0] == 22 and int.from_bytes(header[3:5], "big") == len(body)
    return b"".join(
        header[:3] + len(body[i : i + size]).to_bytes(2, "big") + body[i : i + size]
        for i in range(0, len(body), size)
    )


def handshake_error(address: Address, server_hostname: str | None) -> ssl.SSLError:
    """Handshake with Python's ssl (no SNI when server_hostname is None); return
    the error the relay's alert produced."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(address, timeout=WAIT) as raw,
        pytest.raises(ssl.SSLError) as info,
    ):
        ctx.wrap_socket(raw, server_hostname=server_hostname)
    return info.value


async def outlet_echoes(ws: Any) -> list[str | bytes]:
    """Five messages and a ping over an open /v1/outlet WebSocket; the echoes."""
    replies = []
    for i in range(5):
        await ws.send(f"ping-{i}")
        replies.append(await asyncio.wait_for(ws.recv(), WAIT))
    latency = await asyncio.wait_for(await ws.ping(), WAIT)
    assert latency >= 0
    return replies


def tls_listen(lc: ListenerCerts, **tls: Any) -> dict[str, Any]:
    """A ``listen`` entry: a TLS listener on an ephemeral port."""
    return {
        "address": "127.0.0.1:0",
        "tls": {"cert": str(lc.cert), "key": str(lc.key), **tls},
    }


# --- command-line clients -------------------------------------------------------------------


def curl_whoami(
    certs: Certs, *args: str, host: str = CP_HOST, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """curl ``https://host/whoami`` with the data plane's client certificate;
    ``args`` say how it gets there (``--proxy``, ``--connect-to``, ...)."""
    curl = require_tool("curl")
    return subprocess.run(
        [
            curl,
            "-sS",
            "--max-time",
            str(WAIT),
            *args,
            "--cacert",
            str(certs.ca_file),
            "--cert",
            str(certs.client_cert),
            "--key",
            str(certs.client_key),
            f"https://{host}/whoami",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=check,
    )


def s_client(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``openssl s_client ARGS`` with ``stdin`` as its input."""
    openssl = require_tool("openssl")
    return subprocess.run(
        [openssl, "s_client", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )


def s_client_whoami(certs: Certs, *args: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` with the data plane's client certificate, the test CA
    verified, sending GET /whoami."""
    return s_client(
        *args,
        "-CAfile",
        str(certs.ca_file),
        "-verify_return_error",
        "-cert",
        str(certs.client_cert),
        "-key",
        str(certs.client_key),
        "-quiet",
        stdin=WHOAMI,
    )


def relay_cli(
    *args: str, script: bool = False, timeout: float = WAIT * 3
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion (``konnect-relay`` itself when ``script``)."""
    if script:
        if not CONSOLE_SCRIPT.exists():
            pytest.skip("the konnect-relay console script is not installed in this environment")
        argv = [str(CONSOLE_SCRIPT), *args]
    else:
        argv = [sys.executable, "-m", "relay", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_config(tmp_path: Path, data: Any, name: str = "relay.yaml") -> Path:
    """``data`` (a mapping, or YAML text as it is) written to ``tmp_path/name``."""
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def nofile_prefix(n: int) -> list[str]:
    """A command prefix running the relay with RLIMIT_NOFILE ``n`` (``prlimit``
    execs it: the pid stays the relay's)."""
    return [require_tool("prlimit"), f"--nofile={n}:{n}", "--"]


def parse_table(out: str) -> dict[str, dict[str, str]]:
    """The table's rows keyed by host, each row's cells keyed by column name."""
    lines = out.splitlines()
    header = lines[0]
    starts = [header.find(name) for name in doctor.COLUMNS]
    assert -1 not in starts and starts == sorted(starts), header
    rows = {}
    for line in lines[1:]:
        if not line:
            break
        ends = [*starts[1:], len(line)]
        cells = [line[a:b].strip() for a, b in zip(starts, ends, strict=True)]
        rows[cells[0]] = dict(zip(doctor.COLUMNS, cells, strict=True))
    return rows


class NotifySocket:
    """A stand-in for systemd's NOTIFY_SOCKET that records each sender's pid."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(WAIT)

    def recv(self) -> tuple[str, int]:
        creds = struct.calcsize("3i")
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:creds])[0]
        return data.decode(), pid

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
