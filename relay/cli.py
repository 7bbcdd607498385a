"""Command line: ``run``, ``reload``, ``upgrade``, ``check``, ``policy``, ``doctor``. No
logic of its own."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay import config


def _load(path: str | None) -> config.Settings:
    return _load_document(path)[0]


def _load_document(path: str | None) -> tuple[config.Settings, dict[str, Any]]:
    try:
        return config.load_document(path)
    except config.ConfigError as exc:
        where = exc.source or path or "<config>"
        print(f"{where}: {len(exc.errors)} error(s)", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        _refuse_handover(f"{where}: {len(exc.errors)} error(s): {'; '.join(exc.errors)}")
        raise SystemExit(1) from None


def _refuse_handover(cause: str) -> None:
    """A successor that cannot start says why to the relay that started it."""
    from relay.handover import HANDOVER_ENV, refuse

    fd = os.environ.get(HANDOVER_ENV)
    if fd is not None and fd.isdigit():
        refuse(int(fd), cause)


async def _serve(settings: config.Settings, args: argparse.Namespace) -> int:
    from relay import upgrade
    from relay.handover import HANDOVER_ENV, Channel, ChannelClosed, HandoverFailed
    from relay.notify import notify
    from relay.server import Relay
    from relay.successor import Successor
    from relay.workers_upgrade import CONTROL_ENV, serve_control

    relay = Relay(
        settings,
        reuse_port=getattr(args, "reuse_port", False),
        admin_path=getattr(args, "admin_socket", None),
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_sighup() -> None:
        relay.tasks.spawn(relay.reload(args.config))

    def upgraded(task: asyncio.Task[bool]) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            stop.set()  # a successor took over: drain what stayed, then exit

    def on_sigusr2() -> None:
        if getattr(args, "worker_index", None) is not None:
            relay.log("upgrade_refused", detail="a worker is upgraded by its supervisor")
            return
        task = upgrade.begin(relay, args.argv, args.pid_file)
        if task is not None:
            task.add_done_callback(upgraded)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    # resolver.konnect_ips with fetch: false (a worker's, or an operator's whose
    # file another process keeps current): re-read cache_file.
    loop.add_signal_handler(signal.SIGUSR1, relay.feed.reread)
    loop.add_signal_handler(signal.SIGUSR2, on_sigusr2)
    # Started by `konnect-relay upgrade`: take over from the relay that started us.
    handover = os.environ.pop(HANDOVER_ENV, None)
    successor = None
    try:
        if handover is not None:
            successor = Successor(
                relay,
                Channel.inherited(int(handover)),
                args.pid_file,
                getattr(args, "worker_index", None),
            )
            await successor.start()
        else:
            await relay.start()
    except (OSError, ValueError, HandoverFailed, ChannelClosed) as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        await relay.stop()
        return 1
    # Everything built so far (config, policy, metrics, imported modules) lives
    # as long as the process: out of the collector's sight, so that a full
    # collection walks only per-tunnel objects and stays short.
    gc.collect()
    gc.freeze()
    control = os.environ.pop(CONTROL_ENV, None)
    controlled = None
    if control is not None:  # a worker: its supervisor may hand it over
        channel = Channel.inherited(int(control))
        controlled = relay.tasks.spawn(serve_control(relay, channel, args.argv, stop.set))
    if successor is not None:
        try:
            await successor.receive()
        except (OSError, ValueError, HandoverFailed) as exc:
            print(f"upgrade: {exc}", file=sys.stderr)
            await relay.stop()
            return 1
        await successor.take_over()
    else:
        if args.pid_file:
            Path(args.pid_file).write_text(f"{os.getpid()}\n")
        notify("READY=1")
    try:
        await stop.wait()
        if controlled is not None:
            controlled.cancel()  # not a task the drain waits for
        await relay.drain()
    finally:
        if args.pid_file and not relay.handed_over:
            Path(args.pid_file).unlink(missing_ok=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    settings, document = _load_document(args.config)
    if getattr(args, "worker_index", None) is None:
        from relay import supervisor
        from relay.workerconf import worker_count

        if worker_count(settings) > 1:
            return supervisor.run(settings, document, args)
    return uvloop.run(_serve(settings, args))


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate the file first, then send SIGHUP to the process in --pid-file."""
    if args.config:
        _load(args.config)
    try:
        pid = int(Path(args.pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(f"reload: cannot signal the relay named by {args.pid_file}: {exc}", file=sys.stderr)
        return 1
    print(f"reload: sent SIGHUP to {pid}")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Signal the relay in --pid-file to hand over to a successor started from
    the code now installed (SIGUSR2, upgrade.py); wait for the outcome."""
    from relay.upgrade import status_path
    from relay.upgrade_command import wait_for_upgrade

    if args.config:
        _load(args.config)
    return wait_for_upgrade(args.pid_file, status_path(args.pid_file), args.timeout)


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
    """The relay's own admission decision (admission.py) for one request."""
    from relay.admission import Admission, Refuse

    settings = _load(args.config)
    host, port = split_target(args.target)
    answer = Admission(settings).decide(args.user, args.cert, args.source or "", host, port)
    allowed = not isinstance(answer, Refuse)
    print(f"{'allow' if allowed else 'deny'} {args.target}")
    if isinstance(answer, Refuse):
        print(f"  reason: {answer.reason}")
        print(f"  rule:   {answer.fields.get('rule') or '-'}")
        print(f"  detail: {answer.detail}")
        if answer.reason == "route_denied":
            print("  egress: deny")
        return 1
    decision = answer.decision
    print(f"  reason: {decision.reason.value}")
    print(f"  rule:   {decision.rule or '-'}")
    print(f"  detail: {decision.detail}")
    if answer.entry:
        print(f"  client: {answer.entry}")
    if answer.would_deny:
        print("  mode:   report (policy_mode: report lets it through, logged as would_deny)")
    print(f"  egress: {answer.via}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """The effective Konnect allowlist: every preset with its product and purpose."""
    settings = _load(args.config)
    pol = settings.policy
    ports = sorted(pol.konnect.ports)
    if args.format == "json":
        import json

        rules = [
            {
                "rule": p.rule,
                "pattern": p.row.pattern,
                "product": p.row.product,
                "purpose": p.row.purpose,
                "legacy": p.row.legacy,
                "region": p.region,
                "label": p.label,
                "pinned": list(p.pinned),
                "ports": ports,
            }
            for p in pol.presets
        ]
        extra = {
            "allow": [p.text for p in pol.allow],
            "deny": [p.text for p in pol.deny],
            "products": list(pol.konnect.products),
        }
        print(json.dumps({"presets": rules, **extra}, indent=1))
        return 0
    width = max((len(p.rule) for p in pol.presets), default=0)
    print(f"# konnect.products: {', '.join(pol.konnect.products)}; ports: {ports}")
    for p in pol.presets:
        legacy = " (legacy)" if p.row.legacy else ""
        pinned = f" [{p.label} one of: {', '.join(p.pinned)}]" if p.pinned else ""
        print(f"{p.rule:<{width}}  {p.row.product:<13} {p.row.purpose}{legacy}{pinned}")
    for pattern in pol.allow:
        print(f"allow:{pattern.text}")
    for pattern in pol.deny:
        print(f"deny:{pattern.text}  (wins over everything)")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print an argon2id hash for auth.basic.users[].password_hash."""
    import getpass

    from relay.auth import hash_password

    password = sys.stdin.readline().rstrip("\r\n") if args.stdin else getpass.getpass()
    try:
        print(hash_password(password))
    except ValueError as exc:
        print(f"hash-password: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from relay import doctor

    settings = _load(args.config)
    return doctor.main(settings, args.targets, cafile=args.cafile, timeout=args.timeout)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="konnect-relay",
        description="HTTP CONNECT relay for Kong Gateway data planes reaching Kong Konnect.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the relay")
    run.add_argument("--config", help="YAML config file (default: the embedded default)")
    run.add_argument("--pid-file", help="write the process id here (for `reload`)")
    # Set by the supervisor (workers: N) when it starts a worker; not for operators.
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--admin-socket", help=argparse.SUPPRESS)
    run.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)
    reload = sub.add_parser("reload", help="make a running relay re-read its config (SIGHUP)")
    reload.add_argument("--pid-file", required=True, help="the file given to `run --pid-file`")
    reload.add_argument("--config", help="validate this file first; refuse to signal if invalid")
    reload.set_defaults(func=cmd_reload)
    up = sub.add_parser(
        "upgrade",
        help="replace a running relay by one started from the code now installed, "
        "handing it the listeners and tunnels (SIGUSR2)",
    )
    up.add_argument("--pid-file", required=True, help="the file given to `run --pid-file`")
    up.add_argument("--config", help="validate this file first; refuse to signal if invalid")
    up.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="give up waiting after S seconds"
    )
    up.set_defaults(func=cmd_upgrade)
    check = sub.add_parser("check", help="validate a config file; exit 1 listing every error")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)
    pol = sub.add_parser("policy", help="show the allow/deny decision for HOST:PORT")
    pol.add_argument("target", metavar="HOST:PORT")
    pol.add_argument("--config")
    who = pol.add_argument_group("the client asking (for clients: entries and clients_only)")
    who.add_argument("--user", help="its proxy-auth user")
    who.add_argument("--cert", help="its client-certificate name")
    who.add_argument("--source", metavar="IP", help="its source address")
    pol.set_defaults(func=cmd_policy)
    pre = sub.add_parser(
        "presets", help="print the effective Konnect allowlist with each rule's product and purpose"
    )
    pre.add_argument("--config", help="YAML config file (default: the embedded default)")
    pre.add_argument("--format", choices=("text", "json"), default="text")
    pre.set_defaults(func=cmd_presets)
    doc = sub.add_parser(
        "doctor",
        help="check that Konnect hosts are reachable through the configured egress "
        "(policy, DNS, connect, verified TLS handshake)",
    )
    doc.add_argument(
        "targets",
        nargs="*",
        metavar="HOST[:PORT]",
        help="hosts to check (default: the Konnect hosts of the configured regions "
        "and konnect.control_planes)",
    )
    doc.add_argument("--config", help="YAML config file (default: the embedded default)")
    doc.add_argument("--cafile", help="CA bundle to verify servers with (default: system CAs)")
    doc.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds allowed for each step: DNS, connect, TLS handshake "
        "(default: limits.connect_timeout to connect, as the relay; 5 s otherwise, as Kong)",
    )
    doc.set_defaults(func=cmd_doctor)
    hp = sub.add_parser("hash-password", help="print an argon2id hash for auth.basic.users")
    hp.add_argument("--stdin", action="store_true", help="read the password from stdin")
    hp.set_defaults(func=cmd_hash_password)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # What a successor is started with (konnect-relay upgrade): the same arguments.
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command != "run":
        # A command whose reader went away (`konnect-relay presets | head`)
        # ends quietly, as Unix tools do; the relay itself keeps Python's
        # default and never dies of a closed log pipe.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    return int(args.func(args))
