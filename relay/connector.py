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
from relay.egress import Dialer, DialError
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
        self.dial(conn, answer, relay.dialers[answer.via], relay.settings.limits.connect_timeout)

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

    def dial(self, conn: ClientConnection, dial: Dial, dialer: Dialer, timeout: float) -> None:
        relay = self.relay
        relay.book.reserve(dial.identity)
        self.dialing += 1
        conn.dialing(relay.tasks.spawn(self._open(conn, dial, dialer)), timeout)

    async def _open(self, conn: ClientConnection, dial: Dial, dialer: Dialer) -> None:
        relay = self.relay
        loop = relay.loop
        host, port = dial.host, dial.port
        target = format_target(host, port)
        settings = relay.settings
        pending = Pending()
        started = loop.time()
        extra: dict[str, Any] = {"rule": dial.decision.rule}
        if dial.entry:
            extra["client_entry"] = dial.entry
        if dial.would_deny:
            extra["would_deny"] = True
            extra["would_deny_detail"] = dial.decision.detail
        opened = False
        try:
            try:
                dialled = await dialer.dial(host, port, pending)
            except DialError as exc:
                self._failed(
                    conn, dialer, target, started, exc.status, exc.reason, exc.detail, extra
                )
                return
            except asyncio.CancelledError:
                if pending.transport is not None:
                    pending.transport.abort()
                if conn.expired:
                    timeout = settings.limits.connect_timeout
                    detail = f"connect to {target} timed out after {timeout:g} s"
                    self._failed(conn, dialer, target, started, 504, "timeout", detail, extra)
                    return
                dial_ms = round((loop.time() - started) * 1000, 3)
                conn.log_request(target, True, 0, "client_gone", dial_ms=dial_ms, **extra)
                raise
            elapsed = loop.time() - started
            relay.metrics.connect_time(dialer.name).observe(elapsed)
            if dialled.would_deny:  # resolver.konnect_ips in report mode
                relay.metrics.would_deny.labels("address_not_pinned").inc()
                extra["would_deny"] = True
                extra["would_deny_reason"] = "address_not_pinned"
                extra["would_deny_detail"] = dialled.would_deny
            who = (conn.user, conn.cert, conn.client_ip)
            if relay.settings is not settings and relay.admission.revokes(who, host, port):
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
                conn.handed_over()
                return
            listener = conn.listener
            if not listener.sni:  # an SNI client never sent a CONNECT
                client.write(connect.ESTABLISHED)
            early, conn.buf = bytes(conn.buf), b""
            tunnel = Tunnel(
                dial.identity, host, port, dialer.name, relay.book.closed, listener.name
            )
            tunnel.label = REPORT_HOST_LABEL if dial.would_deny else host
            tunnel.who = who
            relay.book.opened(tunnel)
            opened = True
            conn.handed_over()
            peek = None
            if dial.konnect and settings.require_tls and not listener.sni:
                peek = PeekHello(
                    tunnel,
                    host if settings.check_sni else None,
                    settings.limits.tls_peek_timeout,
                    loop,
                )
            tunnel.start(client, dialled.transport, early, pending, dialled.leftover, peek)
            tunnel.keepalive_due = dialled.keepalive
            if conn.client_eof:
                cast(asyncio.Protocol, client.get_protocol()).eof_received()
            relay.book.log_established(
                tunnel,
                conn.peer,
                dial.identity,
                target,
                dial.decision.reason.value,
                dialled.peer,
                elapsed,
                extra,
            )
        finally:
            self.dialing -= 1
            if not opened:
                relay.book.release(dial.identity)

    def _failed(
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
        dial_ms = round((self.relay.loop.time() - started) * 1000, 3)
        if status != 403:
            self.relay.metrics.connect_failures.labels(dialer.name, reason).inc()
        conn.refuse(status, reason, detail, (), target, dial_ms=dial_ms, **extra)
