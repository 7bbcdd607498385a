"""The tunnel book: live tunnels, per-client counts, reconnect memory, the
counters folded into metrics, the sweep, and the two log lines of a tunnel's
life (its ``request`` line with status 200 and its ``tunnel_closed`` line).

Every open tunnel stays reachable from :attr:`TunnelBook.tunnels` until it is
closed. Not only for drain and limits: uvloop (0.23) aborts the whole process
("double free or corruption") when the garbage collector takes a transport
whose connection is still open (a transport and its protocol form a cycle that
nothing else holds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relay.clients import ClientMemory
from relay.hostport import hostport
from relay.log import EventLog, json_fields, json_string
from relay.metrics import Metrics
from relay.tunnel import Tunnel

# A tunnel whose transports were asked to close gracefully but still hold
# unsent bytes for a peer that stopped reading is aborted after this long.
CLOSE_LINGER = 10.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class TunnelBook:
    """What the relay knows about its tunnels; ``reconnect_window()`` is the
    current ``limits.reconnect_window`` (it changes on reload)."""

    def __init__(
        self, metrics: Metrics, log: EventLog, reconnect_window: Callable[[], float]
    ) -> None:
        self.metrics = metrics
        self.log = log
        self.reconnect_window = reconnect_window
        self.tunnels: dict[int, Tunnel] = {}
        self.per_client: dict[str, int] = {}  # tunnels open or being dialled, per identity
        self.last_closed: dict[tuple[str, str], float] = {}  # (client, host) -> when
        self.memory = ClientMemory()  # identities beyond their live tunnels (/clients)
        self.empty = asyncio.Event()  # set while no tunnel is open
        self.empty.set()

    def __len__(self) -> int:
        return len(self.tunnels)

    # --- per-client counts ----------------------------------------------------

    def reserve(self, identity: str) -> None:
        self.per_client[identity] = self.per_client.get(identity, 0) + 1

    def release(self, identity: str) -> None:
        left = self.per_client.get(identity, 0) - 1
        if left > 0:
            self.per_client[identity] = left
        else:
            self.per_client.pop(identity, None)

    # --- a tunnel's life ----------------------------------------------------

    def opened(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel.id] = tunnel
        self.empty.clear()
        host = tunnel.label
        series = tunnel.series = self.metrics.host(host)
        series.opened += 1
        series.active += 1
        last = self.last_closed.get((tunnel.client, host))
        if last is not None and tunnel.opened_mono - last <= self.reconnect_window():
            series.reconnects += 1
            self.memory.reconnected(tunnel.client, tunnel.opened_mono)

    def closed(self, tunnel: Tunnel) -> None:
        """The tunnel's on_closed callback: count, log, forget."""
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        host = tunnel.label
        series = tunnel.series
        assert series is not None  # set by opened()
        now = time.monotonic()
        reason = tunnel.close_reason or "error"
        self.fold(tunnel)
        series.active -= 1
        series.closed_by(reason)
        duration = now - tunnel.opened_mono
        series.duration.observe(duration)
        self.last_closed[(tunnel.client, host)] = now
        self.memory.closed(tunnel.client, now)
        self.release(tunnel.client)
        # As self.log("tunnel_closed", tunnel=..., client=..., ..., reason=...)
        # would write it, from a template (see EventLog.write_event).
        self.log.write_event(
            "tunnel_closed",
            f',"tunnel":{tunnel.id},"client":{json_string(tunnel.client)}'
            f',"listener":{json_string(tunnel.listener)}'
            f',"target":{json_string(hostport(tunnel.host, tunnel.port))}'
            f',"egress":{json_string(tunnel.egress)},"bytes_up":{tunnel.bytes_up}'
            f',"bytes_down":{tunnel.bytes_down},"duration_s":{round(duration, 3)!r}'
            f',"reason":{json_string(reason)}',
        )
        if not self.tunnels:
            self.empty.set()

    def moved_out(self, tunnel: Tunnel) -> None:
        """The tunnel lives on in a successor: forget it without closing it
        (its bytes so far are in this process's totals, which the successor
        continues from)."""
        if self.tunnels.pop(tunnel.id, None) is None:
            return
        series = tunnel.series
        assert series is not None  # set by opened()
        self.fold(tunnel)
        series.active -= 1
        self.release(tunnel.client)
        if not self.tunnels:
            self.empty.set()

    def moved_in(self, tunnel: Tunnel) -> None:
        """A tunnel the predecessor ran: live here from now on; its bytes
        until now (folded already) came with the predecessor's totals."""
        self.tunnels[tunnel.id] = tunnel
        self.empty.clear()
        series = tunnel.series = self.metrics.host(tunnel.label)
        series.active += 1
        self.reserve(tunnel.client)

    def log_established(
        self,
        tunnel: Tunnel,
        peer: str,
        identity: str,
        target: str,
        reason: str,
        upstream: str,
        dial_s: float,
        extra: dict[str, Any],
    ) -> None:
        """The request line of an opened tunnel, as ``log("request", client=...,
        listener=..., identity=..., target=..., allowed=True, status=200,
        reason=..., egress=..., upstream=..., dial_ms=..., tunnel=..., **extra)``
        writes it, from a template (see EventLog.write_event)."""
        identity_json = json_string(identity) if identity else "null"
        self.log.write_event(
            "request",
            f',"client":{json_string(peer)}'
            f',"listener":{json_string(tunnel.listener)}'
            f',"identity":{identity_json},"target":{json_string(target)}'
            f',"allowed":true,"status":200,"reason":{json_string(reason)}'
            f',"egress":{json_string(tunnel.egress)},"upstream":{json_string(upstream)}'
            f',"dial_ms":{round(dial_s * 1000, 3)!r},"tunnel":{tunnel.id}'
            f"{json_fields(extra)}",
        )

    # --- counters -> metrics ----------------------------------------------------

    def fold(self, tunnel: Tunnel) -> None:
        """Move a tunnel's byte counts since the last fold into Prometheus."""
        up, down = tunnel.bytes_up, tunnel.bytes_down
        if up != tunnel.folded_up or down != tunnel.folded_down:
            series = tunnel.series
            assert series is not None  # set by opened()
            series.up += up - tunnel.folded_up
            series.down += down - tunnel.folded_down
            tunnel.folded_up, tunnel.folded_down = up, down

    def fold_all(self) -> None:
        for tunnel in self.tunnels.values():
            self.fold(tunnel)

    # --- the sweep ----------------------------------------------------------

    def sweep(self, now: float, idle_timeout: float, forget_after: float = 3600.0) -> None:
        """Idle timeouts, lingering closes, SO_KEEPALIVE on young direct
        upstreams, and the reconnect memory past its window."""
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
        window = self.reconnect_window()
        self.memory.prune(now, window, forget_after)
        if self.last_closed:
            stale = [k for k, t in self.last_closed.items() if now - t > window]
            for key in stale:
                del self.last_closed[key]

    def close_where(
        self, revokes: Callable[[tuple[str | None, str | None, str], str, int], bool], reason: str
    ) -> int:
        """Close (abort) the tunnels ``revokes(who, host, port)`` names; how many."""
        closed = 0
        for tunnel in list(self.tunnels.values()):
            if revokes(tunnel.who, tunnel.host, tunnel.port):
                tunnel.close(reason, abort=True)
                closed += 1
        return closed

    def close_all(self, reason: str) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel.close(reason, abort=True)

    # --- what a successor carries on -------------------------------------------

    def memory_state(self, now: float) -> dict[str, Any]:
        """The reconnect window's memory, as ages (monotonic clocks differ
        between processes)."""
        return {
            "last_closed": [[c, h, now - at] for (c, h), at in self.last_closed.items()],
            "clients": self.memory.state(now),
        }

    def adopt_memory(self, state: dict[str, Any], now: float) -> None:
        for client, host, age in state.get("last_closed", ()):
            key = (str(client), str(host))
            self.last_closed[key] = max(self.last_closed.get(key, 0.0), now - float(age))
        self.memory.adopt(state.get("clients", {}), now)

    # --- the /tunnels view ----------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """The live tunnels as /tunnels returns them. Read-only: the activity
        shown is the sweep's, or now when bytes moved since it last looked."""
        now = time.monotonic()
        mono_to_wall = time.time() - now
        return [
            {
                "id": t.id,
                "client": t.client,
                "host": t.host,
                "port": t.port,
                "egress": t.egress,
                "listener": t.listener,
                "opened_at": _iso(t.opened_at),
                "bytes_up": t.bytes_up,
                "bytes_down": t.bytes_down,
                "last_activity": _iso(t.activity(now) + mono_to_wall),
            }
            for t in self.tunnels.values()
        ]
