"""Data planes, not just tunnels: per client identity, what it reaches and a state.

A Kong data plane holds tunnels to its control plane's configuration endpoint
(``{cp}.{region}.cp.konghq.com``, legacy ``cp0``) and telemetry endpoint
(``…tp…``, ``tp0``): one for ``/v1/outlet`` plus one per nginx worker. The
tunnel book knows each live tunnel's identity (proxy user, client-certificate
name, or source address) and host; :class:`ClientMemory` adds what outlives a
tunnel (when an identity was last seen, its recent reconnects, its last
refusal), bounded in size and time. :func:`clients` builds the ``/clients``
view from both, and :func:`state_of` the state, by these rules (README, "Data
planes"):

- ``flapping``: at least ``data_planes.flapping_reconnects`` reconnects
  within ``limits.reconnect_window`` (whatever else is open);
- ``ok``: tunnels open, and a telemetry tunnel beside the configuration ones
  (or a configuration tunnel younger than ``data_planes.no_telemetry_after``:
  Kong opens telemetry just after);
- ``no_telemetry``: a configuration tunnel open for more than
  ``data_planes.no_telemetry_after`` seconds without any telemetry tunnel
  (telemetry bypasses the relay, or fails);
- ``refused``: no tunnel open, and refused since its last tunnel closed;
- ``gone``: no tunnel open; forgotten ``data_planes.forget_after`` seconds
  after it was last seen.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.schema import DataPlanesModel
    from relay.tunnel import Tunnel

STATES = ("ok", "no_telemetry", "flapping", "refused", "gone")
RECENT_REFUSALS = 100
# Identities remembered without a live tunnel, at most (the oldest go first).
MAX_REMEMBERED = 10_000


def endpoint_of(host: str) -> tuple[str, str, str]:
    """(control-plane label, region, kind) of a tunnel's host; kind is config,
    telemetry, or other (any other Konnect API, or a host outside Konnect)."""
    labels = host.split(".")
    if len(labels) == 5 and labels[3] == "konghq" and labels[4] == "com":
        kind = labels[2]
        if kind in ("cp", "cp0"):
            return labels[0], labels[1], "config"
        if kind in ("tp", "tp0"):
            return labels[0], labels[1], "telemetry"
    return "", "", "other"


@dataclass(slots=True)
class Remembered:
    """What outlives an identity's tunnels."""

    seen: float  # monotonic: last tunnel closed, or last refusal
    reconnects: deque[float]
    refusal: tuple[float, str, str, int] | None = None  # wall time, reason, target, status
    refused_at: float = 0.0  # monotonic
    closed_at: float = 0.0  # monotonic, last tunnel closed


class ClientMemory:
    """Per identity: last seen, reconnects in the window, last refusal."""

    def __init__(self) -> None:
        self.known: dict[str, Remembered] = {}
        # The last refusals, for the status page: never a header value.
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)

    def _get(self, identity: str, now: float) -> Remembered:
        entry = self.known.pop(identity, None)
        if entry is None:
            entry = Remembered(now, deque(maxlen=64))
            if len(self.known) >= MAX_REMEMBERED:
                del self.known[next(iter(self.known))]
        self.known[identity] = entry  # most recent last
        entry.seen = now
        return entry

    def closed(self, identity: str, now: float) -> None:
        self._get(identity, now).closed_at = now

    def reconnected(self, identity: str, now: float) -> None:
        self._get(identity, now).reconnects.append(now)

    def refused(self, identity: str, client: str, reason: str, target: str, status: int) -> None:
        now = time.monotonic()
        entry = self._get(identity, now)
        wall = time.time()
        entry.refusal = (wall, reason, target, status)
        self.recent.appendleft(
            {
                "at": _iso(wall),
                "client": client,
                "identity": identity,
                "target": target,
                "status": status,
                "reason": reason,
            }
        )
        entry.refused_at = now

    def state(self, now: float) -> dict[str, Any]:
        """For a successor (book.memory_state): times as ages."""
        return {
            "known": [
                [
                    identity,
                    now - e.seen,
                    [now - r for r in e.reconnects],
                    list(e.refusal) if e.refusal else None,
                    now - e.refused_at if e.refused_at else None,
                    now - e.closed_at if e.closed_at else None,
                ]
                for identity, e in self.known.items()
            ],
            "recent": list(self.recent),
        }

    def adopt(self, state: dict[str, Any], now: float) -> None:
        """The predecessor's memory, under what this process learnt already."""
        for identity, seen, reconnects, refusal, refused, closed in state.get("known", ()):
            if identity in self.known:
                continue
            entry = Remembered(now - seen, deque((now - r for r in reconnects), maxlen=64))
            if refusal is not None:
                wall, reason, target, status = refusal
                entry.refusal = (float(wall), str(reason), str(target), int(status))
            entry.refused_at = now - refused if refused is not None else 0.0
            entry.closed_at = now - closed if closed is not None else 0.0
            if len(self.known) >= MAX_REMEMBERED:
                break
            self.known[identity] = entry
        known = {(r.get("at"), r.get("identity")) for r in self.recent}
        for record in state.get("recent", ()):
            if (record.get("at"), record.get("identity")) not in known:
                self.recent.append(record)

    def prune(self, now: float, window: float, forget_after: float) -> None:
        for identity in [i for i, e in self.known.items() if now - e.seen > forget_after]:
            del self.known[identity]
        for entry in self.known.values():
            while entry.reconnects and now - entry.reconnects[0] > window:
                entry.reconnects.popleft()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def state_of(
    live: list[Tunnel],
    entry: Remembered | None,
    now: float,
    window: float,
    rules: DataPlanesModel,
) -> str:
    reconnects = sum(1 for t in entry.reconnects if now - t <= window) if entry else 0
    if reconnects >= rules.flapping_reconnects:
        return "flapping"
    if live:
        kinds = [endpoint_of(t.host)[2] for t in live]
        if "config" in kinds and "telemetry" not in kinds:
            oldest = min(t.opened_mono for t, k in zip(live, kinds, strict=True) if k == "config")
            if now - oldest > rules.no_telemetry_after:
                return "no_telemetry"
        return "ok"
    if entry is not None and entry.refusal is not None and entry.refused_at >= entry.closed_at:
        return "refused"
    return "gone"


def clients(
    tunnels: Iterable[Tunnel], memory: ClientMemory, window: float, rules: DataPlanesModel
) -> list[dict[str, Any]]:
    """The /clients view, most recently active first."""
    now = time.monotonic()
    to_wall = time.time() - now
    live: dict[str, list[Tunnel]] = {}
    for tunnel in tunnels:
        live.setdefault(tunnel.client, []).append(tunnel)
    out: list[dict[str, Any]] = []
    order: list[float] = []
    for identity in {*live, *memory.known}:
        mine = live.get(identity, [])
        entry = memory.known.get(identity)
        planes: dict[tuple[str, str], dict[str, Any]] = {}
        for t in mine:
            cp, region, kind = endpoint_of(t.host)
            plane = planes.setdefault(
                (cp, region),
                {
                    "control_plane": cp or None,
                    "region": region or None,
                    "config": 0,
                    "telemetry": 0,
                    "other": 0,
                },
            )
            plane[kind] += 1
        refusal = entry.refusal if entry else None
        reconnects = sum(1 for r in entry.reconnects if now - r <= window) if entry else 0
        last = max((t.activity(now) for t in mine), default=entry.seen if entry else now)
        out.append(
            {
                "identity": identity,
                "state": state_of(mine, entry, now, window, rules),
                "tunnels": len(mine),
                "control_planes": list(planes.values()),
                "bytes_up": sum(t.bytes_up for t in mine),
                "bytes_down": sum(t.bytes_down for t in mine),
                "oldest": _iso(min(t.opened_at for t in mine)) if mine else None,
                "newest": _iso(max(t.opened_at for t in mine)) if mine else None,
                "reconnects": reconnects,
                "last_seen": _iso(last + to_wall),
                "last_refusal": None
                if refusal is None
                else {
                    "at": _iso(refusal[0]),
                    "reason": refusal[1],
                    "target": refusal[2],
                    "status": refusal[3],
                },
            }
        )
        order.append(-last)
    return [c for _, c in sorted(zip(order, out, strict=True), key=lambda p: p[0])]


def state_counts(view: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for client in view:
        counts[client["state"]] += 1
    return counts
