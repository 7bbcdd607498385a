"""The JSON-lines event log: one object per line, written in batches."""

from __future__ import annotations

import asyncio
import io
import json

from hypothesis import given
from hypothesis import strategies as st

from relay import log as log_module
from relay.log import EventLog, json_fields, json_string


class Recorder(io.StringIO):
    """A stream that counts writes and says when one happened."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.written: asyncio.Event | None = None

    def write(self, text: str) -> int:
        self.writes.append(text)
        if self.written is not None:
            self.written.set()
        return super().write(text)


def lines(stream: Recorder) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_without_a_loop_each_line_is_written_at_once() -> None:
    stream = Recorder()
    log = EventLog(stream)
    log("one", n=1)
    log("two", n=2, name="x\ny", ok=True, none=None, ms=0.5, tags=["a"])
    assert len(stream.writes) == 2
    first, second = lines(stream)
    assert first["event"] == "one" and first["n"] == 1
    assert {k: v for k, v in second.items() if k != "ts"} == {
        "event": "two",
        "n": 2,
        "name": "x\ny",
        "ok": True,
        "none": None,
        "ms": 0.5,
        "tags": ["a"],
    }
    assert str(first["ts"]).endswith("+00:00")


def test_in_a_loop_lines_are_batched_into_one_write() -> None:
    asyncio.run(_in_a_loop_lines_are_batched_into_one_write())


async def _in_a_loop_lines_are_batched_into_one_write() -> None:
    stream = Recorder()
    stream.written = asyncio.Event()
    log = EventLog(stream)
    log.loop = asyncio.get_running_loop()
    for i in range(10):
        log("request", i=i)
    assert stream.writes == []  # nothing yet: the batch waits for the interval
    await asyncio.wait_for(stream.written.wait(), timeout=5)
    assert len(stream.writes) == 1
    assert [line["i"] for line in lines(stream)] == list(range(10))


def test_a_full_batch_is_written_without_waiting() -> None:
    asyncio.run(_a_full_batch_is_written_without_waiting())


async def _a_full_batch_is_written_without_waiting() -> None:
    stream = Recorder()
    log = EventLog(stream)
    log.loop = asyncio.get_running_loop()
    for i in range(log_module.MAX_PENDING):
        log("request", i=i)
    assert len(stream.writes) == 1
    assert len(lines(stream)) == log_module.MAX_PENDING
    log("request", i=-1)
    log.flush()  # what the relay does on its way out
    assert len(stream.writes) == 2
    assert lines(stream)[-1]["i"] == -1


def test_a_broken_stream_loses_the_lines_not_the_relay() -> None:
    asyncio.run(_a_broken_stream_loses_the_lines_not_the_relay())


async def _a_broken_stream_loses_the_lines_not_the_relay() -> None:
    stream = Recorder()
    stream.close()
    log = EventLog(stream)
    log.loop = asyncio.get_running_loop()
    log("request")
    log.flush()  # ValueError from the closed stream is swallowed
    log("request")
    log.flush()
    assert len(stream.writes) == 2  # both batches were tried, neither raised


def test_passed_through_lines_keep_their_place_in_the_batch() -> None:
    asyncio.run(_passed_through_lines_keep_their_place_in_the_batch())


async def _passed_through_lines_keep_their_place_in_the_batch() -> None:
    stream = Recorder()
    stream.written = asyncio.Event()
    log = EventLog(stream)
    log.loop = asyncio.get_running_loop()
    log("own", i=0)
    log.write_line('{"event":"request","worker":1}\n')
    log("own", i=1)
    await asyncio.wait_for(stream.written.wait(), timeout=5)
    assert len(stream.writes) == 1
    assert [line["event"] for line in lines(stream)] == ["own", "request", "own"]


@given(
    st.text(max_size=40),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.one_of(st.none(), st.booleans(), st.text(max_size=10), st.lists(st.integers())),
)
def test_a_template_line_equals_the_encoded_line(
    text: str, number: int, real: float, extra: object
) -> None:
    generic, template = Recorder(), Recorder()
    fields = {"client": text, "tunnel": number, "dial_ms": real, "extra": extra}
    EventLog(generic)("request", **fields)
    EventLog(template).write_event(
        "request",
        f',"client":{json_string(text)},"tunnel":{number},"dial_ms":{real!r}'
        + json_fields({"extra": extra}),
    )
    # Equal after the timestamp.
    assert template.getvalue().split(',"event"')[1] == generic.getvalue().split(',"event"')[1]
    assert json.loads(template.getvalue())["client"] == text
