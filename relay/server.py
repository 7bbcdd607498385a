"""Listeners, accept, the per-connection lifecycle, drain.

A connection starts as a ``ClientConnection`` that collects the request head
(bounded in size and time), asks the policy, and for an allowed target spawns
one task that dials. Once the destination is connected the relay answers
``200`` and hands both transports to a ``Tunnel`` (tunnel.py), which owns them
from then on; the task ends. Every task and tunnel is held in a set or dict
here and leaves it when it ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
import ssl
import time
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from relay import config, connect, proxyproto, splice, tlspeek
from relay.auth import CHALLENGE, AuthError
from relay.config import ListenModel, Settings, TLSModel
from relay.egress import Dialer, DialError, make_dialers
from relay.konnect_ips_feed import Feed, unpinned_egresses
from relay.log import EventLog, json_fields, json_string
from relay.metrics import Metrics
from relay.notify import notify
from relay.policy import Decision, Reason
from relay.resolver import KonnectPins, resolver_for
from relay.tunnel import HIGH_WATER, PeekHello, Pending, Tunnel

# A tunnel whose transports were asked to close gracefully but still hold
# unsent bytes for a peer that stopped reading is aborted after this long.
CLOSE_LINGER = 10.0
# Upper bound on the idle sweep period (idle detection and last_activity are
# accurate to one period).
MAX_SWEEP_INTERVAL = 5.0
LISTEN_BACKLOG = 1024
# File descriptors kept free for the admin listener, logs, DNS and the listeners
# themselves: beyond this the relay answers 503 instead of letting accept fail.
FD_RESERVE = 64
# In report mode a tunnel the policy would deny carries this host label, so
# Prometheus label values stay bounded by the allowlist.
REPORT_HOST_LABEL = "(would-deny)"
# How long a refused client's remaining input is read and dropped before close.
LINGER_TIMEOUT = 2.0
# Credential checks queued or running at once before new ones get 503.
MAX_PENDING_VERIFICATIONS = 32


def format_target(host: str, port: int) -> str:
    """host:port for logs and messages; userinfo a client put in its target is
    never repeated (it may be a credential)."""
    if "@" in host:
        host = "(userinfo withheld)@" + host.rpartition("@")[2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """One ``listen:`` entry: its socket options, TLS and PROXY-protocol settings."""

    __slots__ = ("name", "port", "proxy_protocol", "sni", "spec", "ssl", "target_port", "trusted")

    def __init__(self, spec: ListenModel) -> None:
        self.spec = spec
        self.name = spec.name or spec.address
        self.sni = spec.mode == "sni"
        self.port = 0  # the bound port, set once listening
        self.target_port = spec.target_port  # SNI: the port to dial, if not the bound one
        self.proxy_protocol = spec.proxy_protocol
        self.trusted = tuple(ipaddress.ip_network(c) for c in spec.trusted_proxies)
        self.ssl = tls_server_context(spec.tls) if spec.tls is not None else None

    def trusts(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)


def tls_server_context(tls: TLSModel) -> ssl.SSLContext:
    """The listener's TLS: our certificate, and with client_ca a required client one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def cert_name(peercert: Any) -> str | None:
    """The client certificate's subject commonName (else its first DNS SAN)."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None


class ClientConnection(asyncio.Protocol):
    """A client connection until its tunnel is established (or it is refused)."""

    __slots__ = (
        "buf",
        "cert",
        "client_eof",
        "client_ip",
        "expired",
        "identity",
        "lingering",
        "listener",
        "need_proxy_header",
        "over_limit",
        "peer",
        "relay",
        "task",
        "timer",
        "transport",
        "user",
    )

    def __init__(self, relay: Relay, listener: Listener) -> None:
        self.relay = relay
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buf: bytes | bytearray = b""
        self.client_ip = ""
        self.peer = ""
        self.cert: str | None = None
        self.user: str | None = None
        self.identity = ""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.need_proxy_header = listener.proxy_protocol
        self.lingering = False
        self.expired = False
        self.client_eof = False
        self.over_limit: tuple[str, str] | None = None
        if listener.ssl is not None:
            # The event loop creates this protocol when it accepts and calls
            # connection_made only after the TLS handshake: the handshake already
            # counts as a pending head (limits, fd budget, head_timeout).
            self.over_limit = relay.admission()
            if self.over_limit is None:
                self.enter_pending()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else "unknown"
        self.peer = format_target(self.client_ip, int(peer[1])) if peer else "unknown"
        relay = self.relay
        if self.listener.ssl is not None:
            self.cert = cert_name(transport.get_extra_info("peercert"))
        if self.need_proxy_header and not self.listener.trusts(self.client_ip):
            relay.metrics.requests_denied.labels("untrusted_proxy").inc()
            detail = "PROXY protocol listener: source is not in trusted_proxies"
            self.log_request("", False, 0, "untrusted_proxy", detail=detail)
            self.transport.abort()  # type: ignore[union-attr]
            return
        if self.listener.ssl is None:
            self.over_limit = relay.admission()
            if self.over_limit is None:
                self.enter_pending()
        if self.over_limit is not None:
            self.refuse(503, *self.over_limit)

    def enter_pending(self) -> None:
        relay = self.relay
        relay.pending.add(self)
        self.timer = relay.loop.call_later(relay.settings.limits.head_timeout, self.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # refused: the client's remaining bytes are read and dropped
        buf: bytes | bytearray
        if not self.buf:
            buf = self.buf = data
        else:  # a head in pieces: grow one buffer instead of copying it per read
            if type(self.buf) is bytes:
                self.buf = bytearray(self.buf)
            self.buf += data
            buf = self.buf
        if self.task is not None:
            # Bytes after the head while dialling are kept for the tunnel. Reading
            # goes on (so a client that resets is noticed and the dial cancelled)
            # until the buffer holds a write buffer's worth.
            if len(buf) >= HIGH_WATER:
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if self.need_proxy_header:
            try:
                header = proxyproto.parse(buf)
            except proxyproto.ProxyProtocolError as exc:
                self.refuse(400, "bad_proxy_protocol", f"PROXY protocol: {exc.detail}")
                return
            if header is None:
                return
            self.need_proxy_header = False
            if not header.local and header.source is not None:
                ip = ipaddress.ip_address(header.source[0])
                mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
                self.client_ip = str(mapped or ip)
                self.peer = format_target(self.client_ip, header.source[1])
            buf = self.buf = buf[header.length :]
            if not buf:
                return
        if self.listener.sni:
            self.hello_received(buf)
            return
        try:
            request = connect.parse_head(buf)
        except connect.HeadError as exc:
            self.refuse(exc.status, exc.reason, exc.detail, exc.headers)
            return
        if request is None:
            return
        self.end_head_phase()
        self.buf = buf[request.head_length :]
        self.relay.on_request(self, request)

    def hello_received(self, buf: bytes | bytearray) -> None:
        """SNI listener: the target is the ClientHello's server_name on the
        listener's port. The hello stays in ``buf`` and is forwarded unchanged."""
        try:
            hello = tlspeek.parse_client_hello(buf)
        except tlspeek.PeekError as exc:
            self.refuse(400, exc.reason, f"SNI listener: {exc.detail}")
            return
        if hello is None:
            return
        if hello.server_name is None:
            self.refuse(400, "no_sni", "SNI listener: the ClientHello carries no server_name")
            return
        self.end_head_phase()
        request = connect.ConnectRequest(
            host=hello.server_name,
            port=self.listener.target_port or self.listener.port,
            version="TLS",
            proxy_authorization=None,
            user_agent=None,
            head_length=0,
        )
        self.relay.admit(self, request)

    def expire(self) -> None:
        """limits.connect_timeout passed while dialling: stop the dial."""
        self.expired = True
        if self.task is not None:
            self.task.cancel()

    def end_head_phase(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self in self.relay.pending:
            self.relay.pending.discard(self)

    def head_timeout(self) -> None:
        self.timer = None
        limit = self.relay.settings.limits.head_timeout
        if self.listener.ssl is not None and self.transport is None:
            # The event loop ran the handshake and never handed over a transport:
            # it failed (no or an unknown client certificate, a client speaking
            # plain HTTP) or is still running. The loop reports neither, and
            # gives no client address; this is where it shows.
            self.end_head_phase()
            self.relay.metrics.requests_denied.labels("tls_handshake").inc()
            detail = f"TLS handshake failed or not complete within {limit:g} s"
            self.log_request("", False, 0, "tls_handshake", detail=detail)
            return
        self.refuse(408, "head_timeout", f"request head not received within {limit:g} s")

    def refuse(
        self,
        status: int,
        reason: str,
        detail: str,
        headers: Iterable[tuple[str, str]] = (),
        target: str = "",
        **extra: Any,
    ) -> None:
        """Answer with an error status and close; log and count the refusal."""
        self.end_head_phase()
        relay = self.relay
        relay.metrics.requests_denied.labels(reason).inc()
        self.log_request(target, False, status, reason, detail=detail, **extra)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if not self.listener.sni:
                transport.write(connect.response(status, detail, headers))
            elif reason == "no_sni":
                transport.write(tlspeek.ALERT_UNRECOGNIZED_NAME)
            elif 400 < status < 500:
                transport.write(tlspeek.ALERT_ACCESS_DENIED)
            elif status >= 500:
                transport.write(tlspeek.ALERT_INTERNAL_ERROR)
            if transport.can_write_eof():
                # Lingering close: closing with unread input would make the kernel
                # send a reset that can destroy the answer before the client reads
                # it. Send FIN, drop what the client still sends, close on its EOF.
                transport.write_eof()
                self.lingering = True
                transport.resume_reading()
                self.timer = relay.loop.call_later(LINGER_TIMEOUT, transport.close)
            else:
                transport.close()

    def log_request(
        self, target: str, allowed: bool, status: int, reason: str, **fields: Any
    ) -> None:
        """The one decision line per request (no header value but the target)."""
        self.relay.log(
            "request",
            client=self.peer,
            listener=self.listener.name,
            identity=self.identity or None,
            target=target,
            allowed=allowed,
            status=status,
            reason=reason,
            **fields,
        )

    def eof_received(self) -> bool:
        if self.lingering:
            return False
        if self.task is None:
            # The client gave up before sending a complete head: nothing to answer.
            self.end_head_phase()
            return False
        # EOF after the head, while dialling: a half-close to forward once the
        # tunnel is up.
        self.client_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.end_head_phase()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client went away while the relay was dialling
        self.transport = None


class Relay:
    """One relay instance: listeners, admin endpoint, live tunnels."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog | None = None,
        *,
        reuse_port: bool = False,
        admin_path: str | None = None,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.log = log if log is not None else EventLog()
        self.log.loop = self.loop
        self.metrics = Metrics()
        self.metrics.pending_heads = lambda: len(self.pending)
        self.resolver = resolver_for(settings)
        self.auth = settings.auth
        # argon2 verification costs ~0.3 s of CPU and 64 MiB by design: a small
        # dedicated pool and a cap keep a flood of bad credentials from starving
        # the event loop's default executor (DNS) or the memory.
        self.auth_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self.verifying = 0
        self.dialing = 0
        self.per_client: dict[str, int] = {}
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.dialers: dict[str, Dialer] = make_dialers(
            settings, self.resolver, self._egress_state, self._egress_reconnect
        )
        self.feed = Feed(
            settings, self._dialer_for, self.log, self.metrics.konnect_ips, self._set_pins
        )
        self.listeners: dict[str, tuple[Listener, asyncio.Server]] = {}
        self._bound: dict[str, tuple[str, int]] = {}  # listener key -> configured address
        self.reuse_port = reuse_port
        self.admin_path = admin_path
        # Every open connection stays reachable from one of these until it is
        # closed. Not only for drain and limits: uvloop (0.23) aborts the whole
        # process ("double free or corruption") when the garbage collector takes
        # a transport whose connection is still open (a transport and its
        # protocol form a cycle that nothing else holds).
        self.tunnels: dict[int, Tunnel] = {}
        self.pending: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.last_closed: dict[tuple[str, str], float] = {}
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.admin_address = ""
        self.draining = False
        self.stopped = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self._admin: asyncio.Server | None = None
        self._empty = asyncio.Event()

    # --- lifecycle -----------------------------------------------------------

    def _egress_state(self, name: str, up: bool) -> None:
        self.metrics.egress_up.labels(name).set(int(up))

    def _egress_reconnect(self, name: str) -> None:
        self.metrics.egress_reconnects.labels(name).inc()

    def _dialer_for(self, host: str, port: int) -> Dialer | None:
        """The relay's own fetches leave the way the routes send host:port."""
        via = self.settings.route(host, port)
        return None if via == "deny" else self.dialers.get(via)

    def _set_pins(self, pins: KonnectPins | None) -> None:
        self.resolver.pins = pins

    def _note_unpinned(self) -> None:
        if self.settings.konnect_ips.enabled:
            for egress, why in unpinned_egresses(self.settings):
                self.log("konnect_ips_not_applied", egress=egress, detail=why)

    async def start(self) -> None:
        for spec, address in zip(self.settings.raw.listen, self.settings.listen, strict=True):
            await self._bind(spec, address)
        if self.admin_path is not None:
            from relay.admin import start_admin_unix

            self._admin = await start_admin_unix(self, self.admin_path)
            self.admin_address = self.admin_path
        elif self.settings.admin is not None:
            from relay.admin import start_admin

            self._admin = await start_admin(self, *self.settings.admin)
            name = self._admin.sockets[0].getsockname()
            self.admin_address = format_target(name[0], name[1])
        for dialer in self.dialers.values():
            await dialer.start()
        self._note_unpinned()
        await self.feed.start()
        self.metrics.ready.set(1)
        self._schedule_sweep()
        self.log(
            "listening",
            proxy=self.addresses,
            admin=self.admin_address or None,
            egress=self.settings.egress,
            config=self.settings.source,
        )

    async def _bind(self, spec: ListenModel, address: tuple[str, int]) -> str:
        listener = Listener(spec)
        server = await self.loop.create_server(
            lambda: ClientConnection(self, listener),
            address[0],
            address[1],
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            ssl=listener.ssl,
            ssl_handshake_timeout=self.settings.limits.head_timeout if listener.ssl else None,
        )
        for sock in server.sockets:
            # Accepted sockets inherit these on Linux: no per-connection syscalls.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            name = sock.getsockname()
            self.addresses.append(format_target(name[0], name[1]))
            self.resolver.listening.add((name[0], name[1]))
            listener.port = name[1]
        self.servers.append(server)
        key = spec.model_dump_json()
        self.listeners[key] = (listener, server)
        self._bound[key] = address
        return key

    # --- reload --------------------------------------------------------------

    async def reload(self, path: str | None) -> bool:
        """Re-read the config. Invalid (or its listeners or TLS files unusable):
        keep running on the old one. Valid: swap policy, auth, resolver and
        changed egresses atomically, rebind changed listeners, re-read TLS
        files, and close tunnels the new policy denies."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                new = config.load(path)
                await self._apply(new)
            except config.ConfigError as exc:
                self.metrics.reloads.labels("error").inc()
                self.log("reload_failed", config=exc.source, errors=exc.errors)
                return False
            self.metrics.reloads.labels("ok").inc()
            return True
        finally:
            notify("READY=1")

    async def _apply(self, new: Settings) -> None:
        """Everything that can fail (TLS files, binding new addresses) happens
        before anything is swapped; a failure is a ConfigError."""
        old = self.settings
        wanted = {
            spec.model_dump_json(): (spec, address)
            for spec, address in zip(new.raw.listen, new.listen, strict=True)
        }
        errors = []
        for i, spec in enumerate(new.raw.listen):
            if spec.tls is not None:
                try:
                    tls_server_context(spec.tls)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    errors.append(f"listen.{i}.tls: {exc}")
        if errors:
            raise config.ConfigError(errors, new.source)
        in_use = {address for key, address in self._bound.items() if key in self.listeners}
        fresh: list[str] = []
        try:
            for i, (key, (spec, address)) in enumerate(wanted.items()):
                if key not in self.listeners and address not in in_use:
                    try:
                        fresh.append(await self._bind(spec, address))
                    except OSError as exc:
                        raise config.ConfigError([f"listen.{i}: {exc}"], new.source) from None
        except config.ConfigError:
            for key in fresh:
                self._unbind(key)
            raise
        resolver = resolver_for(new, self.feed.pins)
        resolver.listening = self.resolver.listening
        dialers = make_dialers(new, resolver, self._egress_state, self._egress_reconnect)
        kept: dict[str, Dialer] = {}
        for name, dialer in dialers.items():
            previous = self.dialers.get(name)
            if previous is not None and _egress_model(old, name) == _egress_model(new, name):
                previous.retarget(resolver)
                kept[name] = previous  # e.g. keep the live SSH connection and its tunnels
            else:
                await dialer.start()
                kept[name] = dialer
        retired = [d for n, d in self.dialers.items() if kept.get(n) is not d]
        self.settings, self.resolver, self.dialers, self.auth = new, resolver, kept, new.auth
        for dialer in retired:
            await dialer.close()
        await self.feed.reconfigure(new)
        self._note_unpinned()
        for key in list(self.listeners):
            if key not in wanted:
                self._unbind(key)
        for key, (spec, address) in wanted.items():
            if key not in self.listeners:  # same address as a listener just retired
                await self._bind(spec, address)
            elif spec.tls is not None:
                listener = self.listeners[key][0]
                assert listener.ssl is not None
                # Checked above; new handshakes use the new files, live ones keep theirs.
                listener.ssl.load_cert_chain(spec.tls.cert, spec.tls.key)
        revoked = self._close_revoked()
        extra = {}
        if new.admin != old.admin:
            extra["admin_unchanged"] = "admin.address changes on restart, not on reload"
        self.log("reloaded", config=new.source, tunnels=len(self.tunnels), revoked=revoked, **extra)

    def _unbind(self, key: str) -> None:
        _, server = self.listeners.pop(key)
        self._bound.pop(key, None)
        server.close()
        self.servers.remove(server)
        for sock in server.sockets:
            name = sock.getsockname()
            self.resolver.listening.discard((name[0], name[1]))
            self.addresses.remove(format_target(name[0], name[1]))

    def _revoked(self, who: tuple[str | None, str | None, str], host: str, port: int) -> bool:
        """Does the current config revoke this client's tunnel to host:port?"""
        raw = self.settings.raw
        if not raw.reload.close_revoked:
            return False
        _, pol = self.settings.policy_for(*who)
        if pol is None:
            return True
        return raw.policy_mode == "enforce" and not pol.decide(host, port).allowed

    def _close_revoked(self) -> int:
        revoked = 0
        for tunnel in list(self.tunnels.values()):
            if self._revoked(tunnel.who, tunnel.host, tunnel.port):
                tunnel.close("policy_revoked", abort=True)
                revoked += 1
        return revoked

    async def drain(self) -> None:
        """Stop accepting, let live tunnels run up to drain_timeout, then close them."""
        if self.draining:
            return
        self.draining = True
        notify("STOPPING=1")
        self.metrics.ready.set(0)
        for server in self.servers:
            server.close()
        for conn in list(self.pending):
            if conn.transport is not None:
                conn.transport.abort()
        timeout = self.settings.limits.drain_timeout
        self.log("draining", tunnels=len(self.tunnels), timeout_s=timeout)
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        if self.tunnels:
            self._empty.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._empty.wait()
            except TimeoutError:
                for tunnel in list(self.tunnels.values()):
                    tunnel.close("drain", abort=True)
                async with asyncio.timeout(CLOSE_LINGER):
                    await self._empty.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            server.close()
        await self.feed.close()
        for dialer in self.dialers.values():
            await dialer.close()
        if self._admin is not None:
            self._admin.close()
        for task in list(self.tasks):
            task.cancel()
        self.auth_executor.shutdown(wait=False, cancel_futures=True)
        self.log("stopped")
        self.log.flush()
        self.stopped.set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- requests ------------------------------------------------------------

    def admission(self) -> tuple[str, str] | None:
        """(reason, detail) when a new connection must be refused at once."""
        if len(self.pending) >= self.settings.limits.max_pending_heads:
            return "too_many_pending", "too many connections without a request head"
        # Each tunnel (or dial in progress) holds two descriptors, a pending head
        # one, and tunnels moving bulk data a pipe (two) per busy direction.
        used = len(self.pending) + 2 * (self.dialing + len(self.tunnels)) + splice.pipe_fds()
        if used + FD_RESERVE >= self.fd_limit:
            return "fd_limit", "relay is at its open-file limit; retry shortly"
        return None

    def on_request(self, conn: ClientConnection, request: connect.ConnectRequest) -> None:
        auth = self.auth
        if auth is None:
            self.admit(conn, request)
            return
        header = request.proxy_authorization
        target = format_target(request.host, request.port)
        try:
            user = auth.cached(header, time.monotonic())
            if user is None:
                auth.parse(header)  # syntax errors answered at once, without a thread
        except AuthError as exc:
            conn.refuse(407, exc.reason, exc.detail, CHALLENGE, target)
            return
        if user is not None:
            conn.user = user
            self.admit(conn, request)
            return
        if self.verifying >= MAX_PENDING_VERIFICATIONS:
            conn.refuse(
                503, "auth_busy", "too many credential checks in progress; retry", (), target
            )
            return
        conn.task = self.spawn(self.authenticate(conn, request, header))

    async def authenticate(
        self, conn: ClientConnection, request: connect.ConnectRequest, header: bytes | None
    ) -> None:
        """Verify a password hash off the event loop (argon2 is slow by design)."""
        assert self.auth is not None
        self.verifying += 1
        try:
            conn.user = await self.loop.run_in_executor(
                self.auth_executor, self.auth.verify, header, time.monotonic()
            )
        except AuthError as exc:
            target = format_target(request.host, request.port)
            conn.refuse(407, exc.reason, exc.detail, CHALLENGE, target)
            return
        finally:
            self.verifying -= 1
        conn.task = None
        if conn.transport is not None:
            self.admit(conn, request)

    def admit(self, conn: ClientConnection, request: connect.ConnectRequest) -> None:
        """Policy for this client, report mode, limits; then dial."""
        settings = self.settings
        target = format_target(request.host, request.port)
        entry, pol = settings.policy_for(conn.user, conn.cert, conn.client_ip)
        identity = conn.identity = conn.user or conn.cert or conn.client_ip
        if pol is None:
            conn.refuse(
                403, "client_not_listed", f"client {identity} matches no clients: entry", (), target
            )
            return
        decision = pol.decide(request.host, request.port)
        would_deny = False
        if not decision.allowed:
            invalid = decision.reason is Reason.INVALID_HOST
            if invalid or settings.raw.policy_mode == "enforce":
                conn.refuse(
                    400 if invalid else 403,
                    decision.reason.value,
                    decision.detail,
                    (),
                    target,
                    rule=decision.rule,
                    client_entry=entry or None,
                )
                return
            would_deny = True
            self.metrics.would_deny.labels(decision.reason.value).inc()
        if self.draining:
            conn.refuse(503, "draining", "relay is shutting down", (), target)
            return
        limits = settings.limits
        if (
            limits.max_tunnels is not None
            and self.dialing + len(self.tunnels) >= limits.max_tunnels
        ):
            conn.refuse(
                503,
                "too_many_tunnels",
                f"relay is at limits.max_tunnels ({limits.max_tunnels})",
                (),
                target,
            )
            return
        per_client = self.per_client.get(identity, 0)
        if (
            limits.max_tunnels_per_client is not None
            and per_client >= limits.max_tunnels_per_client
        ):
            conn.refuse(
                429,
                "too_many_tunnels_per_client",
                f"client {identity} is at limits.max_tunnels_per_client "
                f"({limits.max_tunnels_per_client})",
                (),
                target,
            )
            return
        host = decision.host or request.host.strip("[]")
        via = settings.route(host, request.port)
        if via == "deny":
            conn.refuse(403, "route_denied", f"egress.routes refuse {target}", (), target)
            return
        self.per_client[identity] = per_client + 1
        self.dialing += 1
        konnect = pol.konnect_rule(host) is not None
        conn.task = self.spawn(
            self.open_tunnel(
                conn, self.dialers[via], decision, host, request.port, konnect, would_deny, entry
            )
        )

    def release(self, identity: str) -> None:
        left = self.per_client.get(identity, 0) - 1
        if left > 0:
            self.per_client[identity] = left
        else:
            self.per_client.pop(identity, None)

    async def open_tunnel(
        self,
        conn: ClientConnection,
        dialer: Dialer,
        decision: Decision,
        host: str,
        port: int,
        konnect: bool,
        would_deny: bool,
        entry: str,
    ) -> None:
        target = format_target(host, port)
        identity = conn.identity
        settings = self.settings
        pending = Pending()
        started = self.loop.time()
        extra: dict[str, Any] = {"rule": decision.rule}
        if entry:
            extra["client_entry"] = entry
        if would_deny:
            extra["would_deny"] = True
            extra["would_deny_detail"] = decision.detail
        opened = False
        try:
            # Not asyncio.timeout(): a timer that cancels this task is cheaper,
            # and a flag tells the timeout from the client going away.
            timer = self.loop.call_later(self.settings.limits.connect_timeout, conn.expire)
            try:
                dialled = await dialer.dial(host, port, pending)
            except DialError as exc:
                self._dial_failed(
                    conn, dialer, target, started, exc.status, exc.reason, exc.detail, extra
                )
                return
            except asyncio.CancelledError:
                if pending.transport is not None:
                    pending.transport.abort()
                if conn.expired:
                    timeout = self.settings.limits.connect_timeout
                    detail = f"connect to {target} timed out after {timeout:g} s"
                    self._dial_failed(conn, dialer, target, started, 504, "timeout", detail, extra)
                    return
                dial_ms = round((self.loop.time() - started) * 1000, 3)
                conn.log_request(target, True, 0, "client_gone", dial_ms=dial_ms, **extra)
                raise
            finally:
                timer.cancel()
            elapsed = self.loop.time() - started
            self.metrics.connect_time(dialer.name).observe(elapsed)
            if dialled.would_deny:  # resolver.konnect_ips in report mode
                self.metrics.would_deny.labels("address_not_pinned").inc()
                extra["would_deny"] = True
                extra["would_deny_reason"] = "address_not_pinned"
                extra["would_deny_detail"] = dialled.would_deny
            who = (conn.user, conn.cert, conn.client_ip)
            if self.settings is not settings and self._revoked(who, host, port):
                dialled.transport.abort()  # a reload during the dial denies it now
                conn.refuse(
                    403,
                    "policy_revoked",
                    f"the reloaded policy denies {target}",
                    (),
                    target,
                    **extra,
                )
                return
            client = conn.transport
            if client is None or client.is_closing():
                dialled.transport.abort()
                return
            if not conn.listener.sni:  # an SNI client never sent a CONNECT
                client.write(connect.ESTABLISHED)
            early, conn.buf = bytes(conn.buf), b""
            tunnel = Tunnel(
                identity, host, port, dialer.name, self.tunnel_closed, conn.listener.name
            )
            tunnel.label = REPORT_HOST_LABEL if would_deny else host
            tunnel.who = who
            self.tunnel_opened(tunnel)
            opened = True
            peek = None
            konnect_cfg = self.settings.raw.konnect
            if konnect and konnect_cfg.require_tls and not conn.listener.sni:
                peek = PeekHello(
                    tunnel,
                    host if konnect_cfg.check_sni else None,
                    self.settings.limits.tls_peek_timeout,
                    self.loop,
                )
            tunnel.start(client, dialled.transport, early, pending, dialled.leftover, peek)
            tunnel.keepalive_due = dialled.keepalive
            if conn.client_eof:
                cast(asyncio.Protocol, client.get_protocol()).eof_received()
            # The request line, as conn.log_request(target, True, 200, reason,
            # egress=..., upstream=..., dial_ms=..., tunnel=..., **extra)
            # writes it, from a template (see EventLog.write_event).
            identity_json = json_string(identity) if identity else "null"
            self.log.write_event(
                "request",
                f',"client":{json_string(conn.peer)}'
                f',"listener":{json_string(conn.listener.name)}'
                f',"identity":{identity_json},"target":{json_string(target)}'
                f',"allowed":true,"status":200,"reason":{json_string(decision.reason.value)}'
                f',"egress":{json_string(dialer.name)},"upstream":{json_string(dialled.peer)}'
                f',"dial_ms":{round(elapsed * 1000, 3)!r},"tunnel":{tunnel.id}'
                f"{json_fields(extra)}",
            )
        finally:
            self.dialing -= 1
            if not opened:
                self.release(identity)

    def _dial_failed(
        self,
        conn: ClientConnection,
        dialer: Dialer,
        target: str,
        started: float,
        status: int,
        reason: str,
        detail: str,
        extra: dict[str, Any],
    ) -> None:
        dial_ms = round((self.loop.time() - started) * 1000, 3)
        if status != 403:
            self.metrics.connect_failures.labels(dialer.name, reason).inc()
        conn.refuse(status, reason, detail, (), target, dial_ms=dial_ms, **extra)

    # --- tunnels -------------------------------------------------------------

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel.id] = tunnel
        host = tunnel.label
        series = self.metrics.host(host)
        series.opened += 1
        series.active += 1
        last = self.last_closed.get((tunnel.client, host))
        if last is not None and tunnel.opened_mono - last <= self.settings.limits.reconnect_window:
            series.reconnects += 1

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        host = tunnel.label
        series = self.metrics.host(host)
        now = time.monotonic()
        reason = tunnel.close_reason or "error"
        self.fold(tunnel)
        series.active -= 1
        series.closed_by(reason)
        duration = now - tunnel.opened_mono
        series.duration.observe(duration)
        self.last_closed[(tunnel.client, host)] = now
        self.release(tunnel.client)
        # As self.log("tunnel_closed", tunnel=..., client=..., ..., reason=...)
        # would write it, from a template (see EventLog.write_event).
        self.log.write_event(
            "tunnel_closed",
            f',"tunnel":{tunnel.id},"client":{json_string(tunnel.client)}'
            f',"listener":{json_string(tunnel.listener)}'
            f',"target":{json_string(format_target(tunnel.host, tunnel.port))}'
            f',"egress":{json_string(tunnel.egress)},"bytes_up":{tunnel.bytes_up}'
            f',"bytes_down":{tunnel.bytes_down},"duration_s":{round(duration, 3)!r}'
            f',"reason":{json_string(reason)}',
        )
        if not self.tunnels:
            self._empty.set()

    def fold(self, tunnel: Tunnel) -> None:
        """Move a tunnel's byte counts since the last fold into Prometheus."""
        up, down = tunnel.bytes_up, tunnel.bytes_down
        if up != tunnel.folded_up or down != tunnel.folded_down:
            series = self.metrics.host(tunnel.label)
            series.up += up - tunnel.folded_up
            series.down += down - tunnel.folded_down
            tunnel.folded_up, tunnel.folded_down = up, down

    def fold_all(self) -> None:
        for tunnel in self.tunnels.values():
            self.fold(tunnel)

    # --- periodic sweep ------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = min(self.settings.limits.idle_timeout / 4, MAX_SWEEP_INTERVAL)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        idle_timeout = self.settings.limits.idle_timeout
        for tunnel in list(self.tunnels.values()):
            if tunnel.closed_at is not None:
                if now - tunnel.closed_at > CLOSE_LINGER:
                    tunnel.close(abort=True)
            elif tunnel.idle_for(now) >= idle_timeout:
                tunnel.close("idle_timeout", abort=True)
            elif tunnel.keepalive_due:
                # SO_KEEPALIVE on a direct upstream from the first sweep a tunnel
                # lives through, not at dial time: most short tunnels (an API
                # call, a reconnect) would pay two system calls and a socket
                # object for nothing, and the kernel's first probe comes only
                # after net.ipv4.tcp_keepalive_time (two hours by default).
                tunnel.keepalive()
        window = self.settings.limits.reconnect_window
        if self.last_closed:
            stale = [k for k, t in self.last_closed.items() if now - t > window]
            for key in stale:
                del self.last_closed[key]
        self._schedule_sweep()


def _egress_model(settings: Settings, name: str) -> object:
    egress = settings.raw.egress
    return {"http_proxy": egress.http_proxy, "ssh": egress.ssh}.get(name)
