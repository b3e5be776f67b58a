"""The few Linux calls the ``os`` module lacks, through ctypes; each raises OSError like ``os``.

``os`` has no renameat2 (rename flags), no fallocate with a mode (punch hole), no utimensat
with UTIME_OMIT per field, and no AT_EMPTY_PATH variants that act on O_PATH fds.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "UTIME_NOW",
    "UTIME_OMIT",
    "fallocate",
    "fchown_empty",
    "renameat2",
    "utimens_empty",
]

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)

_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_fchownat = _libc.fchownat
_fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_fchownat.restype = ctypes.c_int


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int


def _check(res: int) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT flags."""
    _check(_renameat2(src_dir_fd, src, dst_dir_fd, dst, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) including FALLOC_FL_PUNCH_HOLE, ZERO_RANGE, COLLAPSE_RANGE..."""
    _check(_fallocate(fd, mode, offset, length))


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """lchown the object an O_PATH fd refers to (-1 leaves an id unchanged)."""
    _check(
        _fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
    )


def _ts(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def utimens_empty(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of what ``fd`` (O_PATH or not, symlinks too) refers to; None = omit."""
    times = (_Timespec * 2)(_ts(atime_ns), _ts(mtime_ns))
    _check(_utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
