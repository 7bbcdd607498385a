"""JSON-lines event log on stdout: one object per line, one line per event.

Only fields the caller passes are written; callers never pass header values
other than the CONNECT target, so credentials cannot reach the log.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO


class EventLog:
    """Writes ``{"ts": ..., "event": ..., **fields}`` lines to a text stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def __call__(self, event: str, /, **fields: Any) -> None:
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update(fields)
        try:
            self.stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must not take tunnels down
