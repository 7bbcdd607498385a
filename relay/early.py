"""Connections that end before a complete request head: counted and logged.

A client that closes or resets during the TLS handshake of a TLS listener
(Kong rejecting the relay's certificate, a client without the certificate
``client_ca`` asks for, a plain-HTTP client on a TLS port) or before its head
is complete (a TCP health check, a scanner, a client that gave up) never gets a
``request`` line: there is no request. Each is counted in
``konnect_relay_early_closes_total{listener, phase}`` and logged as an
``early_close`` line with the client address and what was seen, at most one
line per listener and phase per ``LOG_INTERVAL`` seconds; the next line carries
how many were not logged in between (``suppressed``), so a port scan or a
probe every second cannot flood the log while the count stays exact.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter

from relay.head import HeadReader
from relay.log import EventLog

# At most one early_close line per (listener, phase) this often.
LOG_INTERVAL = 10.0

PHASES = ("tls_handshake", "head")


class EarlyCloses:
    """Counts and rate-limited lines for connections that ended before a head."""

    __slots__ = ("_last", "_suppressed", "counter", "log")

    def __init__(self, counter: Counter, log: EventLog) -> None:
        self.counter = counter
        self.log = log
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def in_head(self, listener: str, client: str, reader: HeadReader | None, how: str) -> None:
        """A connection closed, reset or lost while sending its head."""
        received = len(reader.buf) if reader is not None else 0
        detail = f"connection {how} before a complete request head ({received} bytes)"
        self.note(listener, "head", client, detail, bytes=received)

    def note(self, listener: str, phase: str, client: str, detail: str, **fields: Any) -> None:
        self.counter.labels(listener, phase).inc()
        key = (listener, phase)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        self.log(
            "early_close",
            listener=listener,
            phase=phase,
            client=client,
            detail=detail,
            suppressed=suppressed,
            **fields,
        )
