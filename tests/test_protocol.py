"""Request decoding and reply encoding against hand-packed kernel layouts.

The bodies here are packed with literal struct formats written from fuse_kernel.h, not with the
codec's own Structs, so a wrong field order in abi.py shows up as a failure here.
"""

from __future__ import annotations

import errno
import os
import struct
import timeit

import pytest

from fusefs.protocol import abi
from fusefs.protocol import replies as rp
from fusefs.protocol import requests as rq
from fusefs.protocol.abi import Opcode
from fusefs.protocol.errors import ProtocolError

UNIQUE, NODEID, UID, GID, PID = 0x1122334455, 0x77, 1000, 100, 4242
HDR = (UNIQUE, None, NODEID, UID, GID, PID)


def req(op: int, body: bytes = b"", *, unique: int = UNIQUE, nodeid: int = NODEID,
        extlen: int = 0, ext: bytes = b"") -> bytes:  # fmt: skip
    """A request as the kernel writes it: fuse_in_header then the body (then extensions)."""
    total = 40 + len(body) + len(ext)
    return struct.pack("<IIQQIIIHH", total, op, unique, nodeid, UID, GID, PID, extlen, 0) + (
        body + ext
    )


def check_header(r: object, op: int) -> None:
    assert isinstance(r, tuple)
    unique, opcode, nodeid, uid, gid, pid = r[:6]
    assert (unique, opcode, nodeid, uid, gid, pid) == (UNIQUE, op, NODEID, UID, GID, PID)
    assert type(opcode) is Opcode


def decode_all_ways(buf: bytes, **kw: bool) -> rq.Request:
    """Decode bytes, bytearray and memoryview input; all must agree."""
    a = rq.decode_request(buf, **kw)
    b = rq.decode_request(bytearray(buf), **kw)
    c = rq.decode_request(memoryview(buf), **kw)
    assert _plain(a) == _plain(b) == _plain(c)
    return a


def _plain(r: tuple) -> tuple:
    return tuple(bytes(x) if isinstance(x, memoryview) else x for x in r)


# --- Header -------------------------------------------------------------------------------------


def test_decode_header_peeks_without_body_checks() -> None:
    buf = req(Opcode.WRITE, b"\0" * 10)  # far too short a WRITE body
    h = rq.decode_header(buf[:40])
    assert h == rq.InHeader(50, 16, UNIQUE, NODEID, UID, GID, PID, 0)
    with pytest.raises(ProtocolError):
        rq.decode_header(buf[:39])


# --- Every request type -------------------------------------------------------------------------


def test_lookup() -> None:
    r = decode_all_ways(req(Opcode.LOOKUP, b"hello.txt\0"))
    assert isinstance(r, rq.Lookup)
    check_header(r, Opcode.LOOKUP)
    assert r.name == b"hello.txt"


def test_names_are_arbitrary_bytes() -> None:
    name = bytes(range(1, 256))
    r = rq.decode_request(req(Opcode.UNLINK, name + b"\0"))
    assert isinstance(r, rq.Unlink) and r.name == name


def test_forget_and_batch_forget() -> None:
    r = decode_all_ways(req(Opcode.FORGET, struct.pack("<Q", 5)))
    assert isinstance(r, rq.Forget) and r.nlookup == 5
    check_header(r, Opcode.FORGET)
    items = [(10, 1), (11, 2), (2**64 - 1, 3)]
    body = struct.pack("<II", len(items), 0) + b"".join(struct.pack("<QQ", *i) for i in items)
    r = decode_all_ways(req(Opcode.BATCH_FORGET, body))
    assert isinstance(r, rq.BatchForget) and r.items == tuple(items)
    r = rq.decode_request(req(Opcode.BATCH_FORGET, struct.pack("<II", 0, 0)))
    assert isinstance(r, rq.BatchForget) and r.items == ()
    with pytest.raises(ProtocolError, match="count"):
        rq.decode_request(req(Opcode.BATCH_FORGET, body[:-1]))
    with pytest.raises(ProtocolError, match="count"):
        rq.decode_request(req(Opcode.BATCH_FORGET, struct.pack("<II", 4, 0) + body[8:]))


def test_getattr() -> None:
    r = decode_all_ways(req(Opcode.GETATTR, struct.pack("<IIQ", abi.FUSE_GETATTR_FH, 0, 99)))
    assert isinstance(r, rq.Getattr)
    check_header(r, Opcode.GETATTR)
    assert (r.flags, r.fh) == (abi.FUSE_GETATTR_FH, 99)


def test_setattr() -> None:
    valid = abi.FATTR_MODE | abi.FATTR_SIZE | abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_CTIME
    body = struct.pack(
        "<IIQQQqqqIIIIIIII",
        valid, 0, 7, 12345, 0xABC,  # valid padding fh size lock_owner
        1_700_000_000, -2, 3,  # atime mtime ctime (seconds)
        5, 999_999_999, 0,  # nsecs
        0o100644, 0, 501, 20, 0,  # mode unused4 uid gid unused5
    )  # fmt: skip
    r = decode_all_ways(req(Opcode.SETATTR, body))
    assert isinstance(r, rq.Setattr)
    check_header(r, Opcode.SETATTR)
    assert r.valid == valid and r.fh == 7 and r.size == 12345 and r.lock_owner == 0xABC
    assert r.atime_ns == 1_700_000_000_000_000_005
    assert r.mtime_ns == -2_000_000_000 + 999_999_999
    assert r.ctime_ns == 3_000_000_000
    assert (r.mode, r.new_uid, r.new_gid) == (0o100644, 501, 20)


def test_readlink_statfs_destroy_have_no_body() -> None:
    for op, cls in [(Opcode.READLINK, rq.Readlink), (Opcode.STATFS, rq.Statfs),
                    (Opcode.DESTROY, rq.Destroy)]:  # fmt: skip
        r = decode_all_ways(req(op))
        assert isinstance(r, cls)
        check_header(r, op)
        with pytest.raises(ProtocolError):
            rq.decode_request(req(op, b"\0" * 8))


def test_symlink() -> None:
    r = decode_all_ways(req(Opcode.SYMLINK, b"link\0../target/x\0"))
    assert isinstance(r, rq.Symlink)
    check_header(r, Opcode.SYMLINK)
    assert (r.name, r.target) == (b"link", b"../target/x")


def test_mknod() -> None:
    body = struct.pack("<IIII", 0o020600, 0x0801, 0o022, 0) + b"dev\0"
    r = decode_all_ways(req(Opcode.MKNOD, body))
    assert isinstance(r, rq.Mknod)
    check_header(r, Opcode.MKNOD)
    assert (r.name, r.mode, r.rdev, r.umask) == (b"dev", 0o020600, 0x0801, 0o022)


def test_mkdir() -> None:
    r = decode_all_ways(req(Opcode.MKDIR, struct.pack("<II", 0o755, 0o027) + b"sub\0"))
    assert isinstance(r, rq.Mkdir)
    check_header(r, Opcode.MKDIR)
    assert (r.name, r.mode, r.umask) == (b"sub", 0o755, 0o027)


def test_unlink_rmdir_removexattr() -> None:
    for op, cls in [(Opcode.UNLINK, rq.Unlink), (Opcode.RMDIR, rq.Rmdir),
                    (Opcode.REMOVEXATTR, rq.Removexattr)]:  # fmt: skip
        r = decode_all_ways(req(op, b"victim\0"))
        assert isinstance(r, cls) and r.name == b"victim"  # type: ignore[union-attr]
        check_header(r, op)


def test_rename_and_rename2_both_decode_to_rename() -> None:
    r = decode_all_ways(req(Opcode.RENAME, struct.pack("<Q", 9) + b"old\0new\0"))
    assert isinstance(r, rq.Rename)
    check_header(r, Opcode.RENAME)
    assert (r.newdir, r.name, r.newname, r.flags) == (9, b"old", b"new", 0)
    body = struct.pack("<QII", 9, 1, 0) + b"old\0new\0"  # RENAME_NOREPLACE
    r = decode_all_ways(req(Opcode.RENAME2, body))
    assert isinstance(r, rq.Rename)
    check_header(r, Opcode.RENAME2)
    assert (r.newdir, r.name, r.newname, r.flags) == (9, b"old", b"new", 1)


def test_link() -> None:
    r = decode_all_ways(req(Opcode.LINK, struct.pack("<Q", 42) + b"hard\0"))
    assert isinstance(r, rq.Link)
    check_header(r, Opcode.LINK)
    assert (r.oldnodeid, r.newname) == (42, b"hard")


def test_open_and_opendir() -> None:
    flags = os.O_RDWR | os.O_TRUNC
    for op, cls in [(Opcode.OPEN, rq.Open), (Opcode.OPENDIR, rq.Opendir)]:
        r = decode_all_ways(req(op, struct.pack("<II", flags, abi.FUSE_OPEN_KILL_SUIDGID)))
        assert isinstance(r, cls)
        check_header(r, op)
        assert (r.flags, r.open_flags) == (flags, abi.FUSE_OPEN_KILL_SUIDGID)  # type: ignore[union-attr]


def test_read_readdir_readdirplus() -> None:
    body = struct.pack("<QQIIQII", 5, 1 << 40, 131072, abi.FUSE_READ_LOCKOWNER, 77, os.O_RDONLY, 0)
    r = decode_all_ways(req(Opcode.READ, body))
    assert isinstance(r, rq.Read)
    check_header(r, Opcode.READ)
    assert (r.fh, r.offset, r.size, r.read_flags, r.lock_owner, r.flags) == (
        5, 1 << 40, 131072, abi.FUSE_READ_LOCKOWNER, 77, os.O_RDONLY,
    )  # fmt: skip
    for op, cls in [(Opcode.READDIR, rq.Readdir), (Opcode.READDIRPLUS, rq.Readdirplus)]:
        r2 = decode_all_ways(req(op, body))
        assert isinstance(r2, cls)
        check_header(r2, op)
        assert (r2.fh, r2.offset, r2.size) == (5, 1 << 40, 131072)  # type: ignore[union-attr]


def test_write_data_is_a_zero_copy_view() -> None:
    payload = bytes(range(256)) * 16
    body = struct.pack("<QQIIQII", 3, 8192, len(payload), abi.FUSE_WRITE_CACHE, 5, 2, 0)
    buf = bytearray(req(Opcode.WRITE, body + payload))
    r = rq.decode_request(buf)
    assert isinstance(r, rq.Write)
    check_header(r, Opcode.WRITE)
    assert (r.fh, r.offset, r.size, r.write_flags, r.lock_owner, r.flags) == (
        3, 8192, len(payload), abi.FUSE_WRITE_CACHE, 5, 2,
    )  # fmt: skip
    assert isinstance(r.data, memoryview) and r.data == payload
    buf[80] = 0xFF  # the view aliases the input buffer
    assert r.data[0] == 0xFF
    with pytest.raises(ProtocolError, match="size"):
        rq.decode_request(req(Opcode.WRITE, body + payload[:-1]))
    with pytest.raises(ProtocolError, match="size"):
        rq.decode_request(req(Opcode.WRITE, body + payload + b"x"))


def test_write_prefix_for_spliced_requests() -> None:
    body = struct.pack("<QQIIQII", 3, 8192, 5, 0, 0, 0o2, 0)
    full = req(Opcode.WRITE, body + b"abcde")
    pre = rq.decode_write_prefix(full[: rq.WRITE_PREFIX_SIZE])
    assert pre.header.len == 85 and pre.header.opcode == Opcode.WRITE
    assert (pre.fh, pre.offset, pre.size, pre.write_flags, pre.lock_owner, pre.flags) == (
        3, 8192, 5, 0, 0, 0o2,
    )  # fmt: skip
    w = rq.write_from_prefix(pre, b"abcde")
    assert _plain(w) == _plain(rq.decode_request(full))
    with pytest.raises(ProtocolError):
        rq.write_from_prefix(pre, b"abcd")
    with pytest.raises(ProtocolError):
        rq.decode_write_prefix(full[:79])
    with pytest.raises(ProtocolError, match="not WRITE"):
        rq.decode_write_prefix(req(Opcode.READ, struct.pack("<QQIIQII", 0, 0, 5, 0, 0, 0, 0)))
    lying = struct.pack("<IIQQIIIHH", 90, Opcode.WRITE, 1, 1, 0, 0, 0, 0, 0) + body
    with pytest.raises(ProtocolError, match="size"):
        rq.decode_write_prefix(lying)


def test_release_releasedir() -> None:
    body = struct.pack("<QIIQ", 12, os.O_WRONLY, abi.FUSE_RELEASE_FLUSH, 0xDEAD)
    for op, cls in [(Opcode.RELEASE, rq.Release), (Opcode.RELEASEDIR, rq.Releasedir)]:
        r = decode_all_ways(req(op, body))
        assert isinstance(r, cls)
        check_header(r, op)
        assert (r.fh, r.flags, r.release_flags, r.lock_owner) == (  # type: ignore[union-attr]
            12, os.O_WRONLY, abi.FUSE_RELEASE_FLUSH, 0xDEAD,
        )  # fmt: skip


def test_fsync_fsyncdir() -> None:
    body = struct.pack("<QII", 12, abi.FUSE_FSYNC_FDATASYNC, 0)
    for op, cls in [(Opcode.FSYNC, rq.Fsync), (Opcode.FSYNCDIR, rq.Fsyncdir)]:
        r = decode_all_ways(req(op, body))
        assert isinstance(r, cls)
        check_header(r, op)
        assert (r.fh, r.fsync_flags) == (12, abi.FUSE_FSYNC_FDATASYNC)  # type: ignore[union-attr]


def test_setxattr_compat_and_ext() -> None:
    value = b"\0binary\0value"
    body = struct.pack("<II", len(value), 1) + b"user.k\0" + value
    r = decode_all_ways(req(Opcode.SETXATTR, body))
    assert isinstance(r, rq.Setxattr)
    check_header(r, Opcode.SETXATTR)
    assert (r.name, r.value, r.flags, r.setxattr_flags) == (b"user.k", value, 1, 0)
    body = struct.pack("<IIII", len(value), 2, abi.FUSE_SETXATTR_ACL_KILL_SGID, 0)
    body += b"user.k\0" + value
    r = decode_all_ways(req(Opcode.SETXATTR, body), setxattr_ext=True)
    assert isinstance(r, rq.Setxattr)
    assert (r.name, r.value, r.flags, r.setxattr_flags) == (
        b"user.k", value, 2, abi.FUSE_SETXATTR_ACL_KILL_SGID,
    )  # fmt: skip
    with pytest.raises(ProtocolError, match="size"):
        rq.decode_request(req(Opcode.SETXATTR, struct.pack("<II", 99, 0) + b"user.k\0v"))
    with pytest.raises(ProtocolError, match="NUL"):
        rq.decode_request(req(Opcode.SETXATTR, struct.pack("<II", 0, 0) + b"user.k"))


def test_getxattr_listxattr() -> None:
    r = decode_all_ways(req(Opcode.GETXATTR, struct.pack("<II", 0, 0) + b"user.k\0"))
    assert isinstance(r, rq.Getxattr)
    check_header(r, Opcode.GETXATTR)
    assert (r.name, r.size) == (b"user.k", 0)
    r2 = decode_all_ways(req(Opcode.LISTXATTR, struct.pack("<II", 4096, 0)))
    assert isinstance(r2, rq.Listxattr) and r2.size == 4096
    check_header(r2, Opcode.LISTXATTR)


def test_flush() -> None:
    r = decode_all_ways(req(Opcode.FLUSH, struct.pack("<QIIQ", 8, 0, 0, 0x1234)))
    assert isinstance(r, rq.Flush)
    check_header(r, Opcode.FLUSH)
    assert (r.fh, r.lock_owner) == (8, 0x1234)


def test_init_modern_with_flags2() -> None:
    flags = abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES
    body = struct.pack("<IIIII44x", 7, 45, 131072, flags, (abi.FUSE_PASSTHROUGH >> 32))
    r = decode_all_ways(req(Opcode.INIT, body))
    assert isinstance(r, rq.Init)
    check_header(r, Opcode.INIT)
    assert (r.major, r.minor, r.max_readahead) == (7, 45, 131072)
    assert r.flags == flags | abi.FUSE_PASSTHROUGH


def test_init_flags2_ignored_without_init_ext() -> None:
    body = struct.pack("<IIIII44x", 7, 45, 4096, abi.FUSE_ASYNC_READ, 0xFFFF)
    r = rq.decode_request(req(Opcode.INIT, body))
    assert isinstance(r, rq.Init) and r.flags == abi.FUSE_ASYNC_READ


def test_init_old_16_byte_body_and_future_major() -> None:
    r = rq.decode_request(req(Opcode.INIT, struct.pack("<IIII", 7, 31, 65536, 3)))
    assert isinstance(r, rq.Init) and (r.major, r.minor, r.max_readahead, r.flags) == (
        7, 31, 65536, 3,
    )  # fmt: skip
    r = rq.decode_request(req(Opcode.INIT, struct.pack("<II", 8, 0)))
    assert isinstance(r, rq.Init) and (r.major, r.minor, r.max_readahead, r.flags) == (8, 0, 0, 0)
    with pytest.raises(ProtocolError):
        rq.decode_request(req(Opcode.INIT, struct.pack("<II", 7, 31)))
    with pytest.raises(ProtocolError):
        rq.decode_request(req(Opcode.INIT, b"\7\0\0"))


def test_locks() -> None:
    body = struct.pack("<QQQQIIII", 4, 0xFEED, 0, 2**63 - 1, 1, 777, abi.FUSE_LK_FLOCK, 0)
    for op, cls in [(Opcode.GETLK, rq.Getlk), (Opcode.SETLK, rq.Setlk),
                    (Opcode.SETLKW, rq.Setlkw)]:  # fmt: skip
        r = decode_all_ways(req(op, body))
        assert isinstance(r, cls)
        check_header(r, op)
        assert tuple(r[6:]) == (4, 0xFEED, 0, 2**63 - 1, 1, 777, abi.FUSE_LK_FLOCK)
        assert r.lk_pid == 777  # type: ignore[union-attr]


def test_access() -> None:
    r = decode_all_ways(req(Opcode.ACCESS, struct.pack("<II", os.R_OK | os.X_OK, 0)))
    assert isinstance(r, rq.Access) and r.mask == os.R_OK | os.X_OK
    check_header(r, Opcode.ACCESS)


def test_create_and_tmpfile() -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    body = struct.pack("<IIII", flags, 0o100600, 0o022, 0) + b"new.txt\0"
    for op, cls in [(Opcode.CREATE, rq.Create), (Opcode.TMPFILE, rq.Tmpfile)]:
        r = decode_all_ways(req(op, body))
        assert isinstance(r, cls)
        check_header(r, op)
        assert (r.name, r.flags, r.mode, r.umask, r.open_flags) == (  # type: ignore[union-attr]
            b"new.txt", flags, 0o100600, 0o022, 0,
        )  # fmt: skip


def test_create_skips_trailing_extensions() -> None:
    """Security-context / supp-group extensions trail the body; total_extlen counts 8-byte units."""
    ext = struct.pack("<II", 16, 32) + struct.pack("<II", 1, 1234)  # fuse_ext_header + 1 group
    body = struct.pack("<IIII", 0, 0o100600, 0, 0) + b"f\0"
    r = rq.decode_request(req(Opcode.CREATE, body, extlen=len(ext) // 8, ext=ext))
    assert isinstance(r, rq.Create) and r.name == b"f"
    with pytest.raises(ProtocolError, match="extension"):
        rq.decode_request(req(Opcode.CREATE, body, extlen=100))


def test_interrupt() -> None:
    r = decode_all_ways(req(Opcode.INTERRUPT, struct.pack("<Q", 0xABCDEF), nodeid=NODEID))
    assert isinstance(r, rq.Interrupt) and r.target_unique == 0xABCDEF
    check_header(r, Opcode.INTERRUPT)


def test_bmap() -> None:
    r = decode_all_ways(req(Opcode.BMAP, struct.pack("<QII", 100, 4096, 0)))
    assert isinstance(r, rq.Bmap) and (r.block, r.blocksize) == (100, 4096)
    check_header(r, Opcode.BMAP)


def test_ioctl() -> None:
    body = struct.pack("<QIIQII", 3, abi.FUSE_IOCTL_UNRESTRICTED, 0x5401, 0x7FFF0000, 4, 8)
    r = decode_all_ways(req(Opcode.IOCTL, body + b"abcd"))
    assert isinstance(r, rq.Ioctl)
    check_header(r, Opcode.IOCTL)
    assert tuple(r[6:12]) == (3, abi.FUSE_IOCTL_UNRESTRICTED, 0x5401, 0x7FFF0000, 4, 8)
    assert r.data == b"abcd"


def test_poll() -> None:
    body = struct.pack("<QQII", 3, 9, abi.FUSE_POLL_SCHEDULE_NOTIFY, 0x1 | 0x4)
    r = decode_all_ways(req(Opcode.POLL, body))
    assert isinstance(r, rq.Poll)
    check_header(r, Opcode.POLL)
    assert (r.fh, r.kh, r.flags, r.events) == (3, 9, abi.FUSE_POLL_SCHEDULE_NOTIFY, 5)


def test_notify_reply() -> None:
    body = struct.pack("<QQIIQQ", 0, 4096, 3, 0, 0, 0) + b"xyz"
    r = decode_all_ways(req(Opcode.NOTIFY_REPLY, body))
    assert isinstance(r, rq.NotifyReply)
    check_header(r, Opcode.NOTIFY_REPLY)
    assert (r.offset, r.size, bytes(r.data)) == (4096, 3, b"xyz")
    with pytest.raises(ProtocolError):
        rq.decode_request(req(Opcode.NOTIFY_REPLY, body[:-1]))


def test_fallocate() -> None:
    body = struct.pack("<QQQII", 3, 4096, 1 << 20, 0x01, 0)  # FALLOC_FL_KEEP_SIZE
    r = decode_all_ways(req(Opcode.FALLOCATE, body))
    assert isinstance(r, rq.Fallocate)
    check_header(r, Opcode.FALLOCATE)
    assert (r.fh, r.offset, r.length, r.mode) == (3, 4096, 1 << 20, 1)


def test_lseek() -> None:
    r = decode_all_ways(req(Opcode.LSEEK, struct.pack("<QqII", 3, 12345, os.SEEK_HOLE, 0)))
    assert isinstance(r, rq.Lseek)
    check_header(r, Opcode.LSEEK)
    assert (r.fh, r.offset, r.whence) == (3, 12345, os.SEEK_HOLE)


def test_copy_file_range_both_opcodes() -> None:
    body = struct.pack("<QQQQQQQ", 1, 100, 55, 2, 200, 4096, 0)
    for op in (Opcode.COPY_FILE_RANGE, Opcode.COPY_FILE_RANGE_64):
        r = decode_all_ways(req(op, body))
        assert isinstance(r, rq.CopyFileRange)
        check_header(r, op)
        assert (r.fh_in, r.off_in, r.nodeid_out, r.fh_out, r.off_out, r.length, r.flags) == (
            1, 100, 55, 2, 200, 4096, 0,
        )  # fmt: skip


def test_syncfs() -> None:
    r = decode_all_ways(req(Opcode.SYNCFS, struct.pack("<Q", 0)))
    assert isinstance(r, rq.Syncfs)
    check_header(r, Opcode.SYNCFS)


@pytest.mark.parametrize("op", [Opcode.STATX, Opcode.SETUPMAPPING, 999, 0, 2**32 - 1])
def test_unknown_opcodes(op: int) -> None:
    r = rq.decode_request(req(op, b"whatever body"))
    assert isinstance(r, rq.Unknown)
    assert r.opcode == op and r.unique == UNIQUE and r.nodeid == NODEID


def test_every_decoded_opcode_has_a_test_above() -> None:
    """Guard: a new entry in the dispatch table needs a round-trip test in this file."""
    tested = {
        Opcode.LOOKUP, Opcode.FORGET, Opcode.GETATTR, Opcode.SETATTR, Opcode.READLINK,
        Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME,
        Opcode.LINK, Opcode.OPEN, Opcode.READ, Opcode.WRITE, Opcode.STATFS, Opcode.RELEASE,
        Opcode.FSYNC, Opcode.SETXATTR, Opcode.GETXATTR, Opcode.LISTXATTR, Opcode.REMOVEXATTR,
        Opcode.FLUSH, Opcode.INIT, Opcode.OPENDIR, Opcode.READDIR, Opcode.RELEASEDIR,
        Opcode.FSYNCDIR, Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW, Opcode.ACCESS, Opcode.CREATE,
        Opcode.INTERRUPT, Opcode.BMAP, Opcode.DESTROY, Opcode.IOCTL, Opcode.POLL,
        Opcode.NOTIFY_REPLY, Opcode.BATCH_FORGET, Opcode.FALLOCATE, Opcode.READDIRPLUS,
        Opcode.RENAME2, Opcode.LSEEK, Opcode.COPY_FILE_RANGE, Opcode.SYNCFS, Opcode.TMPFILE,
        Opcode.COPY_FILE_RANGE_64,
    }  # fmt: skip
    assert set(rq._DECODERS) == tested


def test_requests_are_immutable_and_distinct_by_opcode() -> None:
    a = rq.decode_request(req(Opcode.UNLINK, b"x\0"))
    b = rq.decode_request(req(Opcode.RMDIR, b"x\0"))
    assert a != b
    with pytest.raises(AttributeError):
        a.name = b"y"  # type: ignore[misc]


# --- Malformed input ------------------------------------------------------------------------


FIXED_BODIES = {
    Opcode.FORGET: 8, Opcode.GETATTR: 16, Opcode.SETATTR: 88, Opcode.OPEN: 8, Opcode.READ: 40,
    Opcode.RELEASE: 24, Opcode.FSYNC: 16, Opcode.LISTXATTR: 8, Opcode.FLUSH: 24,
    Opcode.OPENDIR: 8, Opcode.READDIR: 40, Opcode.RELEASEDIR: 24, Opcode.FSYNCDIR: 16,
    Opcode.GETLK: 48, Opcode.SETLK: 48, Opcode.SETLKW: 48, Opcode.ACCESS: 8, Opcode.INTERRUPT: 8,
    Opcode.BMAP: 16, Opcode.POLL: 24, Opcode.FALLOCATE: 32, Opcode.READDIRPLUS: 40,
    Opcode.LSEEK: 24, Opcode.COPY_FILE_RANGE: 56, Opcode.SYNCFS: 8,
}  # fmt: skip


@pytest.mark.parametrize("op,size", sorted(FIXED_BODIES.items()))
def test_fixed_bodies_must_have_exact_size(op: int, size: int) -> None:
    assert isinstance(rq.decode_request(req(op, b"\0" * size)), tuple)
    with pytest.raises(ProtocolError):
        rq.decode_request(req(op, b"\0" * (size - 1)))
    with pytest.raises(ProtocolError):
        rq.decode_request(req(op, b"\0" * (size + 8)))
    with pytest.raises(ProtocolError):
        rq.decode_request(req(op))


@pytest.mark.parametrize(
    "op,fixed",
    [(Opcode.LOOKUP, b""), (Opcode.UNLINK, b""), (Opcode.MKDIR, b"\0" * 8),
     (Opcode.MKNOD, b"\0" * 16), (Opcode.CREATE, b"\0" * 16), (Opcode.LINK, b"\0" * 8),
     (Opcode.GETXATTR, b"\0" * 8)],
)  # fmt: skip
def test_bad_single_names(op: int, fixed: bytes) -> None:
    assert isinstance(rq.decode_request(req(op, fixed + b"ok\0")), tuple)
    for bad in (b"", b"no-terminator", b"two\0names\0", b"trailing\0junk"):
        with pytest.raises(ProtocolError):
            rq.decode_request(req(op, fixed + bad))
    if fixed:  # the fixed struct itself truncated
        with pytest.raises(ProtocolError):
            rq.decode_request(req(op, fixed[:-1]))


@pytest.mark.parametrize(
    "op,fixed",
    [(Opcode.SYMLINK, b""), (Opcode.RENAME, b"\0" * 8), (Opcode.RENAME2, b"\0" * 16)],
)
def test_bad_name_pairs(op: int, fixed: bytes) -> None:
    assert isinstance(rq.decode_request(req(op, fixed + b"a\0b\0")), tuple)
    for bad in (b"", b"a", b"a\0", b"a\0b", b"a\0b\0c", b"a\0b\0c\0", b"\0"):
        with pytest.raises(ProtocolError):
            rq.decode_request(req(op, fixed + bad))


def test_length_must_match_header() -> None:
    good = req(Opcode.LOOKUP, b"x\0")
    rq.decode_request(good)
    with pytest.raises(ProtocolError, match="header says"):
        rq.decode_request(good + b"\0")  # oversized
    with pytest.raises(ProtocolError, match="header says"):
        rq.decode_request(good[:-1])  # truncated
    with pytest.raises(ProtocolError, match="shorter"):
        rq.decode_request(good[:20])
    with pytest.raises(ProtocolError):
        rq.decode_request(b"")


def test_protocol_error_is_its_own_class() -> None:
    assert issubclass(ProtocolError, Exception)
    assert not issubclass(ProtocolError, (ValueError, struct.error, IndexError))


# --- Replies ---------------------------------------------------------------------------------

ATTR = rp.Attr(
    ino=0x10, size=0x20, blocks=0x30,
    atime_ns=1_700_000_000_123_456_789, mtime_ns=-1, ctime_ns=5,
    mode=0o100644, nlink=2, uid=501, gid=20, rdev=0x1234_0801, blksize=4096,
)  # fmt: skip
ATTR_BYTES = struct.pack(
    "<QQQqqqIIIIIIIIII",
    0x10, 0x20, 0x30, 1_700_000_000, -1, 0,
    123_456_789, 999_999_999, 5,
    0o100644, 2, 501, 20, 0x1234_0801, 4096, 0,
)  # fmt: skip


def out(length: int, error: int = 0, unique: int = UNIQUE) -> bytes:
    return struct.pack("<IiQ", length, error, unique)


def test_pack_attr() -> None:
    assert rp.pack_attr(ATTR) == ATTR_BYTES
    assert len(ATTR_BYTES) == abi.ATTR_SIZE


def test_pack_attr_truncates_rdev_to_32_bits() -> None:
    big = ATTR._replace(rdev=(1 << 40) | 0x0801)
    assert rp.pack_attr(big)[76:80] == struct.pack("<I", 0x0801)


def test_attr_from_stat() -> None:
    st = os.stat(__file__)
    a = rp.attr_from_stat(st)
    assert (a.ino, a.size, a.mode, a.mtime_ns, a.nlink) == (
        st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_nlink,
    )  # fmt: skip
    assert rp.attr_from_stat(st, ino=99).ino == 99


def test_reply_error_and_empty() -> None:
    assert rp.reply_error(UNIQUE, errno.ENOENT) == out(16, -errno.ENOENT)
    assert rp.reply_empty(UNIQUE) == out(16)
    for bad in (0, -2, 512):
        with pytest.raises(ValueError):
            rp.reply_error(UNIQUE, bad)


def test_reply_data_and_read_header() -> None:
    assert rp.reply_data(UNIQUE, b"hello") == out(21) + b"hello"
    assert rp.reply_data(UNIQUE, memoryview(b"hello")) == out(21) + b"hello"
    assert rp.reply_data(UNIQUE, b"") == out(16)
    assert rp.read_reply_header(UNIQUE, 1 << 20) == out(16 + (1 << 20))


def test_split_timeout() -> None:
    assert rp.split_timeout(1.5) == (1, 500_000_000)
    assert rp.split_timeout(0) == (0, 0)
    assert rp.split_timeout(-3.0) == (0, 0)
    assert rp.split_timeout(float("nan")) == (0, 0)
    assert rp.split_timeout(2) == (2, 0)
    sec, nsec = rp.split_timeout(float("inf"))
    assert sec > 10**9 and nsec == 0
    assert rp.split_timeout(0.999_999_999_9)[1] <= 999_999_999


def test_reply_entry() -> None:
    got = rp.reply_entry(UNIQUE, 0x77, 3, 1.25, 2.5, ATTR)
    body = struct.pack("<QQQQII", 0x77, 3, 1, 2, 250_000_000, 500_000_000) + ATTR_BYTES
    assert got == out(16 + 128) + body
    assert len(body) == abi.ENTRY_OUT_SIZE


def test_reply_attr() -> None:
    got = rp.reply_attr(UNIQUE, 0.5, ATTR)
    assert got == out(16 + 104) + struct.pack("<QII", 0, 500_000_000, 0) + ATTR_BYTES


def test_reply_open_with_backing_id() -> None:
    assert rp.reply_open(UNIQUE, 9, abi.FOPEN_PASSTHROUGH, 3) == out(32) + struct.pack(
        "<QIi", 9, abi.FOPEN_PASSTHROUGH, 3
    )
    assert rp.reply_open(UNIQUE, 9) == out(32) + struct.pack("<QIi", 9, 0, 0)


def test_reply_create() -> None:
    got = rp.reply_create(UNIQUE, 0x77, 0, 1.0, 1.0, ATTR, 5, abi.FOPEN_KEEP_CACHE, 2)
    entry = struct.pack("<QQQQII", 0x77, 0, 1, 1, 0, 0) + ATTR_BYTES
    assert got == out(16 + 128 + 16) + entry + struct.pack("<QIi", 5, abi.FOPEN_KEEP_CACHE, 2)


def test_small_replies() -> None:
    assert rp.reply_write(UNIQUE, 4096) == out(24) + struct.pack("<II", 4096, 0)
    assert rp.reply_xattr_size(UNIQUE, 77) == out(24) + struct.pack("<II", 77, 0)
    assert rp.reply_lseek(UNIQUE, 1 << 33) == out(24) + struct.pack("<q", 1 << 33)
    assert rp.reply_bmap(UNIQUE, 12) == out(24) + struct.pack("<Q", 12)
    assert rp.reply_poll(UNIQUE, 5) == out(24) + struct.pack("<II", 5, 0)
    assert rp.reply_copy_file_range_64(UNIQUE, 1 << 40) == out(24) + struct.pack("<Q", 1 << 40)
    assert rp.reply_lk(UNIQUE, 0, 99, 1, 42) == out(40) + struct.pack("<QQII", 0, 99, 1, 42)


def test_reply_statfs() -> None:
    got = rp.reply_statfs(UNIQUE, 1000, 500, 400, 100, 50, 4096, 255, 4096)
    body = struct.pack("<QQQQQIIII", 1000, 500, 400, 100, 50, 4096, 255, 4096, 0) + bytes(24)
    assert got == out(16 + 80) + body


def test_reply_init_full_and_compat() -> None:
    init = rp.InitReply(
        major=7, minor=41, max_readahead=131072,
        flags=abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_PASSTHROUGH,
        max_background=64, congestion_threshold=48, max_write=1 << 20, time_gran=1,
        max_pages=256, map_alignment=0, max_stack_depth=1, request_timeout=0,
    )  # fmt: skip
    body = struct.pack(
        "<IIIIHHIIHHIIH22x",
        7, 41, 131072, abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT, 64, 48, 1 << 20, 1, 256, 0,
        abi.FUSE_PASSTHROUGH >> 32, 1, 0,
    )  # fmt: skip
    assert rp.reply_init(UNIQUE, init) == out(16 + 64) + body
    old = init._replace(minor=22, flags=abi.FUSE_ASYNC_READ)
    got = rp.reply_init(UNIQUE, old)
    assert got == out(16 + 24) + struct.pack("<IIIIHHI", 7, 22, 131072, 1, 64, 48, 1 << 20)


def test_notifications() -> None:
    assert rp.notify_inval_inode(5, -1, 0) == out(40, 2, 0) + struct.pack("<Qqq", 5, -1, 0)
    assert rp.notify_inval_entry(1, b"name", abi.FUSE_EXPIRE_ONLY) == out(16 + 16 + 5, 3, 0) + (
        struct.pack("<QII", 1, 4, 1) + b"name\0"
    )
    assert rp.notify_delete(1, 9, b"gone") == out(16 + 24 + 5, 6, 0) + (
        struct.pack("<QQII", 1, 9, 4, 0) + b"gone\0"
    )
    assert rp.notify_store(9, 4096, b"data") == out(16 + 24 + 4, 4, 0) + (
        struct.pack("<QQII", 9, 4096, 4, 0) + b"data"
    )
    with pytest.raises(ValueError):
        rp.notify_inval_entry(1, b"bad\0name")
    with pytest.raises(ValueError):
        rp.notify_delete(1, 2, b"x" * 4096)


def test_backing_map_and_ioctl_numbers() -> None:
    assert abi.pack_backing_map(7) == struct.pack("<iIQ", 7, 0, 0)
    assert abi.pack_backing_id(3) == struct.pack("<I", 3)

    def ioc(direction: int, nr: int, size: int) -> int:
        return (direction << 30) | (size << 16) | (abi.FUSE_DEV_IOC_MAGIC << 8) | nr

    assert abi.FUSE_DEV_IOC_BACKING_OPEN == ioc(1, 1, 16) == 0x4010E501
    assert abi.FUSE_DEV_IOC_BACKING_CLOSE == ioc(1, 2, 4) == 0x4004E502
    assert ioc(2, 0, 4) == abi.FUSE_DEV_IOC_CLONE
    assert ioc(0, 3, 0) == abi.FUSE_DEV_IOC_SYNC_INIT


# --- Directory buffers ----------------------------------------------------------------------


def dirent(ino: int, off: int, typ: int, name: bytes) -> bytes:
    rec = struct.pack("<QQII", ino, off, len(name), typ) + name
    return rec + b"\0" * (-len(rec) % 8)


def test_dirent_buffer_plain() -> None:
    buf = rp.DirentBuffer(4096, plus=False)
    assert buf.add(1, 1, 4, b".")
    assert buf.add(2, 2, 8, b"file-with-long-name")
    assert buf.add(3, 3, 8, b"exactly8")
    expected = dirent(1, 1, 4, b".") + dirent(2, 2, 8, b"file-with-long-name")
    expected += dirent(3, 3, 8, b"exactly8")
    assert buf.to_bytes() == expected
    assert len(buf) == len(expected) and buf.count == 3
    assert len(dirent(3, 3, 8, b"exactly8")) == 32  # 24 + 8, no padding


def test_dirent_buffer_refuses_what_does_not_fit() -> None:
    buf = rp.DirentBuffer(64, plus=False)
    assert buf.add(1, 1, 8, b"a")  # 32 bytes
    assert buf.add(2, 2, 8, b"b")  # 64 bytes: exactly full
    assert not buf.add(3, 3, 8, b"c")
    assert buf.count == 2 and len(buf.to_bytes()) == 64
    assert not rp.DirentBuffer(31, plus=False).add(1, 1, 8, b"a")
    with pytest.raises(ValueError):
        buf.add(4, 4, 8, b"")


def test_dirent_buffer_plus() -> None:
    buf = rp.DirentBuffer(4096, plus=True)
    entry = rp.EntryOut(0x77, 1, 1.0, 2.0, ATTR)
    assert buf.add(0x10, 1, 8, b"f", entry)
    assert buf.add(5, 2, 4, b"nodir")
    rec1 = struct.pack("<QQQQII", 0x77, 1, 1, 2, 0, 0) + ATTR_BYTES
    rec1 += struct.pack("<QQII", 0x10, 1, 1, 8) + b"f" + b"\0" * 7
    # No entry: an all-zero entry_out (nodeid 0: the kernel counts no lookup) but ino and type.
    empty_attr = struct.pack("<QQQqqqIIIIIIIIII", 5, 0, 0, 0, 0, 0, 0, 0, 0, 0o040000,
                             0, 0, 0, 0, 0, 0)  # fmt: skip
    rec2 = struct.pack("<QQQQII", 0, 0, 0, 0, 0, 0) + empty_attr
    rec2 += struct.pack("<QQII", 5, 2, 5, 4) + b"nodir" + b"\0" * 3
    assert len(rec1) == 160 and len(rec2) == 160
    assert buf.to_bytes() == rec1 + rec2
    assert not rp.DirentBuffer(159, plus=True).add(1, 1, 8, b"f")


# --- Speed (reported, loosely bounded so a slow CI machine does not fail) ---------------------


def test_decode_speed() -> None:
    lookup = req(Opcode.LOOKUP, b"some-file-name.txt\0")
    n = 20000
    per = timeit.timeit(lambda: rq.decode_request(lookup), number=n) / n
    assert per < 20e-6, f"lookup decode takes {per * 1e6:.2f} us"
