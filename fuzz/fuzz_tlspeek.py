"""Coverage-guided fuzzing of relay.tlspeek.parse_client_hello with atheris.

Run by hand, not in CI:

    pip install atheris
    python fuzz/fuzz_tlspeek.py -atheris_runs=1000000

Extra arguments go to libFuzzer (a corpus directory, -max_len=, -jobs=, ...).

Raw bytes alone rarely get past the record header, so the first input bytes pick
how the rest is framed: raw; as a handshake body inside valid record and handshake
headers; as the extensions block of an otherwise valid hello; as extensions built
from fuzzer choices (server_name, ALPN, supported_versions, GREASE, any type), in
one record or cut into records of fuzzer-chosen sizes. Beyond "only PeekError escapes",
each input checks the invariants the relay relies on: not_tls is decided from the
first three bytes, a result never claims more bytes than were given, bytes after
the hello do not change the answer, and a full buffer is never left undecided.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from relay.tlspeek import (
        MAX_CLIENT_HELLO,
        ClientHello,
        PeekError,
        _one_record,
        _parse_records,
        looks_like_tls,
        parse_client_hello,
    )

# A max_size small enough that the fuzzer reaches the too_large paths with
# short inputs; the default is exercised by the raw mode.
SMALL_MAX = 600


def _record(payload: bytes, version: bytes = b"\x03\x01") -> bytes:
    return b"\x16" + version + len(payload).to_bytes(2, "big") + payload


def _handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def _body(extensions: bytes) -> bytes:
    return (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"
        + b"\x00\x02\x13\x01"
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
    )


def _parse(buf: bytes, max_size: int | None = None) -> ClientHello | str | None:
    limit = MAX_CLIENT_HELLO if max_size is None else max_size
    # The one-record fast path answers only where the full parser accepts,
    # and with the same hello.
    fast = _one_record(buf, limit)
    if fast is not None and fast != _parse_records(buf, limit):
        raise AssertionError(f"fast path differs: {fast!r}")
    try:
        if max_size is None:
            return parse_client_hello(buf)
        return parse_client_hello(buf, max_size=max_size)
    except PeekError as exc:
        if fast is not None:
            raise AssertionError(f"fast path accepted what the parser refuses: {exc}") from exc
        if exc.reason not in ("not_tls", "malformed", "too_large", "not_client_hello"):
            raise AssertionError(f"unknown reason {exc.reason!r}") from exc
        return exc.reason


def _rest(fdp: atheris.FuzzedDataProvider) -> bytes:
    return bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))


def _vec(data: bytes, width: int) -> bytes:
    return len(data).to_bytes(width, "big") + data


def _extensions(fdp: atheris.FuzzedDataProvider) -> bytes:
    """Well-framed extensions whose contents are mostly well-formed too, so the
    fuzzer spends its time in server_name, ALPN and supported_versions."""
    out = bytearray()
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        ext_type = fdp.PickValueInList([0, 0, 16, 43, 0x0A0A, fdp.ConsumeIntInRange(0, 0xFFFF)])
        if ext_type == 0:
            names = b"".join(
                bytes((fdp.PickValueInList([0, 0, 0, 1]),)) + _vec(fdp.ConsumeBytes(20), 2)
                for _ in range(fdp.ConsumeIntInRange(0, 3))
            )
            data = _vec(names, 2)
        elif ext_type == 16:
            protocols = b"".join(
                _vec(fdp.ConsumeBytes(8), 1) for _ in range(fdp.ConsumeIntInRange(0, 3))
            )
            data = _vec(protocols, 2)
        elif ext_type == 43:
            data = _vec(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12)), 1)
        else:
            data = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))
        if fdp.ConsumeIntInRange(0, 15) == 0:  # now and then, a raw extension body
            data = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)))
        out += ext_type.to_bytes(2, "big") + _vec(data, 2)
    return bytes(out) + _rest(fdp)


def _frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    mode = fdp.ConsumeIntInRange(0, 4)
    if mode == 0:
        return _rest(fdp)
    if mode == 1:
        return _record(_handshake(_rest(fdp)))
    if mode == 2:
        return _record(_handshake(_body(_rest(fdp))))
    if mode == 3:
        return _record(_handshake(_body(_extensions(fdp))))
    sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(1, 8))]
    message = _handshake(_body(_extensions(fdp)))
    out = bytearray()
    pos = 0
    for size in sizes:
        if pos >= len(message):
            break
        out += _record(message[pos : pos + size])
        pos += size
    if pos < len(message):
        out += _record(message[pos:])
    return bytes(out)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    small = fdp.ConsumeBool()
    buf = _frame(fdp)
    max_size = SMALL_MAX if small else None

    result = _parse(buf, max_size)
    if (result == "not_tls") != (not looks_like_tls(buf[:3])):
        raise AssertionError("not_tls disagrees with looks_like_tls")
    if isinstance(result, ClientHello):
        if not 0 < result.record_bytes <= len(buf):
            raise AssertionError(f"record_bytes {result.record_bytes} of {len(buf)}")
        # The answer depends only on the records that carry the hello.
        if _parse(buf[: result.record_bytes], max_size) != result:
            raise AssertionError("result changes without the trailing bytes")
        if _parse(buf + b"\x17\x03\x03\x00\x01x", max_size) != result:
            raise AssertionError("result changes with more bytes after the hello")
    if result is None and len(buf) >= (max_size or 32 * 1024):
        raise AssertionError("a full buffer left undecided")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
