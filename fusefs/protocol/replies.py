"""Encoding FUSE replies and notifications: Python values in, the bytes to write to /dev/fuse out.

Each encoder packs header and body with one precompiled ``Struct`` call.  Replies carrying bulk
data have a header-only variant (:func:`read_reply_header`) so the session can writev or splice
the data behind it without copying it into a new bytes object.

Timeouts are float seconds, split into the (sec, nsec) pairs the kernel wants; negative timeouts
become 0.  Times in :class:`Attr` are integer nanoseconds, as in ``os.stat_result.st_*time_ns``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from . import abi

__all__ = [
    "Attr",
    "DirentBuffer",
    "EntryOut",
    "InitReply",
    "attr_from_stat",
    "notify_delete",
    "notify_inval_entry",
    "notify_inval_inode",
    "notify_store",
    "pack_attr",
    "read_reply_header",
    "reply_attr",
    "reply_bmap",
    "reply_copy_file_range_64",
    "reply_create",
    "reply_data",
    "reply_data_parts",
    "reply_empty",
    "reply_entry",
    "reply_error",
    "reply_init",
    "reply_lk",
    "reply_lseek",
    "reply_open",
    "reply_poll",
    "reply_statfs",
    "reply_write",
    "reply_xattr_size",
    "split_timeout",
]

_NS = 1_000_000_000
_OUT = abi.OUT_HEADER_SIZE
_pack_header = abi.OUT_HEADER.pack
_MAX_TIMEOUT_S = (1 << 63) // _NS  # beyond this the kernel's jiffies arithmetic saturates anyway
_U32 = 0xFFFFFFFF


class Attr(NamedTuple):
    """The fields of ``struct fuse_attr``; times in nanoseconds since the epoch."""

    ino: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0


def attr_from_stat(st: os.stat_result, ino: int | None = None) -> Attr:
    """An :class:`Attr` from a stat result; ``ino`` overrides ``st_ino`` (e.g. the nodeid)."""
    return Attr(
        st.st_ino if ino is None else ino,
        st.st_size,
        st.st_blocks,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_blksize,
    )


def _attr_fields(a: Attr) -> tuple[int, ...]:
    """fuse_attr field order: the three times split into sec / nsec (floor division keeps
    nsec in 0..999999999 for pre-1970 times); rdev truncated to the kernel's 32-bit encoding."""
    ino, size, blocks, atime, mtime, ctime, mode, nlink, uid, gid, rdev, blksize, flags = a
    asec, ansec = divmod(atime, _NS)
    msec, mnsec = divmod(mtime, _NS)
    csec, cnsec = divmod(ctime, _NS)
    return (
        ino, size, blocks, asec, msec, csec, ansec, mnsec, cnsec,
        mode, nlink, uid, gid, rdev & _U32, blksize, flags,
    )  # fmt: skip


def pack_attr(attr: Attr) -> bytes:
    """The 88-byte ``struct fuse_attr``."""
    return abi.ATTR.pack(*_attr_fields(attr))


def split_timeout(seconds: float) -> tuple[int, int]:
    """Float seconds -> (sec, nsec) for entry_valid/attr_valid; <= 0 (or NaN) means no caching."""
    if not seconds > 0:
        return 0, 0
    if seconds >= _MAX_TIMEOUT_S:
        return _MAX_TIMEOUT_S, 0
    sec = int(seconds)
    nsec = int((seconds - sec) * _NS)
    return sec, min(nsec, _NS - 1)


_timeout_cache: dict[float, tuple[int, int]] = {}


def _timeout(seconds: float) -> tuple[int, int]:
    """split_timeout, memoized: filesystems use a handful of constant timeouts."""
    split = _timeout_cache.get(seconds)
    if split is None:
        split = split_timeout(seconds)
        if len(_timeout_cache) < 64:
            _timeout_cache[seconds] = split
    return split


class EntryOut(NamedTuple):
    """What a LOOKUP-like reply says about one name (also the body of a READDIRPLUS record).

    A ``nodeid`` of 0 with READDIRPLUS means "no entry information" (no lookup is counted).
    """

    nodeid: int
    generation: int
    entry_valid_s: float
    attr_valid_s: float
    attr: Attr


def _entry_fields(
    nodeid: int, generation: int, entry_valid_s: float, attr_valid_s: float, attr: Attr
) -> tuple[int, ...]:
    esec, ensec = _timeout(entry_valid_s)
    asec, ansec = _timeout(attr_valid_s)
    return (nodeid, generation, esec, asec, ensec, ansec, *_attr_fields(attr))


# --- Replies ---------------------------------------------------------------------------------


def reply_error(unique: int, errno: int) -> bytes:
    """An error reply; ``errno`` is positive (ENOENT, not -ENOENT).  The kernel accepts 1..511."""
    if not 0 < errno < 512:
        raise ValueError(f"errno {errno} is not in 1..511")
    return _pack_header(_OUT, -errno, unique)


def reply_empty(unique: int) -> bytes:
    """Success with no body (SETXATTR, UNLINK, RELEASE, FLUSH, FSYNC, ACCESS, ...)."""
    return _pack_header(_OUT, 0, unique)


def read_reply_header(unique: int, data_len: int) -> bytes:
    """The 16-byte header of a success reply whose ``data_len`` bytes are written after it
    (writev or splice), so the data itself is never copied into a bytes object here."""
    return _pack_header(_OUT + data_len, 0, unique)


def reply_data(unique: int, data: bytes | bytearray | memoryview) -> bytes:
    """A success reply carrying ``data`` (READ, READLINK, READDIR, GETXATTR, LISTXATTR)."""
    return _pack_header(_OUT + len(data), 0, unique) + data


def reply_data_parts(unique: int, data: bytes) -> list[bytes]:
    """reply_data as [header, data], for writev: a large READ reply is not copied once more
    just to put 16 bytes in front of it."""
    return [_pack_header(_OUT + len(data), 0, unique), data]


_pack_entry = abi.OUT_ENTRY.pack
_ENTRY_LEN = abi.OUT_ENTRY.size


def reply_entry(
    unique: int,
    nodeid: int,
    generation: int,
    entry_valid_s: float,
    attr_valid_s: float,
    attr: Attr,
) -> bytes:
    """LOOKUP/MKNOD/MKDIR/SYMLINK/LINK reply.  ``nodeid`` 0 is a cacheable negative entry."""
    return _pack_entry(
        _ENTRY_LEN, 0, unique,
        *_entry_fields(nodeid, generation, entry_valid_s, attr_valid_s, attr),
    )  # fmt: skip


_pack_attr_out = abi.OUT_ATTR.pack
_ATTR_LEN = abi.OUT_ATTR.size


def reply_attr(unique: int, attr_valid_s: float, attr: Attr) -> bytes:
    """GETATTR/SETATTR reply."""
    sec, nsec = _timeout(attr_valid_s)
    return _pack_attr_out(_ATTR_LEN, 0, unique, sec, nsec, 0, *_attr_fields(attr))


_pack_open = abi.OUT_OPEN.pack
_OPEN_LEN = abi.OUT_OPEN.size


def reply_open(unique: int, fh: int, open_flags: int = 0, backing_id: int = 0) -> bytes:
    """OPEN/OPENDIR reply.  For passthrough set FOPEN_PASSTHROUGH and the registered backing_id."""
    return _pack_open(_OPEN_LEN, 0, unique, fh, open_flags, backing_id)


_pack_create = abi.OUT_CREATE.pack
_CREATE_LEN = abi.OUT_CREATE.size


def reply_create(
    unique: int,
    nodeid: int,
    generation: int,
    entry_valid_s: float,
    attr_valid_s: float,
    attr: Attr,
    fh: int,
    open_flags: int = 0,
    backing_id: int = 0,
) -> bytes:
    """CREATE/TMPFILE reply: an entry followed by an open."""
    return _pack_create(
        _CREATE_LEN, 0, unique,
        *_entry_fields(nodeid, generation, entry_valid_s, attr_valid_s, attr),
        fh, open_flags, backing_id,
    )  # fmt: skip


_pack_write = abi.OUT_WRITE.pack
_WRITE_LEN = abi.OUT_WRITE.size


def reply_write(unique: int, size: int) -> bytes:
    """WRITE (and COPY_FILE_RANGE) reply: bytes written."""
    return _pack_write(_WRITE_LEN, 0, unique, size, 0)


_pack_statfs = abi.OUT_STATFS.pack
_STATFS_LEN = abi.OUT_STATFS.size


def reply_statfs(
    unique: int,
    blocks: int,
    bfree: int,
    bavail: int,
    files: int,
    ffree: int,
    bsize: int,
    namelen: int,
    frsize: int,
) -> bytes:
    """STATFS reply (``struct fuse_kstatfs``)."""
    return _pack_statfs(
        _STATFS_LEN, 0, unique, blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0
    )


_pack_xattr_size = abi.OUT_XATTR_SIZE.pack
_XATTR_SIZE_LEN = abi.OUT_XATTR_SIZE.size


def reply_xattr_size(unique: int, size: int) -> bytes:
    """GETXATTR/LISTXATTR reply to a size probe (request size 0)."""
    return _pack_xattr_size(_XATTR_SIZE_LEN, 0, unique, size, 0)


_pack_lk = abi.OUT_LK.pack
_LK_LEN = abi.OUT_LK.size


def reply_lk(unique: int, start: int, end: int, type: int, pid: int) -> bytes:
    """GETLK reply: the conflicting lock, or ``type`` F_UNLCK if none."""
    return _pack_lk(_LK_LEN, 0, unique, start, end, type, pid)


_pack_lseek = abi.OUT_LSEEK.pack
_LSEEK_LEN = abi.OUT_LSEEK.size


def reply_lseek(unique: int, offset: int) -> bytes:
    """LSEEK (SEEK_DATA/SEEK_HOLE) reply."""
    return _pack_lseek(_LSEEK_LEN, 0, unique, offset)


_pack_bmap = abi.OUT_BMAP.pack
_BMAP_LEN = abi.OUT_BMAP.size


def reply_bmap(unique: int, block: int) -> bytes:
    """BMAP reply."""
    return _pack_bmap(_BMAP_LEN, 0, unique, block)


_pack_poll = abi.OUT_POLL.pack
_POLL_LEN = abi.OUT_POLL.size


def reply_poll(unique: int, revents: int) -> bytes:
    """POLL reply."""
    return _pack_poll(_POLL_LEN, 0, unique, revents, 0)


_pack_cfr64 = abi.OUT_COPY_FILE_RANGE_64.pack
_CFR64_LEN = abi.OUT_COPY_FILE_RANGE_64.size


def reply_copy_file_range_64(unique: int, bytes_copied: int) -> bytes:
    """COPY_FILE_RANGE_64 reply (plain COPY_FILE_RANGE uses :func:`reply_write`)."""
    return _pack_cfr64(_CFR64_LEN, 0, unique, bytes_copied)


class InitReply(NamedTuple):
    """The fields of ``struct fuse_init_out``; ``flags`` is 64-bit (split into flags/flags2)."""

    major: int
    minor: int
    max_readahead: int = 0
    flags: int = 0
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 0
    max_pages: int = 0
    map_alignment: int = 0
    max_stack_depth: int = 0
    request_timeout: int = 0


def reply_init(unique: int, init: InitReply) -> bytes:
    """INIT reply.  Kernels before 7.23 get the 24-byte compat struct (they reject more)."""
    body = abi.INIT_OUT.pack(
        init.major,
        init.minor,
        init.max_readahead,
        init.flags & _U32,
        init.max_background,
        init.congestion_threshold,
        init.max_write,
        init.time_gran,
        init.max_pages,
        init.map_alignment,
        (init.flags >> 32) & _U32,
        init.max_stack_depth,
        init.request_timeout,
    )
    if init.major == abi.FUSE_KERNEL_VERSION and init.minor < 23:
        body = body[: abi.INIT_OUT_COMPAT_22_SIZE]
    return _pack_header(_OUT + len(body), 0, unique) + body


# --- Notifications (unique 0, error = notify code) ---------------------------------------------


def notify_inval_inode(ino: int, off: int = 0, length: int = 0) -> bytes:
    """Drop cached data of ``ino`` in [off, off+length) (length 0: to the end; off < 0: attrs
    only)."""
    return _pack_header(
        _OUT + abi.NOTIFY_INVAL_INODE_OUT_SIZE, abi.FUSE_NOTIFY_INVAL_INODE, 0
    ) + abi.NOTIFY_INVAL_INODE_OUT.pack(ino, off, length)


def _check_name(name: bytes) -> None:
    if len(name) > abi.FUSE_NAME_MAX or b"\0" in name:
        raise ValueError(f"invalid name for a notification: {name!r}")


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    """Drop the dentry ``name`` in ``parent`` (``flags`` FUSE_EXPIRE_ONLY: just expire it)."""
    _check_name(name)
    body = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags) + name + b"\0"
    return _pack_header(_OUT + len(body), abi.FUSE_NOTIFY_INVAL_ENTRY, 0) + body


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """Tell the kernel ``name`` in ``parent`` (inode ``child``) is gone (also unhashes it)."""
    _check_name(name)
    body = abi.NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0) + name + b"\0"
    return _pack_header(_OUT + len(body), abi.FUSE_NOTIFY_DELETE, 0) + body


def notify_store(nodeid: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """Push ``data`` into the page cache of ``nodeid`` at ``offset``."""
    n = len(data)
    return (
        _pack_header(_OUT + abi.NOTIFY_STORE_OUT_SIZE + n, abi.FUSE_NOTIFY_STORE, 0)
        + abi.NOTIFY_STORE_OUT.pack(nodeid, offset, n, 0)
        + data
    )


# --- Directory listings ------------------------------------------------------------------------

_pack_dirent = abi.DIRENT.pack
_pack_direntplus = abi.DIRENTPLUS.pack
_PAD = tuple(bytes(i) for i in range(8))


class DirentBuffer:
    """Accumulates ``fuse_dirent`` (READDIR) or ``fuse_direntplus`` (READDIRPLUS) records.

    ``size_limit`` is the request's ``size``: :meth:`add` refuses (returns False) the first record
    that would not fit, which is the caller's signal to stop and reply with :meth:`to_bytes`.
    """

    __slots__ = ("_buf", "_limit", "_plus", "count")

    def __init__(self, size_limit: int, plus: bool) -> None:
        self._buf = bytearray()
        self._limit = size_limit
        self._plus = plus
        self.count = 0

    def add(
        self,
        ino: int,
        off: int,
        type: int,
        name: bytes,
        entry: EntryOut | tuple[int, int, float, float, Attr] | None = None,
    ) -> bool:
        """Append one entry; ``off`` is the offset of the *next* entry (what telldir returns).

        ``type`` is the DT_* value (see :func:`~fusefs.protocol.abi.dirent_type`).  In plus mode
        ``entry`` describes the name (and counts as a lookup if its nodeid is nonzero); without it
        an empty entry is sent, which the kernel treats as "no information".
        """
        buf = self._buf
        start = len(buf)
        namelen = len(name)
        if not 0 < namelen <= abi.FUSE_NAME_MAX:
            # The kernel fails the whole READDIR with EIO on such a record.
            raise ValueError(f"directory entry name length {namelen} not in 1..4095")
        if self._plus:
            reclen = (abi.DIRENTPLUS_SIZE + namelen + 7) & ~7
            if start + reclen > self._limit:
                return False
            if entry is None:
                fields: tuple[int, ...] = (
                    0, 0, 0, 0, 0, 0,  # nodeid generation entry_valid attr_valid + nsecs
                    ino, 0, 0, 0, 0, 0, 0, 0, 0, (type & 0o17) << 12, 0, 0, 0, 0, 0, 0,
                )  # fmt: skip
            else:
                fields = _entry_fields(*entry)
            buf += _pack_direntplus(*fields, ino, off, namelen, type)
            buf += name
            buf += _PAD[reclen - abi.DIRENTPLUS_SIZE - namelen]
        else:
            reclen = (abi.DIRENT_SIZE + namelen + 7) & ~7
            if start + reclen > self._limit:
                return False
            buf += _pack_dirent(ino, off, namelen, type)
            buf += name
            buf += _PAD[reclen - abi.DIRENT_SIZE - namelen]
        self.count += 1
        return True

    def __len__(self) -> int:
        return len(self._buf)

    def to_bytes(self) -> bytes:
        """The records, ready for :func:`reply_data`."""
        return bytes(self._buf)
