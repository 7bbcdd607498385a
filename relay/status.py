"""The status page at the admin listener's ``/`` and the JSON it reads.

The page is three static files of the package (``relay/page``): HTML, a
stylesheet and a small script that polls ``/status``, ``/clients``,
``/tunnels`` and ``/refusals`` on the same origin every two seconds. No
framework and no other origin (a DMZ has no CDN); the admin answers carry a
Content-Security-Policy that allows nothing else (admin.CSP).
"""

from __future__ import annotations

import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from relay import __version__
from relay.admin import Handler, Query, Reply, json_reply

if TYPE_CHECKING:
    from relay.server import Relay

PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/page/status.css": ("status.css", "text/css; charset=utf-8"),
}


def _page(name: str) -> bytes:
    return (resources.files("relay") / "page" / name).read_bytes()


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def status_of(relay: Relay) -> dict[str, Any]:
    """Ready or draining, version, uptime, config and its last reload, egress
    state, open files against the limit, denied requests by reason."""
    metrics = relay.metrics
    registry = metrics.registry
    egress = []
    for name in sorted(relay.dialers):
        up = registry.get_sample_value("konnect_relay_egress_up", {"egress": name})
        reconnects = registry.get_sample_value(
            "konnect_relay_egress_reconnects_total", {"egress": name}
        )
        egress.append(
            {
                "name": name,
                "up": None if up is None else bool(up),
                "reconnects": int(reconnects or 0),
            }
        )
    denied = {
        s.labels["reason"]: int(s.value)
        for family in metrics.requests_denied.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    return {
        "ready": not relay.draining,
        "version": __version__,
        "uptime_s": round(time.time() - relay.started, 1),
        "config": relay.settings.source,
        "last_reload": relay.last_reload,
        "egress": egress,
        "open_files": {"open": open_files(), "limit": relay.fd_limit},
        "tunnels": len(relay.book),
        "pending": len(relay.pending),
        "denied": dict(sorted(denied.items())),
        "actions": relay.settings.admin_token is not None,
    }


def file_routes() -> dict[str, Handler]:
    """``/`` and the page's files (the supervisor serves them too)."""
    routes: dict[str, Handler] = {}
    for path, (name, content_type) in PAGE_FILES.items():
        body = _page(name)

        async def serve(query: Query, body: bytes = body, kind: str = content_type) -> Reply:
            return Reply(200, body, kind)

        routes[path] = serve
    return routes


def page_routes(relay: Relay) -> dict[str, Handler]:
    """``/`` and its files, ``/status``, ``/refusals``."""
    routes = file_routes()

    async def status(query: Query) -> Reply:
        return json_reply(status_of(relay))

    async def refusals(query: Query) -> Reply:
        return json_reply(list(relay.book.memory.recent))

    routes["/status"] = status
    routes["/refusals"] = refusals
    return routes
