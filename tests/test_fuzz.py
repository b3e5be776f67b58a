"""Hostile input (issue #4): the request decoder, the session's reject path, and file names,
sizes and offsets at the edges, compared with the backing filesystem.

- Decoder: tests/test_protocol_fuzz.py feeds random bytes and random bodies; here every opcode
  gets well-formed bodies built from its C layout with random field values and names (which
  must decode, to the values put in), and every truncation and extension of them (which must
  decode or raise ProtocolError, nothing else).
- Session: malformed requests written into a live :class:`fusefs.session.session.Session`
  through a socketpair standing in for /dev/fuse (a test cannot inject into the real device):
  each one gets EINVAL with its unique (or no reply if not even the header is readable, or it
  is a FORGET), and the session goes on answering valid requests.
- Names with every byte value but '/' and NUL, 255-byte names, files beyond 4 GiB and sparse
  files at 1 TiB offsets behave on the mount as on a plain directory of the backing filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs.mirror.mirrorfs import MirrorFS
from fusefs.protocol import abi
from fusefs.protocol import requests as rq
from fusefs.protocol.abi import Opcode
from fusefs.protocol.errors import ProtocolError
from fusefs.protocol.init import Negotiated
from fusefs.session.session import Session
from tests import reliability_ops as ro
from tests.mounting import MountFactory

pytestmark = pytest.mark.reliability

# --- building requests from their C layouts ----------------------------------------------------

NAME = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b)


def _fixed(s: struct.Struct) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=s.size, max_size=s.size)


def _name(b: bytes) -> bytes:
    return b + b"\0"


def _with_size(fixed: bytes, offset: int, data: bytes) -> bytes:
    """``fixed`` with the uint32 at ``offset`` set to len(data), then data."""
    b = bytearray(fixed)
    struct.pack_into("<I", b, offset, len(data))
    return bytes(b) + data


@st.composite
def bodies(draw: Callable[..., Any], opcode: Opcode, setxattr_ext: bool) -> bytes:
    """A body the kernel could send for ``opcode`` (random field values, valid framing)."""
    name = st.builds(_name, NAME)
    data = st.binary(max_size=600)
    fixed_only = {
        Opcode.FORGET: abi.FORGET_IN, Opcode.GETATTR: abi.GETATTR_IN,
        Opcode.SETATTR: abi.SETATTR_IN, Opcode.OPEN: abi.OPEN_IN, Opcode.OPENDIR: abi.OPEN_IN,
        Opcode.READ: abi.READ_IN, Opcode.READDIR: abi.READ_IN, Opcode.READDIRPLUS: abi.READ_IN,
        Opcode.RELEASE: abi.RELEASE_IN, Opcode.RELEASEDIR: abi.RELEASE_IN,
        Opcode.FSYNC: abi.FSYNC_IN, Opcode.FSYNCDIR: abi.FSYNC_IN,
        Opcode.LISTXATTR: abi.GETXATTR_IN, Opcode.FLUSH: abi.FLUSH_IN,
        Opcode.GETLK: abi.LK_IN, Opcode.SETLK: abi.LK_IN, Opcode.SETLKW: abi.LK_IN,
        Opcode.ACCESS: abi.ACCESS_IN, Opcode.INTERRUPT: abi.INTERRUPT_IN,
        Opcode.BMAP: abi.BMAP_IN, Opcode.POLL: abi.POLL_IN, Opcode.FALLOCATE: abi.FALLOCATE_IN,
        Opcode.LSEEK: abi.LSEEK_IN, Opcode.COPY_FILE_RANGE: abi.COPY_FILE_RANGE_IN,
        Opcode.COPY_FILE_RANGE_64: abi.COPY_FILE_RANGE_IN, Opcode.SYNCFS: abi.SYNCFS_IN,
        Opcode.INIT: abi.INIT_IN,
    }  # fmt: skip
    fixed_then_name = {
        Opcode.MKNOD: abi.MKNOD_IN, Opcode.MKDIR: abi.MKDIR_IN, Opcode.LINK: abi.LINK_IN,
        Opcode.GETXATTR: abi.GETXATTR_IN, Opcode.CREATE: abi.CREATE_IN,
        Opcode.TMPFILE: abi.CREATE_IN,
    }  # fmt: skip
    if opcode in (Opcode.READLINK, Opcode.STATFS, Opcode.DESTROY):
        return b""
    if opcode in fixed_only:
        return draw(_fixed(fixed_only[opcode]))
    if opcode in (Opcode.LOOKUP, Opcode.UNLINK, Opcode.RMDIR, Opcode.REMOVEXATTR):
        return draw(name)
    if opcode in fixed_then_name:
        return draw(_fixed(fixed_then_name[opcode])) + draw(name)
    if opcode == Opcode.SYMLINK:
        return draw(name) + draw(name)
    if opcode == Opcode.RENAME:
        return draw(_fixed(abi.RENAME_IN)) + draw(name) + draw(name)
    if opcode == Opcode.RENAME2:
        return draw(_fixed(abi.RENAME2_IN)) + draw(name) + draw(name)
    if opcode == Opcode.WRITE:
        return _with_size(draw(_fixed(abi.WRITE_IN)), 16, draw(data))
    if opcode == Opcode.SETXATTR:
        fixed = abi.SETXATTR_IN if setxattr_ext else abi.SETXATTR_IN_COMPAT
        value = draw(data)
        return _with_size(draw(_fixed(fixed)), 0, value)[: fixed.size] + draw(name) + value
    if opcode == Opcode.IOCTL:
        return draw(_fixed(abi.IOCTL_IN)) + draw(data)
    if opcode == Opcode.NOTIFY_REPLY:
        return _with_size(draw(_fixed(abi.NOTIFY_RETRIEVE_IN)), 16, draw(data))
    if opcode == Opcode.BATCH_FORGET:
        items = draw(st.lists(_fixed(abi.FORGET_ONE), max_size=40))
        return struct.pack("<II", len(items), draw(st.integers(0, 2**32 - 1))) + b"".join(items)
    raise AssertionError(f"no layout for {opcode!r}")


def frame(opcode: int, body: bytes, unique: int = 7, nodeid: int = 1, extlen: int = 0) -> bytes:
    length = abi.IN_HEADER_SIZE + len(body)
    return abi.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 1, extlen, 0) + body


DECODED = sorted(op for op in Opcode if int(op) in rq._TABLE)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data(), opcode=st.sampled_from(DECODED), ext=st.booleans(),
       unique=st.integers(0, 2**64 - 1), nodeid=st.integers(0, 2**64 - 1))  # fmt: skip
def test_well_formed_requests_decode(
    data: st.DataObject, opcode: Opcode, ext: bool, unique: int, nodeid: int
) -> None:
    """Every body the kernel could send decodes (never ProtocolError) into the right type with
    the header's unique and nodeid; names and payloads come back byte for byte."""
    body = data.draw(bodies(opcode, ext))
    buf = frame(opcode, body, unique, nodeid)
    req = rq.decode_request(buf, setxattr_ext=ext)
    assert req.opcode == opcode and req.unique == unique and req.nodeid == nodeid
    if opcode == Opcode.INIT and struct.unpack_from("<I", body)[0] != abi.FUSE_KERNEL_VERSION:
        return
    for field in ("name", "newname", "target"):
        value = getattr(req, field, None)
        if value is not None:
            assert isinstance(value, bytes) and b"\0" not in value
            assert value + b"\0" in body
    if opcode == Opcode.WRITE:
        assert bytes(req.data) == body[abi.WRITE_IN_SIZE :]
        prefix = rq.decode_write_prefix(buf)
        assert (prefix.fh, prefix.offset, prefix.size) == (req.fh, req.offset, req.size)
    if opcode == Opcode.SETXATTR:
        assert req.value == body[len(body) - len(req.value) :]


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.data(), opcode=st.sampled_from(DECODED), ext=st.booleans(),
       cut=st.integers(0, 2000), extra=st.binary(min_size=1, max_size=9),
       extlen=st.sampled_from([0, 0, 1, 3, 255]))  # fmt: skip
def test_mangled_requests_decode_or_raise_protocol_error(
    data: st.DataObject, opcode: Opcode, ext: bool, cut: int, extra: bytes, extlen: int
) -> None:
    """Truncated, extended or mis-framed versions of well-formed requests: decoded or
    ProtocolError, never another exception (struct.error, IndexError, UnicodeError...)."""
    body = data.draw(bodies(opcode, ext))
    good = frame(opcode, body, extlen=extlen)
    variants = [
        good[: min(cut, len(good))],  # truncated, header length now wrong
        frame(opcode, body[: min(cut, len(body))], extlen=extlen),  # truncated, framed
        frame(opcode, body + extra, extlen=extlen),  # extended
        good + extra,  # trailing garbage beyond the header's length
    ]
    for buf in variants:
        try:
            req = rq.decode_request(buf, setxattr_ext=ext)
        except ProtocolError:
            continue
        assert isinstance(req, rq.REQUEST_TYPES)
        assert req.unique == 7


# --- the session's reject path ------------------------------------------------------------------

PROBE_UNIQUE = 1 << 40


def _probe(n: int) -> bytes:
    """A valid GETATTR of the root: the session must still answer it."""
    return frame(Opcode.GETATTR, abi.GETATTR_IN.pack(0, 0, 0), unique=PROBE_UNIQUE + n)


def _malformed_cases() -> list[tuple[bytes, int | None]]:
    """(request, unique of the expected EINVAL reply, or None: no reply)."""
    cases: list[tuple[bytes, int | None]] = []
    unique = 100
    for op in DECODED:
        if op in (Opcode.INIT, Opcode.DESTROY):
            continue  # handled before the reject path only when well-formed
        unique += 1
        # Three bytes are malformed for every opcode: too short for any fixed part, not
        # NUL-terminated for a name, and not empty for the body-less ones.
        no_reply = op in (Opcode.FORGET, Opcode.BATCH_FORGET)
        cases.append((frame(op, b"\x01\x01\x01", unique), None if no_reply else unique))
    cases.append((b"\x01" * 10, None))  # not even a header
    cases.append((b"\x01" * 39, None))
    hdr = frame(Opcode.LOOKUP, b"name\0", unique=555)
    cases.append((hdr[:-1], 555))  # the header's length says one byte more
    cases.append((frame(Opcode.LOOKUP, b"name\0", unique=556, extlen=100), 556))
    r = random.Random(4)
    for _ in range(150):  # garbage
        buf = r.randbytes(r.randrange(1, 200))
        try:
            rq.decode_request(buf)
            continue  # (astronomically unlikely) a valid request
        except ProtocolError:
            pass
        expect = None
        if len(buf) >= abi.IN_HEADER_SIZE:
            h = rq.decode_header(buf)
            if h.opcode not in (Opcode.FORGET, Opcode.BATCH_FORGET):
                expect = h.unique
        cases.append((buf, expect))
    return cases


async def _recv(sock: socket.socket) -> tuple[int, int, int]:
    """One reply from the session: (len, error, unique)."""
    with trio.fail_after(10):
        while True:
            try:
                data = sock.recv(1 << 20)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock.fileno())
    length, error, unique = abi.OUT_HEADER.unpack_from(data)
    assert length == len(data)
    return length, error, unique


async def test_session_rejects_malformed_requests(tmp_path: Path) -> None:
    """Every malformed request gets EINVAL with its own unique (none for FORGETs and
    unreadable headers), is counted as an error, and the session keeps serving."""
    backing = tmp_path / "backing"
    backing.mkdir()
    ops = MirrorFS(backing)
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setblocking(False)
    session = Session(ops, ours.fileno(), str(tmp_path / "mnt"), data="copy")
    cases = _malformed_cases()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            for n, (buf, expect) in enumerate(cases):
                kernel.send(buf)
                if expect is not None:
                    _, error, unique = await _recv(kernel)
                    assert (unique, error) == (expect, -errno.EINVAL), (n, buf[:48])
                kernel.send(_probe(n))
                _, error, unique = await _recv(kernel)
                assert (unique, error) == (PROBE_UNIQUE + n, 0), (n, buf[:48])
            nursery.cancel_scope.cancel()
    finally:
        ours.close()
        kernel.close()
        ops.close()
    assert session.counters.errors == len(cases)


#: What INIT agreed on (splice-capable), for sessions driven without one.
NEGOTIATED = Negotiated(True, 7, 41, 0, 0, 0, 0, 254, 12, 9, 0, 1)


@contextlib.contextmanager
def _lossy_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str, call: str, err: int
) -> Iterator[tuple[Session, socket.socket, list[int]]]:
    """A session over a socketpair whose next take of a request off the device (``call``:
    "read" or "splice") fails with ``err`` after consuming the request, as the kernel does
    when it fails a request itself.  Yields (session, the kernel's end, failures left)."""
    backing = tmp_path / "backing"
    backing.mkdir()
    ops = MirrorFS(backing)
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    kernel.setblocking(False)
    session = Session(ops, ours.fileno(), str(tmp_path / "mnt"), data=data)
    real_read, real_call = os.read, getattr(os, call)
    failures = [err]

    def failing(fd: int, *args: Any, **kw: Any) -> Any:
        if fd == ours.fileno() and failures:
            real_read(fd, 1 << 20)  # the request is gone
            raise OSError(failures.pop(), os.strerror(err))
        return real_call(fd, *args, **kw)

    monkeypatch.setattr(os, call, failing)
    try:
        yield session, kernel, failures
    finally:
        ours.close()
        kernel.close()
        ops.close()


async def _lost_then_answered(session: Session, kernel: socket.socket) -> None:
    """The first probe is lost on the way in; the second must still be answered."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve)
        kernel.send(_probe(0))
        kernel.send(_probe(1))
        _, error, unique = await _recv(kernel)
        assert (unique, error) == (PROBE_UNIQUE + 1, 0)
        nursery.cancel_scope.cancel()


async def test_a_request_lost_before_init_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before INIT is done a device that fails a read is not a mount worth keeping: the error
    ends the session (and the mount reports it) instead of leaving a daemon that never gets
    ready."""
    with _lossy_session(tmp_path, monkeypatch, "copy", "read", errno.EIO) as (session, kernel, _):
        kernel.send(_probe(0))
        with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as caught:
            await session.serve()
        assert caught.group_contains(OSError)


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOMEM, errno.EFAULT], ids=errno.errorcode.get)
async def test_session_survives_a_request_the_kernel_could_not_hand_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """When taking a request off the device fails (the kernel then fails that request with
    EIO itself), the session counts it and keeps serving: one lost request must not take
    the mount down with it."""
    with _lossy_session(tmp_path, monkeypatch, "copy", "read", err) as (session, kernel, left):
        session.negotiated = NEGOTIATED  # after INIT: before it, such an error ends the session
        await _lost_then_answered(session, kernel)
    assert not left
    assert session.counters.errors == 1


async def test_a_failed_request_splice_falls_back_to_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that fails to splice off the device (EIO: it did not fit the pipe) turns
    request splicing off for the session; the next requests are read, and answered."""
    with _lossy_session(tmp_path, monkeypatch, "splice", "splice", errno.EIO) as (
        session,
        kernel,
        left,
    ):
        session.negotiated = NEGOTIATED
        session._choose_data_mode(NEGOTIATED)
        assert session.splice_writes
        await _lost_then_answered(session, kernel)
    assert not left
    assert not session.splice_writes
    assert session.counters.errors == 1


# --- names, sizes and offsets at the edges ----------------------------------------------------

#: One name holding every byte value but NUL and '/' (254 bytes), every single-byte name but
#: '.' and '/', and names at the 255-byte limit.
ALL_BYTES = bytes(b for b in range(1, 256) if b != ord("/"))
NAMES = [
    ALL_BYTES,
    *(bytes([b]) for b in ALL_BYTES if b != ord(".")),
    b"\xff" * 255,
    b"x" * 254 + b"\x80",
    b"..." + b"\n" * 252,
    b"-rf \t\r\x1b[31m",
]


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain"
    path.mkdir()
    return path


def _name_ops(root: Path) -> list[Any]:
    """Create, stat, read, rename and list every name in NAMES under ``root``; outcomes."""
    out: list[Any] = []
    r = os.fsencode(root)
    for i, name in enumerate(NAMES):
        p = r + b"/" + name
        try:
            with open(p, "xb") as f:
                f.write(name)
            st_ = os.lstat(p)
            with open(p, "rb") as f:
                out.append((st_.st_size, f.read() == name))
        except OSError as e:
            out.append(ro.errname(e))
        if i % 7 == 0:  # directories too, and renames between the two kinds of name
            try:
                os.mkdir(p + b".d" if len(name) < 250 else b"%s/d%d" % (r, i))
                os.rename(p, b"%s/renamed%d" % (r, i))
                os.rename(b"%s/renamed%d" % (r, i), p)
            except OSError as e:
                out.append(ro.errname(e))
    listing = sorted(os.listdir(r))
    out.append(listing)
    for name in (b"y" * 256, b"a/" + b"b" * 256):  # too long: ENAMETOOLONG on both sides
        try:
            os.close(os.open(r + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o644))
            out.append("created")
        except OSError as e:
            out.append(ro.errname(e))
    for name in listing[::5]:
        p = r + b"/" + name
        if os.path.isdir(p):
            os.rmdir(p)
        else:
            os.unlink(p)
    out.append(sorted(os.listdir(r)))
    return out


def test_names_with_every_byte(mnt: Path, plain: Path, backing: Path) -> None:
    """Names with every byte value but '/' and NUL, and 255-byte names, work as on a plain
    directory, and are the same names in BACKING."""
    assert len(ALL_BYTES) == 254 and max(len(n) for n in NAMES) == 255
    a = _name_ops(mnt)
    b = _name_ops(plain)
    assert a == b
    assert sorted(os.listdir(os.fsencode(backing))) == sorted(os.listdir(os.fsencode(plain)))
    assert ro.compare_trees(str(mnt), str(plain)) == []


GiB = ro.GiB
TiB = 1 << 40
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE


def _big_file_ops() -> list[ro.Op]:
    rw = os.O_RDWR | os.O_CREAT
    return [
        ("open", 0, "big", rw, 0o644),
        ("pwrite", 0, 5 * GiB, 1, 11),  # one byte at 5 GiB
        ("fstat", 0),
        ("pread", 0, 4 * GiB, 8192),  # a hole reads as zeros
        ("pread", 0, 5 * GiB - 10, 20),  # across the byte and EOF
        ("pread", 0, 5 * GiB + 1, 10),  # at EOF
        ("lseek", 0, 0, SEEK_DATA),
        ("lseek", 0, 0, SEEK_HOLE),
        ("lseek", 0, 5 * GiB + 1, SEEK_DATA),  # ENXIO
        ("lseek", 0, 4 * GiB + 5, os.SEEK_SET),
        ("read", 0, 100),
        ("mmap_read", 0, 5 * GiB - 100, 200),
        ("pwrite", 0, 4 * GiB - 3, 7, 12),  # across the 32-bit boundary
        ("pread", 0, 4 * GiB - 8, 16),
        ("mmap_write", 0, 4 * GiB - 2, 4, 13),
        ("pread", 0, 4 * GiB - 8, 16),
        ("open", 1, "tera", rw, 0o600),
        ("pwrite", 1, TiB + 123, 4096, 14),  # sparse at 1 TiB
        ("fstat", 1),
        ("pread", 1, TiB, 8192),
        ("lseek", 1, 1, SEEK_DATA),
        ("lseek", 1, TiB + 200, SEEK_HOLE),
        ("pwrite", 1, 3 * GiB, 10, 15),
        ("lseek", 1, 0, SEEK_DATA),
        ("lseek", 1, 3 * GiB + 100, SEEK_HOLE),
        ("fallocate", 1, ro.FALLOC_FL_PUNCH_HOLE | ro.FALLOC_FL_KEEP_SIZE, TiB, 8192),
        ("pread", 1, TiB + 100, 100),
        ("ftruncate", 1, 4 * GiB + 1),
        ("fstat", 1),
        ("pread", 1, 3 * GiB, 20),
        ("ftruncate", 1, 17 * TiB),  # beyond ext4's limit: EFBIG on both sides
        ("truncate", "tera", TiB * 2),
        ("stat", "tera"),
        ("copy_file_range", 0, 5 * GiB - 4, 1, 2 * TiB - 2, 10),
        ("pread", 1, 2 * TiB - 4, 16),
        ("close", 0),
        ("close", 1),
    ]


@pytest.mark.parametrize(("session", "mode"), ro.COMBOS, indirect=["session"])
def test_huge_sparse_files(
    mount_factory: MountFactory, session: str, mode: str, plain: Path, backing: Path
) -> None:
    """Files beyond 4 GiB and sparse files at 1 TiB offsets: sizes, holes reading as zeros,
    SEEK_DATA/SEEK_HOLE, mmap and truncation as on a plain directory of the backing
    filesystem (the files are compared by attributes: reading 2 TiB is not the point)."""
    mount = ro.mount_mode(mount_factory, session, mode)
    avoid = ro.avoid_for(session, mode)
    engine = ro.Engine(mount.mountpoint / "t", plain / "t", check_every=0)
    try:
        for op in _big_file_ops():
            clean = ro.sanitize(op, avoid)
            if clean is None:
                continue
            found = engine.step(clean)
            assert found is None, str(found)
    finally:
        engine.close()
    for name in ("big", "tera"):
        a = os.stat(mount.mountpoint / "t" / name)
        b = os.stat(backing / "t" / name)
        c = os.stat(plain / "t" / name)
        assert a.st_size == b.st_size == c.st_size
        assert a.st_blocks == b.st_blocks  # the mount reports the backing allocation
