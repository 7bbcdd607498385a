"""One deadline per phase: the members of a phase, oldest first, and one timer.

Every member of a phase waits the same duration from when it joined
(limits.head_timeout for a head, limits.connect_timeout for a dial,
limits.tls_peek_timeout for a ClientHello, the linger of a refused client), so
the oldest member's deadline is the first to come. A ``Waiting`` keeps the
members in joining order (an insertion-ordered dict: member -> when it joined)
and arms one event-loop timer for the oldest; when it fires, every member past
its deadline is expired and the timer is armed for the next. Joining and
leaving are a dict insertion and removal: no timer, handle or entry object
per member, and a member that leaves early (nearly all of them) costs nothing
more. The duration is read when the timer fires, so a reload that changes it
applies to the members already waiting too (and keeps their order).

A timer per connection (``loop.call_later``) costs, on uvloop, a handle object,
a libuv timer, a heap insertion, and on cancel a close callback on the next
loop iteration; three of them per tunnel were a measurable part of its setup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

M = TypeVar("M", bound=Hashable)


class Waiting(Generic[M]):
    """The members of one phase; ``expire(member)`` once one waited ``timeout()``."""

    __slots__ = ("_expire", "_loop", "_members", "_timeout", "_timer", "_when")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout: Callable[[], float],
        expire: Callable[[M], object],
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._expire = expire
        self._members: dict[M, float] = {}  # member -> loop time it joined, oldest first
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0  # when the timer fires

    def add(self, member: M) -> None:
        """``member`` joins now (once per phase: it is not a member yet)."""
        now = self._members[member] = self._loop.time()
        deadline = now + self._timeout()
        if self._timer is None or deadline < self._when:  # none, or a reload shortened it
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = when
        self._timer = self._loop.call_at(when, self._fire)

    def discard(self, member: M) -> None:
        """``member`` leaves the phase (the timer stays armed; it re-arms when it fires)."""
        self._members.pop(member, None)

    def deadline(self, member: M) -> float | None:
        """When ``member``'s wait ends (loop time), None if it is not waiting."""
        joined = self._members.get(member)
        return None if joined is None else joined + self._timeout()

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[M]:
        return iter(list(self._members))

    def _fire(self) -> None:
        self._timer = None
        members = self._members
        now = self._loop.time()
        limit = self._timeout()
        while members:
            member, joined = next(iter(members.items()))
            if joined + limit > now:
                break
            del members[member]
            self._expire(member)
        if members and self._timer is None:  # an expire callback may have armed it
            self._arm(next(iter(members.values())) + limit)

    def close(self) -> None:
        """Every member leaves, none expires (the relay stops)."""
        self._members.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
