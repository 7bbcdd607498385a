"""Coverage-guided fuzzing of relay.connect.parse_head with atheris.

Run by hand, not in CI:

    pip install atheris
    python fuzz/fuzz_connect.py -atheris_runs=1000000

The first input byte picks how the rest is framed: raw bytes; after a valid
"CONNECT host:443 HTTP/1.1\\r\\n" request line (fuzzing the header block); or as
a request line built from fuzzer-chosen method, target and version. Beyond "only
HeadError escapes", each input checks what the server relies on: an accepted
head is never longer than MAX_HEAD_SIZE and parses the same on its own, None
only below the size limit, a credential never appears in an error detail, and
every error renders as a well-formed response.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from relay.connect import MAX_HEAD_SIZE, HeadError, parse_head, response

SECRET = b"c2VjcmV0LXVzZXI6aHVudGVyMg=="  # base64 of a user:password pair
LINE = b"CONNECT a.eu.cp0.konghq.com:443 HTTP/1.1\r\n"


def _frame(data: bytes) -> bytes:
    if not data:
        return data
    mode, rest = data[0] % 4, data[1:]
    if mode == 1:
        return LINE + rest
    if mode == 2:
        return LINE + b"Proxy-Authorization: Basic " + SECRET + b"\r\n" + rest
    if mode == 3:
        parts = [*rest.split(b"\x00", 3), b"", b"", b""]
        return b"%s %s %s\r\n\r\n" % (parts[0], parts[1], parts[2])
    return rest


def test_one_input(data: bytes) -> None:
    buf = _frame(data)
    try:
        request = parse_head(buf)
    except HeadError as exc:
        assert SECRET not in exc.detail.encode("latin-1", "replace"), "credential echoed"
        answer = response(exc.status, exc.detail, exc.headers)
        assert answer.startswith(b"HTTP/1.1 %d " % exc.status)
        return
    if request is None:
        assert len(buf) < MAX_HEAD_SIZE, "undecided at the size limit"
        return
    assert request.head_length <= min(len(buf), MAX_HEAD_SIZE), "head too long"
    assert parse_head(buf[: request.head_length]) == request, "head not self-contained"
    assert 1 <= request.port <= 65535


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
