"""The few Linux calls the ``os`` module lacks, through ctypes; each raises OSError like ``os``.

``os`` has no renameat2 (rename flags), no fallocate with a mode (punch hole), no utimensat
with UTIME_OMIT per field, and no AT_EMPTY_PATH variants that act on O_PATH fds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

__all__ = [
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "LOCAL_FS",
    "UTIME_NOW",
    "UTIME_OMIT",
    "cached",
    "fallocate",
    "fchmod_empty",
    "fchown_empty",
    "fs_magic",
    "name_to_handle",
    "on_local_fs",
    "open_by_handle",
    "renameat2",
    "syncfs",
    "utimens_empty",
    "without_cap_fsetid",
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


_syncfs = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


#: Local filesystems on a disk or in memory (statfs f_type): ext2/3/4, xfs, btrfs, tmpfs,
#: f2fs, zfs, bcachefs.  Their close() does nothing a caller could observe, and their cached
#: pages are read without a round trip to anywhere.
LOCAL_FS = frozenset(
    {0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0xF2F52010, 0x2FC12FC1, 0xCA451A4E}
)


def fs_magic(fd: int) -> int:
    """f_type of the filesystem holding ``fd`` (statvfs has no such field)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a word) comes first
    _check(_fstatfs(fd, buf))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


_local_devs: dict[int, bool] = {}


def on_local_fs(fd: int, dev: int) -> bool:
    """Whether ``fd`` (on device ``dev``, its st_dev) lives on a LOCAL_FS filesystem; one
    statfs per device, remembered.  False when that cannot be told."""
    local = _local_devs.get(dev)
    if local is None:
        try:
            local = fs_magic(fd) in LOCAL_FS
        except OSError:
            return False
        _local_devs[dev] = local
    return local


_syscall = _libc.syscall
_SYS_CACHESTAT = 451  # x86_64 and the generic table alike (Linux 6.5+)
_cachestat_works = True
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of the range are in the page cache (cachestat(2)); None when unknown
    (no cachestat: Linux < 6.5, or an error)."""
    global _cachestat_works
    if not _cachestat_works or length <= 0:
        return None
    rng = (ctypes.c_uint64 * 2)(offset, length)
    out = (ctypes.c_uint64 * 5)()
    if _syscall(_SYS_CACHESTAT, ctypes.c_uint(fd), rng, out, ctypes.c_uint(0)) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _cachestat_works = False
        return None
    return int(out[0])


def cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of the range is in the page cache, so reading it cannot block on
    the disk.  False when unsure."""
    n = cached_pages(fd, offset, length)
    if n is None:
        return False
    first = offset // _PAGE_SIZE
    last = (offset + length - 1) // _PAGE_SIZE
    return n >= last - first + 1


def syncfs(fd: int) -> None:
    """syncfs(2): write back the whole filesystem holding ``fd``."""
    _check(_syncfs(fd))


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


_times = (_Timespec * 2)()  # reused: only ever called from the one trio thread


def utimens_empty(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of what ``fd`` (O_PATH or not, symlinks too) refers to; None = omit.

    Not thread-safe (a shared buffer keeps this cheap): call it from the event loop thread.
    """
    a, m = _times[0], _times[1]
    if atime_ns is None:
        a.tv_sec, a.tv_nsec = 0, UTIME_OMIT
    else:
        a.tv_sec, a.tv_nsec = divmod(atime_ns, 1_000_000_000)
    if mtime_ns is None:
        m.tv_sec, m.tv_nsec = 0, UTIME_OMIT
    else:
        m.tv_sec, m.tv_nsec = divmod(mtime_ns, 1_000_000_000)
    _check(_utimensat(fd, b"", _times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_fchmodat2 = 452  # x86_64 and aarch64 (generic table) alike; Linux 6.6+
_have_fchmodat2 = True


def fchmod_empty(fd: int, mode: int) -> None:
    """chmod what an O_PATH ``fd`` refers to (fchmodat2 AT_EMPTY_PATH, else /proc/self/fd)."""
    global _have_fchmodat2
    if _have_fchmodat2:
        res = _syscall(
            ctypes.c_long(_SYS_fchmodat2),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(mode),
            ctypes.c_int(AT_EMPTY_PATH),
        )
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
        _have_fchmodat2 = False
    os.chmod(f"/proc/self/fd/{fd}", mode)


# -- file handles: reopen an inode without holding an fd on it --------------------------------

MAX_HANDLE_SZ = 128

_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int

_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


def name_to_handle(fd: int) -> bytes:
    """The file handle (``struct file_handle`` as bytes) of what ``fd`` refers to."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    ctypes.c_uint32.from_buffer(buf).value = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    _check(_name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH))
    size = ctypes.c_uint32.from_buffer(buf).value
    return buf.raw[: 8 + size]


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the object ``handle`` names on the filesystem of ``mount_fd`` (needs
    CAP_DAC_READ_SEARCH); ESTALE once the object is gone."""
    fd: int = _open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


_CAP_FSETID = 4
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@contextlib.contextmanager
def without_cap_fsetid() -> Iterator[None]:
    """Drop CAP_FSETID from this thread's effective capabilities for the duration."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0 or not data[0].effective & (1 << _CAP_FSETID):
        yield
        return
    saved = data[0].effective
    data[0].effective = saved & ~(1 << _CAP_FSETID)
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        yield
        return
    try:
        yield
    finally:
        data[0].effective = saved
        _libc.capset(ctypes.byref(hdr), data)
