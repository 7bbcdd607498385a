"""Command line: ``run``, ``check``, ``policy``. No logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from relay import config


def _load(path: str | None) -> config.Settings:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        where = exc.source or path or "<config>"
        print(f"{where}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1) from None


async def _serve(settings: config.Settings) -> int:
    from relay.server import Relay

    relay = Relay(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        await relay.stop()
        return 1
    await stop.wait()
    await relay.drain()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    settings = _load(args.config)
    return uvloop.run(_serve(settings))


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    print(f"{settings.source}: ok")
    return 0


def split_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not host:
        raise SystemExit(f"policy: {text!r} is not HOST:PORT")
    return host, int(port)


def cmd_policy(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    host, port = split_target(args.target)
    decision = settings.policy.decide(host, port)
    verdict = "allow" if decision.allowed else "deny"
    print(f"{verdict} {args.target}")
    print(f"  reason: {decision.reason.value}")
    print(f"  rule:   {decision.rule or '-'}")
    print(f"  detail: {decision.detail}")
    if decision.allowed:
        print(f"  egress: {settings.egress}")
    return 0 if decision.allowed else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="konnect-relay",
        description="HTTP CONNECT relay for Kong Gateway data planes reaching Kong Konnect.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the relay")
    run.add_argument("--config", help="YAML config file (default: the embedded default)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config file; exit 1 listing every error")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)
    pol = sub.add_parser("policy", help="show the allow/deny decision for HOST:PORT")
    pol.add_argument("target", metavar="HOST:PORT")
    pol.add_argument("--config")
    pol.set_defaults(func=cmd_policy)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))
