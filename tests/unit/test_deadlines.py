"""relay.deadlines.Waiting: one timer per phase instead of one per connection.

Driven on a real uvloop loop with short durations; every wait is for an
event an expiry sets, bounded by pytest-timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from relay.deadlines import Waiting

pytestmark = pytest.mark.timeout(10)


def run(test: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 5))


class Member:
    """Something that waits; records when it expired."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.expired_at: float | None = None


def test_members_expire_in_order_each_at_its_own_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        order: list[Member] = []

        def expire(m: Member) -> None:
            m.expired_at = loop.time()
            order.append(m)
            if len(order) == 3:
                done.set()

        waiting: Waiting[Member] = Waiting(loop, lambda: 0.05, expire)
        members = [Member(n) for n in "abc"]
        joined = []
        for m in members:
            waiting.add(m)
            joined.append(loop.time())
            await asyncio.sleep(0.01)
        await done.wait()
        assert order == members
        for m, t in zip(members, joined, strict=True):
            assert m.expired_at is not None
            assert m.expired_at - t >= 0.05 - 0.002  # uvloop's clock: milliseconds
        assert len(waiting) == 0

    run(main)


def test_a_member_that_leaves_never_expires_and_the_next_one_still_does() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        expired: list[str] = []
        waiting: Waiting[Member] = Waiting(
            loop, lambda: 0.03, lambda m: (expired.append(m.name), done.set())
        )
        first, second = Member("first"), Member("second")
        waiting.add(first)
        await asyncio.sleep(0.01)
        waiting.add(second)
        assert waiting.deadline(first) is not None and first in waiting
        waiting.discard(first)  # the timer armed for it stays; it re-arms for second
        waiting.discard(first)  # twice is harmless
        assert waiting.deadline(first) is None and first not in waiting
        await done.wait()
        assert expired == ["second"]

    run(main)


def test_a_shorter_duration_after_a_reload_applies_to_new_and_waiting_members() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        timeout = [30.0]
        expired: list[str] = []

        def expire(m: Member) -> None:
            expired.append(m.name)
            if len(expired) == 2:
                done.set()

        waiting: Waiting[Member] = Waiting(loop, lambda: timeout[0], expire)
        waiting.add(Member("old"))  # timer armed 30 s ahead
        timeout[0] = 0.03  # "reload"
        waiting.add(Member("new"))  # re-arms for its earlier deadline
        await done.wait()
        assert expired == ["old", "new"]

    run(main)


def test_an_expiry_may_add_members_and_they_get_their_own_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        names: list[str] = []
        waiting: Waiting[Member]

        def expire(m: Member) -> None:
            names.append(m.name)
            if m.name == "first":
                waiting.add(Member("added while firing"))
            else:
                done.set()

        waiting = Waiting(loop, lambda: 0.02, expire)
        waiting.add(Member("first"))
        await done.wait()
        assert names == ["first", "added while firing"]

    run(main)


def test_close_turns_every_deadline_off() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expired: list[Member] = []
        waiting: Waiting[Member] = Waiting(loop, lambda: 0.01, expired.append)
        for n in "ab":
            waiting.add(Member(n))
        waiting.close()
        assert len(waiting) == 0 and list(waiting) == []
        await asyncio.sleep(0.05)  # past every deadline: nothing may expire
        assert expired == []

    run(main)


def test_many_members_that_leave_at_once_keep_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiting: Waiting[Member] = Waiting(loop, lambda: 60, lambda m: None)
        for i in range(10_000):
            m = Member(str(i))
            waiting.add(m)
            waiting.discard(m)
        assert len(waiting) == 0  # no per-member remains (entries, handles)

    run(main)
