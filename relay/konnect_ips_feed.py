"""Keeps ``resolver.konnect_ips`` current: the cache at start, a fetch through
the relay's own egress, a refresh every ``refresh`` (with jitter), and an
atomic swap of the pins the resolver applies.

A list that fails any check (konnect_ips.py) is refused whole and the previous
one stays in force: a broken or poisoned document never switches pinning off.
A new list only affects new dials; live tunnels are never closed by a refresh.
The last good document is written to ``cache_file`` (aside, then renamed), so
a relay restarted while offline keeps pinning. Without any list, ``enforce``
refuses Konnect dials (``503 konnect_ips_unavailable``) and fetches are
retried with backoff until one succeeds.

With ``workers: N`` the supervisor runs the feed and hands every accepted
document to its workers through a file in its private run directory; each
worker runs the feed with ``fetch: false`` on that file and re-reads it on
SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.config import MINUTES, SECONDS, Settings
from relay.egress import Dialer
from relay.fetch import FetchError, Target, https_get
from relay.files import write_atomically
from relay.konnect import MESH_GEOS
from relay.konnect_ips import MAX_DOCUMENT_SIZE, IPList, IPListError, parse_document
from relay.metrics import KonnectIPsMetrics
from relay.resolver import KonnectPins
from relay.tasks import TaskSet

# Retries after a failed fetch: 1 s, 2 s, 4 s ... up to 5 min (or `refresh`
# when shorter), each drawn from [half, whole] so a fleet does not retry in step.
BACKOFF_START = 1 * SECONDS
BACKOFF_CAP = 5 * MINUTES
# Each refresh comes after `refresh` +/- 10 %.
JITTER = 0.1
# The relay waits this long at start for the first fetch when no cache_file
# holds a list, so that it is ready to pin as soon as it listens; a fetch that
# hangs does not hold up the start for longer.
STARTUP_WAIT = 3 * SECONDS
# Keys under ingressIPs that are used when present but need not be: global
# services and the mesh sync geos.
OPTIONAL_KEYS = ("global", *MESH_GEOS)

Log = Callable[..., None]
DialerFor = Callable[[str, int], Dialer | None]


def _diff(old: IPList | None, new: IPList) -> tuple[list[str], list[str]]:
    before = old.texts() if old is not None else frozenset()
    after = new.texts()
    return sorted(after - before), sorted(before - after)


class Feed:
    """The current Konnect ingress list and the task that keeps it current.

    ``on_pins(pins)`` is called with every new :class:`KonnectPins` (a new list
    or a new mode); ``on_document(data, fetched_at)`` with every accepted
    document (the supervisor passes it on to its workers)."""

    def __init__(
        self,
        settings: Settings,
        dialer_for: DialerFor,
        log: Log,
        metrics: KonnectIPsMetrics,
        on_pins: Callable[[KonnectPins | None], None],
        on_document: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self.model = settings.konnect_ips
        self.regions = tuple(settings.policy.konnect.regions)
        self.dialer_for = dialer_for
        self.log = log
        self.metrics = metrics
        self.on_pins = on_pins
        self.on_document = on_document
        self.ips: IPList | None = None
        self.document = b""
        self.fetched_at: float | None = None  # wall clock, when the list was fetched
        self.source = ""  # where the list in force came from
        self.last_error = ""
        self.pins: KonnectPins | None = None
        self._tasks = TaskSet()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        metrics.age.set_function(self.age)

    @property
    def enabled(self) -> bool:
        return self.model.enabled

    def age(self) -> float:
        """Seconds since the list in force was fetched; +Inf while there is none."""
        if not self.enabled:
            return 0.0
        if self.fetched_at is None:
            return float("inf")
        return max(0.0, time.time() - self.fetched_at)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the cache; start fetching; wait briefly for a first list."""
        self._publish()
        if not self.enabled:
            return
        if self.model.cache_file is not None:
            self.load_file()
        if self.model.fetch:
            self._start_task()
            if self.ips is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(STARTUP_WAIT, self.model.timeout)):
                        await self._first.wait()

    def _start_task(self) -> None:
        if self._task is None:
            self._task = self._tasks.spawn(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reconfigure(self, settings: Settings) -> None:
        """A reload: a changed url or region list fetches now, a changed mode
        applies at once, and turning the feed off or on takes effect."""
        old, new = self.model, settings.konnect_ips
        regions = tuple(settings.policy.konnect.regions)
        regions_changed = regions != self.regions
        self.model, self.regions = new, regions
        if not new.enabled:
            await self.close()
            self.ips, self.document, self.fetched_at, self.source = None, b"", None, ""
            self._publish()
            return
        if regions_changed and self.document:
            # The document in force, read for the new regions (kept if it lacks one).
            self._accept(self.document, self.source, self.fetched_at or time.time(), False)
        self._publish()
        if new.cache_file is not None and (not new.fetch or self.ips is None):
            self.load_file()
        if not new.fetch:
            await self.close()
        elif self._task is None:
            self._start_task()
        elif new.url != old.url or regions_changed:
            self._wake.set()

    def reread(self) -> None:
        """SIGUSR1: take ``cache_file`` again (with ``fetch: false`` another
        process keeps it current: the supervisor, for its workers)."""
        if self.enabled and self.model.cache_file is not None:
            self.load_file()

    # --- sources -----------------------------------------------------------------

    def load_file(self) -> bool:
        """Take the list in ``cache_file`` (its mtime is when it was fetched)."""
        path = self.model.cache_file
        assert path is not None
        try:
            data = Path(path).read_bytes()[: MAX_DOCUMENT_SIZE + 1]
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._failed("cache_file", f"{path}: cannot read: {exc.strerror or exc}")
            return False
        return self._accept(data, f"cache_file {path}", mtime, False)

    async def refresh(self) -> bool:
        """One fetch through the egress the routes pick for the list's host."""
        url = self.model.url
        target = Target.parse(url)
        dialer = self.dialer_for(target.host, target.port)
        if dialer is None:
            self._failed("route_denied", f"{url}: egress.routes refuse {target.host}:{target.port}")
            return False
        try:
            data = await https_get(
                dialer,
                url,
                ca_file=self.model.ca_file,
                timeout=self.model.timeout,
                limit=MAX_DOCUMENT_SIZE,
            )
        except FetchError as exc:
            self._failed(exc.reason, exc.detail)
            return False
        return self._accept(data, url, time.time(), True)

    def _accept(self, data: bytes, source: str, fetched_at: float, fetched: bool) -> bool:
        try:
            ips = parse_document(data, self.regions, OPTIONAL_KEYS)
        except IPListError as exc:
            self._failed("invalid", f"{source}: {exc.problem}", path=exc.path)
            return False
        added, removed = _diff(self.ips, ips)
        changed = self.ips is None or bool(added or removed)
        self.ips, self.document, self.fetched_at, self.source = ips, data, fetched_at, source
        self.last_error = ""
        if fetched:
            self.metrics.refreshes.labels("ok").inc()
            self._write_cache(data, fetched_at)
        if changed:
            self._publish()
            self.log(
                "konnect_ips_updated",
                source=source,
                prefixes=len(ips),
                regions=ips.per_region,
                added=added,
                removed=removed,
            )
        if self.on_document is not None:
            self.on_document(data, fetched_at)
        return True

    def _write_cache(self, data: bytes, fetched_at: float) -> None:
        path = self.model.cache_file
        if path is None:
            return
        try:
            write_atomically(path, data, mode=0o644, mtime=fetched_at)
        except OSError as exc:
            self.log("konnect_ips_cache_failed", cache_file=path, error=str(exc))

    def _failed(self, reason: str, detail: str, **extra: Any) -> None:
        self.last_error = detail
        self.metrics.refreshes.labels("error").inc()
        self.log(
            "konnect_ips_refresh_failed",
            reason=reason,
            detail=detail,
            keeping=len(self.ips) if self.ips is not None else None,
            **extra,
        )

    def _publish(self) -> None:
        self.pins = KonnectPins(self.ips, self.model.mode) if self.enabled else None
        self.metrics.prefixes.set(len(self.ips) if self.ips is not None else 0)
        self.on_pins(self.pins)

    # --- the refresh loop --------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            ok = await self.refresh()
            self._first.set()
            if ok:
                failures = 0
                delay = self.model.refresh * random.uniform(1 - JITTER, 1 + JITTER)
            else:
                cap = min(BACKOFF_CAP, self.model.refresh)
                whole = min(cap, BACKOFF_START * 2.0**failures)
                delay = random.uniform(whole / 2, whole)
                failures += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()


def unpinned_egresses(settings: Settings) -> list[tuple[str, str]]:
    """The egresses this config uses whose dials the list cannot pin: there
    the relay does not resolve the destination itself."""
    egress = settings.egress_config
    out = []
    if "http_proxy" in egress.used:
        out.append(("http_proxy", "the parent proxy resolves Konnect names, not the relay"))
    if "ssh" in egress.used and egress.ssh is not None and egress.ssh.resolve == "remote":
        out.append(("ssh", "the bastion resolves Konnect names (egress.ssh.resolve: remote)"))
    return out
