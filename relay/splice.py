"""The zero-copy bulk path: an established tunnel's bytes moved by ``os.splice``.

On the transport path every chunk is read into a Python ``bytes`` object and
written out again: two copies through user space and an allocation per chunk.
``splice(2)`` moves the pages socket -> pipe -> socket inside the kernel, so a
bulk tunnel costs two system calls per chunk and no copy at all.

A tunnel starts on the event loop's transports (the ``200``, bytes the client
sent with its head, bytes held while dialling and the TLS peek need them) and
switches here once it carries bulk data (see ``tunnel.py``). ``Link.take``
duplicates both sockets' descriptors while the transports are paused with
empty write buffers; the transports are then closed, which closes only the
loop's own descriptors: the connections stay open through the duplicates, the
peers see no FIN and no RST, and no byte was read that has not been forwarded.

From then on a ``Link`` drives two ``Pump`` objects, one per direction, from
the event loop with ``add_reader``/``add_writer`` on the raw descriptors: no
coroutine and no task per tunnel. A pump reads its source while its pipe has
room and waits for the destination to become writable while the pipe holds
bytes; a full pipe stops the reading. So a stalled peer holds at most one
pipe's capacity per direction, in the kernel, and nothing in the relay
(symmetric, bounded backpressure). EOF is forwarded with ``shutdown(SHUT_WR)``
once the pipe is drained; the other direction keeps flowing until it ends too.

Pipes are created when a direction first moves data and closed again when it
has been quiet for ``PIPE_IDLE`` seconds, so a long-lived tunnel that once
carried a burst goes back to its two socket descriptors. When no pipe can be
had (the pipe budget ``MAX_PIPE_FDS`` is spent, the process is at its open-file
limit, or the kernel refuses to splice sockets) a pump copies through a bounded
buffer instead: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Protocol

from relay.sockets import was_reset

# Bytes one direction carries on the transport path before the tunnel moves to
# splice: the handshakes and pings of a Kong tunnel stay far below it, a bulk
# transfer passes it within milliseconds. Below it a switch costs more than it
# saves (two dup()s, two pipes, a poll handle per socket).
SWITCH_AFTER = 1 << 20
# Capacity asked for each pipe (F_SETPIPE_SZ; /proc/sys/fs/pipe-max-size caps it,
# 1 MiB by default). It is the most one direction of a tunnel can hold when its
# destination stops reading, and the most one splice call moves: larger pipes
# mean fewer system calls per byte. If the kernel refuses (an unprivileged user
# past fs.pipe-user-pages-soft or pipe-max-size), the pipe keeps what it got.
PIPE_SIZE = 1 << 20
# A pipe the kernel would not make at least this large (past the per-user
# fs.pipe-user-pages-soft, new pipes get two pages) moves too little per call
# to beat copying: the pump copies instead.
MIN_PIPE_SIZE = 64 * 1024
# TCP_NOTSENT_LOWAT on both sockets once spliced: the kernel keeps at most this
# much not-yet-sent data queued per socket (what is in flight is bounded by the
# peer's window), and the socket reports writable only below it. Without it a
# socket queues up to its whole send buffer (4 MiB by default), which is memory
# a stalled peer pins and, on loopback, measured ~20% slower for one tunnel.
NOTSENT_LOWAT = 128 * 1024
# A direction whose pipe moved nothing for this long gives the pipe back (two
# descriptors and its pages); the next byte opens a new one. Checked from the
# server's periodic sweep (Tunnel.idle_for), so the release happens up to one
# sweep period later.
PIPE_IDLE = 10.0
# Descriptors all pipes together may hold: a quarter of the open-file limit, so
# bulk tunnels cannot starve accept() and the upstream dials. Past it a pump
# copies through user space.
MAX_PIPE_FDS = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
# Reads per readable event before a pump yields to the other tunnels (each read
# moves up to PIPE_SIZE bytes).
READ_ROUNDS = 16
# Read size of the copying fallback, and so the most it holds per direction.
COPY_CHUNK = 64 * 1024
# SPLICE_F_NONBLOCK: pipe operations never block (the sockets are non-blocking
# already). SPLICE_F_MOVE is a hint the kernel may ignore.
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
# errno values meaning "this kernel or file system cannot splice these".
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class _State:
    """Process-wide facts: whether splicing works here, and pipe descriptors held."""

    __slots__ = ("pipe_fds", "works")

    def __init__(self) -> None:
        self.works = hasattr(os, "splice")
        self.pipe_fds = 0


_state = _State()


def pipe_fds() -> int:
    """Descriptors held by pipes right now, over every spliced tunnel (for the
    server's open-file budget: each tunnel holds two sockets plus these)."""
    return _state.pipe_fds


def available() -> bool:
    """False once the kernel refused to splice sockets: new tunnels stay on
    their transports (the ones already switched copy instead)."""
    return _state.works


class Owner(Protocol):
    """What a Link reports to (the Tunnel): ``link_eof`` when one direction
    reached EOF (from the client, or from the destination), ``close`` when both
    directions are done or on an error, ``link_closed`` once every descriptor
    is closed and the tunnel is gone."""

    def link_eof(self, from_client: bool) -> None: ...
    def close(self, reason: str | None = None, *, abort: bool = False) -> None: ...

    def lost_reason(self, exc: BaseException, client: bool) -> str: ...
    def link_closed(self) -> None: ...


class Counter(Protocol):
    """Holds a direction's byte count (the tunnel's side objects)."""

    nbytes: int


class Pump:
    """One direction: ``src`` socket -> pipe -> ``dst`` socket.

    The destination is watched for writing while ``pending`` bytes are held;
    the source for reading until the pipe is full (copying: until the one
    buffer is written). So at most one pipe, or one copy buffer, of bytes is
    held per direction, whatever the peers do.
    """

    __slots__ = (
        "buf",
        "counter",
        "dst",
        "dst_sock",
        "eof",
        "link",
        "loop",
        "pending",
        "pipe_r",
        "pipe_w",
        "quiet_since",
        "reading",
        "seen",
        "src",
        "src_sock",
        "writing",
    )

    def __init__(
        self,
        link: Link,
        src: socket.socket,
        dst: socket.socket,
        counter: Counter,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.link = link
        self.loop = loop
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.src_sock = src
        self.dst_sock = dst
        self.counter = counter
        self.pipe_r = -1
        self.pipe_w = -1
        self.pending = 0  # bytes read from src, not yet written to dst
        self.buf: memoryview | None = None  # those bytes, when copying
        self.reading = False
        self.writing = False
        self.eof = False  # src ended; the EOF is passed on once pending is written
        self.seen = counter.nbytes
        self.quiet_since = 0.0

    # --- event-loop callbacks (the hot path) ---------------------------------

    def on_readable(self) -> None:
        """Read until the socket is empty (EAGAIN), the pipe is full, or the
        stream ends; at most READ_ROUNDS times, then yield to other tunnels.

        Reading down to EAGAIN is what makes a reset safe: when a socket
        reports an error, libuv runs its reader one last time and drops the
        watch, so the bytes queued ahead of the error must be read now, down
        to the error itself. EAGAIN proves no error was pending (a socket with
        one returns it instead), so the watch is still alive."""
        for _ in range(READ_ROUNDS):
            if not (self.splice_in() if self.pipe_w >= 0 or self.open_pipe() else self.copy_in()):
                return
        # Still readable: renewing the watch keeps it alive even if this
        # was an error's last event.
        self.loop.remove_reader(self.src)
        self.loop.add_reader(self.src, self.on_readable)

    def splice_in(self) -> bool:
        """One splice from the socket into the pipe and a flush; True to read on."""
        try:
            n = _splice(self.src, self.pipe_w, PIPE_SIZE, None, None, _FLAGS)
        except BlockingIOError:
            if self.pending:  # the pipe may be full: flush() resumes reading after progress
                self.stop_reading()
            return False
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                self.link.fail(self.src_sock, exc)
            elif self.pending:
                self.stop_reading()  # copy once the pipe is drained
            else:
                _state.works = False
                self.close_pipe()
                return self.copy_in()
            return False
        if n == 0:
            self.at_eof()
            return False
        self.counter.nbytes += n
        self.pending += n
        self.flush()
        return self.reading

    def flush(self) -> None:
        """Write what is held to dst; watch dst while it cannot take it all.
        While the pipe holds bytes the source is still read, so both sockets
        work at once; a full pipe stops the reading (see on_readable)."""
        try:
            if self.buf is None:
                n = _splice(self.pipe_r, self.dst, self.pending, None, None, _FLAGS)
            else:
                n = os.write(self.dst, self.buf)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.link.fail(self.dst_sock, exc)
            return
        pending = self.pending = self.pending - n
        if pending:
            if not self.writing:
                self.loop.add_writer(self.dst, self.flush)
                self.writing = True
            if self.buf is not None:  # copying: one buffer, so no read until it is out
                self.buf = self.buf[n:]
                if self.reading:
                    self.loop.remove_reader(self.src)
                    self.reading = False
            elif n and not self.reading and not self.eof and not self.link.closing:
                self.loop.add_reader(self.src, self.on_readable)
                self.reading = True
            return
        self.buf = None
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        if self.link.closing:
            self.link.flushed()
        elif self.eof:
            self.forward_eof()
        elif not self.reading:
            self.loop.add_reader(self.src, self.on_readable)
            self.reading = True

    def copy_in(self) -> bool:
        """The fallback without a pipe: one bounded read, then the same flush
        (which stops the reading until that one buffer is written)."""
        try:
            data = os.read(self.src, COPY_CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.link.fail(self.src_sock, exc)
            return False
        if not data:
            self.at_eof()
            return False
        self.counter.nbytes += len(data)
        self.buf = memoryview(data)
        self.pending = len(data)
        self.flush()
        return self.reading

    def at_eof(self) -> None:
        """src ended: pass the EOF on once the bytes still held are written."""
        link = self.link
        other = link.down if self is link.up else link.up
        we_sent_fin = other.eof and not other.pending  # other.forward_eof() ran
        if not we_sent_fin and was_reset(self.src_sock):
            link.fail(self.src_sock, ConnectionResetError())
            return
        self.stop_reading()
        self.eof = True
        self.link.owner.link_eof(self is self.link.up)
        if not self.pending:
            self.forward_eof()

    def forward_eof(self) -> None:
        link = self.link
        try:
            self.dst_sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            link.fail(self.dst_sock, exc)
            return
        self.close_pipe()
        if link.up.eof and link.down.eof and not (link.up.pending or link.down.pending):
            link.owner.close()

    # --- state changes (rare) ------------------------------------------------

    def start(self) -> None:
        if not self.reading and not self.eof:
            self.loop.add_reader(self.src, self.on_readable)
            self.reading = True

    def stop_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def stop(self) -> None:
        self.stop_reading()
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False

    def open_pipe(self) -> bool:
        if not _state.works or _state.pipe_fds + 2 > MAX_PIPE_FDS:
            return False
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False  # EMFILE/ENFILE: copy until a later read finds room
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # EPERM past the per-user pipe budget: keep what the kernel gave
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        if size < MIN_PIPE_SIZE:
            os.close(r)
            os.close(w)
            return False
        self.pipe_r, self.pipe_w = r, w
        _state.pipe_fds += 2
        return True

    def close_pipe(self) -> None:
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            _state.pipe_fds -= 2

    def tidy(self, now: float) -> None:
        """Give the pipe back after PIPE_IDLE seconds without a byte."""
        nbytes = self.counter.nbytes
        if nbytes != self.seen:
            self.seen = nbytes
            self.quiet_since = now
        elif self.pipe_r >= 0 and not self.pending and now - self.quiet_since >= PIPE_IDLE:
            self.close_pipe()


class Link:
    """Both directions of a spliced tunnel; owns both sockets from ``take`` on."""

    __slots__ = ("client", "closed", "closing", "down", "held", "loop", "owner", "up", "upstream")

    def __init__(
        self,
        owner: Owner,
        client: socket.socket,
        upstream: socket.socket,
        up: Counter,
        down: Counter,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.owner = owner
        self.client = client
        self.upstream = upstream
        self.up = Pump(self, client, upstream, up, self.loop)
        self.down = Pump(self, upstream, client, down, self.loop)
        self.closing = False
        self.closed = False
        self.held: Callable[[], None] | None = None  # moving out: called once drained

    @classmethod
    def take(
        cls,
        owner: Owner,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        up: Counter,
        down: Counter,
    ) -> Link:
        """Duplicate both transports' sockets (raises OSError, e.g. EMFILE, and
        then holds nothing). The caller closes the transports afterwards; their
        reading must be paused and their write buffers empty."""
        socks: list[socket.socket] = []
        try:
            for transport in (client, upstream):
                info = transport.get_extra_info("socket")
                # fromfd() dup()s: the copy is ours, close-on-exec and, sharing
                # the open file description, non-blocking like the original.
                sock = socket.fromfd(info.fileno(), info.family, info.type)
                socks.append(sock)
                with contextlib.suppress(OSError):  # an old kernel: still correct
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        except OSError:
            for sock in socks:
                sock.close()
            raise
        return cls(owner, socks[0], socks[1], up, down)

    def start(self) -> None:
        now = time.monotonic()  # the clock of Tunnel.idle_for
        for pump in (self.up, self.down):
            pump.quiet_since = now
            pump.start()

    def tidy(self, now: float) -> None:
        if not self.closed:
            self.up.tidy(now)
            self.down.tidy(now)

    def fail(self, sock: socket.socket, exc: OSError) -> None:
        """A socket error (reset, broken pipe) on ``sock``: abort the tunnel,
        saying which side ended it."""
        self.owner.close(self.owner.lost_reason(exc, sock is self.client), abort=True)

    def close(self, abort: bool) -> None:
        """Stop reading; with ``abort`` (or nothing held) close at once, else
        after the pipes are drained (the server aborts a tunnel that lingers)."""
        if self.closed:
            return
        self.closing = True
        self.held = None
        self.up.stop_reading()
        self.down.stop_reading()
        if abort or not (self.up.pending or self.down.pending):
            self.release()

    def flushed(self) -> None:
        """A pump emptied while closing or held."""
        if not (self.up.pending or self.down.pending):
            if self.held is not None:
                self.held()
            else:
                self.release()

    def hold(self, ready: Callable[[], None]) -> None:
        """Stop reading; ``ready()`` once the pipes are empty (moving.py)."""
        self.closing = True  # no pump reads again
        self.held = ready
        self.up.stop_reading()
        self.down.stop_reading()
        self.flushed()

    def unhold(self) -> None:
        if self.held is not None and not self.closed:
            self.closing, self.held = False, None
            self.start()

    def detach(self) -> None:
        """Drop our descriptors without a FIN: another process has the sockets."""
        self.held = None
        self.closed = True
        for pump in (self.up, self.down):
            pump.stop()
            pump.close_pipe()
        self.client.close()
        self.upstream.close()

    def release(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pump in (self.up, self.down):
            pump.stop()
            pump.close_pipe()
            pump.buf = None
        self.client.close()
        self.upstream.close()
        # Reported from the loop, as a transport reports connection_lost: the
        # caller of close() may still be iterating over the tunnels.
        self.loop.call_soon(self.owner.link_closed)
