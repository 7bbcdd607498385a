"""Admin actions, off by default: ``POST /tunnels/{id}/close`` and ``POST /drain``.

On only with ``admin.actions.token_file``; each request must carry
``Authorization: Bearer <token>`` (compared in constant time). Without actions
configured a POST is ``404``, with a wrong or missing token ``401``; every
attempt is logged as an ``admin_action`` line with its outcome (never the
token). Only POST reaches them: every GET of the admin listener stays
read-only.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING

from relay.admin import Reply, text

if TYPE_CHECKING:
    from relay.server import Relay

_CLOSE = re.compile(r"/tunnels/([0-9]{1,18})/close")


def authorized(token: bytes, authorization: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token)


async def act(relay: Relay, path: str, authorization: str) -> Reply:
    token = relay.settings.admin_token
    if token is None:
        return text(404, "admin actions are off (admin.actions.token_file)\n")
    close = _CLOSE.fullmatch(path)
    if close is None and path != "/drain":
        return text(404, "not found\n")
    action = "drain" if close is None else "close_tunnel"
    if not authorized(token, authorization):
        relay.log("admin_action", action=action, path=path, outcome="unauthorized")
        return text(401, "a valid Authorization: Bearer token is required\n")
    if close is None:
        relay.log("admin_action", action=action, path=path, outcome="draining")
        relay.tasks.spawn(relay.drain())
        return text(202, "draining\n")
    tunnel = relay.book.tunnels.get(int(close.group(1)))
    if tunnel is None:
        relay.log("admin_action", action=action, path=path, outcome="no_such_tunnel")
        return text(404, "no such tunnel\n")
    tunnel.close("admin_close", abort=True)
    relay.log("admin_action", action=action, path=path, outcome="closed", tunnel=tunnel.id)
    return text(200, f"tunnel {tunnel.id} closed\n")
