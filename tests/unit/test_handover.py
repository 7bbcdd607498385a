"""The handover channel (relay/handover.py) over a real socket pair, and the
state a successor carries on: metrics totals, reconnect memory, log pieces."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import uvloop

from relay import handover
from relay.book import TunnelBook
from relay.clients import ClientMemory
from relay.handover import Channel, ChannelClosed, HandoverFailed
from relay.log import EventLog, _groups
from relay.metrics import Metrics


def run(coro: object) -> object:
    return uvloop.run(coro)  # type: ignore[arg-type]


def test_message_with_descriptors_arrives_whole() -> None:
    async def main() -> None:
        ours, theirs = Channel.pair()
        other = Channel(theirs)
        r, w = os.pipe()
        try:
            await ours.send({"type": "tunnels", "n": 1}, [w])
            message, fds = await other.recv()
            assert message == {"type": "tunnels", "n": 1}
            assert len(fds) == 1 and fds[0] != w
            os.write(fds[0], b"through the copy")  # the same pipe, another descriptor
            assert os.read(r, 100) == b"through the copy"
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
            ours.close()
            other.close()

    run(main())


def test_long_message_is_split_and_joined() -> None:
    payload = "x" * (5 * handover.PACKET + 123)

    async def main() -> None:
        ours, theirs = Channel.pair()
        other = Channel(theirs)
        r, w = os.pipe()
        try:
            sending = asyncio.ensure_future(ours.send({"type": "done", "blob": payload}, [r, w]))
            message, fds = await other.recv()
            await sending
            assert message["blob"] == payload
            assert len(fds) == 2  # with the first packet only, once
            handover.close_fds(fds)
        finally:
            os.close(r)
            os.close(w)
            ours.close()
            other.close()

    run(main())


def test_closed_peer_and_failed_message() -> None:
    async def main() -> None:
        ours, theirs = Channel.pair()
        other = Channel(theirs)
        await other.send({"type": "failed", "cause": "cannot listen: busy"})
        with pytest.raises(HandoverFailed, match="cannot listen: busy"):
            await ours.expect("accepting")
        await other.send({"type": "adopted"})
        with pytest.raises(HandoverFailed, match="expected 'hello', got 'adopted'"):
            await ours.expect("hello")
        other.close()
        with pytest.raises(ChannelClosed):
            await ours.recv()
        ours.close()

    run(main())


@pytest.mark.parametrize(
    ("packet", "error"),
    [(b".not json", "not JSON"), (b".[1, 2]", "without a type"), (b'.{"type": 3}', "type")],
)
def test_malformed_messages_are_errors(packet: bytes, error: str) -> None:
    async def main() -> None:
        ours, theirs = Channel.pair()
        try:
            theirs.send(packet)
            with pytest.raises(OSError, match=error):
                await ours.recv()
        finally:
            ours.close()
            theirs.close()

    run(main())


def test_refuse_before_any_loop() -> None:
    """A successor whose config does not load says why, synchronously."""

    async def main(fd: int) -> dict[str, object]:
        channel = Channel(socket.socket(fileno=fd))
        try:
            with pytest.raises(HandoverFailed, match=r"limits\.idle_timeout: must be > 0"):
                await channel.expect("hello")
        finally:
            channel.close()
        return {}

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handover.refuse(theirs.detach(), "relay.yaml: 1 error(s): limits.idle_timeout: must be > 0")
    run(main(ours.detach()))


def test_inherited_must_be_a_seqpacket_socket() -> None:
    r, w = os.pipe()
    try:

        async def main() -> None:
            with pytest.raises(OSError, match="not a handover channel"):
                Channel.inherited(r)

        run(main())
    finally:
        os.close(r)
        os.close(w)


def test_metrics_totals_continue_in_the_successor() -> None:
    old = Metrics()
    series = old.host("dp.eu.cp0.konghq.com")
    series.opened, series.reconnects, series.up, series.down = 7, 2, 1000, 2000
    series.closed_by("client_eof")
    series.duration.observe(12.0)
    old.connect_time("direct").observe(0.003)
    old.requests_denied.labels("not_allowlisted").inc(3)
    old.reloads.labels("ok").inc()
    new = Metrics()
    new.host("dp.eu.cp0.konghq.com").opened = 1  # the successor's own, since it started
    new.requests_denied.labels("not_allowlisted").inc()
    new.add_carried(old.carried())
    got = new.hosts["dp.eu.cp0.konghq.com"]
    assert (got.opened, got.reconnects, got.up, got.down) == (8, 2, 1000, 2000)
    assert got.closed == {"client_eof": 1}
    assert got.duration.counts == series.duration.counts and got.duration.sum == 12.0
    assert new.connect["direct"].counts == old.connect["direct"].counts
    text = new.reply().body.decode()
    assert 'konnect_relay_requests_denied_total{reason="not_allowlisted"} 4.0' in text
    assert 'konnect_relay_config_reloads_total{result="ok"} 1.0' in text


def test_changed_buckets_and_unknown_series_are_left_out() -> None:
    new = Metrics()
    new.add_carried(
        {
            "connect": {"direct": {"bounds": [1.0], "counts": [5, 1], "sum": 2.0}},
            "counters": {
                "konnect_relay_gone": [[{}, 5]],
                "konnect_relay_requests_denied": [[{"no_such_label": "x"}, 1]],
            },
        }
    )
    assert sum(new.connect["direct"].counts) == 0
    assert "no_such_label" not in new.reply().body.decode()


def test_reconnect_memory_moves_as_ages() -> None:
    log = EventLog()
    old = TunnelBook(Metrics(), log, lambda: 900.0)
    now = time.monotonic()
    old.last_closed[("dp-1", "dp.eu.cp0.konghq.com")] = now - 30
    old.memory.closed("dp-1", now - 30)
    old.memory.reconnected("dp-1", now - 20)
    old.memory.refused("dp-2", "10.0.0.2:4000", "auth_failed", "x.eu.cp0.konghq.com:443", 407)
    state = old.memory_state(time.monotonic())
    new = TunnelBook(Metrics(), log, lambda: 900.0)
    later = time.monotonic() + 100  # another process's clock
    new.adopt_memory(state, later)
    age = later - new.last_closed[("dp-1", "dp.eu.cp0.konghq.com")]
    assert 29 < age < 31
    entry = new.memory.known["dp-1"]
    assert 19 < later - entry.reconnects[0] < 21
    assert new.memory.known["dp-2"].refusal is not None
    assert [r["reason"] for r in new.memory.recent] == ["auth_failed"]


def test_memory_of_the_successor_wins() -> None:
    mine = ClientMemory()
    mine.closed("dp-1", 50.0)
    theirs = ClientMemory()
    theirs.closed("dp-1", 10.0)
    mine.adopt(theirs.state(60.0), 60.0)
    assert mine.known["dp-1"].seen == 50.0


def test_shared_log_writes_whole_lines_within_pipe_buf() -> None:
    lines = [f'{{"n":{i},"pad":"{"p" * (i % 300)}"}}\n' for i in range(500)]
    pieces = _groups(lines, 4096)
    assert "".join(pieces) == "".join(lines)
    assert all(len(p) <= 4096 and p.endswith("\n") for p in pieces)
    assert len(_groups(["y" * 5000 + "\n", "z\n"], 4096)) == 2  # a long line goes alone


def test_a_container_pid_1_refuses_to_upgrade(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """PID 1's exit ends its container, successor and all: refused, with the
    outcome written for `konnect-relay upgrade`."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from relay import upgrade

    lines: list[tuple[str, dict[str, object]]] = []
    relay = SimpleNamespace(upgrade=None, draining=False, log=lambda e, **f: lines.append((e, f)))
    pid_file = Path(str(tmp_path)) / "relay.pid"
    monkeypatch.setattr(os, "getpid", lambda: 1)
    assert upgrade.begin(relay, [], str(pid_file)) is None  # type: ignore[arg-type]
    assert lines[0][0] == "upgrade_failed" and "PID 1" in str(lines[0][1]["cause"])
    record = json.loads(Path(upgrade.status_path(str(pid_file))).read_text())
    assert record["state"] == "failed" and record["pid"] == 1
    assert relay.upgrade is None
