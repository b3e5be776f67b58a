"""Decoding FUSE requests: bytes read from /dev/fuse in, one immutable event object out.

Every request type is a :class:`typing.NamedTuple` whose first six fields are the header's
``unique, opcode, nodeid, uid, gid, pid`` followed by the opcode's own fields.  NamedTuples are
immutable, support ``match`` statements, and are built here with ``tuple.__new__`` straight from
``Struct.unpack_from`` output -- no per-field Python code runs -- because this decoder runs once per
request.  ``opcode`` is always an :class:`~fusefs.protocol.abi.Opcode` member (a plain ``int``
for :class:`Unknown`), so two different requests never compare equal.

Names are ``bytes`` without their NUL terminator.  Payloads (WRITE data, ioctl input,
NOTIFY_REPLY data) are ``memoryview`` slices of the input buffer: zero-copy, and valid only as long
as the caller does not reuse that buffer.

Input is checked strictly: the header's ``len`` must equal the buffer length, fixed-size bodies
must have their exact C size, names must be NUL-terminated with nothing after them.  Any violation
raises :class:`~fusefs.protocol.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from . import abi
from .abi import Opcode
from .errors import ProtocolError

__all__ = [
    "REQUEST_TYPES",
    "Access",
    "BatchForget",
    "Bmap",
    "CopyFileRange",
    "Create",
    "Destroy",
    "Fallocate",
    "Flush",
    "Forget",
    "Fsync",
    "Fsyncdir",
    "Getattr",
    "Getlk",
    "Getxattr",
    "InHeader",
    "Init",
    "Interrupt",
    "Ioctl",
    "Link",
    "Listxattr",
    "Lookup",
    "Lseek",
    "Mkdir",
    "Mknod",
    "NotifyReply",
    "Open",
    "Opendir",
    "Poll",
    "ProtocolError",
    "Read",
    "Readdir",
    "Readdirplus",
    "Readlink",
    "Release",
    "Releasedir",
    "Removexattr",
    "Rename",
    "Request",
    "Rmdir",
    "Setattr",
    "Setlk",
    "Setlkw",
    "Setxattr",
    "Statfs",
    "Symlink",
    "Syncfs",
    "Tmpfile",
    "Unknown",
    "Unlink",
    "Write",
    "WritePrefix",
    "decode_header",
    "decode_request",
    "decode_write_prefix",
    "write_from_prefix",
]

_new = tuple.__new__
_NS = 1_000_000_000
_IN_HEADER = abi.IN_HEADER
_HDR = abi.IN_HEADER_SIZE

# --- Header --------------------------------------------------------------------------------


class InHeader(NamedTuple):
    """``struct fuse_in_header`` (padding dropped)."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int


def decode_header(buf: bytes | bytearray | memoryview) -> InHeader:
    """Peek at the 40-byte header of a request without decoding (or length-checking) its body."""
    try:
        fields = _IN_HEADER.unpack_from(buf)
    except struct.error:
        raise ProtocolError(
            f"request shorter than the {_HDR}-byte fuse_in_header ({len(buf)} bytes)"
        ) from None
    return _new(InHeader, fields[:8])


# --- Request types -------------------------------------------------------------------------
# Each class lists the header fields first; keep them identical across classes.


class Lookup(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes


class Forget(NamedTuple):
    """No reply is sent to FORGET."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    nlookup: int


class BatchForget(NamedTuple):
    """``items`` are ``(nodeid, nlookup)`` pairs.  No reply is sent."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    items: tuple[tuple[int, int], ...]


class Getattr(NamedTuple):
    """``fh`` is meaningful only when ``flags & FUSE_GETATTR_FH``."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    flags: int
    fh: int


class Setattr(NamedTuple):
    """Only fields whose ``FATTR_*`` bit is set in ``valid`` mean anything.

    Times are nanoseconds since the epoch; ``FATTR_ATIME_NOW``/``FATTR_MTIME_NOW`` mean "now"
    instead of the given time.
    """

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    valid: int
    fh: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    mode: int
    new_uid: int
    new_gid: int
    lock_owner: int


class Readlink(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class Symlink(NamedTuple):
    """Create ``name`` in directory ``nodeid`` pointing at ``target``."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    target: bytes


class Mknod(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    mode: int
    rdev: int
    umask: int


class Mkdir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    mode: int
    umask: int


class Unlink(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes


class Rmdir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes


class Rename(NamedTuple):
    """RENAME and RENAME2 (``flags`` is 0 for RENAME; RENAME_NOREPLACE/EXCHANGE/WHITEOUT)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    newdir: int
    name: bytes
    newname: bytes
    flags: int


class Link(NamedTuple):
    """Make ``newname`` in directory ``nodeid`` a hard link to ``oldnodeid``."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    oldnodeid: int
    newname: bytes


class Open(NamedTuple):
    """``flags`` are open(2) flags; ``open_flags`` are FUSE_OPEN_* (KILL_SUIDGID)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    flags: int
    open_flags: int


class Read(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


class Write(NamedTuple):
    """``data`` is a zero-copy view into the request buffer; ``len(data) == size``."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: memoryview


class Statfs(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class Release(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


class Fsync(NamedTuple):
    """``fsync_flags & FUSE_FSYNC_FDATASYNC`` asks for fdatasync."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    fsync_flags: int


class Setxattr(NamedTuple):
    """``flags`` are XATTR_CREATE/REPLACE; ``setxattr_flags`` only with FUSE_SETXATTR_EXT."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    value: bytes
    flags: int
    setxattr_flags: int


class Getxattr(NamedTuple):
    """``size == 0`` asks for the value's size only (reply_xattr_size)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    size: int


class Listxattr(NamedTuple):
    """``size == 0`` asks for the list's size only (reply_xattr_size)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    size: int


class Removexattr(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes


class Flush(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    lock_owner: int


class Init(NamedTuple):
    """``flags`` is the 64-bit combination ``flags | flags2 << 32`` (flags2 only with INIT_EXT).

    For a major other than 7 only ``major``/``minor`` are decoded (the rest is 0): the layout of a
    future major is unknown, and the reply just names our version.
    """

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    major: int
    minor: int
    max_readahead: int
    flags: int


class Opendir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    flags: int
    open_flags: int


class Readdir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    size: int


class Readdirplus(NamedTuple):
    """Each entry returned with a nonzero nodeid counts as a lookup (the kernel will FORGET it)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    size: int


class Releasedir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


class Fsyncdir(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    fsync_flags: int


class Getlk(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    owner: int
    start: int
    end: int
    type: int
    lk_pid: int
    lk_flags: int


class Setlk(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    owner: int
    start: int
    end: int
    type: int
    lk_pid: int
    lk_flags: int


class Setlkw(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    owner: int
    start: int
    end: int
    type: int
    lk_pid: int
    lk_flags: int


class Access(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    mask: int


class Create(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    flags: int
    mode: int
    umask: int
    open_flags: int


class Tmpfile(NamedTuple):
    """O_TMPFILE in directory ``nodeid``; same body as CREATE."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    name: bytes
    flags: int
    mode: int
    umask: int
    open_flags: int


class Interrupt(NamedTuple):
    """Interrupt the request whose unique is ``target_unique``.  No reply unless EAGAIN."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    target_unique: int


class Bmap(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    block: int
    blocksize: int


class Destroy(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class Ioctl(NamedTuple):
    """``data`` is the ioctl's input (zero-copy view)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: memoryview


class Poll(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    kh: int
    flags: int
    events: int


class NotifyReply(NamedTuple):
    """The kernel's answer to a NOTIFY_RETRIEVE; ``unique`` is the notification's unique."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    offset: int
    size: int
    data: memoryview


class Fallocate(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    length: int
    mode: int


class Lseek(NamedTuple):
    """Only SEEK_DATA/SEEK_HOLE reach the filesystem (the kernel handles the others)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    offset: int
    whence: int


class CopyFileRange(NamedTuple):
    """COPY_FILE_RANGE (reply_write) and COPY_FILE_RANGE_64 (reply_copy_file_range_64)."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    length: int
    flags: int


class Syncfs(NamedTuple):
    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class Unknown(NamedTuple):
    """Any opcode this codec does not decode (reply ENOSYS); the body is not inspected."""

    unique: int
    opcode: int
    nodeid: int
    uid: int
    gid: int
    pid: int


Request = (
    Lookup
    | Forget
    | BatchForget
    | Getattr
    | Setattr
    | Readlink
    | Symlink
    | Mknod
    | Mkdir
    | Unlink
    | Rmdir
    | Rename
    | Link
    | Open
    | Read
    | Write
    | Statfs
    | Release
    | Fsync
    | Setxattr
    | Getxattr
    | Listxattr
    | Removexattr
    | Flush
    | Init
    | Opendir
    | Readdir
    | Readdirplus
    | Releasedir
    | Fsyncdir
    | Getlk
    | Setlk
    | Setlkw
    | Access
    | Create
    | Tmpfile
    | Interrupt
    | Bmap
    | Destroy
    | Ioctl
    | Poll
    | NotifyReply
    | Fallocate
    | Lseek
    | CopyFileRange
    | Syncfs
    | Unknown
)

REQUEST_TYPES: tuple[type, ...] = Request.__args__

# --- Body helpers ------------------------------------------------------------------------------

_Buf = bytes | bytearray | memoryview
_Hdr = tuple[int, ...]


def _short(what: str, got: int, want: int) -> ProtocolError:
    return ProtocolError(f"{what}: body is {got} bytes, expected {want}")


def _one_name(buf: _Buf, start: int, end: int, what: str) -> bytes:
    """The single NUL-terminated name filling ``buf[start:end]`` exactly."""
    raw = bytes(buf[start:end])
    last = len(raw) - 1
    if last < 0 or raw.find(0) != last:
        raise ProtocolError(f"{what}: name is not a single NUL-terminated string")
    return raw[:last]


def _two_names(buf: _Buf, start: int, end: int, what: str) -> tuple[bytes, bytes]:
    """Two consecutive NUL-terminated names filling ``buf[start:end]`` exactly."""
    raw = bytes(buf[start:end])
    first = raw.find(0)
    last = len(raw) - 1
    if first < 0 or raw.find(0, first + 1) != last:
        raise ProtocolError(f"{what}: expected two NUL-terminated names")
    return raw[:first], raw[first + 1 : last]


def _empty(cls: type) -> Callable[[_Buf, _Hdr, int], Any]:
    name = cls.__name__.upper()

    def decode(buf: _Buf, h: _Hdr, end: int) -> Any:
        if end != _HDR:
            raise _short(name, end - _HDR, 0)
        return _new(cls, h)

    return decode


# --- Per-opcode decoders: (buf, header fields, end of body) -> request ---------------------------

_FORGET_END = _HDR + abi.FORGET_IN_SIZE
_FORGET_IN = abi.FORGET_IN.unpack_from


def _forget(buf: _Buf, h: _Hdr, end: int) -> Forget:
    if end != _FORGET_END:
        raise _short("FORGET", end - _HDR, abi.FORGET_IN_SIZE)
    return _new(Forget, h + _FORGET_IN(buf, _HDR))


_BATCH_FORGET_IN = abi.BATCH_FORGET_IN.unpack_from
_FORGET_ONE_ITER = abi.FORGET_ONE.iter_unpack
_BF_START = _HDR + abi.BATCH_FORGET_IN_SIZE


def _batch_forget(buf: _Buf, h: _Hdr, end: int) -> BatchForget:
    if end < _BF_START:
        raise _short("BATCH_FORGET", end - _HDR, abi.BATCH_FORGET_IN_SIZE)
    count = _BATCH_FORGET_IN(buf, _HDR)[0]
    if end - _BF_START != count * abi.FORGET_ONE_SIZE:
        raise ProtocolError(f"BATCH_FORGET: count {count} does not match body length")
    items = tuple(_FORGET_ONE_ITER(buf[_BF_START:end]))
    return _new(BatchForget, (*h, items))


def _lookup(buf: _Buf, h: _Hdr, end: int) -> Lookup:
    return _new(Lookup, (*h, _one_name(buf, _HDR, end, "LOOKUP")))


_GETATTR_IN = abi.GETATTR_IN.unpack_from
_GETATTR_END = _HDR + abi.GETATTR_IN_SIZE


def _getattr(buf: _Buf, h: _Hdr, end: int) -> Getattr:
    if end != _GETATTR_END:
        raise _short("GETATTR", end - _HDR, abi.GETATTR_IN_SIZE)
    flags, _, fh = _GETATTR_IN(buf, _HDR)
    return _new(Getattr, (*h, flags, fh))


_SETATTR_IN = abi.SETATTR_IN.unpack_from
_SETATTR_END = _HDR + abi.SETATTR_IN_SIZE


def _setattr(buf: _Buf, h: _Hdr, end: int) -> Setattr:
    if end != _SETATTR_END:
        raise _short("SETATTR", end - _HDR, abi.SETATTR_IN_SIZE)
    (valid, _, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
     mode, _, uid, gid, _) = _SETATTR_IN(buf, _HDR)  # fmt: skip
    return _new(
        Setattr,
        (
            *h,
            valid,
            fh,
            size,
            atime * _NS + atimensec,
            mtime * _NS + mtimensec,
            ctime * _NS + ctimensec,
            mode,
            uid,
            gid,
            lock_owner,
        ),
    )


def _symlink(buf: _Buf, h: _Hdr, end: int) -> Symlink:
    return _new(Symlink, (*h, *_two_names(buf, _HDR, end, "SYMLINK")))


_MKNOD_IN = abi.MKNOD_IN.unpack_from
_MKNOD_END = _HDR + abi.MKNOD_IN_SIZE


def _mknod(buf: _Buf, h: _Hdr, end: int) -> Mknod:
    if end < _MKNOD_END:
        raise _short("MKNOD", end - _HDR, abi.MKNOD_IN_SIZE)
    mode, rdev, umask, _ = _MKNOD_IN(buf, _HDR)
    return _new(Mknod, (*h, _one_name(buf, _MKNOD_END, end, "MKNOD"), mode, rdev, umask))


_MKDIR_IN = abi.MKDIR_IN.unpack_from
_MKDIR_END = _HDR + abi.MKDIR_IN_SIZE


def _mkdir(buf: _Buf, h: _Hdr, end: int) -> Mkdir:
    if end < _MKDIR_END:
        raise _short("MKDIR", end - _HDR, abi.MKDIR_IN_SIZE)
    mode, umask = _MKDIR_IN(buf, _HDR)
    return _new(Mkdir, (*h, _one_name(buf, _MKDIR_END, end, "MKDIR"), mode, umask))


def _unlink(buf: _Buf, h: _Hdr, end: int) -> Unlink:
    return _new(Unlink, (*h, _one_name(buf, _HDR, end, "UNLINK")))


def _rmdir(buf: _Buf, h: _Hdr, end: int) -> Rmdir:
    return _new(Rmdir, (*h, _one_name(buf, _HDR, end, "RMDIR")))


_RENAME_IN = abi.RENAME_IN.unpack_from
_RENAME_END = _HDR + abi.RENAME_IN_SIZE
_RENAME2_IN = abi.RENAME2_IN.unpack_from
_RENAME2_END = _HDR + abi.RENAME2_IN_SIZE


def _rename(buf: _Buf, h: _Hdr, end: int) -> Rename:
    if end < _RENAME_END:
        raise _short("RENAME", end - _HDR, abi.RENAME_IN_SIZE)
    (newdir,) = _RENAME_IN(buf, _HDR)
    name, newname = _two_names(buf, _RENAME_END, end, "RENAME")
    return _new(Rename, (*h, newdir, name, newname, 0))


def _rename2(buf: _Buf, h: _Hdr, end: int) -> Rename:
    if end < _RENAME2_END:
        raise _short("RENAME2", end - _HDR, abi.RENAME2_IN_SIZE)
    newdir, flags, _ = _RENAME2_IN(buf, _HDR)
    name, newname = _two_names(buf, _RENAME2_END, end, "RENAME2")
    return _new(Rename, (*h, newdir, name, newname, flags))


_LINK_IN = abi.LINK_IN.unpack_from
_LINK_END = _HDR + abi.LINK_IN_SIZE


def _link(buf: _Buf, h: _Hdr, end: int) -> Link:
    if end < _LINK_END:
        raise _short("LINK", end - _HDR, abi.LINK_IN_SIZE)
    (oldnodeid,) = _LINK_IN(buf, _HDR)
    return _new(Link, (*h, oldnodeid, _one_name(buf, _LINK_END, end, "LINK")))


_OPEN_IN = abi.OPEN_IN.unpack_from
_OPEN_END = _HDR + abi.OPEN_IN_SIZE


def _open(buf: _Buf, h: _Hdr, end: int) -> Open:
    if end != _OPEN_END:
        raise _short("OPEN", end - _HDR, abi.OPEN_IN_SIZE)
    return _new(Open, h + _OPEN_IN(buf, _HDR))


def _opendir(buf: _Buf, h: _Hdr, end: int) -> Opendir:
    if end != _OPEN_END:
        raise _short("OPENDIR", end - _HDR, abi.OPEN_IN_SIZE)
    return _new(Opendir, h + _OPEN_IN(buf, _HDR))


_READ_IN = abi.READ_IN.unpack_from
_READ_END = _HDR + abi.READ_IN_SIZE


def _read(buf: _Buf, h: _Hdr, end: int) -> Read:
    if end != _READ_END:
        raise _short("READ", end - _HDR, abi.READ_IN_SIZE)
    return _new(Read, h + _READ_IN(buf, _HDR)[:6])


def _readdir(buf: _Buf, h: _Hdr, end: int) -> Readdir:
    if end != _READ_END:
        raise _short("READDIR", end - _HDR, abi.READ_IN_SIZE)
    return _new(Readdir, h + _READ_IN(buf, _HDR)[:3])


def _readdirplus(buf: _Buf, h: _Hdr, end: int) -> Readdirplus:
    if end != _READ_END:
        raise _short("READDIRPLUS", end - _HDR, abi.READ_IN_SIZE)
    return _new(Readdirplus, h + _READ_IN(buf, _HDR)[:3])


_WRITE_IN = abi.WRITE_IN.unpack_from
_WRITE_DATA = _HDR + abi.WRITE_IN_SIZE


def _write(buf: _Buf, h: _Hdr, end: int) -> Write:
    if end < _WRITE_DATA:
        raise _short("WRITE", end - _HDR, abi.WRITE_IN_SIZE)
    fields = _WRITE_IN(buf, _HDR)
    if end - _WRITE_DATA != fields[2]:
        raise ProtocolError(f"WRITE: size {fields[2]} but {end - _WRITE_DATA} data bytes")
    return _new(Write, (*h, *fields[:6], memoryview(buf)[_WRITE_DATA:end]))


_RELEASE_IN = abi.RELEASE_IN.unpack_from
_RELEASE_END = _HDR + abi.RELEASE_IN_SIZE


def _release(buf: _Buf, h: _Hdr, end: int) -> Release:
    if end != _RELEASE_END:
        raise _short("RELEASE", end - _HDR, abi.RELEASE_IN_SIZE)
    return _new(Release, h + _RELEASE_IN(buf, _HDR))


def _releasedir(buf: _Buf, h: _Hdr, end: int) -> Releasedir:
    if end != _RELEASE_END:
        raise _short("RELEASEDIR", end - _HDR, abi.RELEASE_IN_SIZE)
    return _new(Releasedir, h + _RELEASE_IN(buf, _HDR))


_FSYNC_IN = abi.FSYNC_IN.unpack_from
_FSYNC_END = _HDR + abi.FSYNC_IN_SIZE


def _fsync(buf: _Buf, h: _Hdr, end: int) -> Fsync:
    if end != _FSYNC_END:
        raise _short("FSYNC", end - _HDR, abi.FSYNC_IN_SIZE)
    return _new(Fsync, h + _FSYNC_IN(buf, _HDR)[:2])


def _fsyncdir(buf: _Buf, h: _Hdr, end: int) -> Fsyncdir:
    if end != _FSYNC_END:
        raise _short("FSYNCDIR", end - _HDR, abi.FSYNC_IN_SIZE)
    return _new(Fsyncdir, h + _FSYNC_IN(buf, _HDR)[:2])


def _setxattr_body(
    buf: _Buf, h: _Hdr, end: int, fixed: int, size: int, flags: int, sx_flags: int
) -> Setxattr:
    raw = bytes(buf[_HDR + fixed : end])
    nul = raw.find(0)
    if nul < 0:
        raise ProtocolError("SETXATTR: name is not NUL-terminated")
    value = raw[nul + 1 :]
    if len(value) != size:
        raise ProtocolError(f"SETXATTR: size {size} but {len(value)} value bytes")
    return _new(Setxattr, (*h, raw[:nul], value, flags, sx_flags))


_SETXATTR_COMPAT = abi.SETXATTR_IN_COMPAT.unpack_from
_SETXATTR_EXT = abi.SETXATTR_IN.unpack_from


def _setxattr(buf: _Buf, h: _Hdr, end: int) -> Setxattr:
    fixed = abi.SETXATTR_IN_COMPAT_SIZE
    if end < _HDR + fixed:
        raise _short("SETXATTR", end - _HDR, fixed)
    size, flags = _SETXATTR_COMPAT(buf, _HDR)
    return _setxattr_body(buf, h, end, fixed, size, flags, 0)


def _setxattr_ext(buf: _Buf, h: _Hdr, end: int) -> Setxattr:
    fixed = abi.SETXATTR_IN_SIZE
    if end < _HDR + fixed:
        raise _short("SETXATTR", end - _HDR, fixed)
    size, flags, sx_flags, _ = _SETXATTR_EXT(buf, _HDR)
    return _setxattr_body(buf, h, end, fixed, size, flags, sx_flags)


_GETXATTR_IN = abi.GETXATTR_IN.unpack_from
_GETXATTR_END = _HDR + abi.GETXATTR_IN_SIZE


def _getxattr(buf: _Buf, h: _Hdr, end: int) -> Getxattr:
    if end < _GETXATTR_END:
        raise _short("GETXATTR", end - _HDR, abi.GETXATTR_IN_SIZE)
    size = _GETXATTR_IN(buf, _HDR)[0]
    return _new(Getxattr, (*h, _one_name(buf, _GETXATTR_END, end, "GETXATTR"), size))


def _listxattr(buf: _Buf, h: _Hdr, end: int) -> Listxattr:
    if end != _GETXATTR_END:
        raise _short("LISTXATTR", end - _HDR, abi.GETXATTR_IN_SIZE)
    return _new(Listxattr, (*h, _GETXATTR_IN(buf, _HDR)[0]))


def _removexattr(buf: _Buf, h: _Hdr, end: int) -> Removexattr:
    return _new(Removexattr, (*h, _one_name(buf, _HDR, end, "REMOVEXATTR")))


_FLUSH_IN = abi.FLUSH_IN.unpack_from
_FLUSH_END = _HDR + abi.FLUSH_IN_SIZE


def _flush(buf: _Buf, h: _Hdr, end: int) -> Flush:
    if end != _FLUSH_END:
        raise _short("FLUSH", end - _HDR, abi.FLUSH_IN_SIZE)
    fh, _, _, lock_owner = _FLUSH_IN(buf, _HDR)
    return _new(Flush, (*h, fh, lock_owner))


_INIT_MAJOR_MINOR = struct.Struct("<II").unpack_from
_INIT_IN_COMPAT = abi.INIT_IN_COMPAT.unpack_from
_FLAGS2 = struct.Struct("<I").unpack_from


def _init(buf: _Buf, h: _Hdr, end: int) -> Init:
    body = end - _HDR
    if body < 8:
        raise _short("INIT", body, abi.INIT_IN_SIZE)
    major, minor = _INIT_MAJOR_MINOR(buf, _HDR)
    if major != abi.FUSE_KERNEL_VERSION:
        return _new(Init, (*h, major, minor, 0, 0))
    if body < abi.INIT_IN_COMPAT_SIZE:
        raise _short("INIT", body, abi.INIT_IN_SIZE)
    _, _, max_readahead, flags = _INIT_IN_COMPAT(buf, _HDR)
    if flags & abi.FUSE_INIT_EXT and body >= 20:
        flags |= _FLAGS2(buf, _HDR + 16)[0] << 32
    return _new(Init, (*h, major, minor, max_readahead, flags))


_LK_IN = abi.LK_IN.unpack_from
_LK_END = _HDR + abi.LK_IN_SIZE


def _lk(cls: type, name: str) -> Callable[[_Buf, _Hdr, int], Any]:
    def decode(buf: _Buf, h: _Hdr, end: int) -> Any:
        if end != _LK_END:
            raise _short(name, end - _HDR, abi.LK_IN_SIZE)
        return _new(cls, h + _LK_IN(buf, _HDR)[:7])

    return decode


_ACCESS_IN = abi.ACCESS_IN.unpack_from
_ACCESS_END = _HDR + abi.ACCESS_IN_SIZE


def _access(buf: _Buf, h: _Hdr, end: int) -> Access:
    if end != _ACCESS_END:
        raise _short("ACCESS", end - _HDR, abi.ACCESS_IN_SIZE)
    return _new(Access, (*h, _ACCESS_IN(buf, _HDR)[0]))


_CREATE_IN = abi.CREATE_IN.unpack_from
_CREATE_END = _HDR + abi.CREATE_IN_SIZE


def _create(buf: _Buf, h: _Hdr, end: int) -> Create:
    if end < _CREATE_END:
        raise _short("CREATE", end - _HDR, abi.CREATE_IN_SIZE)
    fields = _CREATE_IN(buf, _HDR)
    return _new(Create, (*h, _one_name(buf, _CREATE_END, end, "CREATE"), *fields))


def _tmpfile(buf: _Buf, h: _Hdr, end: int) -> Tmpfile:
    if end < _CREATE_END:
        raise _short("TMPFILE", end - _HDR, abi.CREATE_IN_SIZE)
    fields = _CREATE_IN(buf, _HDR)
    return _new(Tmpfile, (*h, _one_name(buf, _CREATE_END, end, "TMPFILE"), *fields))


_INTERRUPT_IN = abi.INTERRUPT_IN.unpack_from
_INTERRUPT_END = _HDR + abi.INTERRUPT_IN_SIZE


def _interrupt(buf: _Buf, h: _Hdr, end: int) -> Interrupt:
    if end != _INTERRUPT_END:
        raise _short("INTERRUPT", end - _HDR, abi.INTERRUPT_IN_SIZE)
    return _new(Interrupt, h + _INTERRUPT_IN(buf, _HDR))


_BMAP_IN = abi.BMAP_IN.unpack_from
_BMAP_END = _HDR + abi.BMAP_IN_SIZE


def _bmap(buf: _Buf, h: _Hdr, end: int) -> Bmap:
    if end != _BMAP_END:
        raise _short("BMAP", end - _HDR, abi.BMAP_IN_SIZE)
    return _new(Bmap, h + _BMAP_IN(buf, _HDR)[:2])


_IOCTL_IN = abi.IOCTL_IN.unpack_from
_IOCTL_END = _HDR + abi.IOCTL_IN_SIZE


def _ioctl(buf: _Buf, h: _Hdr, end: int) -> Ioctl:
    if end < _IOCTL_END:
        raise _short("IOCTL", end - _HDR, abi.IOCTL_IN_SIZE)
    return _new(Ioctl, (*h, *_IOCTL_IN(buf, _HDR), memoryview(buf)[_IOCTL_END:end]))


_POLL_IN = abi.POLL_IN.unpack_from
_POLL_END = _HDR + abi.POLL_IN_SIZE


def _poll(buf: _Buf, h: _Hdr, end: int) -> Poll:
    if end != _POLL_END:
        raise _short("POLL", end - _HDR, abi.POLL_IN_SIZE)
    return _new(Poll, h + _POLL_IN(buf, _HDR))


_RETRIEVE_IN = abi.NOTIFY_RETRIEVE_IN.unpack_from
_RETRIEVE_END = _HDR + abi.NOTIFY_RETRIEVE_IN_SIZE


def _notify_reply(buf: _Buf, h: _Hdr, end: int) -> NotifyReply:
    if end < _RETRIEVE_END:
        raise _short("NOTIFY_REPLY", end - _HDR, abi.NOTIFY_RETRIEVE_IN_SIZE)
    _, offset, size, _, _, _ = _RETRIEVE_IN(buf, _HDR)
    if end - _RETRIEVE_END != size:
        raise ProtocolError(f"NOTIFY_REPLY: size {size} but {end - _RETRIEVE_END} data bytes")
    return _new(NotifyReply, (*h, offset, size, memoryview(buf)[_RETRIEVE_END:end]))


_FALLOCATE_IN = abi.FALLOCATE_IN.unpack_from
_FALLOCATE_END = _HDR + abi.FALLOCATE_IN_SIZE


def _fallocate(buf: _Buf, h: _Hdr, end: int) -> Fallocate:
    if end != _FALLOCATE_END:
        raise _short("FALLOCATE", end - _HDR, abi.FALLOCATE_IN_SIZE)
    return _new(Fallocate, h + _FALLOCATE_IN(buf, _HDR)[:4])


_LSEEK_IN = abi.LSEEK_IN.unpack_from
_LSEEK_END = _HDR + abi.LSEEK_IN_SIZE


def _lseek(buf: _Buf, h: _Hdr, end: int) -> Lseek:
    if end != _LSEEK_END:
        raise _short("LSEEK", end - _HDR, abi.LSEEK_IN_SIZE)
    return _new(Lseek, h + _LSEEK_IN(buf, _HDR)[:3])


_CFR_IN = abi.COPY_FILE_RANGE_IN.unpack_from
_CFR_END = _HDR + abi.COPY_FILE_RANGE_IN_SIZE


def _copy_file_range(buf: _Buf, h: _Hdr, end: int) -> CopyFileRange:
    if end != _CFR_END:
        raise _short("COPY_FILE_RANGE", end - _HDR, abi.COPY_FILE_RANGE_IN_SIZE)
    return _new(CopyFileRange, h + _CFR_IN(buf, _HDR))


_SYNCFS_END = _HDR + abi.SYNCFS_IN_SIZE


def _syncfs(buf: _Buf, h: _Hdr, end: int) -> Syncfs:
    if end != _SYNCFS_END:
        raise _short("SYNCFS", end - _HDR, abi.SYNCFS_IN_SIZE)
    return _new(Syncfs, h)


_Decoder = Callable[[_Buf, _Hdr, int], Any]

_DECODERS: dict[Opcode, _Decoder] = {
    Opcode.LOOKUP: _lookup,
    Opcode.FORGET: _forget,
    Opcode.GETATTR: _getattr,
    Opcode.SETATTR: _setattr,
    Opcode.READLINK: _empty(Readlink),
    Opcode.SYMLINK: _symlink,
    Opcode.MKNOD: _mknod,
    Opcode.MKDIR: _mkdir,
    Opcode.UNLINK: _unlink,
    Opcode.RMDIR: _rmdir,
    Opcode.RENAME: _rename,
    Opcode.LINK: _link,
    Opcode.OPEN: _open,
    Opcode.READ: _read,
    Opcode.WRITE: _write,
    Opcode.STATFS: _empty(Statfs),
    Opcode.RELEASE: _release,
    Opcode.FSYNC: _fsync,
    Opcode.SETXATTR: _setxattr,
    Opcode.GETXATTR: _getxattr,
    Opcode.LISTXATTR: _listxattr,
    Opcode.REMOVEXATTR: _removexattr,
    Opcode.FLUSH: _flush,
    Opcode.INIT: _init,
    Opcode.OPENDIR: _opendir,
    Opcode.READDIR: _readdir,
    Opcode.RELEASEDIR: _releasedir,
    Opcode.FSYNCDIR: _fsyncdir,
    Opcode.GETLK: _lk(Getlk, "GETLK"),
    Opcode.SETLK: _lk(Setlk, "SETLK"),
    Opcode.SETLKW: _lk(Setlkw, "SETLKW"),
    Opcode.ACCESS: _access,
    Opcode.CREATE: _create,
    Opcode.INTERRUPT: _interrupt,
    Opcode.BMAP: _bmap,
    Opcode.DESTROY: _empty(Destroy),
    Opcode.IOCTL: _ioctl,
    Opcode.POLL: _poll,
    Opcode.NOTIFY_REPLY: _notify_reply,
    Opcode.BATCH_FORGET: _batch_forget,
    Opcode.FALLOCATE: _fallocate,
    Opcode.READDIRPLUS: _readdirplus,
    Opcode.RENAME2: _rename2,
    Opcode.LSEEK: _lseek,
    Opcode.COPY_FILE_RANGE: _copy_file_range,
    Opcode.SYNCFS: _syncfs,
    Opcode.TMPFILE: _tmpfile,
    Opcode.COPY_FILE_RANGE_64: _copy_file_range,
}

# int opcode -> (Opcode member, decoder); a second table for FUSE_SETXATTR_EXT connections.
_TABLE: dict[int, tuple[Opcode, _Decoder]] = {int(op): (op, fn) for op, fn in _DECODERS.items()}
_TABLE_XATTR_EXT = {**_TABLE, int(Opcode.SETXATTR): (Opcode.SETXATTR, _setxattr_ext)}


def decode_request(buf: bytes | bytearray | memoryview, setxattr_ext: bool = False) -> Request:
    """Decode one complete request (exactly what one read of /dev/fuse returned).

    ``setxattr_ext`` must be True once FUSE_SETXATTR_EXT was negotiated: it changes the size of
    fuse_setxattr_in and nothing in the request says so.  Raises :class:`ProtocolError` on any
    malformed input.
    """
    try:
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _IN_HEADER.unpack_from(buf)
    except struct.error:
        raise ProtocolError(
            f"request shorter than the {_HDR}-byte fuse_in_header ({len(buf)} bytes)"
        ) from None
    if length != len(buf):
        raise ProtocolError(f"header says {length} bytes but the request has {len(buf)}")
    entry = (_TABLE_XATTR_EXT if setxattr_ext else _TABLE).get(opcode)
    if entry is None:
        return _new(Unknown, (unique, opcode, nodeid, uid, gid, pid))
    # Extensions (security context, supplementary groups) trail the body; we never negotiate
    # them, but skipping them keeps the body checks exact if a kernel sends them anyway.
    end = length - extlen * 8
    if end < _HDR:
        raise ProtocolError(f"extension length {extlen * 8} exceeds the request body")
    op, fn = entry
    try:
        return fn(buf, (unique, op, nodeid, uid, gid, pid), end)
    except struct.error as exc:  # unreachable if the size checks above are right; a net
        raise ProtocolError(f"{op.name}: {exc}") from None


# --- WRITE through a pipe: the header and write_in first, the data stays in the pipe ----------


class WritePrefix(NamedTuple):
    """The first 80 bytes of a WRITE request: header plus ``fuse_write_in``."""

    header: InHeader
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int


WRITE_PREFIX_SIZE = _WRITE_DATA


def decode_write_prefix(buf: bytes | bytearray | memoryview) -> WritePrefix:
    """Decode the first 80 bytes of a request known (by :func:`decode_header`) to be a WRITE.

    For spliced requests the data remains in the pipe; ``header.len - 80 == size`` is checked so
    the caller can trust ``size`` as the number of payload bytes left to move.
    """
    if len(buf) < _WRITE_DATA:
        raise ProtocolError(f"WRITE prefix needs {_WRITE_DATA} bytes, got {len(buf)}")
    header = decode_header(buf)
    if header.opcode != Opcode.WRITE:
        raise ProtocolError(f"opcode {header.opcode} is not WRITE")
    fields = _WRITE_IN(buf, _HDR)[:6]
    if header.len - _WRITE_DATA != fields[2] or header.total_extlen:
        raise ProtocolError(f"WRITE: size {fields[2]} but header length {header.len}")
    return _new(WritePrefix, (header, *fields))


def write_from_prefix(prefix: WritePrefix, data: bytes | bytearray | memoryview) -> Write:
    """Build the :class:`Write` request from a prefix and its payload read separately."""
    if len(data) != prefix.size:
        raise ProtocolError(f"WRITE: size {prefix.size} but {len(data)} data bytes")
    h = prefix.header
    return Write(
        h.unique, Opcode.WRITE, h.nodeid, h.uid, h.gid, h.pid,
        prefix.fh, prefix.offset, prefix.size, prefix.write_flags, prefix.lock_owner,
        prefix.flags, memoryview(data),
    )  # fmt: skip
