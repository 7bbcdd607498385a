"""Files the relay writes for others to read: aside, flushed, renamed over, so
a reader (a worker, the relay after a restart) sees the old file or the new,
never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: str, data: bytes, *, mode: int, mtime: float | None = None) -> None:
    """Write ``data`` to ``path`` (created with ``mode``); ``mtime``, when
    given, becomes the file's modification time."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if mtime is not None:
            os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
