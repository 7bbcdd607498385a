"""systemd readiness notification (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd sets NOTIFY_SOCKET; the relay sends READY=1 once
it listens, RELOADING=1 / READY=1 around a reload and STOPPING=1 when it
drains. Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` to systemd's notification socket; False when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        return False
    return True
