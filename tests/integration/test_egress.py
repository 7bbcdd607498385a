"""Egress through a parent proxy and through an SSH bastion.

Three tiers, as everywhere in this project:

- the parent's response-head parser and the CONNECT request, with tables and
  a property test;
- each dialer in-process on uvloop (the relay's loop), driving the real
  tunnel pump (``Tunnel``) over the transport it returns: scripted parents
  for every answer a parent can give, real peers for TLS, flow control,
  channel limits and connection loss;
- the relay as a subprocess, where the SAME tunnel tests (mTLS fingerprints
  with curl, a websockets session, half-close, a stalled peer either way, the
  ClientHello in the CONNECT packet) run through every egress: direct,
  mitmdump and squid as parents, OpenSSH's sshd and an asyncssh server as
  bastions. Then the faults: a parent or bastion killed mid-tunnel and
  started again, wrong credentials, a wrong host key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from relay.config import HttpProxyModel, SSHModel, http_proxy_settings, ssh_settings
from relay.egress import Dialer, DialError, Dialled
from relay.egress.http_proxy import (
    MAX_HEAD_SIZE,
    HttpProxyDialer,
    ParentHeadError,
    parse_response_head,
)
from relay.egress.ssh import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    CHANNEL_WINDOW,
    EgressLost,
    SSHDialer,
    backoff_delay,
)
from relay.resolver import Resolver
from relay.tunnel import HIGH_WATER, Pending, Tunnel
from tests.integration.test_tunnels import (
    connect_via,
    open_tunnel,
    recv_all,
    recv_exactly,
    tcp_peer,
)
from tests.support.helpers import curl_whoami
from tests.support.peers import (
    PROXY_PASSWORD,
    PROXY_USER,
    AsyncsshBastion,
    Mitmdump,
    Squid,
    Sshd,
)
from tests.support.relay import (
    CP_HOST,
    RAW_HOST,
    TP_HOST,
    WAIT,
    Certs,
    FakeControlPlane,
    LoopThread,
    RelayProcess,
    free_port,
    relay_config,
)

T = TypeVar("T")
CP_TARGET = f"{CP_HOST}:443"
RAW_TARGET = f"{RAW_HOST}:443"


# SSH dialers a test made: closed when its coroutine ends, pass or fail (an
# SSH connection left open keeps uvloop from closing).
_dialers: list[SSHDialer] = []


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine on uvloop, the loop the relay runs on."""

    async def main() -> T:
        try:
            return await coro
        finally:
            while _dialers:
                await _dialers.pop().close()

    # A transport a failing test left open must not turn into an error inside
    # uvloop's close (which then never finishes): collect those warnings and
    # fail with them once the loop is closed.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        result = uvloop.run(main())
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
    return result


# --- peers (session-wide; fault tests start their own) -------------------------------


@pytest.fixture(scope="session")
def mitm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mitmdump]:
    peer = Mitmdump(tmp_path_factory.mktemp("mitm-conf"))
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def squid() -> Iterator[Squid]:
    peer = Squid()
    try:
        peer.start()
        yield peer
    finally:
        peer.cleanup()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    peer = Sshd(tmp_path_factory.mktemp("sshd"))
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def asyncssh_bastion(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsyncsshBastion]:
    peer = AsyncsshBastion(loop_thread, tmp_path_factory.mktemp("asyncssh"))
    peer.start()
    yield peer
    peer.stop()


@dataclass
class Egress:
    """One way out, as the relay's ``egress:`` section and the peer behind it."""

    id: str
    mode: str
    config: dict[str, Any]
    peer: Any = None


EGRESSES = ("direct", "mitmdump", "squid", "sshd", "asyncssh")


def make_egress(request: pytest.FixtureRequest, name: str) -> Egress:
    if name == "direct":
        return Egress(name, "direct", {"mode": "direct"})
    if name == "mitmdump":
        mitm: Mitmdump = request.getfixturevalue("mitm")
        return Egress(name, "http_proxy", {"mode": "http_proxy", "http_proxy": {"url": mitm.url()}})
    if name == "squid":
        sq: Squid = request.getfixturevalue("squid")
        return Egress(name, "http_proxy", {"mode": "http_proxy", "http_proxy": {"url": sq.url()}})
    if name == "sshd":
        # sshd resolves the name the relay asks for: resolve: remote.
        bastion: Any = request.getfixturevalue("sshd")
        return Egress(name, "ssh", {"mode": "ssh", "ssh": bastion.egress(resolve="remote")})
    bastion = request.getfixturevalue("asyncssh_bastion")
    # The relay resolves and checks, the bastion gets an address: resolve: local.
    return Egress(name, "ssh", {"mode": "ssh", "ssh": bastion.egress(resolve="local")})


@pytest.fixture(params=EGRESSES)
def egress(request: pytest.FixtureRequest) -> Egress:
    return make_egress(request, request.param)


@pytest.fixture(params=EGRESSES)
def fresh_egress(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Egress]:
    """Like ``egress``, but a parent proxy of its own: after a flood, mitmdump
    (one Python thread) can take seconds to drain what it holds, and the next
    test must not pay for it."""
    name = request.param
    if name not in ("mitmdump", "squid"):
        yield make_egress(request, name)
        return
    parent: Any = Mitmdump(tmp_path / "mitm-conf") if name == "mitmdump" else Squid()
    try:
        parent.start()
        yield Egress(
            name, "http_proxy", {"mode": "http_proxy", "http_proxy": {"url": parent.url()}}
        )
    finally:
        parent.cleanup()


def start_via(
    start_relay: Callable[..., RelayProcess], egress: Egress, port: int, **overrides: Any
) -> RelayProcess:
    """A relay that sends the Konnect test names (TLS only) and RAW_HOST (any
    bytes) to 127.0.0.1:port through ``egress``."""
    target = f"127.0.0.1:{port}"
    cfg = relay_config(
        resolver={"static": {CP_HOST: target, TP_HOST: target, RAW_HOST: target}},
        egress=egress.config,
        **overrides,
    )
    return start_relay(cfg)


def established(relay: RelayProcess, egress: Egress) -> dict[str, Any]:
    """The relay's log line for the tunnel just opened; it must name the egress."""
    event = relay.wait_event(lambda e: e["event"] == "request" and e.get("status") == 200)
    assert event["egress"] == egress.mode, event
    if egress.mode != "direct":
        assert " via " in event["upstream"], event
    return event


# === 1. pure: the parent's response head and the CONNECT request ======================


@given(st.binary(max_size=256), st.integers(min_value=0, max_value=256))
def test_parse_response_head_total(data: bytes, cut: int) -> None:
    """Any bytes either parse, stay incomplete, or raise ParentHeadError; a
    parsed head never claims more than it was given; feeding more bytes never
    changes a result already reached."""
    head = b"HTTP/1.1 200 OK\r\n" + data
    try:
        first = parse_response_head(head[: cut + 17])
    except ParentHeadError:
        return
    if first is None:
        return
    assert first[2] <= len(head[: cut + 17])
    assert parse_response_head(head) == first


@given(st.integers(min_value=0, max_value=100))
def test_backoff_full_jitter_capped(attempt: int) -> None:
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
    assert backoff_delay(attempt, lambda: 0.0) == 0.0
    assert backoff_delay(attempt, lambda: 0.999999) == pytest.approx(ceiling * 0.999999)
    assert 0 <= backoff_delay(attempt) < ceiling <= BACKOFF_CAP


# === 2. in-process: each dialer under the real tunnel pump ============================


def resolver(
    static: dict[str, tuple[str, int]] | None = None, allow_private: bool = True
) -> Resolver:
    return Resolver(
        {(host, None): target for host, target in (static or {}).items()},
        allow_private=allow_private,
        cache_ttl=0,
    )


@dataclass
class Piped:
    """A dialled upstream joined by a Tunnel to a socketpair whose other end
    (``sock``) plays the client."""

    sock: socket.socket
    client: asyncio.Transport
    tunnel: Tunnel
    dialled: Dialled
    closed: asyncio.Future[Tunnel]


async def pipe(
    dialer: Dialer, host: str = CP_HOST, port: int = 443, sockbuf: int | None = None
) -> Piped:
    """``sockbuf`` shrinks the socketpair's kernel buffers, so that the
    relay's own buffers, not the kernel's, absorb a slow client."""
    loop = asyncio.get_running_loop()
    pending = Pending()
    dialled = await dialer.dial(host, port, pending)
    ours, theirs = socket.socketpair()
    if sockbuf is not None:
        for sock in (ours, theirs):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
    client, _ = await loop.create_unix_connection(asyncio.Protocol, sock=theirs)
    closed: asyncio.Future[Tunnel] = loop.create_future()
    tunnel = Tunnel("test", host, port, dialer.name, closed.set_result)
    tunnel.start(client, dialled.transport, b"", pending, dialled.leftover)
    return Piped(ours, client, tunnel, dialled, closed)


async def whoami(piped: Piped, certs: Certs) -> str:
    """mTLS to the fake control plane over the tunnel; the client-cert
    fingerprint it saw."""
    reader, writer = await asyncio.open_unix_connection(
        sock=piped.sock, ssl=certs.client_context(), server_hostname=CP_HOST
    )
    writer.write(f"GET /whoami HTTP/1.1\r\nHost: {CP_HOST}\r\nConnection: close\r\n\r\n".encode())
    body = b""
    async with asyncio.timeout(WAIT):
        while not body.rstrip().endswith(b"}"):
            chunk = await reader.read(65536)
            assert chunk, body
            body += chunk
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    fp: str = json.loads(body.partition(b"\r\n\r\n")[2])["client_cert_sha256"]
    return fp


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def no_leak(fds: int, tasks: int) -> None:
    """No more fds or tasks than counted before. The fake control plane runs in
    this process too and closes its side on its own thread, so the count may
    lag a moment; a leak never comes back."""
    async with asyncio.timeout(WAIT):
        while fd_count() > fds or len(asyncio.all_tasks()) > tasks:
            await asyncio.sleep(0.02)


# --- http_proxy against scripted parents ---------------------------------------------


@dataclass
class ScriptedParent:
    """A parent that reads the CONNECT head, answers ``answer`` (None: says
    nothing), then echoes (or closes, with ``close``)."""

    answer: bytes | None
    close: bool = False
    then: tuple[bytes, ...] = ()  # sent right after the answer, one write each
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedParent:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            if self.answer is not None:
                writer.write(self.answer)
            for chunk in self.then:
                await writer.drain()
                writer.write(chunk)
            if self.close:
                writer.close()
                return
            while data := await reader.read(65536):
                writer.write(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def proxy_dialer(
    url: str, static: dict[str, tuple[str, int]] | None = None, **model: Any
) -> HttpProxyDialer:
    return HttpProxyDialer(http_proxy_settings(HttpProxyModel(url=url, **model)), resolver(static))


@pytest.mark.parametrize(
    ("answer", "leftover"),
    [
        (b"HTTP/1.1 200 Connection established\r\n\r\n", b""),
        (b"HTTP/1.0 200 OK\r\nVia: 1.0 corp\r\n\r\nserver-first", b"server-first"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    ],
)
def test_parent_2xx_hands_over_with_leftover(answer: bytes, leftover: bytes) -> None:
    async def main() -> None:
        async with ScriptedParent(answer) as parent:
            dialer = proxy_dialer(f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{parent.port}")
            piped = await pipe(dialer)
            assert piped.dialled.leftover == leftover
            assert piped.dialled.peer == f"{CP_TARGET} via 127.0.0.1:{parent.port}"
            loop = asyncio.get_running_loop()
            piped.sock.setblocking(False)
            await loop.sock_sendall(piped.sock, b"ping")
            got = b""
            async with asyncio.timeout(WAIT):
                while len(got) < len(leftover) + 4:
                    got += await loop.sock_recv(piped.sock, 65536)
            assert got == leftover + b"ping"
            piped.sock.close()
            await asyncio.wait_for(piped.closed, WAIT)
        token = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
        assert parent.requests == [
            f"CONNECT {CP_TARGET} HTTP/1.1\r\nHost: {CP_TARGET}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
        ]

    run(main())


def test_parent_bytes_after_the_200_arrive_in_order() -> None:
    """The destination speaks first: bytes in the 200's packet (leftover),
    right behind it (held by the Pending until the tunnel starts) and later
    (the tunnel) reach the client once each, in order."""
    later = tuple(f"<{i}>".encode() for i in range(50))

    async def main() -> None:
        parent = ScriptedParent(b"HTTP/1.1 200 OK\r\n\r\n<head>", then=later)
        async with parent:
            piped = await pipe(proxy_dialer(f"http://127.0.0.1:{parent.port}"))
            assert piped.dialled.leftover.startswith(b"<head>")
            loop = asyncio.get_running_loop()
            piped.sock.setblocking(False)
            want, got = b"<head>" + b"".join(later), b""
            async with asyncio.timeout(WAIT):
                while len(got) < len(want):
                    got += await loop.sock_recv(piped.sock, 65536)
            assert got == want
            piped.sock.close()
            await asyncio.wait_for(piped.closed, WAIT)

    run(main())


@pytest.mark.parametrize(
    ("answer", "close", "reason", "detail", "status"),
    [
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
            False,
            "parent_refused",
            "parent proxy answered 407 Proxy Authentication Required",
            502,
        ),
        (
            b"HTTP/1.0 403 Forbidden\r\nContent-Length: 5\r\n\r\ndeny!",
            False,
            "parent_refused",
            "parent proxy answered 403 Forbidden",
            502,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n", False, "parent_refused", "answered 100 Continue", 502),
        (b"HTTP/2 200\r\n\r\n", False, "parent_error", "malformed status line: HTTP/2 200", 502),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False, "parent_error", "not an HTTP/1.x response", 502),
        (
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD_SIZE + 10),
            False,
            "parent_error",
            "exceeds 16 KiB",
            502,
        ),
        (b"HTTP/1.1 200 OK\r\n", True, "parent_closed", "closed the connection before", 502),
        (b"", True, "parent_closed", "closed the connection before", 502),
        (None, False, "timeout", "did not answer CONNECT", 504),
    ],
)
def test_parent_refusals(
    answer: bytes | None, close: bool, reason: str, detail: str, status: int
) -> None:
    async def main() -> None:
        async with ScriptedParent(answer, close=close) as parent:
            dialer = proxy_dialer(f"http://127.0.0.1:{parent.port}", connect_timeout=0.3)
            pending = Pending()
            with pytest.raises(DialError) as info:
                await dialer.dial(CP_HOST, 443, pending)
            assert parent.requests[0].startswith(f"CONNECT {CP_TARGET} ".encode())
            assert b"Proxy-Authorization" not in parent.requests[0]
        assert (info.value.reason, info.value.status) == (reason, status)
        assert detail in info.value.detail
        assert pending.transport is None  # never handed over

    run(main())


def test_parent_is_asked_for_the_static_address_and_the_relay_does_no_dns() -> None:
    """A static entry decides what the parent is asked for; a name without one
    goes to the parent as is (the relay never resolves it, so an unresolvable
    name and a private-range check are the parent's business)."""

    async def main() -> None:
        async with ScriptedParent(b"HTTP/1.1 200 OK\r\n\r\n", close=True) as parent:
            dialer = HttpProxyDialer(
                http_proxy_settings(HttpProxyModel(url=f"http://127.0.0.1:{parent.port}")),
                Resolver({(CP_HOST, None): ("10.1.2.3", 8443)}, allow_private=False, cache_ttl=0),
            )
            for host in (CP_HOST, "konnect.example.invalid"):
                dialled = await dialer.dial(host, 443, Pending())
                dialled.transport.abort()
        assert [r.split(b"\r\n")[0] for r in parent.requests] == [
            b"CONNECT 10.1.2.3:8443 HTTP/1.1",
            b"CONNECT konnect.example.invalid:443 HTTP/1.1",
        ]

    run(main())


def test_parent_unreachable_names_the_parent() -> None:
    port = free_port()  # nothing listens there

    async def main() -> None:
        with pytest.raises(DialError) as info:
            await proxy_dialer(f"http://127.0.0.1:{port}").dial(CP_HOST, 443, Pending())
        assert info.value.reason == "refused"
        assert info.value.detail == f"connection refused by parent proxy 127.0.0.1:{port}"

    run(main())


# --- http_proxy over TLS to the parent -----------------------------------------------


class TLSParent:
    """A minimal CONNECT proxy behind TLS (an ``https://`` parent)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.port = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> TLSParent:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            host, _, port = head.split(b" ")[1].decode().rpartition(":")
            up_r, up_w = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

            async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.close()

            await asyncio.gather(copy(reader, up_w), copy(up_r, writer), return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()


@pytest.mark.parametrize(
    ("trust", "verify", "outcome"),
    [("ca_file", True, "ok"), ("system", True, "parent_tls"), ("system", False, "ok")],
)
def test_https_parent_verified_by_default(
    certs: Certs, fake_cp: FakeControlPlane, trust: str, verify: bool, outcome: str
) -> None:
    parent_cert = certs.ca.issue_cert("127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    parent_cert.configure_cert(ctx)

    async def main() -> None:
        async with TLSParent(ctx) as parent:
            dialer = proxy_dialer(
                f"https://127.0.0.1:{parent.port}",
                {CP_HOST: ("127.0.0.1", fake_cp.port)},
                ca_file=str(certs.ca_file) if trust == "ca_file" else None,
                verify=verify,
            )
            if outcome != "ok":
                with pytest.raises(DialError) as info:
                    await dialer.dial(CP_HOST, 443, Pending())
                assert info.value.reason == outcome
                assert "certificate verify failed" in info.value.detail
                return
            piped = await pipe(dialer)
            # TLS inside TLS: no half-close over an SSL transport (EOF closes the tunnel).
            assert piped.dialled.transport.can_write_eof() is False
            assert await whoami(piped, certs) == certs.client_sha256
            await asyncio.wait_for(piped.closed, WAIT)

    run(main())


# --- http_proxy against real parents -------------------------------------------------


@pytest.mark.parametrize("parent", ["mitmdump", "squid"])
def test_real_parent_carries_mtls(
    request: pytest.FixtureRequest, certs: Certs, fake_cp: FakeControlPlane, parent: str
) -> None:
    egress = make_egress(request, parent)
    url = egress.config["http_proxy"]["url"]

    async def main() -> None:
        dialer = proxy_dialer(url, {CP_HOST: ("127.0.0.1", fake_cp.port)})
        for _ in range(2):  # warm-up, so lazy allocations do not look like leaks
            piped = await pipe(dialer)
            assert await whoami(piped, certs) == certs.client_sha256
            await asyncio.wait_for(piped.closed, WAIT)
        fds, tasks = fd_count(), len(asyncio.all_tasks())
        for _ in range(5):
            piped = await pipe(dialer)
            assert await whoami(piped, certs) == certs.client_sha256
            await asyncio.wait_for(piped.closed, WAIT)
        await no_leak(fds, tasks)

    run(main())


def test_mitmdump_wrong_credentials_is_407(mitm: Mitmdump) -> None:
    async def main() -> None:
        dialer = proxy_dialer(mitm.url(password="wrong"), {CP_HOST: ("127.0.0.1", 9)})
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        assert (info.value.reason, info.value.status) == ("parent_refused", 502)
        assert info.value.detail == "parent proxy answered 407 Proxy Authentication Required"

    run(main())


# --- ssh ------------------------------------------------------------------------------


BASTIONS = ("sshd", "asyncssh")


def bastion_peer(request: pytest.FixtureRequest, name: str) -> Any:
    return request.getfixturevalue("sshd" if name == "sshd" else "asyncssh_bastion")


@dataclass
class Health:
    """What the dialer reported through on_state / on_reconnect."""

    states: list[bool] = field(default_factory=list)
    reconnects: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_state(self, up: bool) -> None:
        self.states.append(up)
        self.changed.set()

    def on_reconnect(self) -> None:
        self.reconnects += 1

    async def wait_for(self, up: bool) -> None:
        async with asyncio.timeout(WAIT * 3):
            while not self.states or self.states[-1] is not up:
                self.changed.clear()
                await self.changed.wait()


def ssh_dialer(
    peer: Any,
    static: dict[str, tuple[str, int]] | None = None,
    allow_private: bool = True,
    health: Health | None = None,
    **model: Any,
) -> SSHDialer:
    dialer = SSHDialer(
        ssh_settings(SSHModel(**peer.egress(**model))),
        resolver(static, allow_private),
        on_state=health.on_state if health else None,
        on_reconnect=health.on_reconnect if health else None,
    )
    _dialers.append(dialer)
    return dialer


@pytest.mark.parametrize("resolve", ["remote", "local"])
@pytest.mark.parametrize("name", BASTIONS)
def test_ssh_channel_carries_mtls(
    request: pytest.FixtureRequest,
    certs: Certs,
    fake_cp: FakeControlPlane,
    name: str,
    resolve: str,
) -> None:
    peer = bastion_peer(request, name)

    async def main() -> None:
        health = Health()
        dialer = ssh_dialer(
            peer, {CP_HOST: ("127.0.0.1", fake_cp.port)}, health=health, resolve=resolve
        )
        await dialer.start()
        assert dialer.connected and health.states == [False, True]
        for _ in range(3):
            piped = await pipe(dialer)
            assert piped.dialled.peer == (
                f"127.0.0.1:{fake_cp.port} via ssh {peer.user}@127.0.0.1:{peer.port}"
            )
            assert piped.dialled.transport.can_write_eof()
            assert await whoami(piped, certs) == certs.client_sha256
            tunnel = await asyncio.wait_for(piped.closed, WAIT)
            assert tunnel.close_reason in ("client_eof", "upstream_eof")
        assert dialer.active == 0
        await dialer.close()
        assert health.states[-1] is False and health.reconnects == 0

    run(main())


def test_ssh_dial_waits_for_the_connection_attempt_in_progress(
    request: pytest.FixtureRequest, certs: Certs, fake_cp: FakeControlPlane
) -> None:
    """A request that arrives while the bastion connection is still being set
    up (right after start, or during a reconnect) waits for that attempt
    instead of getting 502 egress_down at once."""
    peer = bastion_peer(request, "asyncssh")

    async def main() -> None:
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", fake_cp.port)})
        starting = asyncio.ensure_future(dialer.start())
        await asyncio.sleep(0)  # the attempt has begun; nothing is connected yet
        assert not dialer.connected
        piped = await pipe(dialer)
        assert await whoami(piped, certs) == certs.client_sha256
        await asyncio.wait_for(piped.closed, WAIT)
        await starting

    run(main())


def test_ssh_resolve_local_applies_address_checks(
    request: pytest.FixtureRequest, fake_cp: FakeControlPlane
) -> None:
    """resolve: local checks the address before asking the bastion; remote
    leaves the name to the bastion (which reaches what it can reach)."""
    peer = bastion_peer(request, "asyncssh")
    static = {CP_HOST: ("127.0.0.1", fake_cp.port)}

    async def main() -> None:
        local = ssh_dialer(peer, static, allow_private=False, resolve="local")
        remote = ssh_dialer(peer, static, allow_private=False, resolve="remote")
        await local.start()
        await remote.start()
        with pytest.raises(DialError) as info:
            await local.dial(CP_HOST, 443, Pending())
        assert (info.value.reason, info.value.status) == ("private_address", 403)
        assert local.active == 0
        dialled = await remote.dial(CP_HOST, 443, Pending())
        dialled.transport.close()
        await local.close()
        await remote.close()

    run(main())


def test_ssh_max_channels(request: pytest.FixtureRequest, fake_cp: FakeControlPlane) -> None:
    peer = bastion_peer(request, "sshd")

    async def main() -> None:
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", fake_cp.port)}, max_channels=2)
        await dialer.start()
        first, second = await pipe(dialer), await pipe(dialer)
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        assert (info.value.reason, info.value.status) == ("egress_busy", 503)
        assert "max_channels: 2" in info.value.detail
        first.sock.close()
        await asyncio.wait_for(first.closed, WAIT)
        third = await pipe(dialer)
        for piped in (second, third):
            piped.sock.close()
            await asyncio.wait_for(piped.closed, WAIT)
        assert dialer.active == 0
        await dialer.close()

    run(main())


def test_ssh_channel_open_failure_is_a_502(request: pytest.FixtureRequest) -> None:
    peer = bastion_peer(request, "sshd")
    port = free_port()  # nothing listens there

    async def main() -> None:
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", port)})
        await dialer.start()
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        assert info.value.status == 502
        assert info.value.detail.startswith(
            f"SSH bastion {peer.user}@127.0.0.1:{peer.port} could not connect to 127.0.0.1:{port}"
        )
        assert dialer.active == 0
        await dialer.close()

    run(main())


def test_ssh_cancelled_dial_leaves_no_channel(
    request: pytest.FixtureRequest, fake_cp: FakeControlPlane
) -> None:
    """A dial cancelled while the channel opens (client gone, connect timeout):
    the channel that opens after all is closed, its count given back."""
    peer = bastion_peer(request, "asyncssh")

    class Watch(Pending):
        def __init__(self) -> None:
            super().__init__()
            self.gone: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.gone.set_result(exc)

    async def main() -> None:
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", fake_cp.port)})
        await dialer.start()
        watch = Watch()
        task = asyncio.get_running_loop().create_task(dialer.dial(CP_HOST, 443, watch))
        await asyncio.sleep(0)  # the open request is on the wire
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(watch.gone, WAIT) is None
        assert dialer.active == 0
        await dialer.close()

    run(main())


def test_ssh_not_connected(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    peer = bastion_peer(request, "asyncssh")
    closed_port = free_port()

    async def main() -> None:
        dialer = ssh_dialer(peer)
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        assert (info.value.reason, info.value.status) == ("egress_down", 502)
        assert info.value.detail == (
            f"SSH bastion relay@127.0.0.1:{peer.port} is not connected: not connected yet"
        )
        down = ssh_dialer(peer, port=closed_port)
        await down.start()
        with pytest.raises(DialError) as info:
            await down.dial(CP_HOST, 443, Pending())
        assert info.value.reason == "egress_down"
        assert info.value.detail.endswith("is not connected: Connection refused")
        await down.close()

    run(main())


@pytest.mark.parametrize("name", BASTIONS)
def test_ssh_wrong_host_key_refused(
    request: pytest.FixtureRequest, tmp_path: Path, name: str
) -> None:
    peer = bastion_peer(request, name)
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{peer.port} {other}")

    async def main() -> None:
        health = Health()
        dialer = ssh_dialer(peer, health=health, known_hosts=str(known))
        await dialer.start()
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        await dialer.close()
        assert info.value.reason == "egress_down"
        assert f"host key of 127.0.0.1:{peer.port} is not trusted by known_hosts {known}" in (
            info.value.detail
        )
        assert True not in health.states

    run(main())


def test_ssh_known_hosts_is_required(request: pytest.FixtureRequest) -> None:
    peer = bastion_peer(request, "asyncssh")
    with pytest.raises(ValueError, match="known_hosts"):
        SSHModel(**{**peer.egress(), "known_hosts": ""})


@pytest.mark.parametrize("name", BASTIONS)
def test_ssh_connection_lost_and_recovered(
    loop_thread: LoopThread, tmp_path: Path, certs: Certs, fake_cp: FakeControlPlane, name: str
) -> None:
    """Kill the bastion under a live tunnel: the tunnel's upstream sees
    EgressLost, new dials get egress_down, the dialer reconnects with backoff
    once the bastion is back, reports it, and leaks no fd or task."""
    peer: Any = Sshd(tmp_path) if name == "sshd" else AsyncsshBastion(loop_thread, tmp_path)
    peer.start()

    class Watch(Pending):
        lost_with: asyncio.Future[Exception | None]

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost_with.set_result(exc)

    async def main() -> None:
        health = Health()
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", fake_cp.port)}, health=health)
        await dialer.start()
        piped = await pipe(dialer)
        assert await whoami(piped, certs) == certs.client_sha256
        await asyncio.wait_for(piped.closed, WAIT)
        fds, tasks = fd_count(), len(asyncio.all_tasks())

        live = await pipe(dialer)
        watch = Watch()
        watch.lost_with = asyncio.get_running_loop().create_future()
        idle = await dialer.dial(CP_HOST, 443, watch)
        peer.kill()
        tunnel = await asyncio.wait_for(live.closed, WAIT)
        assert tunnel.close_reason == "egress_lost"
        lost = await asyncio.wait_for(watch.lost_with, WAIT)
        assert isinstance(lost, EgressLost)
        assert str(lost).startswith(f"SSH connection to {peer.user}@127.0.0.1:{peer.port} lost")
        await health.wait_for(False)
        with pytest.raises(DialError) as info:
            await dialer.dial(CP_HOST, 443, Pending())
        assert info.value.reason == "egress_down"
        assert dialer.active == 0
        idle.transport.abort()  # harmless on a channel that is already gone
        live.sock.close()

        await asyncio.to_thread(peer.start)
        await health.wait_for(True)
        assert health.states == [False, True, False, True] and health.reconnects == 1
        piped = await pipe(dialer)
        assert await whoami(piped, certs) == certs.client_sha256
        await asyncio.wait_for(piped.closed, WAIT)
        await no_leak(fds, tasks)
        await dialer.close()

    try:
        run(main())
    finally:
        peer.stop()


@pytest.mark.parametrize("direction", ["upstream", "downstream", "slow_reader"])
def test_ssh_flow_control_is_bounded(request: pytest.FixtureRequest, direction: str) -> None:
    """A peer that stops reading, or a client that reads slowly: the SSH
    window and pause/resume hold what the relay buffers for a tunnel to one
    window in asyncssh plus a high-water mark and one window in the client
    transport, however many pause/resume cycles there are."""
    peer = bastion_peer(request, "sshd")
    release, blocked, sent = threading.Event(), threading.Event(), [0]
    if direction == "upstream":

        def handler(conn: socket.socket) -> None:
            release.wait(WAIT * 3)

    else:
        handler = flooder(release, blocked, sent)
    bound = 2 * CHANNEL_WINDOW + HIGH_WATER

    async def flood_until_stalled(sock: socket.socket) -> int:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        total, chunk = 0, b"u" * 65536
        while total < 512 * 1024 * 1024:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), 0.5)
            except TimeoutError:
                return total
            total += len(chunk)
        raise AssertionError("the relay kept reading from the client")

    async def main(port: int) -> None:
        dialer = ssh_dialer(peer, {CP_HOST: ("127.0.0.1", port)})
        await dialer.start()
        piped = await pipe(dialer, sockbuf=16384 if direction == "slow_reader" else None)
        upstream = piped.dialled.transport
        chan = upstream._chan  # type: ignore[attr-defined]

        def held() -> int:
            return sum(len(d) for d, _ in chan._recv_buf) + piped.client.get_write_buffer_size()

        if direction == "upstream":
            await flood_until_stalled(piped.sock)
            assert not piped.client.is_reading()
            # One high-water mark plus what one read of the client delivered.
            assert upstream.get_write_buffer_size() <= 2 * HIGH_WATER
        elif direction == "downstream":
            # The test never reads: the client transport fills, the tunnel
            # pauses the channel, asyncssh holds at most one window and the
            # bastion, then the destination, must stop.
            assert await asyncio.to_thread(blocked.wait, WAIT * 2)
            assert sent[0] < 512 * 1024 * 1024
            assert chan._recv_paused is True
            assert sum(len(d) for d, _ in chan._recv_buf) <= CHANNEL_WINDOW
            assert held() <= bound
        else:
            # Reading 16 KiB every 2 ms (8 MB/s at most) is slower than the
            # bastion sends: the tunnel pauses and resumes the channel over
            # and over, and what it holds must not grow with each cycle.
            loop = asyncio.get_running_loop()
            piped.sock.setblocking(False)
            total, worst, in_asyncssh = 0, 0, 0
            async with asyncio.timeout(WAIT * 3):
                while total < 16 * 1024 * 1024:
                    data = await loop.sock_recv(piped.sock, 16384)
                    assert data
                    total += len(data)
                    worst = max(worst, held())
                    in_asyncssh = max(in_asyncssh, sum(len(d) for d, _ in chan._recv_buf))
                    await asyncio.sleep(0.002)
            assert HIGH_WATER < worst <= bound, worst
            assert in_asyncssh <= CHANNEL_WINDOW, in_asyncssh
        release.set()
        piped.sock.close()
        await asyncio.wait_for(piped.closed, WAIT)

    with tcp_peer(handler) as (port, _):
        try:
            run(main(port))
        finally:
            release.set()


# === 3. the relay as a subprocess: the same tunnel tests through every egress =========


def test_curl_mtls_fingerprints(
    start_relay: Callable[..., RelayProcess],
    certs: Certs,
    fake_cp: FakeControlPlane,
    egress: Egress,
) -> None:
    relay = start_via(start_relay, egress, fake_cp.port)
    seen_before = len(fake_cp.seen)
    out = curl_whoami(certs, "--fail", "--proxy", relay.proxy_url, check=True)
    assert json.loads(out.stdout)["client_cert_sha256"] == certs.client_sha256
    assert fake_cp.seen[seen_before:] == [certs.client_sha256]
    established(relay, egress)
    closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["egress"] == egress.mode
    assert closed["bytes_up"] > 0 and closed["bytes_down"] > 0


def test_websocket_session(
    start_relay: Callable[..., RelayProcess],
    certs: Certs,
    fake_cp: FakeControlPlane,
    egress: Egress,
) -> None:
    from websockets.asyncio.client import connect

    relay = start_via(start_relay, egress, fake_cp.port)

    async def session() -> list[str]:
        replies = []
        async with connect(
            f"wss://{CP_HOST}/v1/outlet",
            proxy=relay.proxy_url,
            ssl=certs.client_context(),
            ping_interval=0.05,
            open_timeout=WAIT,
        ) as ws:
            for i in range(5):
                await ws.send(f"ping-{i}")
                replies.append(await asyncio.wait_for(ws.recv(), WAIT))
            assert await asyncio.wait_for(await ws.ping(), WAIT) >= 0
        return replies

    assert asyncio.run(session()) == [f"{certs.client_sha256}:ping-{i}" for i in range(5)]
    established(relay, egress)


# Parents that end both directions of a CONNECT tunnel when the client ends
# its own: the relay forwards the EOF, they do the rest. (Seen with squid 5.7
# and mitmproxy 11 in TLS-passthrough mode.)
HALF_CLOSE_BROKEN = {
    "mitmdump": "mitmdump (ignore_hosts passthrough) closes both directions on the client's EOF",
    "squid": "squid closes both directions of a CONNECT tunnel on the client's EOF",
}


def test_half_close_client_first(
    request: pytest.FixtureRequest, start_relay: Callable[..., RelayProcess], egress: Egress
) -> None:
    """Client sends, then EOF; the destination answers after reading EOF."""
    if egress.id in HALF_CLOSE_BROKEN:
        request.applymarker(pytest.mark.xfail(reason=HALF_CLOSE_BROKEN[egress.id], strict=True))

    def upper_after_eof(conn: socket.socket) -> None:
        conn.sendall(recv_all(conn).upper())

    with tcp_peer(upper_after_eof) as (port, _):
        relay = start_via(start_relay, egress, port)
        sock = open_tunnel(relay)
        with sock:
            sock.sendall(b"hello" * 1000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"HELLO" * 1000
        established(relay, egress)
        closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
    assert closed["reason"] == "client_eof"
    assert closed["bytes_up"] == 5000 and closed["bytes_down"] == 5000


def test_stalled_destination_bounds_memory(
    start_relay: Callable[..., RelayProcess], fresh_egress: Egress
) -> None:
    """The destination never reads while the client floods: backpressure
    reaches the client through the egress, the relay's RSS stays flat."""
    egress = fresh_egress
    release = threading.Event()

    with tcp_peer(lambda conn: release.wait(WAIT * 3)) as (port, _):
        relay = start_via(start_relay, egress, port)
        sock = open_tunnel(relay)
        established(relay, egress)
        rss_before = relay.rss_kib()
        sent, limit, chunk = 0, 512 * 1024 * 1024, b"x" * 65536
        sock.setblocking(False)
        while sent < limit:
            if not select.select([], [sock], [], 0.5)[1]:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                continue
        rss_after = relay.rss_kib()
        release.set()
        sock.close()
    assert sent < limit, "the relay kept reading from the client"
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after, sent)


def flooder(
    release: threading.Event, blocked: threading.Event, sent: list[int]
) -> Callable[[socket.socket], None]:
    """A destination that sends until its socket stays unwritable for 0.5 s
    (backpressure reached it: ``blocked``) or it has sent 512 MiB."""

    def flood(conn: socket.socket) -> None:
        conn.setblocking(False)
        chunk = b"y" * 65536
        while not release.is_set() and sent[0] < 512 * 1024 * 1024:
            if not select.select([], [conn], [], 0.5)[1]:
                blocked.set()
                release.wait(WAIT * 3)
                return
            try:
                sent[0] += conn.send(chunk)
            except BlockingIOError:
                continue
        blocked.set()

    return flood


def test_stalled_client_bounds_memory(
    start_relay: Callable[..., RelayProcess], fresh_egress: Egress
) -> None:
    """The destination floods while the client never reads: the relay stops
    reading its egress (for SSH: stops opening the channel window)."""
    egress = fresh_egress
    release, blocked, sent = threading.Event(), threading.Event(), [0]
    with tcp_peer(flooder(release, blocked, sent)) as (port, _):
        relay = start_via(start_relay, egress, port)
        rss_before = relay.rss_kib()
        sock, head = connect_via(relay, RAW_TARGET)  # the flood may follow the head at once
        assert head.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n"), head[:200]
        established(relay, egress)
        with sock:
            assert blocked.wait(WAIT * 2)
            rss_after = relay.rss_kib()
            release.set()
    assert sent[0] < 512 * 1024 * 1024, "the relay kept reading from the destination"
    assert rss_after - rss_before < 8 * 1024, (rss_before, rss_after, sent[0])


def test_clienthello_in_the_connect_packet(
    start_relay: Callable[..., RelayProcess],
    certs: Certs,
    fake_cp: FakeControlPlane,
    egress: Egress,
) -> None:
    """The ClientHello rides in the CONNECT packet; it must reach the control
    plane through the egress unchanged (the handshake completes)."""
    relay = start_via(start_relay, egress, fake_cp.port)
    ctx = certs.client_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=CP_HOST)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock, head = connect_via(relay, CP_TARGET, extra=outgoing.read())
    with sock:
        status, _, rest = head.partition(b"\r\n\r\n")
        assert status == b"HTTP/1.1 200 Connection established"
        incoming.write(rest)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                data = sock.recv(65536)
                assert data, "relay closed during handshake"
                incoming.write(data)
        tls.write(f"GET /whoami HTTP/1.1\r\nHost: {CP_HOST}\r\nConnection: close\r\n\r\n".encode())
        sock.sendall(outgoing.read())
        body = b""
        while b"client_cert_sha256" not in body:
            data = sock.recv(65536)
            assert data
            incoming.write(data)
            try:
                body += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    assert certs.client_sha256.encode() in body
    established(relay, egress)


# --- faults, end to end -----------------------------------------------------------------


def wait_metric(relay: RelayProcess, name: str, value: float, timeout: float = WAIT * 3) -> None:
    """Poll the relay's /metrics until ``name`` reads ``value`` (bounded)."""
    tick = threading.Event()
    for _ in range(int(timeout / 0.1)):
        if relay.metrics().get(name) == value:
            return
        tick.wait(0.1)
    raise AssertionError(f"{name} != {value}: {relay.metrics().get(name)}")


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def echo_roundtrip(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


@pytest.mark.parametrize("name", ["mitmdump", "squid"])
def test_parent_killed_mid_tunnel_recovers(
    start_relay: Callable[..., RelayProcess], tmp_path: Path, name: str
) -> None:
    parent: Any = Mitmdump(tmp_path / "conf") if name == "mitmdump" else Squid()
    parent.start()
    try:
        url = parent.url()
        egress = Egress(name, "http_proxy", {"mode": "http_proxy", "http_proxy": {"url": url}})
        with tcp_peer(echo) as (port, _):
            relay = start_via(start_relay, egress, port)
            sock = open_tunnel(relay)
            echo_roundtrip(sock)
            sock.close()
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            fds = relay.open_fds()

            live = open_tunnel(relay)
            echo_roundtrip(live)
            established(relay, egress)
            parent.kill()
            assert recv_all(live) == b""  # the live tunnel ends with its parent
            live.close()
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert closed["reason"] in ("upstream_eof", "upstream_reset", "error")
            refused, head = connect_via(relay, RAW_TARGET)
            with refused:
                reply = head + recv_all(refused)
            assert reply.startswith(b"HTTP/1.1 502 ")
            assert f"parent proxy 127.0.0.1:{parent.port}".encode() in reply

            parent.start()
            again = open_tunnel(relay)
            echo_roundtrip(again, b"after restart")
            again.close()
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert relay.open_fds() == fds
    finally:
        parent.cleanup()


@pytest.mark.parametrize("name", BASTIONS)
def test_bastion_killed_mid_tunnel_recovers(
    start_relay: Callable[..., RelayProcess],
    loop_thread: LoopThread,
    tmp_path: Path,
    name: str,
) -> None:
    peer: Any = Sshd(tmp_path) if name == "sshd" else AsyncsshBastion(loop_thread, tmp_path)
    peer.start()
    up, reconnects = (
        'konnect_relay_egress_up{egress="ssh"}',
        ('konnect_relay_egress_reconnects_total{egress="ssh"}'),
    )
    try:
        egress = Egress(name, "ssh", {"mode": "ssh", "ssh": peer.egress()})
        with tcp_peer(echo) as (port, _):
            relay = start_via(start_relay, egress, port)
            assert relay.metrics()[up] == 1
            sock = open_tunnel(relay)
            echo_roundtrip(sock)
            sock.close()
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            fds = relay.open_fds()

            live = open_tunnel(relay)
            echo_roundtrip(live)
            established(relay, egress)
            peer.kill()
            assert recv_all(live) == b""
            live.close()
            closed = relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert closed["reason"] == "egress_lost"
            wait_metric(relay, up, 0)
            refused, head = connect_via(relay, RAW_TARGET)
            with refused:
                reply = head + recv_all(refused)
            assert reply.startswith(b"HTTP/1.1 502 ")
            assert f"SSH bastion {peer.user}@127.0.0.1:{peer.port} is not connected".encode() in (
                reply
            )

            peer.start()
            wait_metric(relay, up, 1)
            assert relay.metrics()[reconnects] == 1
            again = open_tunnel(relay)
            echo_roundtrip(again, b"after restart")
            again.close()
            relay.wait_event(lambda e: e["event"] == "tunnel_closed")
            assert relay.open_fds() == fds
    finally:
        peer.stop()


def test_wrong_parent_credentials_502(
    start_relay: Callable[..., RelayProcess], mitm: Mitmdump
) -> None:
    egress = Egress(
        "mitmdump",
        "http_proxy",
        {"mode": "http_proxy", "http_proxy": {"url": mitm.url(password="wrong")}},
    )
    relay = start_via(start_relay, egress, free_port())
    sock, head = connect_via(relay, RAW_TARGET)
    with sock:
        reply = head + recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert reply.endswith(b"parent proxy answered 407 Proxy Authentication Required\n")
    event = relay.wait_event(lambda e: e["event"] == "request")
    assert event["reason"] == "parent_refused" and event["status"] == 502


@pytest.mark.parametrize("name", BASTIONS)
def test_wrong_host_key_502(
    request: pytest.FixtureRequest,
    start_relay: Callable[..., RelayProcess],
    tmp_path: Path,
    name: str,
) -> None:
    peer = bastion_peer(request, name)
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{peer.port} {other}")
    egress = Egress(name, "ssh", {"mode": "ssh", "ssh": peer.egress(known_hosts=str(known))})
    relay = start_via(start_relay, egress, free_port())
    assert relay.metrics()['konnect_relay_egress_up{egress="ssh"}'] == 0
    sock, head = connect_via(relay, RAW_TARGET)
    with sock:
        reply = head + recv_all(sock)
    assert reply.startswith(b"HTTP/1.1 502 ")
    assert b"is not connected: host key of 127.0.0.1:" in reply
    assert f"is not trusted by known_hosts {known}".encode() in reply
