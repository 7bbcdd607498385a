"""``konnect-relay doctor``: can this host reach Konnect the way the relay would?

For each Konnect host the config allows (or each name given on the command
line) the doctor takes the steps the relay takes for a data plane's
``CONNECT``: the policy decision, the egress route, the resolution (static
map and address checks, shown only for direct egress, where this host does
the lookup), and the dial through the configured egress. It then takes the one
step only the data plane takes: a TLS handshake that verifies the server's
certificate chain and name against the system CAs or ``--cafile``. No client
certificate is offered and nothing but ``close_notify`` is sent after the
handshake, so a check never authenticates to Konnect.

The handshake runs over memory BIOs fed by a small protocol rather than
through ``loop.start_tls``: uvloop's ``start_tls`` accepts only its own TCP,
Unix and TLS transports, and a dialer may hand back another kind (an SSH
channel), so the doctor drives TLS itself over whatever transport it got.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

from relay.admission import Admission, Refuse
from relay.config import Settings
from relay.doctor_tls import Failed, Probe, tls_handshake
from relay.egress import Dialer, DialError, make_dialers
from relay.policy import HostError, normalise_host
from relay.resolver import KonnectPins, ResolveError, Resolver, resolver_for

SECONDS = 1.0
# Kong's client gives up on every proxy step after 5 s; a DNS lookup or TLS
# handshake slower than that fails for the data plane too, so it fails here.
# (The dial gets limits.connect_timeout, as in the relay.)
DEFAULT_TIMEOUT = 5 * SECONDS
# Every region with one control-plane prefix is ~20 hosts; eight at a time keeps
# the run short without looking like a burst to a parent proxy or a firewall.
MAX_CONCURRENT = 8
# A peer that does not close after our close_notify is not worth waiting for.
CLOSE_WAIT = 1 * SECONDS
KONNECT_PORT = 443  # the only port Konnect needs (Konnect networking docs)


_DIAL_VERDICTS = {
    "refused": "connection refused",
    "timeout": "timeout",
    "reset": "connection reset",
    "unreachable": "unreachable",
}
_RESOLVE_VERDICTS = {
    "dns_failure": "DNS failure",
    "dns_timeout": "DNS timeout",
    "private_address": "non-public address refused",
    "address_not_pinned": "address outside resolver.allowed_cidrs",
    "konnect_ips_unavailable": "no Konnect ingress list (konnect_ips)",
}
# How an address outside resolver.konnect_ips shows in the ADDRESSES column.
OUTSIDE_MARK = " (outside konnect_ips)"

COLUMNS = ("HOST", "ADDRESSES", "CONNECT", "TLS", "CERT EXPIRES", "VERDICT")


class UsageError(Exception):
    """A command-line argument the doctor cannot use."""


@dataclass(slots=True)
class Check:
    """The outcome of checking one ``host:port``."""

    host: str
    port: int
    addresses: list[str] = field(default_factory=list)
    connect_ms: float | None = None
    tls_version: str | None = None
    not_after: datetime | None = None
    ok: bool = False
    verdict: str = "not checked"
    detail: str = ""

    @property
    def label(self) -> str:
        return self.host if self.port == KONNECT_PORT else f"{self.host}:{self.port}"


# --- what to check (pure) -----------------------------------------------------


def normalise_or_none(host: str) -> str:
    try:
        return normalise_host(host)
    except HostError:
        return ""


def konnect_targets(settings: Settings) -> tuple[list[tuple[str, int]], str]:
    """The Konnect hosts a data plane of this config talks to, and a note when
    the control-plane hosts cannot be listed (``konnect.control_planes`` empty
    means any prefix, and the prefixes are not known here)."""
    k = settings.policy.konnect
    hosts: list[str] = []
    for region in k.regions:
        for prefix in k.control_planes:
            hosts.append(f"{prefix}.{region}.cp0.konghq.com")
            hosts.append(f"{prefix}.{region}.tp0.konghq.com")
        hosts.append(f"{region}.api.konghq.com")
    hosts += ["cloud.konghq.com", "global.api.konghq.com"]
    note = ""
    if not k.control_planes:
        note = (
            "konnect.control_planes is empty (any prefix is allowed), so the control-plane "
            "hosts are unknown here; name them, e.g. "
            "konnect-relay doctor PREFIX.REGION.cp0.konghq.com PREFIX.REGION.tp0.konghq.com"
        )
    return [(h, KONNECT_PORT) for h in dict.fromkeys(hosts)], note


def parse_target(text: str) -> tuple[str, int]:
    """``HOST`` or ``HOST:PORT`` (port 443 when absent); the policy judges the host."""
    host, sep, port_text = text, "", ""
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and text[end + 1 : end + 2] == ":":
            host, sep, port_text = text[: end + 1], ":", text[end + 2 :]
    elif text.count(":") == 1:
        host, sep, port_text = text.partition(":")
    if not host:
        raise UsageError(f"{text!r}: empty host")
    if not sep:
        return host, KONNECT_PORT
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"{text!r}: port must be in 1..65535")
    return host, int(port_text)


def format_table(checks: Sequence[Check], now: datetime) -> str:
    """The result table, then one line of detail per failed check."""
    rows = [COLUMNS]
    for c in checks:
        expiry = "-"
        if c.not_after is not None:
            days = (c.not_after - now).days
            expiry = f"{c.not_after:%Y-%m-%d} ({days} d)"
        rows.append(
            (
                c.label,
                ", ".join(c.addresses) or "-",
                f"{c.connect_ms:.1f} ms" if c.connect_ms is not None else "-",
                c.tls_version or "-",
                expiry,
                c.verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]
    details = [f"  {c.label}: {c.detail}" for c in checks if c.detail]
    if details:
        lines += ["", "details:", *details]
    return "\n".join(lines) + "\n"


# --- progress -------------------------------------------------------------------


class Progress:
    """``checking 3/12 ...`` on stderr: rewritten in place on a terminal, one
    plain line per finished check otherwise (CI logs, ``kubectl exec`` without -t)."""

    __slots__ = ("done", "stream", "total", "tty", "width")

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.total = total
        self.done = 0
        self.width = 0
        try:
            self.tty = stream.isatty()
        except ValueError:
            self.tty = False
        if self.tty:
            self._show(f"checking 0/{total} ...")

    def finished(self, check: Check) -> None:
        self.done += 1
        if self.tty:
            self._show(f"checking {self.done}/{self.total} ... {check.label}")
        else:
            self._write(f"checking {self.done}/{self.total} ... {check.label}: {check.verdict}\n")

    def close(self) -> None:
        if self.tty and self.width:
            self._write("\r" + " " * self.width + "\r")

    def _show(self, text: str) -> None:
        self._write("\r" + text.ljust(self.width))
        self.width = len(text)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # progress is a courtesy; a closed stderr must not fail the checks


# --- one check ----------------------------------------------------------------


@dataclass(slots=True)
class Doctor:
    """What every check shares: settings, resolver, dialers, TLS context."""

    settings: Settings
    resolver: Resolver
    dialers: dict[str, Dialer]
    context: ssl.SSLContext
    verified_against: str
    timeout: float
    connect_timeout: float
    # resolver.konnect_ips mode when the list is on; the resolver's pins are
    # in report mode here, so that every address shows with its verdict.
    pin_mode: str = ""

    async def check(self, host: str, port: int) -> Check:
        check = Check(host, port)
        try:
            await self._check(check)
        except Failed as exc:
            check.verdict, check.detail = exc.verdict, exc.detail
        else:
            check.ok, check.verdict = True, "ok"
        return check

    async def _check(self, check: Check) -> None:
        answer = Admission(self.settings).decide(None, None, "", check.host, check.port)
        if isinstance(answer, Refuse):
            name = normalise_or_none(check.host)
            if name:
                check.host = name
            if answer.reason == "route_denied":
                raise Failed("denied by egress.routes", f"egress.routes refuse {check.label}")
            raise Failed(f"denied by policy: {answer.reason}", answer.detail)
        decision = answer.decision
        check.host = answer.host
        via = answer.via
        dialer = self.dialers[via]
        loop = asyncio.get_running_loop()
        if via == "direct":
            try:
                async with asyncio.timeout(self.timeout):
                    endpoints = await self.resolver.resolve(check.host, check.port)
            except TimeoutError:
                raise Failed("DNS timeout", f"no answer within {self.timeout:g} s") from None
            except ResolveError as exc:
                verdict = _RESOLVE_VERDICTS.get(exc.reason, exc.reason)
                detail = exc.detail
                if exc.reason == "dns_failure" and ": " in detail:
                    # the cause fits in the table; the detail would only repeat it
                    verdict, detail = f"{verdict}: {detail.rpartition(': ')[2]}", ""
                raise Failed(verdict, detail) from None
            check.addresses = [str(e) + (OUTSIDE_MARK if e.would_deny else "") for e in endpoints]
            if self.pin_mode == "enforce" and all(e.would_deny for e in endpoints):
                raise Failed(
                    "address outside konnect_ips",
                    endpoints[0].would_deny + "; the relay refuses it (address_not_pinned)",
                )
        probe = Probe(loop)
        # not loop.time(): uvloop's clock is libuv's, in whole milliseconds
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    dialled = await dialer.dial(check.host, check.port, probe)
            except TimeoutError:
                raise Failed(
                    "timeout", f"no connection within {self.connect_timeout:g} s"
                ) from None
            except DialError as exc:
                verdict = _DIAL_VERDICTS.get(exc.reason, f"connect failed: {exc.reason}")
                raise Failed(verdict, exc.detail) from None
            check.connect_ms = (time.perf_counter() - started) * 1000
            if via != "direct":
                check.addresses = [f"via {via} {dialled.peer}"]
            probe.transport = dialled.transport
            if dialled.leftover:
                probe.data_received(dialled.leftover)
            try:
                async with asyncio.timeout(self.timeout):
                    check.tls_version, check.not_after = await tls_handshake(
                        dialled.transport, probe, self.context, check.host, self.verified_against
                    )
            except TimeoutError:
                raise Failed(
                    "timeout", f"no TLS handshake within {self.timeout:g} s after connecting"
                ) from None
        finally:
            await self._close(probe)
        if answer.would_deny:
            check.detail = (
                f"policy_mode is report: the relay lets this through and logs would_deny "
                f"({decision.reason.value})"
            )

    async def _close(self, probe: Probe) -> None:
        transport = probe.transport
        if transport is None:
            return
        transport.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await probe.closed
        except TimeoutError:
            transport.abort()


# --- entry points -------------------------------------------------------------


async def konnect_ips_list(
    settings: Settings, dialers: dict[str, Dialer]
) -> tuple[KonnectPins, str]:
    """The list the relay would hold (its cache_file, else one fetch through
    the egress), and a line saying where it came from, how old and how large."""
    from prometheus_client import CollectorRegistry

    from relay.konnect_ips_feed import Feed
    from relay.metrics import KonnectIPsMetrics

    problems: list[str] = []

    def log(event: str, **fields: object) -> None:
        if event == "konnect_ips_refresh_failed":
            problems.append(str(fields.get("detail", "")))

    def dialer_for(host: str, port: int) -> Dialer | None:
        return settings.dialer_for(dialers, host, port)

    model = settings.konnect_ips
    feed = Feed(settings, dialer_for, log, KonnectIPsMetrics(CollectorRegistry()), lambda p: None)
    if model.cache_file is not None:
        feed.load_file()
    if feed.ips is None and model.fetch:
        await feed.refresh()
    if feed.ips is not None:
        regions = ", ".join(f"{k} {n}" for k, n in feed.ips.per_region.items())
        line = (
            f"konnect_ips: {len(feed.ips)} prefixes ({regions}) from {feed.source}, "
            f"fetched {feed.age():.0f} s ago; mode {model.mode}"
        )
    else:
        why = "; ".join(problems) or f"{model.cache_file} holds no list"
        line = f"konnect_ips: no list ({why}); mode {model.mode}"
    return KonnectPins(feed.ips, model.mode), line


def tls_context(cafile: str | None) -> tuple[ssl.SSLContext, str]:
    """A verifying client context (hostname and chain; TLS >= 1.2) and what it trusts."""
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cafile {cafile}: cannot load: {exc}") from None
    return context, cafile or "the system CAs"


async def check_all(
    doctor: Doctor, targets: Iterable[tuple[str, int]], progress: Progress | None = None
) -> list[Check]:
    """Every target, at most MAX_CONCURRENT at a time, results in input order."""
    limit = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(host: str, port: int) -> Check:
        async with limit:
            check = await doctor.check(host, port)
        if progress is not None:
            progress.finished(check)
        return check

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(host, port)) for host, port in targets]
    return [t.result() for t in tasks]


async def _run(
    settings: Settings,
    targets: list[tuple[str, int]],
    context: ssl.SSLContext,
    verified_against: str,
    timeout: float | None,
    err: TextIO,
) -> tuple[list[Check], str]:
    resolver = resolver_for(settings)
    dialers = make_dialers(settings.egress_config, resolver)
    try:
        for dialer in dialers.values():
            await dialer.start()
        pin_mode = summary = ""
        if settings.konnect_ips.enabled:
            pin_mode = settings.konnect_ips.mode
            pins, summary = await konnect_ips_list(settings, dialers)
            resolver.pins = KonnectPins(pins.ips, "report") if pins.ips is not None else pins
        doctor = Doctor(
            settings,
            resolver,
            dialers,
            context,
            verified_against,
            timeout=timeout or DEFAULT_TIMEOUT,
            connect_timeout=timeout or settings.limits.connect_timeout,
            pin_mode=pin_mode,
        )
        progress = Progress(err, len(targets))
        try:
            return await check_all(doctor, targets, progress), summary
        finally:
            progress.close()
    finally:
        for dialer in dialers.values():
            await dialer.close()


def main(
    settings: Settings,
    names: Sequence[str],
    *,
    cafile: str | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the checks on uvloop and print the table: 0 when every check passed,
    1 when one failed, 2 for an unusable argument. ``timeout`` bounds every
    step; by default the dial gets ``limits.connect_timeout`` (as in the relay)
    and DNS and the TLS handshake get DEFAULT_TIMEOUT (as in Kong)."""
    import uvloop

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        if timeout is not None and not timeout > 0:
            raise UsageError(f"--timeout must be > 0 (got {timeout:g})")
        context, verified_against = tls_context(cafile)
        note = ""
        if names:
            targets = list(dict.fromkeys(parse_target(n) for n in names))
        else:
            targets, note = konnect_targets(settings)
    except UsageError as exc:
        print(f"doctor: {exc}", file=err)
        return 2
    checks, summary = uvloop.run(_run(settings, targets, context, verified_against, timeout, err))
    if summary:
        out.write(summary + "\n\n")
    out.write(format_table(checks, datetime.now(UTC)))
    if note:
        out.write(f"\nnote: {note}\n")
    failed = sum(not c.ok for c in checks)
    out.write(
        f"\n{len(checks) - failed} of {len(checks)} ok through egress {settings.egress}"
        f"; certificates verified against {verified_against}\n"
    )
    out.flush()
    return 1 if failed else 0
