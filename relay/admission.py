"""Admission: what happens to a connection and to its request, decided before
anything is done (smokescreen's ``checkACLsForRequest`` before
``handleConnect``).

Two questions, two pure answers:

- :meth:`Admission.at_accept`: may a new connection wait for its head at all
  (pending heads, the file-descriptor budget)? ``None`` or (reason, detail).
- :meth:`Admission.decide`: given who the client is and what it asks for,
  :class:`Refuse` or :class:`Dial`. The policy for this client (``clients:``,
  ``clients_only``), report mode (a would-deny becomes a marked Dial), draining,
  ``limits.max_tunnels``, the per-client cap and the egress route are all here.
  The server acts on the answer; the ``policy`` command and ``doctor`` print it.

Credentials are the step between (:meth:`Admission.credentials`): a cached
header answers at once, a syntax error is refused at once, anything else must
be verified off the event loop (:data:`VERIFY`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.auth import CHALLENGE, AuthError
from relay.config import Settings
from relay.hostport import hostport
from relay.policy import Decision, Reason

# File descriptors kept free for the admin listener, logs, DNS and the listeners
# themselves: beyond this the relay answers 503 instead of letting accept fail.
FD_RESERVE = 64


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer ``status`` and close; ``fields`` go on the request line."""

    status: int
    reason: str
    detail: str
    headers: tuple[tuple[str, str], ...] = ()
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)  # not frozen: one per tunnel, and frozen costs a setattr per field
class Dial:
    """Open a tunnel to ``host:port`` through egress ``via``."""

    decision: Decision
    host: str
    port: int
    via: str
    identity: str
    entry: str  # the clients: entry that matched, "" for the top-level policy
    konnect: bool  # a name of the Konnect presets (TLS only, SNI checked)
    would_deny: bool  # report mode: enforce would refuse it


class Verify:
    """The credentials must be verified off the event loop (argon2)."""

    __slots__ = ()


VERIFY = Verify()


class Admission:
    """The decisions for one config (a reload builds a new one)."""

    __slots__ = ("settings",)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def at_accept(self, pending: int, fds_in_use: int, fd_limit: int) -> tuple[str, str] | None:
        """(reason, detail) when a new connection must be refused at once."""
        if pending >= self.settings.limits.max_pending_heads:
            return "too_many_pending", "too many connections without a request head"
        if fds_in_use + FD_RESERVE >= fd_limit:
            return "fd_limit", "relay is at its open-file limit; retry shortly"
        return None

    def credentials(self, header: bytes | None) -> str | Verify | Refuse | None:
        """The proxy user (None without ``auth:``), VERIFY, or a 407 refusal."""
        auth = self.settings.auth
        if auth is None:
            return None
        try:
            user = auth.cached(header, time.monotonic())
            if user is None:
                auth.parse(header)  # syntax errors answered at once, without a thread
        except AuthError as exc:
            return self.auth_refusal(exc)
        return VERIFY if user is None else user

    @staticmethod
    def auth_refusal(exc: AuthError) -> Refuse:
        return Refuse(407, exc.reason, exc.detail, CHALLENGE)

    def decide(
        self,
        user: str | None,
        cert: str | None,
        client_ip: str,
        host: str,
        port: int,
        *,
        draining: bool = False,
        busy: int = 0,
        per_client: Mapping[str, int] | None = None,
    ) -> Refuse | Dial:
        """Policy for this client, report mode, limits and route; ``busy`` is
        the tunnels open and being dialled, ``per_client`` those per identity."""
        settings = self.settings
        entry, pol = settings.policy_for(user, cert, client_ip)
        identity = user or cert or client_ip
        if pol is None:
            return Refuse(403, "client_not_listed", f"client {identity} matches no clients: entry")
        decision = pol.decide(host, port)
        would_deny = False
        if not decision.allowed:
            invalid = decision.reason is Reason.INVALID_HOST
            if invalid or settings.policy_mode == "enforce":
                return Refuse(
                    400 if invalid else 403,
                    decision.reason.value,
                    decision.detail,
                    fields={"rule": decision.rule, "client_entry": entry or None},
                )
            would_deny = True
        if draining:
            return Refuse(503, "draining", "relay is shutting down")
        limits = settings.limits
        if limits.max_tunnels is not None and busy >= limits.max_tunnels:
            return Refuse(
                503, "too_many_tunnels", f"relay is at limits.max_tunnels ({limits.max_tunnels})"
            )
        cap = limits.max_tunnels_per_client
        if cap is not None and per_client is not None and per_client.get(identity, 0) >= cap:
            return Refuse(
                429,
                "too_many_tunnels_per_client",
                f"client {identity} is at limits.max_tunnels_per_client ({cap})",
            )
        name = decision.host or host.strip("[]")
        via = settings.route(name, port)
        if via == "deny":
            return Refuse(
                403,
                "route_denied",
                f"egress.routes refuse {hostport(host, port)}",
                fields={"rule": decision.rule},
            )
        konnect = pol.konnect_rule(name) is not None
        return Dial(decision, name, port, via, identity, entry, konnect, would_deny)

    def revokes(self, who: tuple[str | None, str | None, str], host: str, port: int) -> bool:
        """Does this config revoke a live tunnel of client ``who`` (user, cert,
        address) to ``host:port`` (``reload.close_revoked``)?"""
        settings = self.settings
        if not settings.close_revoked:
            return False
        _, pol = settings.policy_for(*who)
        if pol is None:
            return True
        return settings.policy_mode == "enforce" and not pol.decide(host, port).allowed
