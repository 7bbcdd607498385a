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
import socket
import time
from collections.abc import Coroutine
from typing import Any

from relay import connect
from relay.config import Settings
from relay.egress import Dialer, DialError
from relay.egress.direct import DirectDialer
from relay.log import EventLog
from relay.metrics import Metrics
from relay.policy import Decision, Reason
from relay.resolver import Resolver
from relay.tunnel import Pending, Tunnel

# A tunnel whose transports were asked to close gracefully but still hold
# unsent bytes for a peer that stopped reading is aborted after this long.
CLOSE_LINGER = 10.0
# Upper bound on the idle sweep period (idle detection and last_activity are
# accurate to one period).
MAX_SWEEP_INTERVAL = 5.0
LISTEN_BACKLOG = 1024


def format_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ClientConnection(asyncio.Protocol):
    """A client connection until its tunnel is established (or it is refused)."""

    __slots__ = ("buf", "client", "decision", "peer", "relay", "task", "timer", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.client = ""
        self.peer = ""
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.decision: Decision | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "unknown"
        self.peer = format_target(str(peer[0]), int(peer[1])) if peer else "unknown"
        relay = self.relay
        relay.pending.add(self)
        self.timer = relay.loop.call_later(relay.settings.limits.head_timeout, self.head_timeout)

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if self.task is not None:
            return  # bytes after the head while dialling: kept for the tunnel
        try:
            request = connect.parse_head(self.buf)
        except connect.HeadError as exc:
            self.refuse(exc.status, exc.reason, exc.detail, exc.headers, target="")
            return
        if request is None:
            return
        self.end_head_phase()
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.relay.on_request(self, request)

    def end_head_phase(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.relay.pending.discard(self)

    def head_timeout(self) -> None:
        self.timer = None
        limit = self.relay.settings.limits.head_timeout
        self.refuse(408, "head_timeout", f"request head not received within {limit:g} s", (), "")

    def refuse(
        self,
        status: int,
        reason: str,
        detail: str,
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]],
        target: str,
        *,
        rule: str = "",
        dial_ms: float | None = None,
    ) -> None:
        """Answer with an error status and close; log and count the refusal."""
        self.end_head_phase()
        relay = self.relay
        relay.metrics.requests_denied.labels(reason).inc()
        fields: dict[str, Any] = {
            "client": self.peer,
            "target": target,
            "allowed": False,
            "status": status,
            "reason": reason,
            "rule": rule,
            "detail": detail,
        }
        if dial_ms is not None:
            fields["dial_ms"] = dial_ms
        relay.log("request", **fields)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(connect.response(status, detail, headers))
            transport.close()

    def eof_received(self) -> bool:
        if self.task is None:
            # The client gave up before sending a complete head: nothing to answer.
            self.end_head_phase()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.end_head_phase()
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # the client went away while the relay was dialling
        self.transport = None


class Relay:
    """One relay instance: listeners, admin endpoint, live tunnels."""

    def __init__(self, settings: Settings, log: EventLog | None = None) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.log = log if log is not None else EventLog()
        self.metrics = Metrics()
        self.resolver = Resolver(
            settings.static, allow_private=settings.allow_private, cache_ttl=settings.cache_ttl
        )
        self.dialer: Dialer = DirectDialer(self.resolver)
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

    async def start(self) -> None:
        for host, port in self.settings.listen:
            server = await self.loop.create_server(
                lambda: ClientConnection(self),
                host,
                port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
            for sock in server.sockets:
                # Accepted sockets inherit these on Linux: no per-connection syscalls.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                name = sock.getsockname()
                self.addresses.append(format_target(name[0], name[1]))
            self.servers.append(server)
        if self.settings.admin is not None:
            from relay.admin import start_admin

            self._admin = await start_admin(self, *self.settings.admin)
            name = self._admin.sockets[0].getsockname()
            self.admin_address = format_target(name[0], name[1])
        self.metrics.ready.set(1)
        self._schedule_sweep()
        self.log(
            "listening",
            proxy=self.addresses,
            admin=self.admin_address or None,
            egress=self.dialer.name,
            config=self.settings.source,
        )

    async def drain(self) -> None:
        """Stop accepting, let live tunnels run up to drain_timeout, then close them."""
        if self.draining:
            return
        self.draining = True
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
        await self.dialer.close()
        if self._admin is not None:
            self._admin.close()
        for task in list(self.tasks):
            task.cancel()
        self.log("stopped")
        self.stopped.set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- requests ------------------------------------------------------------

    def on_request(self, conn: ClientConnection, request: connect.ConnectRequest) -> None:
        target = format_target(request.host, request.port)
        decision = self.settings.policy.decide(request.host, request.port)
        if not decision.allowed:
            status = 400 if decision.reason is Reason.INVALID_HOST else 403
            conn.refuse(
                status, decision.reason.value, decision.detail, (), target, rule=decision.rule
            )
            return
        if self.draining:
            conn.refuse(503, "draining", "relay is shutting down", (), target)
            return
        conn.decision = decision
        early = conn.buf[request.head_length :]
        conn.buf = early
        conn.task = self.spawn(self.open_tunnel(conn, decision))

    async def open_tunnel(self, conn: ClientConnection, decision: Decision) -> None:
        host, port = decision.host, decision.port
        target = format_target(host, port)
        dialer = self.dialer
        pending = Pending()
        started = self.loop.time()
        try:
            async with asyncio.timeout(self.settings.limits.connect_timeout):
                dialled = await dialer.dial(host, port, pending)
        except TimeoutError:
            self._dial_failed(
                conn,
                decision,
                target,
                started,
                504,
                "timeout",
                f"connect to {target} timed out after {self.settings.limits.connect_timeout:g} s",
            )
            return
        except DialError as exc:
            self._dial_failed(conn, decision, target, started, exc.status, exc.reason, exc.detail)
            return
        except asyncio.CancelledError:
            if pending.transport is not None:
                pending.transport.abort()
            self.log(
                "request",
                client=conn.peer,
                target=target,
                allowed=True,
                status=0,
                reason="client_gone",
                rule=decision.rule,
                dial_ms=round((self.loop.time() - started) * 1000, 3),
            )
            raise
        elapsed = self.loop.time() - started
        self.metrics.connect_seconds.labels(dialer.name).observe(elapsed)
        client = conn.transport
        if client is None or client.is_closing():
            dialled.transport.abort()
            return
        client.write(connect.ESTABLISHED)
        early, conn.buf = conn.buf, b""
        tunnel = Tunnel(conn.client, host, port, dialer.name, self.tunnel_closed)
        self.tunnel_opened(tunnel)
        tunnel.start(client, dialled.transport, early, pending, dialled.leftover)
        self.log(
            "request",
            client=conn.peer,
            target=target,
            allowed=True,
            status=200,
            reason=decision.reason.value,
            rule=decision.rule,
            egress=dialer.name,
            upstream=dialled.peer,
            dial_ms=round(elapsed * 1000, 3),
            tunnel=tunnel.id,
        )

    def _dial_failed(
        self,
        conn: ClientConnection,
        decision: Decision,
        target: str,
        started: float,
        status: int,
        reason: str,
        detail: str,
    ) -> None:
        dial_ms = round((self.loop.time() - started) * 1000, 3)
        if status != 403:
            self.metrics.connect_failures.labels(self.dialer.name, reason).inc()
        conn.refuse(status, reason, detail, (), target, rule=decision.rule, dial_ms=dial_ms)

    # --- tunnels -------------------------------------------------------------

    def tunnel_opened(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel.id] = tunnel
        m, host = self.metrics, tunnel.host
        m.tunnels_opened.labels(host).inc()
        m.tunnels_active.labels(host).inc()
        last = self.last_closed.get((tunnel.client, host))
        if last is not None and tunnel.opened_mono - last <= self.settings.limits.reconnect_window:
            m.reconnects.labels(host).inc()

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        m, host = self.metrics, tunnel.host
        now = time.monotonic()
        reason = tunnel.close_reason or "error"
        self.fold(tunnel)
        m.tunnels_active.labels(host).dec()
        m.tunnels_closed.labels(host, reason).inc()
        duration = now - tunnel.opened_mono
        m.tunnel_duration.labels(host).observe(duration)
        self.last_closed[(tunnel.client, host)] = now
        self.log(
            "tunnel_closed",
            tunnel=tunnel.id,
            client=tunnel.client,
            target=format_target(host, tunnel.port),
            egress=tunnel.egress,
            bytes_up=tunnel.bytes_up,
            bytes_down=tunnel.bytes_down,
            duration_s=round(duration, 3),
            reason=reason,
        )
        if not self.tunnels:
            self._empty.set()

    def fold(self, tunnel: Tunnel) -> None:
        """Move a tunnel's byte counts since the last fold into Prometheus."""
        up, down = tunnel.bytes_up, tunnel.bytes_down
        counter = self.metrics.tunnel_bytes
        if up != tunnel.folded_up:
            counter.labels(tunnel.host, "upstream").inc(up - tunnel.folded_up)
            tunnel.folded_up = up
        if down != tunnel.folded_down:
            counter.labels(tunnel.host, "downstream").inc(down - tunnel.folded_down)
            tunnel.folded_down = down

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
        window = self.settings.limits.reconnect_window
        if self.last_closed:
            stale = [k for k, t in self.last_closed.items() if now - t > window]
            for key in stale:
                del self.last_closed[key]
        self._schedule_sweep()
