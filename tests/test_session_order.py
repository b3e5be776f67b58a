"""Ordering the session guarantees between requests in flight, checked without a mount: a
``SOCK_SEQPACKET`` socketpair stands in for /dev/fuse (as in test_fuzz.py)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import trio
import trio.testing

from fusefs.mirror.mirrorfs import MirrorFS
from fusefs.protocol import abi
from fusefs.protocol.abi import Opcode
from fusefs.session.session import Session
from tests.test_fuzz import _recv, frame


def _setattr(unique: int, valid: int) -> bytes:
    body = abi.SETATTR_IN.pack(valid, 0, 0, 0, 0, 5, 6, 0, 0, 0, 0, 0o644, 0, 0, 0, 0)
    return frame(Opcode.SETATTR, body, unique=unique)


def _read(unique: int) -> bytes:
    return frame(Opcode.READ, abi.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0), unique=unique)


def _session_with(
    tmp_path: Path, read: Any, setattr: Any
) -> tuple[MirrorFS, socket.socket, socket.socket, Session]:
    """A copy-mode session over a socketpair whose mirror reads and sets attributes with the
    given (suspending) functions: (ops, our end, the kernel's end, session)."""
    backing = tmp_path / "backing"
    backing.mkdir()
    ops = MirrorFS(backing)
    ops.quick_io_max = 0  # these reads suspend: each must get a task of its own
    ops.read = read  # type: ignore[method-assign]
    ops.setattr = setattr  # type: ignore[method-assign]
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setblocking(False)
    return ops, ours, kernel, Session(ops, ours.fileno(), str(tmp_path / "mnt"), data="copy")


async def test_atime_setattr_waits_for_reads_in_flight(tmp_path: Path) -> None:
    """A SETATTR that sets atime is applied only after the READs in flight on the same node
    have read the backing file (a late readahead READ would otherwise bump the atime just
    set: found by tools/torture, seed 11000104); a SETATTR of the mode is not held back."""
    order: list[str] = []
    release_read = trio.Event()

    async def read(fh: int, off: int, size: int) -> bytes:
        order.append("read started")
        await release_read.wait()
        order.append("read done")
        return b"x" * size

    async def setattr(inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        order.append("atime set" if fields.update_atime else "mode set")
        return await ops.getattr(inode, ctx)

    ops, ours, kernel, session = _session_with(tmp_path, read, setattr)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            kernel.send(_read(10))
            kernel.send(_setattr(11, abi.FATTR_ATIME | abi.FATTR_MTIME))
            kernel.send(_setattr(12, abi.FATTR_MODE))
            _, error, unique = await _recv(kernel)
            assert (unique, error) == (12, 0)  # the mode: answered while the READ waits
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(order) == ["mode set", "read started"]
            release_read.set()
            replies = {(await _recv(kernel))[2] for _ in range(2)}
            assert replies == {10, 11}
            assert order[2:] == ["read done", "atime set"]
            # With no READ in flight an atime SETATTR is answered at once.
            kernel.send(_setattr(13, abi.FATTR_ATIME_NOW))
            assert (await _recv(kernel))[1:] == (0, 13)
            assert session._reading == {} and session._reads_done == {}
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        kernel.close()
        ops.close()


def test_no_passthrough_when_the_filesystem_must_see_io(tmp_path: Path) -> None:
    """With a change sink (replication) the mirror passes nothing through, and the session
    says so: data_mode splice with the reason, not passthrough with no file passed."""
    from fusefs.mirror.changes import ListSink
    from fusefs.protocol.init import Negotiated

    neg = Negotiated(True, 7, 41, 0, abi.FUSE_PASSTHROUGH, 0, 0, 254, 12, 9, 1, 1)
    modes = []
    for sink in (None, ListSink()):
        ops = MirrorFS(tmp_path, changes=sink)
        session = Session(ops, -1, str(tmp_path), data="auto")
        session._choose_data_mode(neg)
        modes.append((session.counters.data_mode, session.passthrough))
        ops.close()
    assert modes == [("passthrough", True), ("splice", False)]
    assert "replication" in session.counters.data_mode_reason


async def test_atime_setattr_waits_only_for_earlier_reads(tmp_path: Path) -> None:
    """READs that arrive after the SETATTR do not hold it up (a reader that keeps readahead
    going would otherwise delay a `touch` forever), and an INTERRUPT ends the wait with EINTR."""
    gates = {10: trio.Event(), 12: trio.Event(), 20: trio.Event()}
    current: list[int] = []

    async def read(fh: int, off: int, size: int) -> bytes:
        unique = current.pop(0)
        await gates[unique].wait()
        return b"x" * size

    async def setattr(inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        return await ops.getattr(inode, ctx)

    ops, ours, kernel, session = _session_with(tmp_path, read, setattr)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            current.append(10)
            kernel.send(_read(10))
            await trio.testing.wait_all_tasks_blocked()
            kernel.send(_setattr(11, abi.FATTR_ATIME))
            await trio.testing.wait_all_tasks_blocked()
            current.append(12)
            kernel.send(_read(12))
            await trio.testing.wait_all_tasks_blocked()
            gates[10].set()
            assert {(await _recv(kernel))[2] for _ in range(2)} == {10, 11}
            # READ 12 is still in flight; an INTERRUPT ends a SETATTR's wait for it.
            current.append(20)
            kernel.send(_read(20))
            await trio.testing.wait_all_tasks_blocked()
            kernel.send(_setattr(21, abi.FATTR_ATIME))
            await trio.testing.wait_all_tasks_blocked()
            body = abi.INTERRUPT_IN.pack(21)
            kernel.send(frame(Opcode.INTERRUPT, body, unique=22))
            _, error, unique = await _recv(kernel)
            assert (unique, error) == (21, -errno.EINTR)
            gates[12].set()
            gates[20].set()
            assert {(await _recv(kernel))[2] for _ in range(2)} == {12, 20}
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        kernel.close()
        ops.close()


async def test_cached_read_is_spliced_in_the_loop(tmp_path: Path) -> None:
    """A READ of cached data on a local filesystem is answered from the reader loop itself
    (spliced: the bytes never enter Python), with the same bytes as the file; a one-page READ
    is copied (cheaper), and a READ of a bad handle gets its errno.  A READ of data not in
    the page cache goes to a task (a worker thread), which uses the range the loop already
    asked the filesystem for."""
    from fusefs.ops import RequestContext
    from fusefs.protocol.init import Negotiated

    backing = tmp_path / "backing"
    backing.mkdir()
    data = os.urandom(300_000)
    (backing / "f").write_bytes(data)
    ops = MirrorFS(backing)
    ctx = RequestContext(uid=0, gid=0, pid=os.getpid(), umask=0)
    entry = await ops.lookup(1, b"f", ctx)
    fi = await ops.open(entry.st_ino, os.O_RDONLY, ctx)
    # A stream socket: a splice into it may be cut into several packets (/dev/fuse takes
    # whole messages); requests are sent one at a time, so each read takes exactly one.
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    kernel.setblocking(False)
    session = Session(ops, ours.fileno(), str(tmp_path / "mnt"), data="splice")
    session._choose_data_mode(Negotiated(True, 7, 41, 0, 0, 0, 0, 254, 12, 9, 0, 1))
    assert session.splice_reads
    spawned: list[Any] = []
    spawn = session._spawn

    def counting_spawn(nursery: trio.Nursery, fn: Any, *args: Any) -> None:
        spawned.append(args)
        spawn(nursery, fn, *args)

    session._spawn = counting_spawn  # type: ignore[method-assign]
    ranges: list[int] = []
    read_range = ops.read_range

    async def counting_read_range(fh: int, off: int, size: int) -> Any:
        ranges.append(off)
        return await read_range(fh, off, size)

    ops.read_range = counting_read_range  # type: ignore[method-assign]

    def read(unique: int, off: int, size: int, fh: int = fi.fh) -> bytes:
        return frame(Opcode.READ, abi.READ_IN.pack(fh, off, size, 0, 0, 0, 0), unique=unique)

    async def recv_exactly(n: int) -> bytes:
        got = b""
        with trio.fail_after(10):
            while len(got) < n:
                try:
                    chunk = kernel.recv(n - len(got))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(kernel.fileno())
                    continue
                assert chunk, "the session closed the connection"
                got += chunk
        return got

    async def reply() -> tuple[int, int, bytes]:
        head = await recv_exactly(abi.OUT_HEADER.size)
        length, error, unique = abi.OUT_HEADER.unpack_from(head)
        return unique, error, await recv_exactly(length - len(head))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            kernel.send(read(5, 1000, 200_000))
            assert await reply() == (5, 0, data[1000:201_000])
            kernel.send(read(6, 290_000, 65_536))  # short at EOF
            assert await reply() == (6, 0, data[290_000:])
            kernel.send(read(7, 4096, 4096))
            assert await reply() == (7, 0, data[4096:8192])
            kernel.send(read(8, 0, 100_000, fh=999_999))
            assert (await reply())[:2] == (8, -errno.EBADF)
            in_loop = list(spawned)
            fd = os.open(backing / "f", os.O_RDONLY)
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            del ranges[:]
            kernel.send(read(9, 0, 131_072))
            assert await reply() == (9, 0, data[:131_072])
            assert ranges == [0]  # asked once, by the loop; the task reused it
            assert len(spawned) == 1
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        kernel.close()
        await ops.release(fi.fh)
        ops.close()
    c = session.counters
    assert (c.read_requests_spliced, c.read_bytes_spliced) == (3, 200_000 + 10_000 + 131_072)
    assert c.read_requests_copied == 1
    assert session._tasks == 0 and session._reading == {} and session._cold == {}
    assert in_loop == []  # every READ of cached data was answered in the loop
