"""JSON-lines event log on stdout: one object per line, one line per event.

Only fields the caller passes are written; callers never pass header values
other than the CONNECT target, so credentials cannot reach the log.

Inside an event loop, lines are collected and written together, with one
write, ``FLUSH_INTERVAL`` after the first of them (or at once when
``MAX_PENDING`` lines wait): thousands of tunnel setups a second cost a few
dozen system calls, not one per line or per loop iteration. Outside a loop
each line is written at once.
"""

from __future__ import annotations

import asyncio
import json
import select
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


# A string as the line encoder writes it (ASCII, escaped), for callers that
# build a hot event's fields themselves (EventLog.write_event): the encoder's
# own C function, called directly.
json_string: Callable[[str], str] = encode_basestring_ascii


def json_fields(fields: dict[str, Any]) -> str:
    """``,"key":value`` for each field, as the line encoder writes them."""
    return "".join(
        f",{encode_basestring_ascii(k)}:"
        f"{encode_basestring_ascii(v) if type(v) is str else _encode(v)}"
        for k, v in fields.items()
    )


# The longest a line waits in memory: what a crash (SIGKILL, OOM) can lose, and
# the delay a reader of the log sees. Like nginx's access_log ``flush=``.
FLUSH_INTERVAL = 0.05
# Lines that force a write before the interval is up: bounds the buffer (a few
# hundred KiB) during a burst.
MAX_PENDING = 512
# While another process writes to the same stdout (an upgrade's predecessor and
# successor, see upgrade.py), lines go out in writes of at most this many
# bytes, which a pipe keeps whole: no line is cut by the other's.
SHARED_WRITE = select.PIPE_BUF


class EventLog:
    """Writes ``{"ts": ..., "event": ..., **fields}`` lines to a text stream."""

    __slots__ = ("_lines", "_second", "_second_text", "_timer", "loop", "shared", "stream")

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        # Set by the owner of the event loop: asking asyncio for the running loop
        # costs a getpid() system call per line on Python 3.11.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._second_text = ""
        self.shared = False  # another process writes to the stream too

    def timestamp(self) -> str:
        """RFC 3339 UTC with milliseconds; the date part is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}+00:00"

    def __call__(self, event: str, /, **fields: Any) -> None:
        record = {"ts": self.timestamp(), "event": event}
        record.update(fields)
        self.write_line(_encode(record) + "\n")

    def write_event(self, event: str, fields: str) -> None:
        """The same line as ``self(event, **f)``, with the fields already encoded
        by the caller (``fields``: ``,"key":value`` for each, see json_string and
        json_fields). For the two events every tunnel logs: a template is a
        few times cheaper than building a dict and encoding it."""
        self.write_line(f'{{"ts":"{self.timestamp()}","event":"{event}"{fields}}}\n')

    def write_line(self, line: str) -> None:
        """Queue one complete line (ending in a newline) with the same batching,
        e.g. a worker's line the supervisor passes through."""
        lines = self._lines
        if not lines:
            loop = self.loop
            if loop is None or loop.is_closed():
                lines.append(line)
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)
        lines.append(line)
        if len(lines) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        try:
            if self.shared:
                for group in _groups(lines, SHARED_WRITE):
                    self.stream.write(group)
                    self.stream.flush()
            else:
                self.stream.write("".join(lines))
                self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stdout must not take tunnels down


def _groups(lines: list[str], size: int) -> list[str]:
    """Whole lines joined into pieces of at most ``size`` bytes (a longer
    line is a piece of its own). Lines are ASCII: characters are bytes."""
    groups: list[str] = []
    current: list[str] = []
    length = 0
    for line in lines:
        if current and length + len(line) > size:
            groups.append("".join(current))
            current, length = [], 0
        current.append(line)
        length += len(line)
    if current:
        groups.append("".join(current))
    return groups
