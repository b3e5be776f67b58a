"""The replication wire protocol, sans-IO (bytes in, events out; events in, bytes out).

Shaped like h11: events are small frozen dataclasses, parsing and serialising are pure
functions, and :class:`Connection` ties them to one state machine with ``receive_data()`` /
``next_event()`` / ``send()``.  Nothing here touches a socket, so every byte layout is
unit-tested without one.  The layout is documented in docs/protocol.md.

A frame is ``u32 length | u8 type | payload[length]`` (big-endian).  The one exception is the
payload of a DATA frame: the frame carries only the range header (seq, path, offset, length);
the ``length`` raw bytes follow the frame unframed, so a sender can ``sendfile()`` them straight
from a file and a receiver can ``splice()`` them straight from the socket into a file.  While a
DATA payload is being received, :meth:`Connection.next_event` yields :class:`DataChunk` events
for bytes already buffered; an I/O layer that wants to splice instead reads
:attr:`Connection.payload_left` and reports what it moved with
:meth:`Connection.payload_received`.

Every problem with the peer's bytes (malformed frames, oversized frames, a bad handshake, a
wrong key) raises :class:`WireError`, and only that; its ``code`` is one of the ``E_*`` codes,
which the I/O layer can send back in an :class:`Error` frame before dropping the connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import stat
import struct
from dataclasses import dataclass, field
from typing import Final

from fusefs.mirror.changes import (
    Change,
    Create,
    Fallocate,
    Link,
    Mkdir,
    Mknod,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Write,
)

__all__ = [
    "E_AUTH",
    "E_BAD_PATH",
    "E_BUSY",
    "E_INTERNAL",
    "E_PROTOCOL",
    "E_VERSION",
    "MAGIC",
    "MAX_CHECKSUM_BLOCKS",
    "MAX_DATA",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_NAME",
    "MAX_OFFSET",
    "MAX_PATH",
    "MAX_PREAUTH_FRAME",
    "MAX_RDEV",
    "MAX_SOURCE",
    "MAX_XATTR_VALUE",
    "NEED_DATA",
    "VERSION",
    "Ack",
    "Auth",
    "AuthOk",
    "Bye",
    "Challenge",
    "Checksum",
    "ChecksumReply",
    "Connection",
    "Data",
    "DataChunk",
    "DataEnd",
    "Entry",
    "Error",
    "Event",
    "Hello",
    "List",
    "ListReply",
    "Op",
    "Read",
    "Role",
    "Sync",
    "WireError",
    "check_change",
    "decode_change",
    "encode_change",
]

#: First bytes of every HELLO payload; then the u16 protocol version.
MAGIC: Final = b"FUSEFSR\x00"
VERSION: Final = 2
#: Largest frame payload (type byte excluded) after authentication.
MAX_FRAME: Final = 1 << 20
#: Largest frame payload before the peer has authenticated (HELLO, CHALLENGE, AUTH are tiny).
MAX_PREAUTH_FRAME: Final = 1024
#: Largest path (bytes) and single name component / xattr name.
MAX_PATH: Final = 4096
MAX_NAME: Final = 255
#: Largest extended attribute value (the Linux limit).
MAX_XATTR_VALUE: Final = 65536
#: Largest raw payload of one DATA frame.
MAX_DATA: Final = 64 << 20
#: Largest source name carried by HELLO.
MAX_SOURCE: Final = 64
#: Largest file offset, size, or end of a range (``off_t``; Linux's MAX_LFS_FILESIZE).
MAX_OFFSET: Final = (1 << 63) - 1
#: Largest uid or gid (``(uid_t) -1`` means "unchanged" to chown, never an owner).
MAX_ID: Final = (1 << 32) - 2
#: Largest device number (mknod(2) takes 32 bits).
MAX_RDEV: Final = (1 << 32) - 1
#: Most blocks a CHECKSUM may cover, and digests a CHECKSUM_REPLY may carry (the client asks
#: for at most 16384, see tree.block_size_for; a reply of this many fits a frame).
MAX_CHECKSUM_BLOCKS: Final = 16384
#: renameat2 flags: NOREPLACE, EXCHANGE, WHITEOUT.
RENAME_FLAGS: Final = 0b111
#: fallocate(2) mode bits: KEEP_SIZE .. UNSHARE_RANGE.
FALLOC_FLAGS: Final = 0x7F
NONCE_SIZE: Final = 32
MAC_SIZE: Final = 32

# error codes (Error.code and WireError.code)
E_PROTOCOL: Final = 1  # malformed or unexpected frame
E_VERSION: Final = 2  # not a fusefs replica peer, or an unsupported version
E_AUTH: Final = 3  # authentication failed
E_BUSY: Final = 4  # too many connections
E_BAD_PATH: Final = 5  # a path that is absolute, has ``..``, or crosses a symlink
E_INTERNAL: Final = 6  # the peer failed unexpectedly

_HEADER = struct.Struct(">IB")
HEADER_SIZE: Final = _HEADER.size


class WireError(Exception):
    """The peer's bytes (or a local call) broke the protocol; ``code`` is an ``E_*`` code."""

    def __init__(self, message: str, code: int = E_PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class _T(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    OP = 5
    DATA = 6
    ACK = 7
    SYNC = 8
    ERROR = 9
    LIST = 10
    LIST_REPLY = 11
    CHECKSUM = 12
    CHECKSUM_REPLY = 13
    READ = 14
    BYE = 15


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first frame: who is connecting, and the client's nonce."""

    source: bytes
    nonce: bytes
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class Challenge:
    """Server -> client: the server's nonce to prove the key with."""

    nonce: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """Client -> server: HMAC-SHA256(key, "client" | server nonce | client nonce | source)."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class AuthOk:
    """Server -> client: HMAC-SHA256(key, "server" | client nonce | server nonce | source)."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class Op:
    """Client -> server: apply ``change`` (sequence number ``seq``)."""

    seq: int
    change: Change


@dataclass(frozen=True, slots=True)
class Data:
    """A byte range of ``path``: ``length`` raw bytes follow this frame, unframed.

    Client -> server: write them at ``offset`` (sequence ``seq``).  Server -> client: the
    answer to :class:`Read` number ``seq``.
    """

    seq: int
    path: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Received raw payload bytes of the current DATA frame (receive side only)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The current DATA frame's payload is complete (receive side only)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Server -> client: every op up to ``seq`` was applied (``durable``: and is on disk).

    ``failed``: op ``seq`` itself could not be applied (the server logged why); the client
    should repair the tree by comparison.
    """

    seq: int
    durable: bool = False
    failed: bool = False


@dataclass(frozen=True, slots=True)
class Sync:
    """Client -> server: make everything up to ``seq`` durable, then ``Ack(seq, durable)``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: a fatal problem (``code`` is an ``E_*`` code); the sender then closes."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One object of a tree listing; ``path`` relative to the tree root (``.`` is the root)."""

    path: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    rdev: int = 0
    #: the target of a symlink
    target: bytes = b""
    #: extended attributes, sorted by name
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    #: another name of the same inode (a hard link): the first one in the listing's order,
    #: so that both ends name a link group alike; empty for the first name and unlinked files
    link: bytes = b""


@dataclass(frozen=True, slots=True)
class List:
    """Client -> server: list the whole tree (recursively, without following symlinks)."""

    req: int


@dataclass(frozen=True, slots=True)
class ListReply:
    """Server -> client: some entries of listing ``req``; ``done`` on the last frame."""

    req: int
    entries: tuple[Entry, ...]
    done: bool


@dataclass(frozen=True, slots=True)
class Checksum:
    """Client -> server: SHA-256 of each ``block_size`` block of the regular file ``path``."""

    req: int
    path: bytes
    block_size: int


@dataclass(frozen=True, slots=True)
class ChecksumReply:
    """Server -> client: ``found`` false when ``path`` is not a regular file."""

    req: int
    found: bool
    size: int = 0
    digests: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Read:
    """Client -> server: send ``length`` bytes of ``path`` at ``offset`` (a :class:`Data`)."""

    req: int
    path: bytes
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Bye:
    """Either way: a clean goodbye; nothing follows."""


Event = (
    Hello
    | Challenge
    | Auth
    | AuthOk
    | Op
    | Data
    | DataChunk
    | DataEnd
    | Ack
    | Sync
    | Error
    | List
    | ListReply
    | Checksum
    | ChecksumReply
    | Read
    | Bye
)


class _NeedData:
    """The sentinel :meth:`Connection.next_event` returns when it needs more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


# -- primitive encoders / decoders -------------------------------------------------------------


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise WireError("truncated frame payload")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack(">H", self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = struct.unpack(">I", self.take(4))[0]
        return v

    def u64(self) -> int:
        v: int = struct.unpack(">Q", self.take(8))[0]
        return v

    def i64(self) -> int:
        v: int = struct.unpack(">q", self.take(8))[0]
        return v

    def blob(self, limit: int, what: str, wide: bool = False) -> bytes:
        n = self.u32() if wide else self.u16()
        if n > limit:
            raise WireError(f"{what} of {n} bytes exceeds the limit of {limit}")
        return self.take(n)

    def path(self) -> bytes:
        p = self.blob(MAX_PATH, "path")
        if not p or b"\x00" in p:
            raise WireError("empty path or NUL byte in a path")
        return p

    def name(self) -> bytes:
        n = self.blob(MAX_NAME, "name")
        if not n or b"\x00" in n:
            raise WireError("empty name or NUL byte in a name")
        return n

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise WireError("trailing bytes in a frame")


def _blob(b: bytes, wide: bool = False) -> bytes:
    return (struct.pack(">I", len(b)) if wide else struct.pack(">H", len(b))) + b


def _check_out(b: bytes, limit: int, what: str) -> bytes:
    if len(b) > limit:
        raise WireError(f"{what} of {len(b)} bytes exceeds the limit of {limit}")
    return b


def _path_out(p: bytes) -> bytes:
    if not p or b"\x00" in p:
        raise WireError("empty path or NUL byte in a path")
    return _blob(_check_out(p, MAX_PATH, "path"))


def _name_out(n: bytes) -> bytes:
    if not n or b"\x00" in n:
        raise WireError("empty name or NUL byte in a name")
    return _blob(_check_out(n, MAX_NAME, "name"))


# -- changes -----------------------------------------------------------------------------------

_CHANGE_TAGS: dict[type, int] = {
    Create: 1,
    Mkdir: 2,
    Mknod: 3,
    Symlink: 4,
    Link: 5,
    Unlink: 6,
    Rmdir: 7,
    Rename: 8,
    Write: 9,
    Truncate: 10,
    Fallocate: 11,
    SetAttr: 12,
    SetXattr: 13,
    RemoveXattr: 14,
}
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _u32(v: int) -> bytes:
    if not 0 <= v <= _U32:
        raise WireError(f"value {v} out of range for u32")
    return struct.pack(">I", v)


def _u64(v: int) -> bytes:
    if not 0 <= v <= _U64:
        raise WireError(f"value {v} out of range for u64")
    return struct.pack(">Q", v)


def _i64(v: int) -> bytes:
    if not -(1 << 63) <= v < (1 << 63):
        raise WireError(f"value {v} out of range for i64")
    return struct.pack(">q", v)


def _range(offset: int, length: int, what: str) -> None:
    """``offset`` and ``length`` >= 0 and the range ends within a file (no overflow later)."""
    if offset < 0 or length < 0 or offset + length > MAX_OFFSET:
        raise WireError(f"{what} range {offset}+{length} is out of bounds")


def _perm(mode: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise WireError(f"mode {mode:#o} has bits beyond the permission bits")


def _ids(uid: int | None, gid: int | None) -> None:
    for v in (uid, gid):
        if v is not None and not 0 <= v <= MAX_ID:
            raise WireError(f"owner id {v} out of range")


_MKNOD_TYPES: Final = frozenset(
    (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFREG)
)


def check_change(c: Change) -> None:
    """Raise WireError unless every field of ``c`` is in the range the replica can apply.

    The codec calls it on both ends, so a peer's value never reaches a system call that
    would reject it with anything but an OSError (e.g. OverflowError for ``ftruncate(2**63)``).
    """
    match c:
        case Create(_, mode, uid, gid) | Mkdir(_, mode, uid, gid):
            _perm(mode)
            _ids(uid, gid)
        case Mknod(_, mode, rdev, uid, gid):
            if stat.S_IFMT(mode) not in _MKNOD_TYPES or mode & ~(stat.S_IFMT(mode) | 0o7777):
                raise WireError(f"mknod mode {mode:#o} is not a node type and permissions")
            if not 0 <= rdev <= MAX_RDEV:
                raise WireError(f"device number {rdev} out of range")
            _ids(uid, gid)
        case Symlink(_, _, uid, gid):
            _ids(uid, gid)
        case Rename(_, _, flags):
            if flags & ~RENAME_FLAGS or flags < 0:
                raise WireError(f"unknown rename flags {flags:#x}")
        case Write(_, offset, size):
            _range(offset, size, "write")
        case Truncate(_, size):
            _range(size, 0, "truncate")
        case Fallocate(_, mode, offset, length):
            if mode & ~FALLOC_FLAGS or mode < 0:
                raise WireError(f"unknown fallocate mode {mode:#x}")
            if length < 1:
                raise WireError("fallocate of an empty range")
            _range(offset, length, "fallocate")
        case SetAttr(_, mode, uid, gid, atime_ns, mtime_ns):
            if mode is not None:
                _perm(mode)
            _ids(uid, gid)
            for t in (atime_ns, mtime_ns):  # any i64 is a valid time (the kernel clamps)
                if t is not None and not -(1 << 63) <= t < (1 << 63):
                    raise WireError(f"time {t} out of range for i64")


_WRITE_TAG = _CHANGE_TAGS[Write]
_WRITE_HEAD = struct.Struct(">BH")
_WRITE_TAIL = struct.Struct(">QQ")


def encode_change(c: Change) -> bytes:
    """The wire (and log) form of one change; raises WireError if a field is out of range."""
    if type(c) is Write:  # the hot path: one per WRITE request through the mount
        p, offset, size = c.path, c.offset, c.size
        if (
            p
            and len(p) <= MAX_PATH
            and b"\x00" not in p
            and offset >= 0
            and size >= 0
            and offset + size <= MAX_OFFSET
        ):
            return _WRITE_HEAD.pack(_WRITE_TAG, len(p)) + p + _WRITE_TAIL.pack(offset, size)
    tag = _CHANGE_TAGS.get(type(c))
    if tag is None:
        raise WireError(f"not a change: {c!r}")
    check_change(c)
    out = [bytes([tag])]
    match c:
        case Create(path, mode, uid, gid) | Mkdir(path, mode, uid, gid):
            out += [_path_out(path), _u32(mode), _u32(uid), _u32(gid)]
        case Mknod(path, mode, rdev, uid, gid):
            out += [_path_out(path), _u32(mode), _u64(rdev), _u32(uid), _u32(gid)]
        case Symlink(path, target, uid, gid):
            out += [_path_out(path), _path_out(target), _u32(uid), _u32(gid)]
        case Link(path, target):
            out += [_path_out(path), _path_out(target)]
        case Unlink(path) | Rmdir(path):
            out += [_path_out(path)]
        case Rename(old, new, flags):
            out += [_path_out(old), _path_out(new), _u32(flags)]
        case Write(path, offset, size):
            out += [_path_out(path), _u64(offset), _u64(size)]
        case Truncate(path, size):
            out += [_path_out(path), _u64(size)]
        case Fallocate(path, mode, offset, length):
            out += [_path_out(path), _u32(mode), _u64(offset), _u64(length)]
        case SetAttr(path, mode, uid, gid, atime_ns, mtime_ns):
            vals = (mode, uid, gid, atime_ns, mtime_ns)
            mask = sum(1 << i for i, v in enumerate(vals) if v is not None)
            out += [_path_out(path), bytes([mask])]
            out += [_u32(mode or 0), _u32(uid or 0), _u32(gid or 0)]
            out += [_i64(atime_ns or 0), _i64(mtime_ns or 0)]
        case SetXattr(path, name, value):
            out += [_path_out(path), _name_out(name)]
            out += [_blob(_check_out(value, MAX_XATTR_VALUE, "xattr value"), wide=True)]
        case RemoveXattr(path, name):
            out += [_path_out(path), _name_out(name)]
    return b"".join(out)


def _read_change(r: _Reader) -> Change:
    c = _read_change_fields(r)
    check_change(c)
    return c


def _read_change_fields(r: _Reader) -> Change:
    tag = r.u8()
    if tag in (1, 2):
        p = r.path()
        mode, uid, gid = r.u32(), r.u32(), r.u32()
        return Create(p, mode, uid, gid) if tag == 1 else Mkdir(p, mode, uid, gid)
    if tag == 3:
        p = r.path()
        return Mknod(p, r.u32(), r.u64(), r.u32(), r.u32())
    if tag == 4:
        return Symlink(r.path(), r.path(), r.u32(), r.u32())
    if tag == 5:
        return Link(r.path(), r.path())
    if tag == 6:
        return Unlink(r.path())
    if tag == 7:
        return Rmdir(r.path())
    if tag == 8:
        return Rename(r.path(), r.path(), r.u32())
    if tag == 9:
        return Write(r.path(), r.u64(), r.u64())
    if tag == 10:
        return Truncate(r.path(), r.u64())
    if tag == 11:
        return Fallocate(r.path(), r.u32(), r.u64(), r.u64())
    if tag == 12:
        p = r.path()
        mask = r.u8()
        if mask & ~0x1F:
            raise WireError("unknown SetAttr field bits")
        mode, uid, gid, at, mt = r.u32(), r.u32(), r.u32(), r.i64(), r.i64()
        return SetAttr(
            p,
            mode if mask & 1 else None,
            uid if mask & 2 else None,
            gid if mask & 4 else None,
            at if mask & 8 else None,
            mt if mask & 16 else None,
        )
    if tag == 13:
        return SetXattr(r.path(), r.name(), r.blob(MAX_XATTR_VALUE, "xattr value", wide=True))
    if tag == 14:
        return RemoveXattr(r.path(), r.name())
    raise WireError(f"unknown change kind {tag}")


def decode_change(buf: bytes) -> Change:
    """The inverse of :func:`encode_change`; raises WireError on malformed input."""
    r = _Reader(buf)
    c = _read_change(r)
    r.end()
    return c


# -- entries -----------------------------------------------------------------------------------


def _check_entry(e: Entry) -> None:
    if not 0 <= e.mode <= 0xFFFF:
        raise WireError(f"entry mode {e.mode:#o} out of range")
    _ids(e.uid, e.gid)
    _range(e.size, 0, "entry size")
    if b"\x00" in e.link:
        raise WireError("NUL byte in an entry's link")


def _encode_entry(e: Entry) -> bytes:
    _check_entry(e)
    out = [
        _path_out(e.path),
        _u32(e.mode),
        _u32(e.uid),
        _u32(e.gid),
        _u64(e.size),
        _i64(e.mtime_ns),
        _u64(e.rdev),
        _blob(_check_out(e.target, MAX_PATH, "symlink target")),
        struct.pack(">H", len(e.xattrs)),
    ]
    for name, value in e.xattrs:
        out += [_name_out(name), _blob(_check_out(value, MAX_XATTR_VALUE, "xattr value"), True)]
    out.append(_blob(_check_out(e.link, MAX_PATH, "link")))
    return b"".join(out)


def _read_entry(r: _Reader) -> Entry:
    path = r.path()
    mode, uid, gid = r.u32(), r.u32(), r.u32()
    size, mtime, rdev = r.u64(), r.i64(), r.u64()
    target = r.blob(MAX_PATH, "symlink target")
    n = r.u16()
    xattrs = tuple((r.name(), r.blob(MAX_XATTR_VALUE, "xattr value", wide=True)) for _ in range(n))
    link = r.blob(MAX_PATH, "link")
    e = Entry(path, mode, uid, gid, size, mtime, rdev, target, xattrs, link)
    _check_entry(e)
    return e


def entry_size(e: Entry) -> int:
    """Bytes ``e`` takes in a LIST_REPLY (to split listings into frames)."""
    return len(_encode_entry(e))


# -- frames ------------------------------------------------------------------------------------


def _payload(ev: Event) -> tuple[_T, bytes]:
    match ev:
        case Hello(source, nonce, version):
            if not 0 <= version <= 0xFFFF:
                raise WireError("version out of range")
            if len(nonce) != NONCE_SIZE:
                raise WireError("nonce must be 32 bytes")
            src = _check_out(source, MAX_SOURCE, "source name")
            return _T.HELLO, MAGIC + struct.pack(">H", version) + nonce + _blob(src)
        case Challenge(nonce):
            if len(nonce) != NONCE_SIZE:
                raise WireError("nonce must be 32 bytes")
            return _T.CHALLENGE, nonce
        case Auth(mac):
            return _T.AUTH, _check_mac(mac)
        case AuthOk(mac):
            return _T.AUTH_OK, _check_mac(mac)
        case Op(seq, change):
            return _T.OP, _u64(seq) + encode_change(change)
        case Data(seq, path, offset, length):
            _data_range(offset, length, "DATA")
            return _T.DATA, _u64(seq) + _u64(offset) + _u64(length) + _path_out(path)
        case Ack(seq, durable, failed):
            return _T.ACK, _u64(seq) + bytes([int(durable) | int(failed) << 1])
        case Sync(seq):
            return _T.SYNC, _u64(seq)
        case Error(code, message):
            text = message.encode("utf-8", "replace")[:1024]
            return _T.ERROR, struct.pack(">H", code & 0xFFFF) + _blob(text)
        case List(req):
            return _T.LIST, _u32(req)
        case ListReply(req, entries, done):
            body = b"".join(_encode_entry(e) for e in entries)
            return _T.LIST_REPLY, _u32(req) + bytes([int(done)]) + _u32(len(entries)) + body
        case Checksum(req, path, block_size):
            _block_size(block_size)
            return _T.CHECKSUM, _u32(req) + _u64(block_size) + _path_out(path)
        case ChecksumReply(req, found, size, digests):
            if any(len(d) != 32 for d in digests):
                raise WireError("digests must be 32 bytes")
            _digests(size, len(digests))
            head = _u32(req) + bytes([int(found)]) + _u64(size) + _u32(len(digests))
            return _T.CHECKSUM_REPLY, head + b"".join(digests)
        case Read(req, path, offset, length):
            _data_range(offset, length, "READ")
            return _T.READ, _u32(req) + _u64(offset) + _u64(length) + _path_out(path)
        case Bye():
            return _T.BYE, b""
    raise WireError(f"cannot send {ev!r}")


def _data_range(offset: int, length: int, what: str) -> None:
    if length > MAX_DATA:
        raise WireError(f"{what} of {length} bytes exceeds the limit of {MAX_DATA}")
    _range(offset, length, what)


def _block_size(bs: int) -> None:
    # No minimum beyond 1: ``fusefs verify`` asks for one digest of a whole file, with the file's
    # size as the block size.  The cost is bounded by MAX_CHECKSUM_BLOCKS, which the server
    # checks against the file's size before computing anything.
    if not 1 <= bs <= MAX_OFFSET:
        raise WireError(f"checksum block size {bs} out of range")


def _digests(size: int, n: int) -> None:
    _range(size, 0, "CHECKSUM_REPLY size")
    if n > MAX_CHECKSUM_BLOCKS:
        raise WireError(f"CHECKSUM_REPLY of {n} digests exceeds {MAX_CHECKSUM_BLOCKS}")


def _check_mac(mac: bytes) -> bytes:
    if len(mac) != MAC_SIZE:
        raise WireError("a MAC must be 32 bytes")
    return mac


def _parse(t: int, payload: bytes) -> Event:
    r = _Reader(payload)
    ev: Event
    if t == _T.HELLO:
        if r.take(len(MAGIC)) != MAGIC:
            raise WireError("not a fusefs replication peer (bad magic)", E_VERSION)
        ev = Hello(version=r.u16(), nonce=r.take(NONCE_SIZE), source=r.blob(MAX_SOURCE, "source"))
    elif t == _T.CHALLENGE:
        ev = Challenge(r.take(NONCE_SIZE))
    elif t == _T.AUTH:
        ev = Auth(r.take(MAC_SIZE))
    elif t == _T.AUTH_OK:
        ev = AuthOk(r.take(MAC_SIZE))
    elif t == _T.OP:
        ev = Op(r.u64(), _read_change(r))
    elif t == _T.DATA:
        seq, off, length = r.u64(), r.u64(), r.u64()
        _data_range(off, length, "DATA")
        ev = Data(seq, r.path(), off, length)
    elif t == _T.ACK:
        seq, flags = r.u64(), r.u8()
        if flags & ~3:
            raise WireError("unknown ACK flags")
        ev = Ack(seq, bool(flags & 1), bool(flags & 2))
    elif t == _T.SYNC:
        ev = Sync(r.u64())
    elif t == _T.ERROR:
        code = r.u16()
        ev = Error(code, r.blob(1024, "error message").decode("utf-8", "replace"))
    elif t == _T.LIST:
        ev = List(r.u32())
    elif t == _T.LIST_REPLY:
        req, done, n = r.u32(), r.u8(), r.u32()
        if done > 1:
            raise WireError("bad LIST_REPLY flag")
        if n > len(payload):
            raise WireError("LIST_REPLY claims more entries than it holds")
        ev = ListReply(req, tuple(_read_entry(r) for _ in range(n)), bool(done))
    elif t == _T.CHECKSUM:
        req, bs = r.u32(), r.u64()
        _block_size(bs)
        ev = Checksum(req, r.path(), bs)
    elif t == _T.CHECKSUM_REPLY:
        req, found, size, n = r.u32(), r.u8(), r.u64(), r.u32()
        if found > 1:
            raise WireError("bad CHECKSUM_REPLY flag")
        _digests(size, n)
        if n * 32 > len(payload):
            raise WireError("CHECKSUM_REPLY claims more digests than it holds")
        ev = ChecksumReply(req, bool(found), size, tuple(r.take(32) for _ in range(n)))
    elif t == _T.READ:
        req, off, length = r.u32(), r.u64(), r.u64()
        _data_range(off, length, "READ")
        ev = Read(req, r.path(), off, length)
    elif t == _T.BYE:
        ev = Bye()
    else:
        raise WireError(f"unknown frame type {t}")
    r.end()
    return ev


def encode_frame(ev: Event) -> bytes:
    """One complete frame (header + payload) for ``ev``; no state checks."""
    t, payload = _payload(ev)
    if len(payload) > MAX_FRAME:
        raise WireError(f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME}")
    return _HEADER.pack(len(payload), t) + payload


# -- authentication ----------------------------------------------------------------------------


def client_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, source: bytes) -> bytes:
    """The client's proof that it holds ``key`` (never the key itself)."""
    msg = b"fusefs-replica client\x00" + server_nonce + client_nonce + source
    return hmac.new(key, msg, hashlib.sha256).digest()


def server_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, source: bytes) -> bytes:
    """The server's proof that it holds ``key`` (so a client never talks to an impostor)."""
    msg = b"fusefs-replica server\x00" + client_nonce + server_nonce + source
    return hmac.new(key, msg, hashlib.sha256).digest()


# -- the connection ----------------------------------------------------------------------------

#: What each side may receive once authenticated.
_FROM_CLIENT = (Op, Data, Sync, List, Checksum, Read, Error, Bye)
_FROM_SERVER = (Ack, Data, Error, ListReply, ChecksumReply, Bye)


@dataclass
class Connection:
    """One side of a replication connection: a state machine over bytes.

    Client: ``send(Hello(...))`` (or :meth:`hello`), then on :class:`Challenge` send
    :meth:`auth`; :class:`AuthOk` is verified here (WireError ``E_AUTH`` if the server does not
    know the key).  Server: on :class:`Hello` send :meth:`challenge`; the :class:`Auth` that
    follows is verified here, then send :meth:`auth_ok`.  Until then only handshake frames may
    be sent or received, and frames are capped at :data:`MAX_PREAUTH_FRAME`.
    """

    role: Role
    key: bytes
    source: bytes = b""
    _buf: bytearray = field(default_factory=bytearray)
    _my_nonce: bytes = b""
    _peer_nonce: bytes = b""
    _state: str = "hello"
    #: raw payload bytes of the DATA frame being received that are still to come
    payload_left: int = 0
    _payload_seq: int = 0
    #: raw payload bytes of the DATA frame being sent that the caller still owes
    send_payload_left: int = 0
    closed: bool = False

    # -- handshake helpers -----------------------------------------------------------------

    @property
    def authenticated(self) -> bool:
        return self._state == "open"

    def hello(self, nonce: bytes | None = None) -> bytes:
        """Client: the HELLO frame that opens the connection."""
        return self.send(Hello(self.source, nonce or secrets.token_bytes(NONCE_SIZE)))

    def challenge(self, nonce: bytes | None = None) -> bytes:
        """Server: the CHALLENGE answering the HELLO received."""
        return self.send(Challenge(nonce or secrets.token_bytes(NONCE_SIZE)))

    def auth(self) -> bytes:
        """Client: the AUTH answering the CHALLENGE received."""
        return self.send(Auth(client_mac(self.key, self._peer_nonce, self._my_nonce, self.source)))

    def auth_ok(self) -> bytes:
        """Server: the AUTH_OK once the client's AUTH was verified."""
        return self.send(
            AuthOk(server_mac(self.key, self._my_nonce, self._peer_nonce, self.source))
        )

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the peer (b"" is ignored; EOF is the caller's business)."""
        if self.closed and data:
            raise WireError("data after the connection closed")
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf)

    def payload_received(self, n: int) -> None:
        """The caller moved ``n`` payload bytes itself (splice), bypassing :meth:`receive_data`.

        Only allowed while nothing is buffered (the buffered bytes come first, as DataChunk).
        """
        if self._buf:
            raise WireError("buffered payload bytes must be consumed first")
        if not 0 <= n <= self.payload_left:
            raise WireError("more payload bytes reported than the DATA frame announced")
        self.payload_left -= n

    def next_event(self) -> Event | _NeedData:
        """The next complete event, or :data:`NEED_DATA`."""
        if self._state == "payload":
            if self.payload_left == 0:
                self._state = "open"
                return DataEnd(self._payload_seq)
            if not self._buf:
                return NEED_DATA
            n = min(self.payload_left, len(self._buf))
            chunk = bytes(self._buf[:n])
            del self._buf[:n]
            self.payload_left -= n
            return DataChunk(chunk)
        if self.closed:
            if self._buf:
                raise WireError("data after the peer closed the connection")
            return NEED_DATA
        if len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        length, t = _HEADER.unpack_from(self._buf)
        limit = MAX_FRAME if self._state == "open" else MAX_PREAUTH_FRAME
        if length > limit:
            raise WireError(f"frame of {length} bytes exceeds the limit of {limit}")
        if len(self._buf) < HEADER_SIZE + length:
            return NEED_DATA
        payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        ev = _parse(t, payload)
        self._received(ev)
        return ev

    def _received(self, ev: Event) -> None:
        server = self.role is Role.SERVER
        if isinstance(ev, Error | Bye):
            self.closed = True
            return
        st = self._state
        if server and st == "hello" and isinstance(ev, Hello):
            if ev.version != VERSION:
                raise WireError(f"unsupported protocol version {ev.version}", E_VERSION)
            self._peer_nonce, self.source = ev.nonce, ev.source
            self._state = "challenge"  # we owe a challenge
            return
        if server and st == "auth" and isinstance(ev, Auth):
            want = client_mac(self.key, self._my_nonce, self._peer_nonce, self.source)
            if not hmac.compare_digest(want, ev.mac):
                raise WireError("authentication failed (wrong key)", E_AUTH)
            self._state = "auth_ok"  # we owe AUTH_OK
            return
        if not server and st == "challenge" and isinstance(ev, Challenge):
            self._peer_nonce = ev.nonce
            self._state = "auth"  # we owe AUTH
            return
        if not server and st == "auth_ok" and isinstance(ev, AuthOk):
            want = server_mac(self.key, self._peer_nonce, self._my_nonce, self.source)
            if not hmac.compare_digest(want, ev.mac):
                raise WireError("the server does not know the key", E_AUTH)
            self._state = "open"
            return
        if st == "open" and isinstance(ev, _FROM_CLIENT if server else _FROM_SERVER):
            if isinstance(ev, Data):
                self._payload_seq = ev.seq
                self.payload_left = ev.length
                self._state = "payload"
            return
        if st == "open":
            raise WireError(f"unexpected {type(ev).__name__} frame")
        raise WireError(f"unexpected {type(ev).__name__} frame during the handshake", E_AUTH)

    # -- sending ---------------------------------------------------------------------------

    def send(self, ev: Event) -> bytes:
        """The bytes for ``ev``; after a :class:`Data`, the caller owes ``length`` raw bytes."""
        if self.send_payload_left:
            raise WireError("the previous DATA payload was not sent yet")
        data = encode_frame(ev)
        server = self.role is Role.SERVER
        st = self._state
        if isinstance(ev, Error | Bye):
            pass
        elif not server and isinstance(ev, Hello) and not self._my_nonce:
            self._my_nonce = ev.nonce
            self.source = ev.source
            self._state = "challenge"
        elif server and isinstance(ev, Challenge) and st == "challenge":
            self._my_nonce = ev.nonce
            self._state = "auth"
        elif not server and isinstance(ev, Auth) and st == "auth":
            self._state = "auth_ok"
        elif server and isinstance(ev, AuthOk) and st == "auth_ok":
            self._state = "open"
        elif self._state in ("open", "payload") and isinstance(
            ev, _FROM_SERVER if server else _FROM_CLIENT
        ):
            if isinstance(ev, Data):
                self.send_payload_left = ev.length
        else:
            raise WireError(f"cannot send {type(ev).__name__} now (state {st})")
        return data

    def payload_sent(self, n: int) -> None:
        """The caller sent ``n`` raw bytes of the current DATA payload (e.g. with sendfile)."""
        if not 0 <= n <= self.send_payload_left:
            raise WireError("more payload bytes sent than the DATA frame announced")
        self.send_payload_left -= n
