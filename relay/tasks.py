"""The one place the relay creates tasks: a set that holds each until it ends.

An event loop keeps only a weak reference to a task; one that nothing else
holds can be collected in the middle of its work. Every task the relay starts
goes into a :class:`TaskSet` and leaves it when done (uvicorn's
``server.py`` keeps its connections and tasks the same way). The static check
in tests/test_static_checks.py refuses ``create_task`` anywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any


class TaskSet:
    """Tasks held until they end."""

    __slots__ = ("_loop", "_tasks")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def wait(self, timeout: float | None = None) -> None:
        """Until every task held now has ended, or ``timeout`` passed."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
