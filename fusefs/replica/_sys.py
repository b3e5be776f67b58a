"""The few Linux calls ``os`` lacks (renameat2, fallocate with a mode, syncfs), via ctypes."""

from __future__ import annotations

import ctypes
import os

__all__ = ["fallocate", "renameat2", "syncfs"]

_libc = ctypes.CDLL(None, use_errno=True)

_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


def _check(res: int) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src_dir_fd: int, src: bytes, dst_dir_fd: int, dst: bytes, flags: int) -> None:
    """renameat2(2): NOREPLACE=1, EXCHANGE=2."""
    _check(_renameat2(src_dir_fd, src, dst_dir_fd, dst, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (punch hole, zero range, ...)."""
    _check(_fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    """syncfs(2): write back the whole filesystem holding ``fd``."""
    _check(_syncfs(fd))
