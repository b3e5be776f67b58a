"""Moving bytes over a connected socket (or a stdin/stdout pair) under trio, zero-copy where
the kernel allows: ``sendfile`` from a file into the socket, ``splice`` from the socket through
a pipe into a file.  Falls back to read/write where splice is refused (a tty, a plain file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from typing import Protocol

import trio

__all__ = ["FdTransport", "TransportClosed", "tune_socket"]

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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset) if offset >= 0 else os.write(fd, view)
        view = view[n:]
        if offset >= 0:
            offset += n
