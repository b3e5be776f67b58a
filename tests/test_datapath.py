"""The splice data path without a mount: a pipe stands in for /dev/fuse."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from fusefs.session.datapath import PipePool, splice_read_reply


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
