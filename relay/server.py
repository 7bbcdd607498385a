"""The relay: start, reload, drain, stop; the parts that do the work are elsewhere.

A connection is a ``ClientConnection`` (connection.py) that reads its head
through the sans-IO head machine (head.py); ``Admission`` (admission.py)
decides what to do with it; the ``Connector`` (connector.py) verifies
credentials and dials through the egress; the ``TunnelBook`` (book.py) keeps
every live tunnel, its counters and the sweep; ``Listeners`` (listeners.py)
binds and rebinds. Every task is held in a ``TaskSet`` until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from typing import TYPE_CHECKING

from relay import config, splice
from relay.actions import act
from relay.admin import AdminServer, Handler, Query, Reply, filtered, json_reply, text
from relay.admission import Admission
from relay.book import CLOSE_LINGER, TunnelBook
from relay.clients import clients, state_counts
from relay.config import Settings
from relay.connection import LINGER_TIMEOUT, ClientConnection
from relay.connector import Connector
from relay.deadlines import Waiting
from relay.early import EarlyCloses
from relay.egress import Dialer, make_dialers
from relay.konnect_ips_feed import Feed, unpinned_egresses
from relay.listeners import ListenError, Listeners
from relay.log import EventLog
from relay.metrics import Metrics
from relay.notify import notify
from relay.resolver import KonnectPins, resolver_for
from relay.status import page_routes
from relay.tasks import TaskSet
from relay.tunnel import PeekHello

if TYPE_CHECKING:
    from relay.upgrade import Upgrade

# Upper bound on the idle sweep period (idle detection and last_activity are
# accurate to one period).
MAX_SWEEP_INTERVAL = 5.0


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
        self.early = EarlyCloses(self.metrics.early_closes, self.log)
        self.admission = Admission(settings)
        self.resolver = resolver_for(settings)
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.tasks = TaskSet(self.loop)
        # One deadline per phase (deadlines.py): connections still sending their
        # head, dialling, lingering after a refusal; tunnels awaiting a ClientHello.
        # The durations are read when a timer fires (a reload may change them).
        self.pending: Waiting[ClientConnection] = Waiting(
            self.loop, lambda: self.settings.limits.head_timeout, ClientConnection.head_timeout
        )
        self.dials: Waiting[ClientConnection] = Waiting(
            self.loop, lambda: self.settings.limits.connect_timeout, ClientConnection.expire
        )
        self.lingering: Waiting[ClientConnection] = Waiting(
            self.loop, lambda: LINGER_TIMEOUT, ClientConnection.linger_over
        )
        self.hellos: Waiting[PeekHello] = Waiting(
            self.loop, lambda: self.settings.limits.tls_peek_timeout, PeekHello.timed_out
        )
        self.metrics.pending_heads = lambda: len(self.pending)
        self.metrics.data_planes = lambda: state_counts(clients_view(self))
        self.book = TunnelBook(
            self.metrics, self.log, lambda: self.settings.limits.reconnect_window
        )
        self.connector = Connector(self)
        self.dialers: dict[str, Dialer] = make_dialers(
            settings.egress_config, self.resolver, self._egress_state, self._egress_reconnect
        )
        self.feed = Feed(
            settings, self._dialer_for, self.log, self.metrics.konnect_ips, self._set_pins
        )
        self.listeners = Listeners(
            lambda slot: ClientConnection(self, slot.listener),
            self._bound,
            reuse_port=reuse_port,
            handshake_timeout=lambda: self.settings.limits.head_timeout,
        )
        self.admin = AdminServer(admin_routes(self), lambda path, auth: act(self, path, auth))
        self.admin_path = admin_path
        self.admin_address = ""
        self.draining = False
        self.upgrade: Upgrade | None = None  # while handing over to a successor
        self.upgrade_task: asyncio.Task[bool] | None = None
        self.handed_over = False  # a successor took over: drain what stayed, exit
        self.stopped = asyncio.Event()
        self.started = time.time()
        self.last_reload: dict[str, object] | None = None  # for the status page
        self._sweeper: asyncio.TimerHandle | None = None

    # --- the parts' callbacks -------------------------------------------------------

    def _egress_state(self, name: str, up: bool) -> None:
        self.metrics.egress_up.labels(name).set(int(up))

    def _egress_reconnect(self, name: str) -> None:
        self.metrics.egress_reconnects.labels(name).inc()

    def _dialer_for(self, host: str, port: int) -> Dialer | None:
        """The relay's own fetches leave the way the routes send host:port."""
        return self.settings.dialer_for(self.dialers, host, port)

    def _set_pins(self, pins: KonnectPins | None) -> None:
        self.resolver.pins = pins

    def _bound(self, name: tuple[str, int], added: bool) -> None:
        # The loop guard: a destination that resolves to a listener is refused.
        if added:
            self.resolver.listening.add(name)
        else:
            self.resolver.listening.discard(name)

    def _note_unpinned(self) -> None:
        if self.settings.konnect_ips.enabled:
            for egress, why in unpinned_egresses(self.settings):
                self.log("konnect_ips_not_applied", egress=egress, detail=why)

    # --- lifecycle ------------------------------------------------------------------

    async def start(
        self,
        inherited: dict[tuple[str, int], list[list[socket.socket]]] | None = None,
        *,
        defer_admin: bool = False,
    ) -> None:
        """Listen and serve. A successor (successor.py) serves on the
        predecessor's ``inherited`` listening sockets, and with
        ``defer_admin`` starts its admin listener later, on the predecessor's."""
        try:
            plan = await self.listeners.prepare(self._wanted(self.settings), inherited)
            await self.listeners.commit(plan)
        except ListenError as exc:
            raise OSError("; ".join(exc.errors)) from None
        if not defer_admin:
            await self.start_admin(None)
        for dialer in self.dialers.values():
            await dialer.start()
        self._note_unpinned()
        await self.feed.start()
        self.metrics.ready.set(1)
        self._schedule_sweep()
        if not defer_admin:
            self.announce()

    def announce(self, **extra: object) -> None:
        self.log(
            "listening",
            proxy=self.listeners.addresses,
            admin=self.admin_address or None,
            egress=self.settings.egress,
            config=self.settings.source,
            **extra,
        )

    async def start_admin(self, sock: socket.socket | None) -> None:
        if self.admin_path is not None:
            self.admin_address = await self.admin.start_unix(self.admin_path)
        elif self.settings.admin is not None:
            self.admin_address = await self.admin.start(*self.settings.admin, sock=sock)

    @staticmethod
    def _wanted(settings: Settings) -> list[tuple[config.ListenModel, tuple[str, int]]]:
        return list(zip(settings.specs, settings.listen, strict=True))

    async def reload(self, path: str | None) -> bool:
        """Re-read the config: all of it, or none of it (see _apply)."""
        if self.upgrade is not None:
            self.log("reload_failed", config=path, errors=["an upgrade is in progress"])
            return False
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                new = config.load(path)
                await _apply(self, new)
            except config.ConfigError as exc:
                self.metrics.reloads.labels("error").inc()
                self.log("reload_failed", config=exc.source, errors=exc.errors)
                self.last_reload = {"at": _now(), "result": "error", "errors": exc.errors}
                return False
            self.metrics.reloads.labels("ok").inc()
            self.last_reload = {"at": _now(), "result": "ok", "errors": []}
            return True
        finally:
            notify("READY=1")

    async def drain(self) -> None:
        """Stop accepting; let dials and live tunnels run until one deadline,
        drain_timeout from now; then close what is left and stop."""
        if self.draining:
            return
        if self.upgrade_task is not None and not self.upgrade_task.done():
            self.upgrade_task.cancel()  # the successor is killed, everything resumes here
            with contextlib.suppress(asyncio.CancelledError):
                await self.upgrade_task
        self.draining = True
        if not self.handed_over:  # else systemd follows the successor already
            notify("STOPPING=1")
        self.metrics.ready.set(0)
        self.listeners.close()
        for conn in list(self.pending):
            if conn.transport is not None:
                conn.transport.abort()
        timeout = self.settings.limits.drain_timeout
        deadline = self.loop.time() + timeout
        self.log("draining", tunnels=len(self.book), timeout_s=timeout)
        try:
            await self.tasks.wait(timeout)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self.connector.quiet()  # dials that run without a task
            try:
                async with asyncio.timeout_at(deadline):
                    await self.book.empty.wait()
            except TimeoutError:
                self.book.close_all("drain")
                try:
                    async with asyncio.timeout(CLOSE_LINGER):
                        await self.book.empty.wait()
                except TimeoutError:
                    self.log("drain_incomplete", tunnels=len(self.book))
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.listeners.close()
        await self.feed.close()
        for dialer in self.dialers.values():
            await dialer.close()
        self.admin.close()
        self.tasks.cancel()
        for waiting in (self.pending, self.dials, self.lingering, self.hellos):
            waiting.close()
        self.connector.close()
        self.log("stopped")
        self.log.flush()
        self.stopped.set()

    # --- requests -------------------------------------------------------------------

    def admission_at_accept(self) -> tuple[str, str] | None:
        # Each tunnel (or dial in progress) holds two descriptors, a pending head
        # one, and tunnels moving bulk data a pipe (two) per busy direction.
        pending = len(self.pending)
        busy = self.connector.dialing + len(self.book.tunnels)
        return self.admission.at_accept(
            pending, pending + 2 * busy + splice.pipe_fds(), self.fd_limit
        )

    # --- periodic sweep -------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = min(self.settings.limits.idle_timeout / 4, MAX_SWEEP_INTERVAL)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        settings = self.settings
        if self.upgrade is not None:  # tunnels on their way out are not touched
            self._schedule_sweep()
            return
        self.book.sweep(
            time.monotonic(), settings.limits.idle_timeout, settings.data_planes.forget_after
        )
        self._schedule_sweep()


async def _apply(relay: Relay, new: Settings) -> None:
    """Everything that can fail (TLS files, binding new addresses) happens
    first, while the old config serves; a failure is a ConfigError and
    nothing changed. Then the swap, which cannot fail."""
    old = relay.settings
    try:
        plan = await relay.listeners.prepare(relay._wanted(new))
        await relay.listeners.commit(plan)
    except ListenError as exc:
        raise config.ConfigError(exc.errors, new.source) from None
    resolver = resolver_for(new, relay.feed.pins)
    resolver.listening = relay.resolver.listening
    dialers = make_dialers(
        new.egress_config, resolver, relay._egress_state, relay._egress_reconnect
    )
    kept: dict[str, Dialer] = {}
    for name, dialer in dialers.items():
        previous = relay.dialers.get(name)
        if previous is not None and old.egress_config.settings_of(
            name
        ) == new.egress_config.settings_of(name):
            previous.retarget(resolver)
            kept[name] = previous  # e.g. keep the live SSH connection and its tunnels
        else:
            await dialer.start()
            kept[name] = dialer
    retired = [d for n, d in relay.dialers.items() if kept.get(n) is not d]
    relay.settings, relay.resolver, relay.dialers = new, resolver, kept
    relay.admission = Admission(new)
    for dialer in retired:
        await dialer.close()
    await relay.feed.reconfigure(new)
    relay._note_unpinned()
    revoked = relay.book.close_where(relay.admission.revokes, "policy_revoked")
    extra = {}
    if new.admin != old.admin:
        extra["admin_unchanged"] = "admin.address changes on restart, not on reload"
    relay.log("reloaded", config=new.source, tunnels=len(relay.book), revoked=revoked, **extra)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def clients_view(relay: Relay) -> list[dict[str, object]]:
    """/clients: the data planes behind the relay's tunnels (clients.py)."""
    settings = relay.settings
    return clients(
        relay.book.tunnels.values(),
        relay.book.memory,
        settings.limits.reconnect_window,
        settings.data_planes,
    )


def admin_routes(relay: Relay) -> dict[str, Handler]:
    """The relay's admin table: each handler shows what its part keeps."""

    async def metrics(query: Query) -> Reply:
        relay.book.fold_all()
        return relay.metrics.reply()

    async def healthz(query: Query) -> Reply:
        return text(200, "ok\n")

    async def readyz(query: Query) -> Reply:
        return text(503, "draining\n") if relay.draining else text(200, "ready\n")

    async def tunnels(query: Query) -> Reply:
        return json_reply(filtered(relay.book.snapshot(), query, ("host", "client")))

    async def clients_(query: Query) -> Reply:
        return json_reply(filtered(clients_view(relay), query, ("identity", "state", "client")))

    async def debug_tasks(query: Query) -> Reply:
        # For leak checks: what the relay holds besides its tunnels.
        return json_reply(
            {
                "relay_tasks": len(relay.tasks),
                "loop_tasks": len(asyncio.all_tasks(relay.loop)),
                "dialing": relay.connector.dialing,
                "pending_heads": len(relay.pending),
                "dials_waiting": len(relay.dials),
                "lingering": len(relay.lingering),
                "hellos_waiting": len(relay.hellos),
                "tunnels": len(relay.book),
            }
        )

    return {
        "/metrics": metrics,
        "/healthz": healthz,
        "/readyz": readyz,
        "/tunnels": tunnels,
        "/clients": clients_,
        **page_routes(relay),
        "/debug/tasks": debug_tasks,
    }
