"""Moving bytes over a connected socket (or a stdin/stdout pair) under trio, zero-copy where
the kernel allows: ``sendfile`` from a file into the socket, ``splice`` from the socket through
a pipe into a file.  Falls back to read/write where splice is refused (a tty, a plain file).

:class:`PayloadStage` is the receiving server's side of a DATA payload: bytes are held (in
pipes, without copying them) until a whole piece of the payload has arrived, and only then
written into the file, so a connection that ends in the middle of a piece writes nothing of it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import os
import socket
import stat
from typing import Protocol

import trio

__all__ = ["PIECE", "FdTransport", "PayloadStage", "TransportClosed", "piece_size", "tune_socket"]

_SPLICE_F_MOVE = 1
_SPLICE_F_NONBLOCK = 2
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_CHUNK = 1 << 16
#: Socket buffers asked for (the kernel caps them at net.core.[rw]mem_max and doubles them):
#: a sendfile or splice then moves MiBs per call instead of the default tens of KiB.
SOCKET_BUFFER = 4 << 20
#: The splice pipe is grown to this (capped by /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_SIZE = 1 << 20
#: A DATA payload is written into the file in pieces of at most this many bytes, each once it
#: was received completely; see :class:`PayloadStage` and :func:`piece_size`.
PIECE = 1 << 20
#: Pipes a stage may fill per piece before it copies their bytes out (see PayloadStage).
_STAGE_PIPES = 4
_FIONREAD = 0x541B


class _Sock(Protocol):
    def getsockopt(self, level: int, option: int, /) -> int: ...
    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


def tune_socket(sock: _Sock) -> None:
    """Large send and receive buffers (best effort), no Nagle delay for small frames."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, opt) < SOCKET_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _grow_if_pipe(fd: int) -> None:
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, min(PIPE_SIZE, _pipe_max()))


def _pipe_max() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return PIPE_SIZE


class TransportClosed(Exception):
    """The peer closed the connection (or it broke)."""


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class FdTransport:
    """A byte stream over ``rfd`` (read side) and ``wfd`` (write side), made non-blocking.

    The fds are not owned: close them (or their socket) yourself.  One task may read while
    another writes; writes are serialised by a lock.
    """

    def __init__(self, rfd: int, wfd: int | None = None) -> None:
        self.rfd = rfd
        self.wfd = rfd if wfd is None else wfd
        _set_nonblocking(self.rfd)
        _set_nonblocking(self.wfd)
        for fd in {self.rfd, self.wfd}:
            _grow_if_pipe(fd)  # ssh's pipes: MiBs per sendfile/splice instead of 64 KiB
        self.send_lock = trio.Lock()
        self._pipe: tuple[int, int] | None = None
        self._pipe_size = 1 << 16
        self._splice_ok = True
        #: a dup of a socket rfd, to set SO_RCVLOWAT on (None: not a socket, or refused)
        self._lowat_sock: socket.socket | None = None
        self._lowat = 1
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(rfd).st_mode):
                self._lowat_sock = socket.socket(fileno=os.dup(rfd))
        self.bytes_sent = 0
        self.bytes_received = 0

    def _wait_for(self, n: int) -> None:
        """Wake the reader only once ``n`` bytes are queued (SO_RCVLOWAT): while a large DATA
        payload streams in, one wake-up and one splice per pipeful instead of per segment."""
        if self._lowat_sock is None or n == self._lowat:
            return
        try:
            self._lowat_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n
        except OSError:
            self._lowat_sock.close()
            self._lowat_sock = None

    def close(self) -> None:
        """Release the splice pipe (not the fds)."""
        if self._lowat_sock is not None:
            self._lowat_sock.close()
            self._lowat_sock = None
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    # -- receiving -------------------------------------------------------------------------

    async def recv(self, n: int = _CHUNK) -> bytes:
        """Up to ``n`` bytes; b"" at EOF."""
        while True:
            try:
                data = os.read(self.rfd, n)
            except BlockingIOError:
                self._wait_for(1)
                await trio.lowlevel.wait_readable(self.rfd)
                continue
            except (ConnectionError, OSError) as e:
                raise TransportClosed(f"receive failed: {e.strerror or e}") from None
            self.bytes_received += len(data)
            return data

    async def recv_into_file(self, fd: int, offset: int, count: int) -> int:
        """Move up to ``count`` (>0) bytes from the stream into ``fd`` at ``offset``.

        With splice, the bytes go socket -> pipe -> file without entering Python.  Returns the
        number moved; raises TransportClosed at EOF.
        """
        if self._splice_ok:
            try:
                return await self._splice_in(fd, offset, count)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EBADF):
                    raise
                self._splice_ok = False
        data = await self.recv(min(count, _CHUNK))
        if not data:
            raise TransportClosed("connection closed in the middle of a DATA payload")
        _pwrite_all(fd, data, offset)
        return len(data)

    async def _splice_in(self, fd: int, offset: int, count: int) -> int:
        """socket -> pipe -> file, a pipeful per round, until ``count`` bytes moved or the
        socket has nothing more right now (then return what moved; wait only if nothing)."""
        if self._pipe is None:
            r, w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, min(PIPE_SIZE, _pipe_max()))
            with contextlib.suppress(OSError):
                self._pipe_size = fcntl.fcntl(w, _F_GETPIPE_SZ)
            self._pipe = (r, w)
        r, w = self._pipe
        moved = 0
        while moved < count:
            try:
                n = os.splice(
                    self.rfd,
                    w,
                    min(count - moved, self._pipe_size),
                    flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK,
                )
            except BlockingIOError:
                if moved:
                    break
                # the sender always completes a payload: waiting for the rest of it (up to a
                # pipeful) cannot deadlock, and EOF or a reset still wakes us
                self._wait_for(min(count, self._pipe_size))
                await trio.lowlevel.wait_readable(self.rfd)
                continue
            if n == 0:
                if moved:
                    break
                raise TransportClosed("connection closed in the middle of a DATA payload")
            self.bytes_received += n
            pos = offset + moved
            left = n
            while left:
                m = os.splice(r, fd, left, offset_dst=None if offset < 0 else pos)
                left -= m
                pos += m
            moved += n
        return moved

    # -- sending ---------------------------------------------------------------------------

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.wfd)
                continue
            except OSError as e:
                raise TransportClosed(f"send failed: {e.strerror or e}") from None
            self.bytes_sent += n
            view = view[n:]

    async def send_file(self, fd: int, offset: int, count: int) -> int:
        """sendfile ``count`` bytes of ``fd`` from ``offset``; fewer only at end of file."""
        sent = 0
        while sent < count:
            try:
                n = os.sendfile(self.wfd, fd, offset + sent, count - sent)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.wfd)
                continue
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS):
                    n = await self._copy_file(fd, offset + sent, count - sent)
                else:
                    raise TransportClosed(f"send failed: {e.strerror or e}") from None
            if n == 0:
                break
            self.bytes_sent += n
            sent += n
        return sent

    async def _copy_file(self, fd: int, offset: int, count: int) -> int:
        data = os.pread(fd, min(count, 1 << 20), offset)
        await self.send_all(data)
        self.bytes_sent -= len(data)  # counted by the caller
        return len(data)


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset) if offset >= 0 else os.write(fd, view)
        view = view[n:]
        if offset >= 0:
            offset += n


def _stage_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe, as large as allowed: (read end, write end, capacity)."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    # twice a piece where allowed (CAP_SYS_RESOURCE), else fs.pipe-max-size (1 MiB)
    for size in (2 * PIECE, min(PIECE, _pipe_max())):
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, size)
            break
        except OSError:
            continue
    try:
        capacity = fcntl.fcntl(w, _F_GETPIPE_SZ)
    except OSError:
        capacity = 1 << 16
    return r, w, capacity


def _piece_of(capacity: int) -> int:
    # A pipe holds one network fragment per page-sized slot, so it fills before its capacity
    # in bytes (~94% with loopback's fragments): a piece of 7/8 of it fits in one pipe, one
    # splice in and one out, as fast as writing each pipeful at once (see PayloadStage).
    return max(1, min(PIECE, capacity - capacity // 8))


@functools.cache
def piece_size() -> int:
    """The piece size a :class:`PayloadStage` uses here: 896 KiB with 1 MiB pipes (the
    default fs.pipe-max-size), 1 MiB where pipes may be larger.  Found once per process (a
    pipe per connection just to ask would fail first when fds run out)."""
    r, w, capacity = _stage_pipe()
    os.close(r)
    os.close(w)
    return _piece_of(capacity)


class PayloadStage:
    """Receives DATA payloads into a file a whole piece at a time (see docs/protocol.md).

    For each payload: :meth:`start` (where its bytes go), then :meth:`add` for bytes the codec
    had already buffered and :meth:`receive` for the rest, then :meth:`finish`.  Bytes are
    staged until :attr:`piece` of them (:func:`piece_size`) or the end of the payload arrived,
    and only then written, at the piece's offset; a connection that ends earlier
    (:meth:`close`) writes nothing of its last piece.  Staged bytes live in pipes, filled by
    ``splice`` from the stream and emptied by ``splice`` into the file, so nothing is copied
    through Python.  A pipe holds one network fragment per slot, so with many small segments
    one may fill before the piece is complete: the next pipe takes over, and when all of them
    are full their bytes are read out into memory (at most a piece).  Bytes in memory
    (``_head``) always precede those in pipes.  Where splice is refused, the stream is read
    into memory instead.
    """

    def __init__(self, transport: FdTransport) -> None:
        self.t = transport
        self._pipes: list[tuple[int, int]] = []
        #: bytes in each pipe in use, in order; the last one is being filled
        self._in_pipe: list[int] = []
        self._head = bytearray()
        #: bytes staged (in memory and pipes), not yet written
        self.staged = 0
        self._splice_ok = True
        self._devnull = -1
        #: the current payload's file (None: its bytes are dropped) and the staged bytes' offset
        self.fd: int | None = None
        self.offset = 0
        #: why writing the current payload failed (its later bytes are then dropped)
        self.error: OSError | None = None
        self.piece = piece_size()  # known before anything is staged; pipes come on first use

    # -- pipes -----------------------------------------------------------------------------

    def _new_pipe(self) -> None:
        # One smaller than the piece (fs.pipe-user-pages-soft reached) just fills early.
        r, w, _ = _stage_pipe()
        self._pipes.append((r, w))

    def _next_pipe(self) -> None:
        """The pipe being filled is full: continue in the next one (or spill to memory)."""
        if len(self._in_pipe) >= _STAGE_PIPES:
            self._spill()
        if len(self._pipes) <= len(self._in_pipe):
            self._new_pipe()
        self._in_pipe.append(0)

    def _spill(self) -> None:
        """Move the pipes' bytes into memory (after ``_head``, where they belong)."""
        for (r, _), n in zip(self._pipes, self._in_pipe, strict=False):
            while n:
                data = os.read(r, n)
                if not data:
                    raise OSError(errno.EIO, "staged bytes vanished from a pipe")
                self._head += data
                n -= len(data)
        self._in_pipe.clear()

    def _input_waiting(self) -> bool:
        """Whether the stream has bytes queued (FIONREAD); unknown counts as yes."""
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.t.rfd, _FIONREAD, buf)
        except OSError:
            return True
        return buf[0] > 0

    # -- a payload -------------------------------------------------------------------------

    def start(self, fd: int | None, offset: int) -> None:
        """A new payload, to be written into ``fd`` at ``offset`` (None: dropped)."""
        assert not self.staged
        self.fd, self.offset, self.error = fd, offset, None

    def add(self, data: bytes) -> None:
        """Stage bytes of the payload that were already received (the codec's buffer)."""
        view = memoryview(data)
        while view:
            if any(self._in_pipe):
                self._spill()  # keep the order (the server adds before it receives anyway)
            n = min(len(view), self.piece - self.staged)
            self._head += view[:n]
            self.staged += n
            view = view[n:]
            if self.staged >= self.piece:
                self._commit()

    async def receive(self, count: int) -> int:
        """Move 1..``count`` bytes of the payload from the stream into the stage (writing
        each piece that completes): as many as are there, waiting only while there are none.
        Raises TransportClosed at EOF or on a broken stream."""
        if not self._splice_ok:
            return await self._receive_copy(count)
        moved = 0
        while moved < count:
            if not self._in_pipe:  # after a commit
                if not self._pipes:
                    self._new_pipe()
                self._in_pipe.append(0)
            want = min(count - moved, self.piece - self.staged)
            w = self._pipes[len(self._in_pipe) - 1][1]
            try:
                n = os.splice(self.t.rfd, w, want, flags=_SPLICE_F_MOVE | _SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if moved:
                    break
                if self._in_pipe[-1] and self._input_waiting():
                    self._next_pipe()  # this pipe's slots are used up
                    continue
                # Wake once the piece can be completed (the peer sends whole payloads, so
                # waiting for that is safe): its write then overlaps the peer's sending.
                self.t._wait_for(min(count, self.piece - self.staged))
                await trio.lowlevel.wait_readable(self.t.rfd)
                continue
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EBADF) and not moved:
                    self._splice_ok = False
                    return await self._receive_copy(count)
                raise TransportClosed(f"receive failed: {e.strerror or e}") from None
            if n == 0:
                if moved:
                    break
                raise TransportClosed("connection closed in the middle of a DATA payload")
            self.t.bytes_received += n
            self._in_pipe[-1] += n
            self.staged += n
            moved += n
            if self.staged >= self.piece:
                self._commit()
        return moved

    async def _receive_copy(self, count: int) -> int:
        data = await self.t.recv(min(count, self.piece - self.staged))
        if not data:
            raise TransportClosed("connection closed in the middle of a DATA payload")
        self.add(data)
        return len(data)

    def finish(self) -> OSError | None:
        """The payload is complete: write its last piece; the error writing it, if any."""
        if self.staged:
            self._commit()
        self.fd = None
        return self.error

    # -- emptying --------------------------------------------------------------------------

    def _commit(self) -> None:
        """Write everything staged at ``offset`` (or drop it); the stage is then empty.  On an
        error of the file, the rest of the payload is dropped and the error kept."""
        n = self.staged
        fd, offset = self.fd, self.offset
        try:
            if fd is not None:
                if self._head:
                    _pwrite_all(fd, self._head, offset)
                    offset += len(self._head)
                    self._head.clear()
                for i, left in enumerate(self._in_pipe):
                    r = self._pipes[i][0]
                    while left:
                        m = os.splice(r, fd, left, offset_dst=offset)
                        if m <= 0:
                            raise OSError(errno.EIO, "short splice into the file")
                        left -= m
                        offset += m
                        self._in_pipe[i] = left
        except OSError as e:
            self.error, self.fd = e, None
        finally:
            self._discard()
            self.offset += n

    def _discard(self) -> None:
        """Drop everything staged."""
        self._head.clear()
        for i, left in enumerate(self._in_pipe):
            r = self._pipes[i][0]
            while left:
                if self._devnull < 0:
                    self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    m = os.splice(r, self._devnull, left)
                except OSError:
                    m = len(os.read(r, min(left, 1 << 16)))
                if m <= 0:  # cannot happen with bytes in the pipe; never loop forever
                    self._close_pipes()
                    break
                left -= m
        self._in_pipe.clear()
        self.staged = 0

    def _close_pipes(self) -> None:
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()
        self._in_pipe.clear()

    def close(self) -> None:
        """Release the pipes; staged bytes are dropped unwritten (the connection ended)."""
        self._close_pipes()
        self._head.clear()
        self.staged = 0
        self.fd = None
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
