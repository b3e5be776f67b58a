"""The splice data path without a mount: a pipe stands in for /dev/fuse."""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import trio

from fusefs.session.datapath import PipePool, splice_read_reply, splice_request


def _reply(dev_r: int) -> tuple[int, int, int, bytes]:
    raw = os.read(dev_r, 1 << 20)
    length, error, unique = struct.unpack_from("<IiQ", raw)
    return length, error, unique, raw[16:]


def _device() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def test_spliced_reply_is_header_plus_the_range(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    dev_r, dev_w = _device()
    pool = PipePool(1 << 20)
    try:
        assert splice_read_reply(pool, dev_w, 77, fd, 4096, 8192) == 8192
        assert _reply(dev_r) == (16 + 8192, 0, 77, data[4096 : 4096 + 8192])
        # past EOF: a short reply carrying what there is, as pread would give
        assert splice_read_reply(pool, dev_w, 78, fd, 98_000, 8192) == 2000
        assert _reply(dev_r) == (16 + 2000, 0, 78, data[98_000:])
        assert splice_read_reply(pool, dev_w, 79, fd, 200_000, 4096) == 0
        assert _reply(dev_r) == (16, 0, 79, b"")
    finally:
        os.close(fd)
        for x in (dev_r, dev_w):
            os.close(x)
        pool.close()


def test_a_reply_too_big_for_the_pipe_sends_nothing(tmp_path: Path) -> None:
    """The pipe must hold the whole message: if it cannot, nothing reaches the device and the
    caller copies the range instead (never a truncated reply, which would read as EOF)."""
    (tmp_path / "f").write_bytes(os.urandom(200_000))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    dev_r, dev_w = _device()
    pool = PipePool(8192)  # two slots: the header and one page; 64 KiB does not fit
    try:
        with pytest.raises(BlockingIOError):
            splice_read_reply(pool, dev_w, 5, fd, 0, 65536)
        with pytest.raises(BlockingIOError):
            os.read(dev_r, 100)  # nothing was sent
        # the pipe went back empty: a reply that fits still works
        assert splice_read_reply(pool, dev_w, 6, fd, 0, 100) == 100
        assert _reply(dev_r)[:3] == (116, 0, 6)
    finally:
        os.close(fd)
        for x in (dev_r, dev_w):
            os.close(x)
        pool.close()


def _request(opcode: int, unique: int, body: bytes) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, 1, 0, 0, 0, 0, 0) + body


@pytest.mark.parametrize("payload_size", [0, 100, 4095, 4096, 300_000])
def test_splice_request_small_and_write(tmp_path: Path, payload_size: int) -> None:
    """Requests come off the device whole; a WRITE with at least min_spliced_write bytes
    comes as its 80-byte prefix plus a payload still in the pipe, which lands in a file."""
    dev_r, dev_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    pool = PipePool(1 << 20)
    target = os.open(tmp_path / "t", os.O_RDWR | os.O_CREAT, 0o600)
    data = os.urandom(payload_size)
    try:
        fcntl.fcntl(dev_w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for the biggest request
        lookup = _request(1, 5, b"name\0")
        os.write(dev_w, lookup)
        assert splice_request(pool, dev_r, 1 << 20, 4096) == (lookup, None)
        write_in = struct.pack("<QQIIQII", 3, 10, payload_size, 0, 0, 0, 0)
        write = _request(16, 6, write_in + data)
        os.write(dev_w, write)
        buf, payload = splice_request(pool, dev_r, len(write), 4096)
        if payload_size < 4096:
            assert (buf, payload) == (write, None)
        else:
            assert buf == write[:80] and payload is not None and payload.size == payload_size
            assert trio.run(payload.to_fd, target, 10) == payload_size
            assert os.pread(target, payload_size + 10, 0) == b"\0" * 10 + data
        with pytest.raises(BlockingIOError):
            splice_request(pool, dev_r, 1 << 20, 4096)
    finally:
        os.close(target)
        os.close(dev_r)
        os.close(dev_w)
        pool.close()


def test_cached_tells_page_cache_residency(tmp_path: Path) -> None:
    """cachestat decides whether a big spliced READ may run in the loop: only when every page
    of the range is cached (a disk read would stall the loop)."""
    from fusefs import _libc

    base = os.open(tmp_path, os.O_RDONLY)
    in_memory = _libc.fs_magic(base) == 0x01021994  # tmpfs: its pages cannot be dropped
    os.close(base)
    folder = Path(tempfile.mkdtemp(dir="/var/tmp")) if in_memory else tmp_path
    path = folder / "f"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not _libc.cached(fd, 0, 1 << 20)
        os.pread(fd, 1 << 20, 0)
        assert _libc.cached(fd, 0, 1 << 20)
        assert _libc.cached(fd, 4097, 8000)
        os.posix_fadvise(fd, 512 << 10, 4096, os.POSIX_FADV_DONTNEED)  # one page gone
        assert not _libc.cached(fd, 0, 1 << 20)
        assert _libc.cached(fd, 0, 512 << 10)
        assert not _libc.cached(fd, 0, 0)
    finally:
        os.close(fd)
        if in_memory:
            shutil.rmtree(folder)


def test_stall_guard_backs_off_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big WRITE payloads are spliced in the loop while that is fast; after a slow one they go
    to worker threads for a while, longer each time in a row, and a fast one resets that."""
    from fusefs.session import datapath

    now = [10**12]
    monkeypatch.setattr(datapath.time, "monotonic_ns", lambda: now[0])
    guard = datapath.StallGuard()
    guard.took(datapath.STALL_NS // 2)
    assert guard.inline_ok()
    guard.took(datapath.STALL_NS * 2)  # slow: threads for the first back-off
    assert not guard.inline_ok()
    now[0] += datapath.STALL_BACKOFF_NS
    assert guard.inline_ok()
    guard.took(datapath.STALL_NS * 2)  # slow again: twice as long
    now[0] += datapath.STALL_BACKOFF_NS
    assert not guard.inline_ok()
    now[0] += datapath.STALL_BACKOFF_NS
    assert guard.inline_ok()
    guard.took(1000)  # fast: the back-off starts over
    guard.took(datapath.STALL_NS * 2)
    now[0] += datapath.STALL_BACKOFF_NS
    assert guard.inline_ok()
