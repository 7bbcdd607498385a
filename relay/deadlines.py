"""Deadlines that many connections share: one event-loop timer per duration.

Every connection in a phase waits the same duration (limits.head_timeout for
its head, limits.connect_timeout for its dial, limits.tls_peek_timeout for its
ClientHello), so deadlines added in order come due in order: a FIFO queue per
duration, with one timer armed for its oldest entry, serves them all. Adding is
an append; cancelling clears the entry's callback, which drops the reference to
the connection at once, and a queue whose entries are mostly cancelled is
compacted, so what is kept stays proportional to what is live.

A timer per connection (``loop.call_later``) costs, on uvloop, a handle object,
a libuv timer, a heap insertion, and on cancel a close callback on the next
loop iteration: three of them per tunnel were a measurable part of the setup
path. Timing is the same: each callback runs when its own deadline passes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

# A queue is compacted once it holds more cancelled entries than this and
# they are at least half of it: memory stays bounded by the live entries, and
# the copy costs O(1) per cancel amortised.
COMPACT_AFTER = 64


class Deadline:
    """One pending deadline; ``cancel()`` it when its phase ends first."""

    __slots__ = ("callback", "queue", "when")

    def __init__(self, when: float, callback: Callable[[], object], queue: _Queue) -> None:
        self.when = when
        self.callback: Callable[[], object] | None = callback
        self.queue = queue

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.queue.cancelled()

    @property
    def active(self) -> bool:
        return self.callback is not None


class _Queue:
    """The deadlines of one duration, oldest first."""

    __slots__ = ("dead", "entries", "firing", "owner", "timeout", "timer")

    def __init__(self, owner: Deadlines, timeout: float) -> None:
        self.owner = owner
        self.timeout = timeout
        self.entries: deque[Deadline] = deque()
        self.dead = 0  # cancelled entries still in the queue
        self.timer: asyncio.TimerHandle | None = None
        self.firing = False

    def cancelled(self) -> None:
        self.dead += 1
        if (
            self.dead > COMPACT_AFTER
            and 2 * self.dead >= len(self.entries)
            and not self.firing  # fire() is walking the queue
        ):
            self.entries = deque(e for e in self.entries if e.callback is not None)
            self.dead = 0
            if not self.entries:
                self.owner.retire(self)

    def fire(self) -> None:
        self.timer = None
        loop = self.owner.loop
        now = loop.time()
        entries = self.entries
        self.firing = True
        try:
            while entries and entries[0].when <= now:
                entry = entries.popleft()
                callback = entry.callback
                if callback is None:
                    self.dead -= 1
                    continue
                entry.callback = None
                callback()
        finally:
            self.firing = False
        # Drop cancelled entries at the front: the timer is armed for a live one.
        while entries and entries[0].callback is None:
            entries.popleft()
            self.dead -= 1
        if entries:
            self.timer = loop.call_at(entries[0].when, self.fire)
        else:
            self.owner.retire(self)


class Deadlines:
    """The relay's shared deadlines (one set per event loop)."""

    __slots__ = ("loop", "queues")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queues: dict[float, _Queue] = {}

    def add(self, timeout: float, callback: Callable[[], object]) -> Deadline:
        """Call ``callback`` once ``timeout`` seconds from now have passed."""
        queue = self.queues.get(timeout)
        if queue is None:
            queue = self.queues[timeout] = _Queue(self, timeout)
        entry = Deadline(self.loop.time() + timeout, callback, queue)
        queue.entries.append(entry)
        if queue.timer is None and not queue.firing:  # fire() re-arms when it is done
            queue.timer = self.loop.call_at(entry.when, queue.fire)
        return entry

    def retire(self, queue: _Queue) -> None:
        """An empty queue: its timer off, forgotten until its duration is used again."""
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        if self.queues.get(queue.timeout) is queue:
            del self.queues[queue.timeout]

    def close(self) -> None:
        """Every deadline off (the relay stops)."""
        for queue in list(self.queues.values()):
            queue.entries.clear()
            queue.dead = 0
            self.retire(queue)

    def __len__(self) -> int:
        """Live deadlines (for leak checks)."""
        return sum(len(q.entries) - q.dead for q in self.queues.values())
