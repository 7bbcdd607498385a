"""Coverage-guided fuzzing of relay.proxyproto.parse with atheris.

Run by hand, not in CI:

    pip install atheris
    python fuzz/fuzz_proxyproto.py -atheris_runs=1000000

Extra arguments go to libFuzzer (a corpus directory, -max_len=, -jobs=, ...).

The first input byte picks how the rest is framed: raw; after "PROXY "; after
"PROXY TCP4 " or "PROXY TCP6 "; after the v2 signature; or as a v2 header with a
correct length field around a fuzzer-chosen family, address block and TLVs. Beyond
"only ProxyProtocolError escapes", each input checks the invariants the server
relies on: `None` only below MAX_HEADER bytes, a header never claims more bytes
than were given, its answer does not change with bytes after it, every prefix of
a valid header asks for more, and addresses are real addresses.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from relay.proxyproto import (
        MAX_HEADER,
        V2_SIGNATURE,
        ProxyHeader,
        ProxyProtocolError,
        parse,
    )

_BLOCK_SIZES = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}


def _parse(buf: bytes) -> ProxyHeader | str | None:
    try:
        return parse(buf)
    except ProxyProtocolError as exc:
        if not exc.detail:
            raise AssertionError("empty detail") from exc
        return "error"


def _rest(fdp: atheris.FuzzedDataProvider) -> bytes:
    return bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))


def _v2(fdp: atheris.FuzzedDataProvider) -> bytes:
    command = fdp.PickValueInList([0x20, 0x21, 0x21, 0x21, fdp.ConsumeIntInRange(0, 255)])
    family = fdp.PickValueInList([0x00, 0x11, 0x21, 0x31, 0x12, fdp.ConsumeIntInRange(0, 255)])
    block = bytes(fdp.ConsumeBytes(_BLOCK_SIZES.get(family, fdp.ConsumeIntInRange(0, 40))))
    tlvs = bytearray()
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        value = bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
        declared = len(value) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        tlvs += bytes([fdp.ConsumeIntInRange(0, 255)]) + declared.to_bytes(2, "big") + value
    body = block + bytes(tlvs)
    length = len(body) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
    return V2_SIGNATURE + bytes([command, family]) + length.to_bytes(2, "big") + body


def _frame(fdp: atheris.FuzzedDataProvider) -> bytes:
    mode = fdp.ConsumeIntInRange(0, 4)
    if mode == 0:
        return _rest(fdp)
    if mode == 1:
        return b"PROXY " + _rest(fdp)
    if mode == 2:
        return fdp.PickValueInList([b"PROXY TCP4 ", b"PROXY TCP6 "]) + _rest(fdp)
    if mode == 3:
        return V2_SIGNATURE + _rest(fdp)
    return _v2(fdp) + _rest(fdp)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf = _frame(fdp)
    result = _parse(buf)
    if result is None:
        if len(buf) >= MAX_HEADER:
            raise AssertionError("a full buffer left undecided")
        return
    if result == "error":
        if _parse(buf + b"\r\n") != "error":
            raise AssertionError("more bytes rescued a refused header")
        return
    assert isinstance(result, ProxyHeader)
    if not 0 < result.length <= len(buf):
        raise AssertionError(f"length {result.length} of {len(buf)}")
    header = buf[: result.length]
    if _parse(header) != result or _parse(header + b"\xff\x00") != result:
        raise AssertionError("result depends on bytes after the header")
    if result.local != (result.source is None) or result.local != (result.destination is None):
        raise AssertionError("local and addresses disagree")
    for address in (result.source, result.destination):
        if address is not None:
            ipaddress.ip_address(address[0])
            if not 0 <= address[1] <= 65535:
                raise AssertionError(f"port {address[1]}")
    # A few prefixes (all of them would make each input quadratic).
    for cut in {0, 1, result.length // 2, result.length - 1}:
        if _parse(header[:cut]) is not None:
            raise AssertionError(f"prefix of {cut} bytes not left undecided")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
