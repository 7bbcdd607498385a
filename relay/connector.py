"""The connector: verify credentials, dial through the egress, open the tunnel.

Given an admitted request (admission.Dial) it dials the destination through
the egress the route chose, answers ``200`` only once the destination is
connected, and hands both transports to a ``Tunnel``; a failed dial becomes
the status and reason the client gets. Credentials that are not in the cache
are verified here, on a small thread pool of their own: argon2 costs ~0.3 s of
CPU and 64 MiB by design, and a flood of bad credentials must not starve the
event loop's default executor (DNS) or the memory.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

from relay import connect
from relay.admission import Admission, Dial, Refuse, Verify
from relay.auth import AuthError
from relay.connection import ClientConnection, format_target
from relay.egress import Dialer, DialError, Dialled
from relay.tunnel import PeekHello, Pending, Tunnel

if TYPE_CHECKING:
    from relay.server import Relay

# In report mode a tunnel the policy would deny carries this host label, so
# Prometheus label values stay bounded by the allowlist.
REPORT_HOST_LABEL = "(would-deny)"
# Credential checks queued or running at once before new ones get 503.
MAX_PENDING_VERIFICATIONS = 32


class Connector:
    """Dials and credential checks in flight, for one relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="auth")
        self.verifying = 0
        self.dialing = 0
        self._quiet: asyncio.Future[None] | None = None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- a request: credentials, then admission -------------------------------------

    def on_head(self, conn: ClientConnection, request: connect.ConnectRequest) -> None:
        relay = self.relay
        if conn.listener.sni:  # an SNI client sends no credentials
            self.admit(conn, request)
            return
        answer = relay.admission.credentials(request.proxy_authorization)
        if type(answer) is Refuse:
            target = format_target(request.host, request.port)
            conn.refuse(answer.status, answer.reason, answer.detail, answer.headers, target)
        elif type(answer) is Verify:
            self.verify(conn, request, relay.admission)
        else:
            conn.user = answer  # type: ignore[assignment]
            self.admit(conn, request)

    def admit(self, conn: ClientConnection, request: connect.ConnectRequest) -> None:
        """Act on admission's decision: refuse, or dial."""
        relay = self.relay
        conn.identity = conn.user or conn.cert or conn.client_ip
        answer = relay.admission.decide(
            conn.user,
            conn.cert,
            conn.client_ip,
            request.host,
            request.port,
            draining=relay.draining,
            busy=self.dialing + len(relay.book.tunnels),
            per_client=relay.book.per_client,
        )
        if type(answer) is Refuse:
            target = format_target(request.host, request.port)
            conn.refuse(
                answer.status, answer.reason, answer.detail, answer.headers, target, **answer.fields
            )
            return
        assert type(answer) is Dial
        if answer.would_deny:
            relay.metrics.would_deny.labels(answer.decision.reason.value).inc()
        self.dial(conn, answer, relay.dialers[answer.via])

    # --- credentials ----------------------------------------------------------------

    def verify(
        self, conn: ClientConnection, request: connect.ConnectRequest, admission: Admission
    ) -> None:
        target = format_target(request.host, request.port)
        if self.verifying >= MAX_PENDING_VERIFICATIONS:
            conn.refuse(
                503, "auth_busy", "too many credential checks in progress; retry", (), target
            )
            return
        conn.task = self.relay.tasks.spawn(self._verify(conn, request, admission))

    async def _verify(
        self, conn: ClientConnection, request: connect.ConnectRequest, admission: Admission
    ) -> None:
        auth = admission.settings.auth
        assert auth is not None
        self.verifying += 1
        try:
            conn.user = await asyncio.get_running_loop().run_in_executor(
                self.executor, auth.verify, request.proxy_authorization, time.monotonic()
            )
        except AuthError as exc:
            refusal = admission.auth_refusal(exc)
            target = format_target(request.host, request.port)
            conn.refuse(refusal.status, refusal.reason, refusal.detail, refusal.headers, target)
            return
        finally:
            self.verifying -= 1
        conn.task = None
        if conn.transport is not None:
            self.admit(conn, request)

    # --- the dial -------------------------------------------------------------------

    def dial(self, conn: ClientConnection, dial: Dial, dialer: Dialer) -> None:
        """Dial through ``dialer`` within limits.connect_timeout: driven by callbacks
        when the dialer can (the direct dialer to an address it knows), else on a task."""
        relay = self.relay
        relay.book.reserve(dial.identity)
        self.dialing += 1
        conn.dialing()
        attempt = _Attempt(self, conn, dial, dialer)
        handle = dialer.dial_now(dial.host, dial.port, attempt.pending, attempt.done)
        if handle is None:
            handle = relay.tasks.spawn(self._open(attempt))
        if not handle.done():  # it may have ended already (an immediate failure)
            conn.task = handle

    async def _open(self, attempt: _Attempt) -> None:
        """The dial on a task, for dialers with waits of their own."""
        dial = attempt.dial
        try:
            dialled = await attempt.dialer.dial(dial.host, dial.port, attempt.pending)
        except BaseException as exc:
            if not attempt.done(None, exc):
                raise
        else:
            attempt.done(dialled, None)

    async def quiet(self) -> None:
        """Until no dial is in progress (drain waits for them)."""
        while self.dialing:
            self._quiet = self.relay.loop.create_future()
            await self._quiet

    def dial_ended(self) -> None:
        self.dialing -= 1
        if not self.dialing and self._quiet is not None:
            if not self._quiet.done():
                self._quiet.set_result(None)
            self._quiet = None


class _Attempt:
    """One admitted dial: what it needs to open the tunnel, or to answer why not."""

    __slots__ = (
        "booked",
        "conn",
        "connector",
        "dial",
        "dialer",
        "extra",
        "pending",
        "settings",
        "started",
    )

    def __init__(
        self, connector: Connector, conn: ClientConnection, dial: Dial, dialer: Dialer
    ) -> None:
        relay = connector.relay
        self.connector = connector
        self.conn = conn
        self.dial = dial
        self.dialer = dialer
        self.settings = relay.settings
        self.pending = Pending()
        self.started = relay.loop.time()
        extra: dict[str, Any] = {"rule": dial.decision.rule}
        if dial.entry:
            extra["client_entry"] = dial.entry
        if dial.would_deny:
            extra["would_deny"] = True
            extra["would_deny_detail"] = dial.decision.detail
        self.extra = extra
        self.booked = False  # the tunnel book holds the tunnel (and releases for it)

    def done(self, dialled: Dialled | None, exc: BaseException | None) -> bool:
        """The dial's outcome (called once). False for an exception the caller
        must re-raise: a cancellation because the client left, or a bug."""
        try:
            if dialled is not None:
                self.opened(dialled)
                return True
            if isinstance(exc, DialError):
                self.failed(exc.status, exc.reason, exc.detail)
                return True
            if isinstance(exc, asyncio.CancelledError):
                return self.cancelled()
            if exc is not None:
                raise exc
            return True
        finally:
            self.connector.dial_ended()
            if not self.booked:
                self.connector.relay.book.release(self.dial.identity)

    def cancelled(self) -> bool:
        """limits.connect_timeout passed (504), or the client left (re-raise)."""
        conn = self.conn
        if self.pending.transport is not None:
            self.pending.transport.abort()
        host, port = self.dial.host, self.dial.port
        if conn.expired:
            timeout = self.settings.limits.connect_timeout
            detail = f"connect to {format_target(host, port)} timed out after {timeout:g} s"
            self.failed(504, "timeout", detail)
            return True
        dial_ms = round((self.connector.relay.loop.time() - self.started) * 1000, 3)
        target = format_target(host, port)
        conn.log_request(target, True, 0, "client_gone", dial_ms=dial_ms, **self.extra)
        return False

    def failed(self, status: int, reason: str, detail: str) -> None:
        relay = self.connector.relay
        dial_ms = round((relay.loop.time() - self.started) * 1000, 3)
        if status != 403:
            relay.metrics.connect_failures.labels(self.dialer.name, reason).inc()
        target = format_target(self.dial.host, self.dial.port)
        self.conn.refuse(status, reason, detail, (), target, dial_ms=dial_ms, **self.extra)

    def opened(self, dialled: Dialled) -> None:
        """Connected: answer 200 and start the tunnel."""
        relay = self.connector.relay
        conn, dial, settings, extra = self.conn, self.dial, self.settings, self.extra
        host, port = dial.host, dial.port
        dialer = self.dialer
        elapsed = relay.loop.time() - self.started
        relay.metrics.connect_time(dialer.name).observe(elapsed)
        if dialled.would_deny:  # resolver.konnect_ips in report mode
            relay.metrics.would_deny.labels("address_not_pinned").inc()
            extra["would_deny"] = True
            extra["would_deny_reason"] = "address_not_pinned"
            extra["would_deny_detail"] = dialled.would_deny
        who = (conn.user, conn.cert, conn.client_ip)
        if relay.settings is not settings and relay.admission.revokes(who, host, port):
            dialled.transport.abort()  # a reload during the dial denies it now
            target = format_target(host, port)
            conn.refuse(
                403, "policy_revoked", f"the reloaded policy denies {target}", (), target, **extra
            )
            return
        client = conn.transport
        if client is None or client.is_closing():
            dialled.transport.abort()
            conn.handed_over()
            return
        listener = conn.listener
        if not listener.sni:  # an SNI client never sent a CONNECT
            client.write(connect.ESTABLISHED)
        early, conn.buf = bytes(conn.buf), b""
        tunnel = Tunnel(dial.identity, host, port, dialer.name, relay.book.closed, listener.name)
        tunnel.label = REPORT_HOST_LABEL if dial.would_deny else host
        tunnel.who = who
        relay.book.opened(tunnel)
        self.booked = True
        conn.handed_over()
        peek = None
        if dial.konnect and settings.require_tls and not listener.sni:
            peek = PeekHello(
                tunnel,
                host if settings.check_sni else None,
                relay.hellos,
            )
        tunnel.start(client, dialled.transport, early, self.pending, dialled.leftover, peek)
        tunnel.keepalive_due = dialled.keepalive
        if conn.client_eof:
            cast(asyncio.Protocol, client.get_protocol()).eof_received()
        relay.book.log_established(
            tunnel,
            conn.peer,
            dial.identity,
            format_target(host, port),
            dial.decision.reason.value,
            dialled.peer,
            elapsed,
            extra,
        )
