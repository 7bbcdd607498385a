"""SSH-bastion egress: one long-lived SSH connection, a direct-tcpip channel per tunnel.

Where the only way out of a restricted network is an SSH bastion in a DMZ, the
relay keeps one authenticated SSH connection to it (asyncssh) and opens a
``direct-tcpip`` channel (RFC 4254 §7.2) for every tunnel. The bastion's host
key is always checked against ``known_hosts``: there is no "accept any key".

The connection is owned by a background task started by ``start()``: it
connects, waits for the connection to end, and reconnects with exponential
backoff and full jitter capped at 30 s. While an attempt is in progress
``dial`` waits for it (within the caller's connect deadline); between attempts
it refuses at once (``egress_down``, with the last error). When the connection
drops, every tunnel on it sees ``connection_lost(EgressLost(...))`` and closes
with reason ``egress_lost``.

Two small adapters let the tunnel pump (tunnel.py) run over a channel without
knowing it: ``ChannelSession`` is the asyncssh session that forwards channel
events to whatever asyncio protocol is current (first the server's Pending,
then the tunnel's side), and ``ChannelTransport`` makes the channel look like
an ``asyncio.Transport``. Flow control is end to end: the tunnel's
``pause_reading`` stops asyncssh from delivering data and from opening the SSH
window, so the bastion stops sending; the channel's send buffer reports
``pause_writing`` past the tunnel's high-water mark, so the tunnel stops
reading the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any, cast

import asyncssh

from relay.egress import Dialer, DialError, Dialled, SSHSettings
from relay.hostport import hostport
from relay.resolver import ResolveError, Resolver, static_target
from relay.tasks import TaskSet

# The cap on the reconnect delay.
BACKOFF_CAP = 30.0
# First reconnect delays are drawn from [0, 0.5 s): a restarted bastion is
# usually back within a second, and Kong retries a failed tunnel after 5-10 s.
BACKOFF_BASE = 0.5
# A connection that lived this long resets the backoff; one that drops sooner
# (a bastion that accepts and then closes) keeps backing off.
STABLE_AFTER = 30.0
# start() waits this long for the first connection attempt to settle, so a
# relay with a reachable bastion is ready as soon as it listens, and a
# black-holed bastion does not hold up startup.
STARTUP_WAIT = 3.0
# SSH receive window per channel (RFC 4254 §5.2). While the tunnel has paused
# reading, asyncssh holds at most this much and then the bastion must stop, so
# a tunnel holds at most one window here plus the client's high-water mark and
# one window in the client transport (see ChannelTransport.resume_reading).
# The cost is throughput: one window per round trip, ~5 MB/s per channel over
# a 50 ms path, far above what Konnect's config sync and telemetry need.
CHANNEL_WINDOW = 256 * 1024
# close() waits this long for the SSH connection to say goodbye.
CLOSE_WAIT = 2.0


def backoff_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Full jitter ("Exponential Backoff And Jitter", AWS Architecture Blog,
    2015): uniform in [0, min(cap, base * 2**attempt)), so a fleet of relays
    that lost the same bastion does not reconnect in lockstep."""
    return rand() * min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(attempt, 16))


class EgressLost(ConnectionError):
    """The SSH connection that carried a tunnel's channel was lost."""

    close_reason = "egress_lost"


class ChannelTransport(asyncio.Transport):
    """An SSH channel seen as an ``asyncio.Transport`` by the tunnel pump."""

    __slots__ = ("_chan", "_closing", "_flushing", "_paused", "_session")

    def __init__(self, chan: asyncssh.SSHTCPChannel[bytes], session: ChannelSession) -> None:
        super().__init__()
        self._chan = chan
        self._session = session
        # asyncio's meaning: close() or abort() was called, or the channel is
        # gone. (The channel's own is_closing() is also true after write_eof,
        # which would make the tunnel skip the close of a half-closed channel.)
        self._closing = False
        self._paused = False
        self._flushing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:  # noqa: SIM105 - hot path: contextlib.suppress costs more per call
            self._chan.write(bytes(data) if not isinstance(data, bytes) else data)
        except BrokenPipeError:
            pass  # like an asyncio transport, a write after close is dropped

    def write_eof(self) -> None:
        self._chan.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._closing = True
        self._chan.close()

    def abort(self) -> None:
        self._closing = True
        self._chan.abort()

    def is_closing(self) -> bool:
        return self._closing

    def channel_gone(self) -> None:
        """The session saw the channel close."""
        self._closing = True

    def pause_reading(self) -> None:
        self._paused = True
        if not self._flushing:
            self._chan.pause_reading()

    def resume_reading(self) -> None:
        """asyncssh delivers what it held back from inside this call, and
        reopens the SSH window as soon as it delivers the first of it: credit
        for everything received, delivered or not. A pause in the middle of
        that delivery would leave the rest held while the bastion may send a
        whole window more, and every slow-reader cycle would add to the pile.
        So a pause during the delivery waits until asyncssh holds nothing:
        then at most one window waits in asyncssh and at most one more in the
        peer transport's buffer above its high-water mark."""
        self._paused = False
        self._flushing = True
        try:
            self._chan.resume_reading()
        finally:
            self._flushing = False
        if self._paused:
            self._chan.pause_reading()

    def is_reading(self) -> bool:
        return not (self._paused or self._closing)

    def get_write_buffer_size(self) -> int:
        return self._chan.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._chan.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._chan.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._session.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._session.protocol


class ChannelSession(asyncssh.SSHTCPSession[bytes]):
    """Forwards a channel's events to the current asyncio protocol."""

    __slots__ = ("dialer", "ended", "link", "protocol", "transport")

    def __init__(self, dialer: SSHDialer, link: _Link, protocol: asyncio.Protocol) -> None:
        self.dialer = dialer
        self.link = link
        self.protocol = protocol
        self.transport: ChannelTransport | None = None
        self.ended = False

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.transport = ChannelTransport(chan, self)
        self.link.sessions.add(self)
        self.protocol.connection_made(self.transport)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool:
        if not self.protocol.eof_received() and self.transport is not None:
            self.transport.close()  # asyncio's meaning of a falsy answer
        return True  # never let asyncssh send an EOF of its own

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.transport is not None:
            self.transport.channel_gone()
        link = self.link
        link.sessions.discard(self)
        self.dialer.active -= 1
        # A channel that ends on its own ends with None; one torn down with
        # its SSH connection gets that connection's error (or None when the
        # relay itself closed the connection, which ``link.closing`` marks).
        if exc is not None or link.closing:
            exc = EgressLost(f"SSH connection to {self.dialer.who} lost: {exc or 'closed'}")
        self.protocol.connection_lost(exc)


class _Link:
    """One SSH connection and the channels on it."""

    __slots__ = ("closing", "conn", "error", "sessions")

    def __init__(self) -> None:
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sessions: set[ChannelSession] = set()
        self.closing = False
        self.error: Exception | None = None


class _Client(asyncssh.SSHClient):
    """Records why the connection ended."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.error = exc


class SSHDialer(Dialer):
    """Reaches destinations through direct-tcpip channels of an SSH bastion."""

    name = "ssh"

    def __init__(
        self,
        model: SSHSettings,
        resolver: Resolver,
        on_state: Callable[[bool], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.resolver = resolver
        self.on_state = on_state
        self.on_reconnect = on_reconnect
        self.who = f"{model.username}@{model.host}:{model.port}"
        self.active = 0  # channels open or being opened
        self.last_error = "not connected yet"
        self.link: _Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()
        self._opening = TaskSet()  # the connection task and channel opens
        self._closed = False
        # Set while a connection attempt is in progress; done once it settled.
        self._attempt: asyncio.Future[None] | None = None

    @property
    def connected(self) -> bool:
        return self.link is not None

    # --- the long-lived connection ---------------------------------------------

    async def start(self) -> None:
        """Start the connection task; wait (briefly) for its first attempt."""
        if self._task is not None or self._closed:
            return
        self._report(False)
        self._attempt = asyncio.get_running_loop().create_future()  # the first one
        self._task = self._opening.spawn(self._run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(STARTUP_WAIT, self.model.connect_timeout)):
                await self._settled.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        connected_before = False
        while not self._closed:
            link = _Link()
            if self._attempt is None or self._attempt.done():
                self._attempt = loop.create_future()
            try:
                link.conn = await self._connect(link)
            except Exception as exc:
                self.last_error = describe(exc, self.model)
                self._settled.set()
                self._attempt.set_result(None)
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1
                continue
            self.link = link
            self.last_error = ""
            self._settled.set()
            self._attempt.set_result(None)
            if connected_before and self.on_reconnect is not None:
                self.on_reconnect()
            connected_before = True
            self._report(True)
            up_since = loop.time()
            try:
                await link.conn.wait_closed()
            finally:
                self.link = None
                self._report(False)
            # asyncssh ends every channel with its connection; should one have
            # been missed, its tunnel must not wait for a keepalive to notice.
            for session in list(link.sessions):
                session.connection_lost(ConnectionAbortedError("SSH connection closed"))
            self.last_error = describe(link.error, self.model) if link.error else "closed"
            if loop.time() - up_since >= STABLE_AFTER:
                attempt = 0
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    async def _connect(self, link: _Link) -> asyncssh.SSHClientConnection:
        m = self.model
        conn, _ = await asyncssh.create_connection(
            lambda: _Client(link),
            m.host,
            m.port,
            username=m.username,
            known_hosts=m.known_hosts,
            # a list: asyncssh reads a tuple as (key, certificate); () loads the defaults
            client_keys=list(m.client_keys) or (),
            keepalive_interval=m.keepalive_interval,
            connect_timeout=m.connect_timeout,
            config=None,  # no ~/.ssh/config: the relay's config says everything
        )
        return conn

    def _report(self, up: bool) -> None:
        if self.on_state is not None:
            self.on_state(up)

    async def close(self) -> None:
        self._closed = True
        # Taken before the task is cancelled: its cleanup forgets the link.
        link, self.link = self.link, None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(None)  # dials waiting for it see egress_down
        for opening in list(self._opening):
            opening.cancel()
        if link is not None and link.conn is not None:
            link.closing = True
            link.conn.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await link.conn.wait_closed()

    # --- channels --------------------------------------------------------------

    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        link = self.link
        attempt = self._attempt
        if link is None and attempt is not None and not attempt.done():
            # Right after start or during a reconnect: wait for the attempt in
            # progress (the caller's connect deadline bounds the wait) rather
            # than refuse a request the bastion is about to carry.
            await asyncio.shield(attempt)
            link = self.link
        if link is None or link.conn is None:
            raise DialError(
                "egress_down", f"SSH bastion {self.who} is not connected: {self.last_error}"
            )
        if self.active >= self.model.max_channels:
            raise DialError(
                "egress_busy",
                f"SSH bastion {self.who} carries {self.active} channels "
                f"(egress.ssh.max_channels: {self.model.max_channels})",
                503,
            )
        if self.model.resolve == "local":
            try:
                endpoints = await self.resolver.resolve(host, port)
            except ResolveError as exc:
                raise DialError(exc.reason, exc.detail, exc.status) from None
            targets = [(e.address, e.port, str(e), e.would_deny) for e in endpoints]
        else:
            h, p = static_target(self.resolver.static, host, port) or (host, port)
            targets = [(h, p, hostport(h, p), "")]
        failures: list[DialError] = []
        for h, p, where, would_deny in targets:
            try:
                session = await self._open(link, h, p, where, protocol)
            except DialError as exc:
                if exc.reason == "egress_down":
                    raise
                failures.append(exc)
                continue
            assert session.transport is not None
            return Dialled(session.transport, f"{where} via ssh {self.who}", would_deny=would_deny)
        raise DialError(failures[0].reason, "; ".join(f.detail for f in failures))

    async def _open(
        self, link: _Link, host: str, port: int, where: str, protocol: asyncio.Protocol
    ) -> ChannelSession:
        """One direct-tcpip channel. The open runs in a task of its own so a
        cancelled dial (client gone, connect timeout) cannot leave a channel
        open: a channel that opens after all is aborted at once."""
        conn = link.conn
        assert conn is not None
        self.active += 1
        task = self._opening.spawn(
            conn.create_connection(
                lambda: ChannelSession(self, link, protocol), host, port, window=CHANNEL_WINDOW
            )
        )
        try:
            _chan, session = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abandon)
            raise
        except asyncssh.ChannelOpenError as exc:
            self.active -= 1
            if conn.is_closed():
                raise DialError(
                    "egress_down", f"SSH bastion {self.who} is not connected: {exc.reason}"
                ) from None
            raise channel_error(exc, self.who, where) from None
        except BaseException:
            self.active -= 1
            raise
        return cast(ChannelSession, session)

    def _abandon(self, task: asyncio.Task[Any]) -> None:
        """Done callback of an open whose dial was cancelled."""
        if task.cancelled() or task.exception() is not None:
            self.active -= 1
            return
        chan, _session = task.result()
        chan.abort()  # the session's connection_lost gives the count back


def channel_error(exc: asyncssh.ChannelOpenError, who: str, where: str) -> DialError:
    """RFC 4254 §5.1 open-failure codes as bounded reasons."""
    text = exc.reason or "no reason given"
    low = text.lower()
    if exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED:
        reason = "egress_prohibited"
    elif exc.code == asyncssh.OPEN_RESOURCE_SHORTAGE:
        reason = "egress_busy"
    elif "refused" in low:
        reason = "refused"
    elif "timed out" in low or "timeout" in low:
        reason = "timeout"
    elif "unreachable" in low or "no route" in low:
        reason = "unreachable"
    else:
        reason = "connect_error"
    return DialError(reason, f"SSH bastion {who} could not connect to {where}: {text}")


def describe(exc: BaseException, model: SSHSettings) -> str:
    """Why the SSH connection failed or ended, for a 502 body and a log line."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return (
            f"host key of {model.host}:{model.port} is not trusted by known_hosts "
            f"{model.known_hosts} ({exc.reason})"
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication as {model.username} refused ({exc.reason})"
    if isinstance(exc, asyncssh.DisconnectError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return f"no SSH session within {model.connect_timeout:g} s"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__
