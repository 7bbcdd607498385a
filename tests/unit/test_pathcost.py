"""bench/pathcost.py: the relay's setup path without sockets, in µs, calls and bytecodes."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest

import relay.log

PATHCOST_PY = Path(__file__).resolve().parents[2] / "bench" / "pathcost.py"


@pytest.fixture(scope="module")
def pathcost() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_pathcost", PATHCOST_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frames_count_for_their_module(pathcost: ModuleType) -> None:
    relay_dir = pathcost.RELAY_DIR
    assert pathcost._module(relay_dir + "tunnel.py") == "relay/tunnel.py"
    assert pathcost._module(relay_dir + "egress/direct.py") == "relay/egress/direct.py"
    assert pathcost._module("<string>") == "(generated)"
    assert pathcost._module(asyncio.__file__) == "(stdlib)"
    assert pathcost._module(pathcost.__file__) is None  # the harness's fakes


class _FrozenClock:
    """``relay.log``'s view of ``time``, stopped inside one second: the log formats
    the date part again when a second turns over, a few bytecodes that would land in
    one round and not the next."""

    gmtime = staticmethod(time.gmtime)
    strftime = staticmethod(time.strftime)

    @staticmethod
    def time() -> float:
        return 1_800_000_000.25


def test_measure_counts_the_same_bytecodes_every_round(
    pathcost: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.log, "time", _FrozenClock)

    async def go() -> tuple[dict[str, object], list[dict[str, int]]]:
        result = await pathcost.measure(pathcost.ROUND, 1)
        loop = asyncio.get_running_loop()
        relay = pathcost.make_relay()
        relay.loop = loop
        for dialer in relay.dialers.values():
            await dialer.start()
        listener = pathcost.Listener(relay.settings.specs[0])
        head = f"CONNECT {pathcost.HOST}:443 HTTP/1.1\r\nHost: {pathcost.HOST}:443\r\n\r\n"
        first = pathcost.client_hello(pathcost.HOST) + pathcost.PAYLOAD
        for _ in range(3):
            await pathcost.one_round(relay, listener, head.encode(), first)
        counts = [
            dict(await pathcost.count_bytecodes(relay, listener, head.encode(), first))
            for _ in range(2)
        ]
        return result, counts

    with asyncio.Runner(loop_factory=pathcost.FakeConnectLoop) as runner:
        result, (a, b) = runner.run(go())
    # Steady state: the same code path gives the same count, round after round.
    assert a == b
    by_module = result["bytecodes_by_module"]
    assert isinstance(by_module, dict)
    assert result["bytecodes_per_tunnel"] == pytest.approx(sum(by_module.values()), abs=1)
    # Every feature on the setup path runs bytecodes of its own module.
    for module in (
        "relay/connect.py",
        "relay/connector.py",
        "relay/tunnel.py",
        "relay/tlspeek.py",
        "relay/book.py",
        "relay/log.py",
        "relay/metrics.py",
        "relay/egress/direct.py",
    ):
        assert by_module[module] > 0, module
    assert 1000 < result["bytecodes_per_tunnel"] < 50_000
    # Two log lines (request, close) for every tunnel of every round it ran.
    lines = result["log_lines"]
    assert isinstance(lines, int)
    assert lines > 0
    assert lines % (2 * pathcost.ROUND) == 0


def test_main_prints_bytecodes_by_module(
    pathcost: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pathcost.main(["--tunnels", "64", "--runs", "1", "--by-module"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "bytecodes per tunnel" in out[0]
    assert any(line.endswith("relay/tlspeek.py") for line in out[1:])
