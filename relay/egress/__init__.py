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
from dataclasses import dataclass


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
    handshake (e.g. after a parent proxy's 200) and belong to the tunnel."""

    transport: asyncio.Transport
    peer: str
    leftover: bytes = b""


class Dialer(abc.ABC):
    """One way out. Implementations: direct, http_proxy, ssh."""

    name: str

    @abc.abstractmethod
    async def dial(self, host: str, port: int, protocol: asyncio.Protocol) -> Dialled:
        """Connect to host:port with ``protocol`` attached; raise DialError."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release long-lived resources (an SSH connection, say)."""


_ERRNO_REASONS = {
    errno.ECONNREFUSED: ("refused", "connection refused"),
    errno.ENETUNREACH: ("unreachable", "network unreachable"),
    errno.EHOSTUNREACH: ("unreachable", "host unreachable"),
    errno.ETIMEDOUT: ("timeout", "connection timed out"),
    errno.ECONNRESET: ("reset", "connection reset"),
    errno.EADDRNOTAVAIL: ("unreachable", "address not available"),
}


def classify(exc: OSError, where: str) -> DialError:
    """A DialError naming the cause of a failed connect to ``where``."""
    reason, text = _ERRNO_REASONS.get(exc.errno or 0, ("connect_error", exc.strerror or str(exc)))
    return DialError(reason, f"{text} by {where}" if reason == "refused" else f"{text}: {where}")
