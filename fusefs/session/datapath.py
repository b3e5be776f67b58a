"""How file data moves between a backing fd and /dev/fuse: splice, copy, or kernel passthrough.

The mirror says *what* answers a READ (a :class:`~fusefs.ops.FileRange`); this module decides
*how* the bytes travel.  A spliced READ reply is built in a pipe: the 16-byte reply header is
written, the data is spliced from the backing file behind it, and the whole message is spliced
into the device in one call (the device wants a complete message per write).  The pipe holds at
most ``pipe-max-size`` bytes (1 MiB unless an administrator raised it; a daemon with
CAP_SYS_RESOURCE may exceed it) and the header takes a slot of its own, so the session
negotiates at most what one pipe holds: 254 pages per request with 1 MiB pipes (a spliced
unaligned WRITE takes one more page slot than its size), the kernel's 256 with 2 MiB ones.

Passthrough needs nothing per request: at OPEN the backing fd is registered with the device
(``FUSE_DEV_IOC_BACKING_OPEN``) and the kernel serves reads and writes itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

import trio

from fusefs import _libc
from fusefs.ops import Payload
from fusefs.protocol.abi import (
    FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
    FUSE_MAX_MAX_PAGES,
)

F_SETPIPE_SZ = 1031
#: Moves of at least this many bytes may run in a worker thread so the loop keeps serving.
THREAD_MIN = 64 * 1024
#: An inline splice into a backing file that took longer than this means the backing store
#: pushes back (dirty-page throttling, a slow disk): big payloads then go to worker threads
#: for a while, STALL_BACKOFF_NS at first, doubling while the next inline try is slow too.
STALL_NS = 5_000_000
STALL_BACKOFF_NS = 200_000_000
STALL_BACKOFF_MAX_NS = 30_000_000_000
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_OUT_HEADER = struct.Struct("<IiQ")


def pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


#: A pipe this big holds a whole 256-page request or reply, header and an unaligned
#: payload's extra page included: 1 MiB writes then come as one WRITE instead of two.
WIDE_PIPE = 2 << 20


def splice_pipe_size() -> int:
    """The pipe size for spliced messages: 2 MiB when this process may make such pipes (root
    with CAP_SYS_RESOURCE, or ``fs.pipe-max-size`` raised), else the system's limit."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, WIDE_PIPE)
        return WIDE_PIPE
    except OSError:
        return min(pipe_max_size(), WIDE_PIPE)
    finally:
        os.close(r)
        os.close(w)


def spliceable_pages(pipe_size: int) -> int:
    """Largest request in pages whose spliced form fits a pipe of ``pipe_size`` bytes: one
    slot for the header, one for the page an unaligned payload spills into."""
    return max(1, min(pipe_size // PAGE_SIZE - 2, FUSE_MAX_MAX_PAGES))


class StallGuard:
    """Decides whether a big spliced WRITE runs in the loop or in a worker thread.

    A worker-thread hop costs more CPU than splicing a MiB into the page cache (measured:
    1.07 vs 1.3 CPU s/GiB, 0.8 vs 0.65 GB/s), but a write the backing store throttles can
    block for long, and the loop must keep serving others.  So: inline while inline writes
    are fast, threaded for a while after one was slow.
    """

    def __init__(self) -> None:
        self.threaded_until = 0
        self.backoff = STALL_BACKOFF_NS

    def inline_ok(self) -> bool:
        return time.monotonic_ns() >= self.threaded_until

    def took(self, ns: int) -> None:
        """Record how long an inline move took."""
        if ns > STALL_NS:
            self.threaded_until = time.monotonic_ns() + self.backoff
            self.backoff = min(self.backoff * 2, STALL_BACKOFF_MAX_NS)
        else:
            self.backoff = STALL_BACKOFF_NS


class PipePool:
    """Pipes sized to hold one whole FUSE message, reused instead of made per request."""

    def __init__(self, size: int) -> None:
        self.size = size
        #: Shared by the payloads of one session (see StallGuard).
        self.guard = StallGuard()
        self._free: list[tuple[int, int]] = []
        self._all: set[tuple[int, int]] = set()

    def get(self) -> tuple[int, int]:
        """A free pipe of ``size`` bytes; OSError when no such pipe can be made any more (an
        administrator lowered ``fs.pipe-max-size`` since): callers then copy instead."""
        try:
            return self._free.pop()  # atomic under the GIL: worker threads splice too
        except IndexError:
            pass
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        except OSError:
            os.close(r)
            os.close(w)
            raise
        pair = (r, w)
        self._all.add(pair)
        return pair

    def put(self, pair: tuple[int, int]) -> None:
        """Return a pipe that is known to be empty."""
        self._free.append(pair)

    def discard(self, pair: tuple[int, int]) -> None:
        """Drop a pipe whose contents are unknown (after an error mid-way)."""
        self._all.discard(pair)
        for fd in pair:
            os.close(fd)

    def close(self) -> None:
        for pair in list(self._all):
            self.discard(pair)
        self._free.clear()


class SpliceShort(Exception):
    """The data did not all fit or arrive; ``data`` is what the pipe held, to send by copying."""

    def __init__(self, data: bytes) -> None:
        super().__init__(len(data))
        self.data = data


def _drain(r: int, limit: int) -> bytes:
    chunks = []
    while limit > 0:
        try:
            chunk = os.read(r, limit)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def splice_read_reply(
    pool: PipePool, devfd: int, unique: int, fd: int, offset: int, size: int,
    st_size: int | None = None,
) -> int:  # fmt: skip
    """Send a READ reply whose data is spliced from ``fd``; return the data length sent.

    The length is fixed before splicing (from fstat, or the ``st_size`` the caller has just
    read), as the header must come first.  If the file shrank under us and fewer bytes arrive,
    the caller gets :class:`SpliceShort` with the bytes that did (the file's new end) and
    answers with them; an OSError (BlockingIOError when the reply does not fit the pipe) means
    nothing was sent: the caller copies instead.
    """
    if st_size is None:
        st_size = os.fstat(fd).st_size
    n = max(0, min(size, st_size - offset))
    pair = pool.get()
    r, w = pair
    try:
        os.write(w, _OUT_HEADER.pack(16 + n, 0, unique))
        got = 0
        while got < n:
            k = os.splice(fd, w, n - got, offset_src=offset + got)
            if k == 0:
                break
            got += k
        if got != n:
            data = _drain(r, 16 + got)[16:]
            pool.put(pair)
            raise SpliceShort(data)
        k = os.splice(r, devfd, 16 + n)
        if k != 16 + n:  # the device takes whole messages; anything else is a broken pipe state
            pool.discard(pair)
            raise OSError(errno.EIO, "short splice into /dev/fuse")
    except BlockingIOError:  # pipe full: the reply does not fit; the caller copies it whole
        _drain(r, pool.size)
        pool.put(pair)
        raise
    except SpliceShort:
        raise
    except OSError:
        pool.discard(pair)
        raise
    pool.put(pair)
    return n


def backing_open(devfd: int, fd: int) -> int:
    """Register ``fd`` with the FUSE connection for passthrough; return its backing id.

    The kernel keeps the credentials of this call and performs every passthrough read and
    write with them.  A root daemon holds CAP_FSETID, which would let an unprivileged writer
    keep a file's setuid/setgid bits; so the registration is made with CAP_FSETID dropped from
    this thread's effective set, and writes clear the bits as on the backing filesystem.
    """
    arg = bytearray(struct.pack("<iIQ", fd, 0, 0))
    with _libc.without_cap_fsetid():
        return fcntl.ioctl(devfd, FUSE_DEV_IOC_BACKING_OPEN, arg, True)


def backing_close(devfd: int, backing_id: int) -> None:
    arg = bytearray(struct.pack("<I", backing_id))
    fcntl.ioctl(devfd, FUSE_DEV_IOC_BACKING_CLOSE, arg, True)


class PipePayload(Payload):
    """A WRITE payload left in the pipe it was spliced into from /dev/fuse.

    ``to_fd`` splices it on into the backing file, so the bytes never enter user space; the
    pipe goes back to the pool once it is empty.
    """

    def __init__(self, pool: PipePool, pair: tuple[int, int], size: int) -> None:
        self.pool = pool
        self.pair: tuple[int, int] | None = pair
        self.size = size
        self.spliced = 0
        self.copied = 0
        self.fallback: OSError | None = None

    async def to_fd(self, fd: int, offset: int) -> int:
        if self.size < THREAD_MIN:
            return self._to_fd(fd, offset)
        guard = self.pool.guard
        if not guard.inline_ok():
            return await trio.to_thread.run_sync(self._to_fd, fd, offset)
        start = time.monotonic_ns()
        try:
            return self._to_fd(fd, offset)
        finally:
            guard.took(time.monotonic_ns() - start)

    def _to_fd(self, fd: int, offset: int) -> int:
        pair = self._take()
        r = pair[0]
        done = 0
        try:
            while done < self.size:
                k = os.splice(r, fd, self.size - done, offset_dst=offset + done)
                if k == 0:
                    break
                done += k
        except OSError as e:
            # The backing fd refused splice (EINVAL for some files and filesystems): copy the
            # rest out of the pipe instead, and say so; a real I/O error recurs in pwrite.
            self.spliced += done
            self.fallback = e
            rest = _drain(r, self.size - done)
            self.pool.put(pair)
            try:
                n = _pwrite_all(fd, rest, offset + done)
            except OSError:
                if done:
                    return done
                raise
            self.copied += n
            return done + n
        self.spliced += done
        self.pool.put(pair)
        return done

    async def to_bytes(self) -> bytes:
        pair = self._take()
        data = _drain(pair[0], self.size)
        self.pool.put(pair)
        self.copied += len(data)
        return data

    def _take(self) -> tuple[int, int]:
        if self.pair is None:
            raise RuntimeError("payload already consumed")
        pair, self.pair = self.pair, None
        return pair

    def close(self) -> None:
        """Give the pipe back even if the filesystem never consumed the payload."""
        if self.pair is not None:
            pair = self._take()
            _drain(pair[0], self.size)
            self.pool.put(pair)


class BytesPayload(Payload):
    """A payload already in memory (the copying path), behind the same interface."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.size = len(data)
        self.copied = 0
        self.spliced = 0

    async def to_fd(self, fd: int, offset: int) -> int:
        n = os.pwrite(fd, self.data, offset)
        self.copied += n
        return n

    async def to_bytes(self) -> bytes:
        self.copied += self.size
        return bytes(self.data)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def splice_request(
    pool: PipePool, devfd: int, bufsize: int, min_spliced_write: int
) -> tuple[bytes, PipePayload | None]:
    """Take one request off the device through a pipe.

    Returns the request bytes and, for a WRITE of at least ``min_spliced_write`` bytes, a
    :class:`PipePayload` holding its data (then the bytes are only header + write_in).  Raises
    BlockingIOError when no request is waiting.
    """
    try:
        pair = pool.get()
    except OSError:  # no pipe can hold our requests now: this one is copied
        return os.read(devfd, bufsize), None
    r, w = pair
    try:
        n = os.splice(devfd, w, bufsize)
    except OSError:
        pool.put(pair)
        raise
    try:
        if n < 80 + min_spliced_write:  # too short to be a spliced WRITE: one read takes it
            buf = os.read(r, n)
            if len(buf) < n:
                buf += _drain(r, n - len(buf))
            pool.put(pair)
            return buf, None
        head = os.read(r, 40)
        length, opcode = _IN_PREFIX.unpack_from(head)
        if opcode == 16 and length - 80 >= min_spliced_write and n == length:  # WRITE
            prefix = head + os.read(r, 40)
            return prefix, PipePayload(pool, pair, length - 80)
        rest = _drain(r, n - 40)
    except OSError:
        pool.discard(pair)
        raise
    pool.put(pair)
    return head + rest, None


_IN_PREFIX = struct.Struct("<II")
