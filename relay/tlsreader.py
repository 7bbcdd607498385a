"""A bounds-checked cursor over a ClientHello's bytes, and the error every
parser of them raises (tlspeek.py). Pure."""

from __future__ import annotations

from typing import Literal

PeekReason = Literal["not_tls", "malformed", "too_large", "not_client_hello"]


class PeekError(Exception):
    """The bytes are not (or cannot become) an acceptable ClientHello.

    `reason` is one of a fixed set (`PeekReason`), usable as a metric label;
    `detail` says what was wrong, for logs.
    """

    reason: PeekReason
    detail: str

    def __init__(self, reason: PeekReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class Reader:
    """Bounds-checked cursor over data[pos:end]; every overrun is "malformed"."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if n > self.end - start:
            raise PeekError("malformed", f"{what}: needs {n} bytes, {self.end - start} left")
        self.pos = start + n
        return start

    def u8(self, what: str) -> int:
        return self.data[self._need(1, what)]

    def u16(self, what: str) -> int:
        i = self._need(2, what)
        return (self.data[i] << 8) | self.data[i + 1]

    def u24(self, what: str) -> int:
        i = self._need(3, what)
        return (self.data[i] << 16) | (self.data[i + 1] << 8) | self.data[i + 2]

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)

    def take(self, n: int, what: str) -> bytes:
        i = self._need(n, what)
        return bytes(self.data[i : i + n])

    def sub(self, n: int, what: str) -> Reader:
        i = self._need(n, what)
        return Reader(self.data, i, i + n)

    def vector8(self, what: str) -> Reader:
        return self.sub(self.u8(what), what)

    def vector16(self, what: str) -> Reader:
        return self.sub(self.u16(what), what)

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise PeekError("malformed", f"{what}: {self.end - self.pos} trailing bytes")
