"""relay.deadlines: shared per-duration queues instead of a timer per connection.

Driven on a real uvloop loop with short durations; every wait is for an
event the deadline sets, bounded by pytest-timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from relay.deadlines import COMPACT_AFTER, Deadlines

pytestmark = pytest.mark.timeout(10)


def run(test: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(test(), 5))


def test_each_callback_runs_once_not_before_its_own_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fired: list[tuple[str, float]] = []
        done = asyncio.Event()
        start = loop.time()
        for name in ("a", "b", "c"):
            deadlines.add(0.05, lambda n=name: fired.append((n, loop.time())))
            await asyncio.sleep(0.01)
        deadlines.add(0.05, done.set)
        await done.wait()
        assert [n for n, _ in fired] == ["a", "b", "c"]
        for i, (_, when) in enumerate(fired):
            # uvloop's clock has millisecond resolution
            assert when - start >= 0.05 + 0.01 * i - 0.002
        assert len(deadlines) == 0 and not deadlines.queues

    run(main)


def test_durations_do_not_wait_for_each_other() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        order: list[str] = []
        done = asyncio.Event()
        deadlines.add(0.3, lambda: (order.append("long"), done.set()))
        deadlines.add(0.02, lambda: order.append("short"))
        await done.wait()
        assert order == ["short", "long"]

    run(main)


def test_a_cancelled_deadline_never_fires_and_releases_its_callback() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fired: list[int] = []
        done = asyncio.Event()
        entry = deadlines.add(0.02, lambda: fired.append(1))
        assert entry.active and len(deadlines) == 1
        entry.cancel()
        entry.cancel()  # twice is harmless
        assert not entry.active and entry.callback is None and len(deadlines) == 0
        deadlines.add(0.04, done.set)
        await done.wait()
        assert fired == []

    run(main)


def test_cancelled_entries_are_compacted_so_memory_follows_the_live_ones() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        live = deadlines.add(60, lambda: None)
        for _ in range(10 * COMPACT_AFTER):
            deadlines.add(60, lambda: None).cancel()
        queue = deadlines.queues[60]
        assert len(queue.entries) <= 2 * COMPACT_AFTER + 2
        assert len(deadlines) == 1 and live.active
        live.cancel()
        for _ in range(COMPACT_AFTER + 1):
            deadlines.add(60, lambda: None).cancel()
        # Nothing live: the queue that held them was retired (its timer off), and
        # what a new one holds is bounded again.
        assert queue.timer is None and deadlines.queues.get(60) is not queue
        assert sum(len(q.entries) for q in deadlines.queues.values()) <= COMPACT_AFTER + 1
        assert len(deadlines) == 0

    run(main)


def test_a_callback_may_add_and_cancel_deadlines_of_its_own_queue() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        done = asyncio.Event()
        order: list[str] = []
        later = [deadlines.add(0.02, lambda i=i: order.append(f"later{i}")) for i in range(3)]

        def first() -> None:
            order.append("first")
            for entry in later[:2]:
                entry.cancel()
            for _ in range(2 * COMPACT_AFTER):  # would compact, were it not firing
                deadlines.add(0.02, lambda: None).cancel()
            deadlines.add(0.02, lambda: (order.append("again"), done.set()))

        entries = deadlines.queues[0.02].entries
        entries.appendleft(entries[0].__class__(loop.time(), first, deadlines.queues[0.02]))
        await done.wait()
        assert order == ["first", "later2", "again"]

    run(main)


def test_close_turns_every_deadline_off() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        fired: list[int] = []
        for timeout in (0.01, 0.02):
            deadlines.add(timeout, lambda: fired.append(1))
        deadlines.close()
        assert len(deadlines) == 0 and not deadlines.queues
        await asyncio.sleep(0.05)  # past both deadlines: nothing may fire
        assert fired == []

    run(main)
