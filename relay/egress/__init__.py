"""Egress: how the relay reaches a destination. One dialer per mode, one interface.

A dialer turns ``host:port`` (already allowed by the policy) into a connected
transport carrying the caller's protocol object. The tunnel never knows which
dialer it got: a direct TCP connection, a CONNECT through a parent proxy, or a
channel through an SSH bastion all look the same from the hot path.
"""

from __future__ import annotations

import abc
import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.resolver import Resolver


@dataclass(frozen=True, slots=True)
class HttpProxySettings:
    """``egress.http_proxy``: the parent proxy."""

    url: str
    ca_file: str | None
    verify: bool
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class SSHSettings:
    """``egress.ssh``: the bastion (``known_hosts`` is never empty)."""

    host: str
    port: int
    username: str
    client_keys: tuple[str, ...]
    known_hosts: str
    keepalive_interval: float
    max_channels: int
    resolve: str  # "remote" or "local"
    connect_timeout: float


@dataclass(frozen=True, slots=True)
class EgressSettings:
    """The egresses a config uses (``egress.mode`` and every route's ``via``)."""

    mode: str = "direct"
    used: tuple[str, ...] = ("direct",)
    http_proxy: HttpProxySettings | None = None
    ssh: SSHSettings | None = None

    def settings_of(self, name: str) -> object:
        """What a long-lived dialer was built from (equal: keep it on reload)."""
        return {"http_proxy": self.http_proxy, "ssh": self.ssh}.get(name)


class DialError(Exception):
    """The destination could not be reached. ``reason`` is a bounded label."""

    def __init__(self, reason: str, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.status = status


@dataclass(slots=True)
class Dialled:
    """A connected upstream. ``leftover`` are bytes that arrived during the egress
    handshake (e.g. after a parent proxy's 200) and belong to the tunnel.
    ``keepalive``: SO_KEEPALIVE is still to be set on this TCP connection (the
    server does it once the tunnel has lived through one sweep period).
    ``would_deny``: the dialled address is one ``resolver.konnect_ips`` in
    report mode let through (the detail to log), else empty."""

    transport: asyncio.Transport
    peer: str
    leftover: bytes = b""
    keepalive: bool = False
    would_deny: str = ""


class Dialing(Protocol):
    """A dial in progress that ``Dialer.dial_now`` started (or a task)."""

    def cancel(self) -> object: ...

    def done(self) -> bool: ...


# dial_now's callback: (the connection, None) or (None, the exception:
# DialError, or CancelledError once cancelled), called exactly once.
DialDone = Callable[["Dialled | None", "BaseException | None"], object]


class Dialer(abc.ABC):
    """One way out. Implementations: direct, http_proxy, ssh."""

    name: str
    resolver: Resolver

    @abc.abstractmethod
    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        """Connect to host:port with ``protocol`` attached; raise DialError."""

    def dial_now(
        self, host: str, port: int, protocol: asyncio.Protocol, done: DialDone
    ) -> Dialing | None:
        """Start the same dial driven by callbacks, when this dialer can do it
        without a task (no coroutine of its own to wait on); ``done`` reports the
        outcome, possibly before this returns. None: use ``dial`` on a task."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin long-lived work (an SSH connection, say); must not block for long."""

    def retarget(self, resolver: Resolver) -> None:
        """Use a new resolver (static map, address checks) after a reload."""
        self.resolver = resolver

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release long-lived resources."""


_ERRNO_REASONS = {
    errno.ECONNREFUSED: ("refused", "connection refused"),
    errno.ENETUNREACH: ("unreachable", "network unreachable"),
    errno.EHOSTUNREACH: ("unreachable", "host unreachable"),
    errno.ETIMEDOUT: ("timeout", "connection timed out"),
    errno.ECONNRESET: ("reset", "connection reset"),
    errno.EADDRNOTAVAIL: ("unreachable", "address not available"),
    errno.EMFILE: ("fd_limit", "relay is at its open-file limit"),
    errno.ENFILE: ("fd_limit", "system is at its open-file limit"),
}


def classify(exc: OSError, where: str) -> DialError:
    """A DialError naming the cause of a failed connect to ``where``."""
    reason, text = _ERRNO_REASONS.get(exc.errno or 0, ("connect_error", exc.strerror or str(exc)))
    return DialError(reason, f"{text} by {where}" if reason == "refused" else f"{text}: {where}")


def make_dialers(
    egress: EgressSettings,
    resolver: Resolver,
    on_state: Callable[[str, bool], None] | None = None,
    on_reconnect: Callable[[str], None] | None = None,
) -> dict[str, Dialer]:
    """One dialer per egress the config uses (``egress.mode`` and every route).
    ``on_state(name, up)`` and ``on_reconnect(name)`` report a long-lived egress
    connection's health (the SSH bastion)."""
    dialers: dict[str, Dialer] = {}
    for name in sorted(egress.used):
        if name == "direct":
            from relay.egress.direct import DirectDialer

            dialers[name] = DirectDialer(resolver)
        elif name == "http_proxy":
            from relay.egress.http_proxy import HttpProxyDialer

            assert egress.http_proxy is not None
            dialers[name] = HttpProxyDialer(egress.http_proxy, resolver)
        elif name == "ssh":
            from relay.egress.ssh import SSHDialer

            assert egress.ssh is not None
            dialers[name] = SSHDialer(
                egress.ssh,
                resolver,
                on_state=(lambda up: on_state("ssh", up)) if on_state else None,
                on_reconnect=(lambda: on_reconnect("ssh")) if on_reconnect else None,
            )
    return dialers
