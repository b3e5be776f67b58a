"""POSIX behaviour of the mount, compared operation by operation with a plain directory.

Each test is a *scenario*: a function that takes a :class:`Rec` and performs a list of
operations on paths relative to ``rec.root``.  :func:`Twin.run` plays the scenario once on the
mount and once on a plain directory of the same (ext4) filesystem, records every step's result
(the normalized return value, or the errno of the OSError), and asserts both logs are equal step
by step.  Afterwards the trees are compared (names, types, sizes, modes, nlink, owners, symlink
targets, contents, hard-link groups, user.* xattrs), and the mount's tree is compared with the
backing directory it mirrors.

Every test runs under three variants (:data:`VARIANTS`): our session on its default data path
(kernel passthrough here), our session forced to splice, and pyfuse3's session.  pyfuse3's has no
FALLOCATE, LSEEK or COPY_FILE_RANGE; there the kernel answers for it (EOPNOTSUPP, generic
"everything is data" seeking, a splice copy), and those tests check exactly that fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import pickle
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import variants
from tests.mounting import Mount

# The variants every test runs under: fixtures overriding the shared ones of conftest.py.
VARIANTS = variants.VARIANTS
variant = variants.variant
session = variants.session
mnt_handle = variants.mnt_handle

# -- libc calls os lacks -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
FALLOC_FL_ZERO_RANGE = 0x10
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


def _check(res: int) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate64(fd, mode, offset, length))


def utimensat(path: bytes, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(AT_FDCWD, path, {atime, mtime}, 0); each time is (sec, nsec|UTIME_NOW|OMIT)."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, path, times, 0))


# -- recording a scenario ------------------------------------------------------------------------


def norm(value: Any) -> Any:
    """A comparable form of an operation's result (no inode numbers, fds or times)."""
    if isinstance(value, os.stat_result):
        fmt = stat.S_IFMT(value.st_mode)
        out: dict[str, Any] = {
            "type": stat.filemode(value.st_mode)[0],
            "mode": oct(stat.S_IMODE(value.st_mode)),
            "nlink": value.st_nlink,
            "uid": value.st_uid,
            "gid": value.st_gid,
        }
        if fmt != stat.S_IFDIR:  # directory sizes depend on the history of the ext4 directory
            out["size"] = value.st_size
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            out["rdev"] = value.st_rdev
        return out
    if isinstance(value, bytes) and len(value) > 64:
        return f"{len(value)} bytes sha1={hashlib.sha1(value).hexdigest()}"
    if isinstance(value, list | tuple):
        items = [norm(v) for v in value]
        return items if len(items) <= 12 else [*items[:12], f"... {len(items) - 12} more"]
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    return value


def ignore(value: Any) -> Any:
    """For results that legitimately differ (fds, inode numbers): record only success."""
    return "(ok)"


class Rec:
    """Performs and records one scenario's operations under ``root``."""

    def __init__(self, root: Path | str) -> None:
        self.root = os.fsencode(root)
        self.log: list[tuple[str, Any]] = []

    def p(self, rel: str | bytes) -> bytes:
        rel = os.fsencode(rel)
        return self.root if rel in (b"", b".") else self.root + b"/" + rel

    def call(
        self, label: str, fn: Callable[..., Any], *args: Any, norm: Any = norm, **kw: Any
    ) -> Any:
        """Run ``fn(*args, **kw)`` and record its normalized result or its errno."""
        try:
            value = fn(*args, **kw)
        except OSError as e:
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            self.log.append((label, ("error", name)))
            return None
        except Exception as e:  # a step after a diverging one (fd None...); keep going
            self.log.append((label, ("exception", type(e).__name__)))
            return None
        self.log.append((label, ("ok", norm(value))))
        return value

    def note(self, label: str, value: Any) -> None:
        """Record a value computed by the scenario itself (a check, a comparison)."""
        self.log.append((label, ("ok", norm(value))))

    def os(self, name: str, rel: str | bytes, *args: Any, norm: Any = norm, **kw: Any) -> Any:
        """``os.<name>(root/rel, *args)``: the path-first os functions."""
        label = f"{name}({os.fsdecode(rel)!r}{''.join(', ' + _short(a) for a in args)})"
        return self.call(label, getattr(os, name), self.p(rel), *args, norm=norm, **kw)

    def os2(self, name: str, a: str | bytes, b: str | bytes, *args: Any) -> Any:
        """``os.<name>(root/a, root/b, *args)``: rename, link, replace."""
        label = f"{name}({os.fsdecode(a)!r}, {os.fsdecode(b)!r})"
        return self.call(label, getattr(os, name), self.p(a), self.p(b), *args)

    def open(self, rel: str | bytes, flags: int, mode: int = 0o666) -> int | None:
        label = f"open({os.fsdecode(rel)!r}, {_flags(flags)}, {mode:o})"
        fd: int | None = self.call(label, os.open, self.p(rel), flags, mode, norm=ignore)
        return fd

    def fd(self, name: str, fd: int | None, *args: Any, norm: Any = norm) -> Any:
        """``os.<name>(fd, *args)``: read, write, pread, pwrite, fstat, ftruncate, lseek, close."""
        label = f"{name}(fd{''.join(', ' + _short(a) for a in args)})"
        return self.call(label, getattr(os, name), fd, *args, norm=norm)

    def read_file(self, rel: str | bytes) -> bytes | None:
        def read() -> bytes:
            with open(self.p(rel), "rb") as f:
                return f.read()

        data: bytes | None = self.call(f"read_file({os.fsdecode(rel)!r})", read)
        return data

    def write_file(self, rel: str | bytes, data: bytes, mode: int = 0o644) -> None:
        def write() -> int:
            fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.call(f"write_file({os.fsdecode(rel)!r}, {len(data)} bytes)", write)


def _short(a: Any) -> str:
    if isinstance(a, bytes) and len(a) > 20:
        return f"<{len(a)} bytes>"
    if isinstance(a, int) and a > 0o777 and a < 0o10000:
        return oct(a)
    return repr(a)


def _flags(flags: int) -> str:
    names = [n for n in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_DIRECTORY", "O_NOFOLLOW",
                         "O_NONBLOCK") if flags & getattr(os, n)]  # fmt: skip
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
    return "|".join([acc[flags & os.O_ACCMODE], *names])


def _format_logs(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> str:
    lines = []
    for i in range(max(len(a), len(b))):
        la = a[i] if i < len(a) else ("-", "-")
        lb = b[i] if i < len(b) else ("-", "-")
        mark = "  " if la == lb else "!!"
        lines.append(f"{mark} {i:3d} {la[0]}\n        mount: {la[1]}")
        if la != lb:
            lines.append(f"        plain: {lb[0]} -> {lb[1]}")
    return "\n".join(lines)


def assert_same_logs(mount_log: list[tuple[str, Any]], plain_log: list[tuple[str, Any]]) -> None:
    for i, (m, p) in enumerate(zip(mount_log, plain_log, strict=False)):
        if m != p:
            pytest.fail(
                f"step {i} differs: {m[0]}\n  mount: {m[1]}\n  plain: {p[1]}\n"
                f"--- all steps:\n{_format_logs(mount_log, plain_log)}"
            )
    assert len(mount_log) == len(plain_log), _format_logs(mount_log, plain_log)


# -- comparing trees -----------------------------------------------------------------------------


def snapshot(root: Path | str, *, contents: bool = True) -> dict[bytes, dict[str, Any]]:
    """Everything a program can see of the tree under ``root`` except inode numbers and times.

    Hard links show as ``links``: the sorted names of the group a file belongs to.
    """
    out: dict[bytes, dict[str, Any]] = {}
    groups: dict[int, list[bytes]] = {}
    base = os.fsencode(root)

    def walk(dirpath: bytes, rel: bytes) -> None:
        for name in sorted(os.listdir(dirpath)):
            path = dirpath + b"/" + name
            relpath = rel + name
            st = os.lstat(path)
            info: dict[str, Any] = {
                "type": stat.filemode(st.st_mode)[0],
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
            }
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                if contents:
                    with open(path, "rb") as f:
                        info["sha1"] = hashlib.sha1(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(relpath)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                info["xattrs"] = {
                    n: os.getxattr(path, n)
                    for n in sorted(os.listxattr(path))
                    if n.startswith("user.")
                }
            out[relpath] = info
            if stat.S_ISDIR(st.st_mode):
                walk(path, relpath + b"/")

    walk(base, b"")
    for names in groups.values():
        for n in names:
            out[n]["links"] = sorted(names)
    return out


def assert_same_trees(a: Path | str, b: Path | str, what: str = "mount vs plain") -> None:
    sa, sb = snapshot(a), snapshot(b)
    if sa == sb:
        return
    diffs = []
    for name in sorted(set(sa) | set(sb)):
        if sa.get(name) != sb.get(name):
            diffs.append(f"  {name!r}:\n    {a}: {sa.get(name)}\n    {b}: {sb.get(name)}")
    pytest.fail(f"trees differ ({what}):\n" + "\n".join(diffs[:30]))


class Twin:
    """A mount and a plain directory that every scenario is played on."""

    def __init__(self, mnt: Path, plain: Path, backing: Path, session: str) -> None:
        self.mnt = mnt
        self.plain = plain
        self.backing = backing
        self.session = session

    def run(self, scenario: Callable[[Rec], None], *, trees: bool = True) -> list[tuple[str, Any]]:
        recs = []
        for root in (self.mnt, self.plain):
            rec = Rec(root)
            scenario(rec)
            recs.append(rec)
        assert_same_logs(recs[0].log, recs[1].log)
        if trees:
            self.check_trees()
        return recs[0].log

    def check_trees(self) -> None:
        assert_same_trees(self.mnt, self.plain)
        assert_same_trees(self.mnt, self.backing, "mount vs its backing directory")


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain"
    path.mkdir()
    return path


@pytest.fixture
def twin(mnt: Path, plain: Path, backing: Path, session: str) -> Twin:
    return Twin(mnt, plain, backing, session)


def in_child(fn: Callable[[], Any], uid: int | None = None, gid: int | None = None) -> Any:
    """Run ``fn`` in a forked child (optionally as uid/gid); return its result (pickled back)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            os.close(r)
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)
            try:
                result: Any = ("ok", fn())
            except BaseException as e:
                result = ("raised", repr(e))
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"child failed (status {status})"
    kind, value = pickle.loads(data)
    assert kind == "ok", f"child raised {value}"
    return value


def stats_of(mnt: Path) -> dict[str, Any]:
    import json

    return dict(json.loads(os.getxattr(mnt, "user.fusefs.stats")))


# ================================================================================================
# Files: create, open flags, read/write at offsets, truncate
# ================================================================================================


def test_create_excl_trunc_append(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        fd = r.open("a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        r.fd("write", fd, b"hello world")
        r.fd("close", fd)
        r.open("a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)  # EEXIST
        r.open("missing", os.O_RDONLY)  # ENOENT
        r.open("a/b", os.O_RDONLY)  # ENOTDIR
        r.os("stat", "a")
        # O_CREAT without O_EXCL on an existing file keeps it and its mode
        fd = r.open("a", os.O_RDWR | os.O_CREAT, 0o600)
        r.fd("read", fd, 100)
        r.fd("close", fd)
        r.os("stat", "a")
        # O_TRUNC empties it
        fd = r.open("a", os.O_RDWR | os.O_TRUNC)
        r.fd("fstat", fd)
        r.fd("write", fd, b"new")
        r.fd("close", fd)
        r.read_file("a")
        # O_APPEND: every write goes to the end, whatever the offset
        fd = r.open("a", os.O_WRONLY | os.O_APPEND)
        r.fd("write", fd, b"-one")
        r.fd("lseek", fd, 0, os.SEEK_SET)
        r.fd("write", fd, b"-two")
        r.fd("pwrite", fd, b"-three", 0)  # Linux: pwrite on O_APPEND appends too
        r.fd("close", fd)
        r.read_file("a")
        # a second fd sees appends made through the first
        fd1 = r.open("a", os.O_WRONLY | os.O_APPEND)
        fd2 = r.open("a", os.O_WRONLY | os.O_APPEND)
        r.fd("write", fd1, b"<1>")
        r.fd("write", fd2, b"<2>")
        r.fd("write", fd1, b"<3>")
        r.fd("close", fd1)
        r.fd("close", fd2)
        r.read_file("a")
        # O_TRUNC|O_CREAT on a new name, open of a directory for writing
        fd = r.open("b", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        r.fd("close", fd)
        r.os("mkdir", "d")
        r.open("d", os.O_WRONLY)  # EISDIR
        r.open("a", os.O_RDONLY | os.O_DIRECTORY)  # ENOTDIR
        fd = r.open("d", os.O_RDONLY | os.O_DIRECTORY)
        r.fd("close", fd)

    twin.run(scenario)


def test_same_file_open_twice(twin: Twin) -> None:
    """Several open file descriptions of one file at once (every program that re-opens a file)."""

    def scenario(r: Rec) -> None:
        r.write_file("f", b"0123456789")
        a = r.open("f", os.O_RDONLY)
        b = r.open("f", os.O_RDONLY)
        c = r.open("f", os.O_RDWR)
        d = r.open("f", os.O_WRONLY | os.O_APPEND)
        r.fd("pwrite", c, b"AB", 2)
        r.fd("write", d, b"++")
        r.fd("pread", a, 100, 0)
        r.fd("pread", b, 100, 0)
        for fd in (a, b, c, d):
            r.fd("close", fd)
        r.read_file("f")

    twin.run(scenario)


def test_read_write_offsets_and_holes(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        fd = r.open("f", os.O_RDWR | os.O_CREAT, 0o644)
        r.fd("write", fd, b"0123456789")
        r.fd("pread", fd, 4, 3)
        r.fd("pread", fd, 100, 8)  # short read at EOF
        r.fd("pread", fd, 10, 10)  # at EOF: empty
        r.fd("pread", fd, 10, 1 << 20)  # far past EOF: empty
        r.fd("pwrite", fd, b"XY", 4)  # overwrite in the middle
        r.fd("pwrite", fd, b"tail", 70000)  # past EOF: a hole of zeros
        r.fd("fstat", fd)
        r.fd("pread", fd, 20, 65530)  # inside the hole
        r.fd("pread", fd, 100000, 0)  # the whole file at once
        r.fd("pwrite", fd, b"far", 3 << 20)  # a hole across several MiB
        r.fd("pread", fd, 16, (3 << 20) - 8)
        r.fd("lseek", fd, 0, os.SEEK_END)
        r.fd("write", fd, b"!")  # write at the current offset after a seek
        r.fd("lseek", fd, 5, os.SEEK_SET)
        r.fd("read", fd, 4)
        r.fd("read", fd, 4)  # continues where the last read stopped
        r.fd("lseek", fd, -3, os.SEEK_END)
        r.fd("read", fd, 10)
        r.fd("lseek", fd, -1, os.SEEK_SET)  # EINVAL
        # an unaligned pattern across page boundaries
        data = bytes(range(256)) * 50
        r.fd("pwrite", fd, data, 4093)
        r.fd("pread", fd, len(data) + 10, 4090)
        r.fd("fsync", fd)
        r.fd("fdatasync", fd)
        r.fd("close", fd)
        r.fd("read", fd, 1)  # EBADF after close
        r.os("stat", "f")
        r.read_file("f")
        # a read-only fd refuses writes, a write-only fd refuses reads
        fd = r.open("f", os.O_RDONLY)
        r.fd("write", fd, b"x")
        r.fd("close", fd)
        fd = r.open("f", os.O_WRONLY)
        r.fd("read", fd, 1)
        r.fd("close", fd)

    twin.run(scenario)


def test_truncate(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("t", bytes(range(256)) * 40)
        r.os("truncate", "t", 100)
        r.read_file("t")
        r.os("truncate", "t", 20000)  # up: zeros
        r.read_file("t")
        r.os("stat", "t")
        fd = r.open("t", os.O_RDWR)
        r.fd("ftruncate", fd, 5)
        r.fd("fstat", fd)
        r.fd("pread", fd, 100, 0)
        r.fd("ftruncate", fd, 1 << 20)
        r.fd("fstat", fd)
        r.fd("pread", fd, 10, (1 << 20) - 5)
        r.fd("ftruncate", fd, 0)
        r.fd("pread", fd, 10, 0)
        r.fd("write", fd, b"abc")  # the fd offset is still 0: writes at 0
        r.fd("ftruncate", fd, -1)  # EINVAL
        r.fd("close", fd)
        fd = r.open("t", os.O_RDONLY)
        r.fd("ftruncate", fd, 0)  # EINVAL (not open for writing)
        r.fd("close", fd)
        r.read_file("t")
        r.os("mkdir", "d")
        r.os("truncate", "d", 0)  # EISDIR
        r.os("truncate", "missing", 0)  # ENOENT

    twin.run(scenario)


def test_open_unlinked_file_still_usable(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("gone", b"still here")
        fd = r.open("gone", os.O_RDWR)
        r.os("unlink", "gone")
        r.os("stat", "gone")  # ENOENT
        r.fd("pread", fd, 100, 0)
        r.fd("pwrite", fd, b" and writable", 10)
        r.fd("pread", fd, 100, 0)
        r.call("fstat.nlink", lambda: os.fstat(fd).st_nlink)  # type: ignore[arg-type]
        r.fd("ftruncate", fd, 4)
        r.fd("pread", fd, 100, 0)
        r.fd("close", fd)
        r.call("listdir", lambda: sorted(os.listdir(r.root)))
        # the same with a name re-created while the old file is open
        r.write_file("again", b"old")
        fd = r.open("again", os.O_RDONLY)
        r.os("unlink", "again")
        r.write_file("again", b"new content")
        r.fd("pread", fd, 100, 0)
        r.fd("close", fd)
        r.read_file("again")

    twin.run(scenario)


def test_append_only_file(twin: Twin) -> None:
    """A ``chattr +a`` file (set in the backing directory) takes O_APPEND writes, nothing else."""
    for root in (twin.backing, twin.plain):
        (root / "log").write_bytes(b"start\n")
        subprocess.run(["chattr", "+a", str(root / "log")], check=True, capture_output=True)

    def scenario(r: Rec) -> None:
        fd = r.open("log", os.O_WRONLY | os.O_APPEND)
        r.fd("write", fd, b"small\n")
        r.fd("write", fd, b"b" * 300_000)
        r.fd("pwrite", fd, b"pwrite", 0)
        r.fd("close", fd)
        r.open("log", os.O_WRONLY)  # EPERM
        r.open("log", os.O_RDWR | os.O_TRUNC)  # EPERM
        r.os("truncate", "log", 0)  # EPERM
        r.os("unlink", "log")  # EPERM
        r.os2("rename", "log", "moved")  # EPERM
        r.os("chmod", "log", 0o600)  # EPERM
        r.read_file("log")

    try:
        twin.run(scenario)
    finally:
        for root in (twin.backing, twin.plain):
            subprocess.run(["chattr", "-a", str(root / "log")], check=False, capture_output=True)


# ================================================================================================
# Directories and names
# ================================================================================================


def test_unlink_rmdir_errors(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.os("mkdir", "d")
        r.os("mkdir", "d")  # EEXIST
        r.os("mkdir", "d/sub")
        r.write_file("d/sub/f", b"x")
        r.write_file("file", b"x")
        r.os("unlink", "d")  # EISDIR
        r.os("rmdir", "file")  # ENOTDIR
        r.os("rmdir", "d")  # ENOTEMPTY
        r.os("rmdir", "d/sub")  # ENOTEMPTY
        r.os("unlink", "missing")  # ENOENT
        r.os("rmdir", "missing")  # ENOENT
        r.os("unlink", "file/x")  # ENOTDIR
        r.os("mkdir", "file/x")  # ENOTDIR
        r.os("rmdir", "d/.")  # EINVAL
        r.os("rmdir", "d/..")  # ENOTEMPTY
        r.os("mkdir", "missing/x")  # ENOENT
        r.os("unlink", "d/sub/f")
        r.os("rmdir", "d/sub")
        r.os("rmdir", "d")
        r.os("unlink", "file")
        r.call("listdir", lambda: sorted(os.listdir(r.root)))

    twin.run(scenario)


def test_mkdir_modes_and_umask(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        for umask, mode in [(0o022, 0o777), (0o077, 0o777), (0o000, 0o777), (0o027, 0o750),
                            (0o022, 0o1777), (0o002, 0o2775), (0o000, 0o111)]:  # fmt: skip
            name = f"d_{umask:03o}_{mode:04o}"
            old = os.umask(umask)
            try:
                r.os("mkdir", name, mode)
                fd = r.open(f"{name}.file", os.O_WRONLY | os.O_CREAT, mode & 0o777 | 0o666)
                r.fd("close", fd)
                r.os("mkfifo", f"{name}.fifo", 0o666)
            finally:
                os.umask(old)
            r.os("stat", name)
            r.os("stat", f"{name}.file")
            r.os("stat", f"{name}.fifo")
        # a set-group-ID directory hands its group and (to directories) the bit down
        r.os("mkdir", "sgid", 0o755)
        r.os("chown", "sgid", 0, 4321)
        r.os("chmod", "sgid", 0o2775)
        r.os("mkdir", "sgid/sub", 0o755)
        r.write_file("sgid/file", b"x")
        r.os("stat", "sgid/sub")
        r.os("stat", "sgid/file")

    twin.run(scenario)


def test_rename(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("a", b"A")
        r.write_file("b", b"B")
        r.os("mkdir", "d1")
        r.os("mkdir", "d2")
        r.write_file("d2/inner", b"I")
        r.os("mkdir", "empty")
        r.os2("rename", "a", "b")  # over a file: replaces it
        r.read_file("b")
        r.os("stat", "a")  # ENOENT
        r.os2("rename", "b", "d1")  # file over directory: EISDIR
        r.os2("rename", "d1", "b")  # directory over file: ENOTDIR
        r.os2("rename", "d1", "d2")  # over a non-empty directory: ENOTEMPTY
        r.os2("rename", "d1", "empty")  # over an empty directory: fine
        r.os("stat", "d1")
        r.os2("rename", "empty", "empty/x")  # into itself: EINVAL
        r.os2("rename", "missing", "x")  # ENOENT
        r.os2("rename", "b", "b")  # same name: a no-op
        r.os2("rename", "b", "d2/moved")  # across directories
        r.os2("rename", "d2", "empty/d2")  # a directory with contents, across directories
        r.read_file("empty/d2/moved")
        r.os2("rename", "empty/d2/inner", "top")
        r.read_file("top")
        # a hard link over its own other name: nothing happens
        r.os2("link", "top", "top2")
        r.os2("rename", "top", "top2")
        r.os("stat", "top")
        r.os("stat", "top2")
        r.call("listdir", lambda: sorted(os.listdir(r.root)))

    twin.run(scenario)


def test_rename_noreplace_exchange(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("x", b"X")
        r.write_file("y", b"Y")
        r.os("mkdir", "dir")
        r.write_file("dir/inside", b"I")

        def rn(a: str, b: str, flags: int) -> Any:
            return r.call(f"renameat2({a!r}, {b!r}, {flags})", renameat2, r.p(a), r.p(b), flags)

        rn("x", "y", RENAME_NOREPLACE)  # EEXIST
        r.read_file("y")
        rn("x", "z", RENAME_NOREPLACE)
        r.os("stat", "x")
        r.read_file("z")
        rn("z", "y", RENAME_EXCHANGE)
        r.read_file("z")
        r.read_file("y")
        rn("y", "dir", RENAME_EXCHANGE)  # a file and a directory swap places
        r.os("stat", "y")
        r.os("stat", "dir")
        r.read_file("y/inside")
        r.read_file("dir")
        rn("dir", "nothere", RENAME_EXCHANGE)  # ENOENT
        rn("dir", "z", RENAME_EXCHANGE | RENAME_NOREPLACE)  # EINVAL
        rn("z", "z", RENAME_NOREPLACE)  # EEXIST
        r.call("listdir", lambda: sorted(os.listdir(r.root)))

    twin.run(scenario)


def test_hard_links(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("one", b"shared")
        r.os("mkdir", "d")
        r.os2("link", "one", "two")
        r.os2("link", "one", "d/three")
        r.os2("link", "one", "two")  # EEXIST
        r.os2("link", "d", "dlink")  # EPERM: no hard links to directories
        r.os2("link", "missing", "x")  # ENOENT
        r.call("nlink", lambda: [os.stat(r.p(n)).st_nlink for n in ("one", "two", "d/three")])
        r.call(
            "same st_ino", lambda: len({os.stat(r.p(n)).st_ino for n in ("one", "two", "d/three")})
        )
        with open(r.p("two"), "ab") as f:  # a write through one name shows through the others
            f.write(b"+more")
        r.read_file("d/three")
        r.os("chmod", "d/three", 0o600)
        r.os("stat", "one")
        r.os("unlink", "one")
        r.os("stat", "two")
        r.os("stat", "d/three")
        r.os("unlink", "two")
        r.os("stat", "d/three")
        # a link made while the file is open; then the original name removed
        r.write_file("f", b"v1")
        fd = r.open("f", os.O_RDWR)
        r.os2("link", "f", "g")
        r.os("unlink", "f")
        r.fd("pwrite", fd, b"v2", 0)
        r.fd("close", fd)
        r.read_file("g")
        r.os("stat", "g")

    twin.run(scenario)


def test_symlinks(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        def sym(target: str | bytes, name: str) -> Any:
            return r.call(f"symlink({target!r}, {name!r})", os.symlink, target, r.p(name))

        sym("target", "dangling")
        r.os("readlink", "dangling")
        r.os("lstat", "dangling")
        r.os("stat", "dangling")  # ENOENT
        r.open("dangling", os.O_RDONLY)  # ENOENT
        r.write_file("target", b"T")
        r.os("stat", "dangling")
        r.read_file("dangling")
        r.open("dangling", os.O_RDONLY | os.O_NOFOLLOW)  # ELOOP
        r.os("mkdir", "dir")
        sym("dir", "dirlink")
        sym("../target", "dir/up")
        r.read_file("dirlink/up")
        r.call("listdir via link", lambda: sorted(os.listdir(r.p("dirlink"))))
        sym("/absolute/elsewhere", "abs")
        r.os("readlink", "abs")
        sym("x" * 4095, "long")  # the longest target
        r.os("readlink", "long")
        sym("x" * 4096, "toolong")  # ENAMETOOLONG
        sym("loop2", "loop1")
        sym("loop1", "loop2")
        r.os("stat", "loop1")  # ELOOP
        sym("target", "target")  # EEXIST
        r.os("lchown", "dangling", 1234, 5678)
        r.os("lstat", "dangling")
        r.os("readlink", "target")  # EINVAL: not a symlink
        r.os2("rename", "dangling", "renamed")
        r.os("readlink", "renamed")
        r.os("unlink", "renamed")
        r.os("stat", "target")  # unlinking a link leaves the target
        r.os("rmdir", "dirlink")  # ENOTDIR

    twin.run(scenario)


def test_mknod_fifo_and_devices(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.os("mkfifo", "fifo", 0o640)
        r.os("stat", "fifo")
        r.os("mkfifo", "fifo")  # EEXIST
        # a fifo on the mount is a real fifo (the kernel handles it, not the filesystem)
        rfd = r.open("fifo", os.O_RDONLY | os.O_NONBLOCK)
        wfd = r.open("fifo", os.O_WRONLY | os.O_NONBLOCK)
        r.fd("write", wfd, b"through the pipe")
        r.fd("read", rfd, 100)
        r.fd("close", wfd)
        r.fd("close", rfd)
        r.os("mknod", "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        r.os("mknod", "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
        r.os("mknod", "reg", 0o600 | stat.S_IFREG)
        r.os("mknod", "sock", 0o600 | stat.S_IFSOCK)
        for name in ("chr", "blk", "reg", "sock"):
            r.os("stat", name)

    twin.run(scenario)


def test_chmod_chown(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("f", b"data")
        r.os("mkdir", "d")
        for mode in (0o000, 0o777, 0o4755, 0o2755, 0o1777, 0o7777, 0o640):
            r.os("chmod", "f", mode)
            r.os("stat", "f")
            r.os("chmod", "d", mode)
            r.os("stat", "d")
        r.os("chown", "f", 1000, 2000)
        r.os("stat", "f")
        r.os("chown", "f", -1, 3000)  # only the group
        r.os("stat", "f")
        r.os("chown", "f", 4000, -1)  # only the owner
        r.os("stat", "f")
        r.os("chmod", "f", 0o6755)
        r.os("chown", "f", 5000, 5000)  # chown clears set-user-ID and set-group-ID
        r.os("stat", "f")
        r.os("chmod", "f", 0o6755)
        fd = r.open("f", os.O_RDWR)
        r.fd("fchmod", fd, 0o600)
        r.fd("fchown", fd, 0, 0)
        r.fd("fstat", fd)
        r.fd("close", fd)
        r.os("chmod", "missing", 0o600)  # ENOENT
        r.os("chown", "d", 1234, 1234)
        r.os("stat", "d")

    twin.run(scenario)


def test_utime(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        def t(rel: str) -> Any:
            return r.call(
                f"times({rel!r})",
                lambda: (os.stat(r.p(rel)).st_atime_ns, os.stat(r.p(rel)).st_mtime_ns),
            )

        def near_now(rel: str, which: str) -> None:
            def check() -> bool:
                st = os.stat(r.p(rel))
                return abs(getattr(st, which) - time.time_ns()) < 30 * 10**9

            r.call(f"{which}({rel!r}) is now", check)

        r.write_file("f", b"x")
        r.os("mkdir", "d")
        r.os("utime", "f", ns=(1_000_000_123, 2_000_000_456))
        t("f")
        r.os("utime", "d", ns=(123_456_789_987_654_321, 1))
        t("d")
        r.os("utime", "f", ns=(0, 1_700_000_000_999_999_999))
        t("f")
        r.os("utime", "f", (1500000000.5, 1600000000.25))  # seconds as floats
        t("f")
        r.os("utime", "f")  # both to now (UTIME_NOW)
        near_now("f", "st_atime_ns")
        near_now("f", "st_mtime_ns")
        r.os("utime", "f", ns=(10**18, 10**18))
        # UTIME_OMIT: only the mtime
        r.call("utimensat(f, OMIT, 5.5)", utimensat, r.p("f"), (0, UTIME_OMIT), (5, 500))
        t("f")
        # UTIME_OMIT: only the atime
        r.call("utimensat(f, 7.7, OMIT)", utimensat, r.p("f"), (7, 700), (0, UTIME_OMIT))
        t("f")
        # UTIME_NOW for one, OMIT for the other
        r.call("utimensat(f, OMIT, NOW)", utimensat, r.p("f"), (0, UTIME_OMIT), (0, UTIME_NOW))
        near_now("f", "st_mtime_ns")
        r.call("atime kept", lambda: os.stat(r.p("f")).st_atime_ns)
        r.call("utimensat(f, OMIT, OMIT)", utimensat, r.p("f"), (0, UTIME_OMIT), (0, UTIME_OMIT))
        r.call("atime kept", lambda: os.stat(r.p("f")).st_atime_ns)
        # a write updates mtime (to now)
        r.os("utime", "f", ns=(10**9, 10**9))
        with open(r.p("f"), "ab") as f:
            f.write(b"more")
        near_now("f", "st_mtime_ns")
        r.os("utime", "missing", ns=(1, 1))  # ENOENT
        r.call("utimensat bad nsec", utimensat, r.p("f"), (0, 10**9), (0, 0))  # EINVAL
        # times on a symlink itself
        r.call("symlink", os.symlink, "f", r.p("lnk"))
        r.call("lutime", os.utime, r.p("lnk"), ns=(3 * 10**9, 4 * 10**9), follow_symlinks=False)
        r.call("lstat times", lambda: os.lstat(r.p("lnk")).st_mtime_ns)

    twin.run(scenario)


def test_xattrs(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        r.write_file("f", b"x")
        r.os("mkdir", "d")
        r.os("getxattr", "f", "user.none")  # ENODATA
        r.os("setxattr", "f", "user.a", b"alpha")
        r.os("setxattr", "f", "user.empty", b"")
        r.os("setxattr", "f", "user.bin", bytes(range(256)))
        r.os("setxattr", "f", "user.big", b"v" * 60000)
        r.os("getxattr", "f", "user.a")
        r.os("getxattr", "f", "user.empty")
        r.os("getxattr", "f", "user.bin")
        r.os("getxattr", "f", "user.big")
        r.call(
            "listxattr", lambda: sorted(n for n in os.listxattr(r.p("f")) if n.startswith("user."))
        )
        r.os("setxattr", "f", "user.a", b"replaced")
        r.os("getxattr", "f", "user.a")
        r.os("removexattr", "f", "user.a")
        r.os("removexattr", "f", "user.a")  # ENODATA
        r.os("getxattr", "f", "user.a")  # ENODATA
        r.os("setxattr", "d", "user.on_dir", b"dir value")
        r.os("getxattr", "d", "user.on_dir")
        r.os("setxattr", "f", "user." + "n" * 251, b"longest name")
        r.os("setxattr", "f", "user." + "n" * 256, b"")  # ERANGE: name too long
        r.os("setxattr", "f", "bogus.ns", b"")  # EOPNOTSUPP
        r.os("setxattr", "f", "trusted.t", b"root may")
        r.os("getxattr", "f", "trusted.t")
        r.os("getxattr", "missing", "user.a")  # ENOENT
        r.call("symlink", os.symlink, "f", r.p("lnk"))
        r.os("getxattr", "lnk", "user.bin")  # follows the link
        r.call("lsetxattr", os.setxattr, r.p("lnk"), "user.x", b"", follow_symlinks=False)  # EPERM
        fd = r.open("f", os.O_RDONLY)
        r.fd("setxattr", fd, "user.by_fd", b"fd")
        r.fd("getxattr", fd, "user.by_fd")
        r.fd("close", fd)

    twin.run(scenario)


def test_xattr_create_replace_flags(twin: Twin) -> None:
    """setxattr(XATTR_CREATE) must not replace, setxattr(XATTR_REPLACE) must not create."""

    def scenario(r: Rec) -> None:
        r.write_file("f", b"x")
        r.os("setxattr", "f", "user.a", b"1", XATTR_CREATE)
        r.os("setxattr", "f", "user.a", b"2", XATTR_CREATE)  # EEXIST
        r.os("getxattr", "f", "user.a")
        r.os("setxattr", "f", "user.b", b"3", XATTR_REPLACE)  # ENODATA
        r.os("getxattr", "f", "user.b")  # ENODATA
        r.os("setxattr", "f", "user.a", b"4", XATTR_REPLACE)
        r.os("getxattr", "f", "user.a")

    twin.run(scenario)


def test_access(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        for mode in (0o000, 0o444, 0o644, 0o755, 0o100, 0o010, 0o001):
            name = f"f{mode:03o}"
            r.write_file(name, b"#!/bin/sh\n", mode)
            r.os("chmod", name, mode)
            for what in (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK | os.X_OK):
                r.os("access", name, what)
        r.os("mkdir", "d", 0o000)
        r.os("access", "d", os.X_OK)
        r.os("access", "missing", os.F_OK)

    twin.run(scenario)


def test_statvfs(twin: Twin) -> None:
    mv = os.statvfs(twin.mnt)
    bv = os.statvfs(twin.backing)
    assert mv.f_namemax == bv.f_namemax == 255
    assert mv.f_bsize > 0 and mv.f_frsize > 0
    assert mv.f_blocks * mv.f_frsize == bv.f_blocks * bv.f_frsize
    assert 0 < mv.f_bavail <= mv.f_bfree <= mv.f_blocks
    assert 0 < mv.f_ffree <= mv.f_files == bv.f_files
    # free space moves with the backing filesystem's (another process may write meanwhile)
    assert abs(mv.f_bfree * mv.f_frsize - bv.f_bfree * bv.f_frsize) < (1 << 30)
    # fstatvfs on an open file of the mount gives the same
    fd = os.open(twin.mnt, os.O_RDONLY)
    try:
        assert os.fstatvfs(fd).f_blocks == mv.f_blocks
    finally:
        os.close(fd)


# ================================================================================================
# fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range (kernel fallbacks on pyfuse3)
# ================================================================================================


def _blocks(fd: int) -> int:
    return os.fstat(fd).st_blocks


def test_fallocate(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        fd = r.open("f", os.O_RDWR | os.O_CREAT, 0o644)
        r.fd("write", fd, b"\xaa" * 65536)
        r.call("fallocate(0, 0, 1 MiB)", fallocate, fd, 0, 0, 1 << 20)  # grows the file
        r.fd("fstat", fd)
        r.call(
            "fallocate(KEEP_SIZE, 1 MiB, 1 MiB)",
            fallocate,
            fd,
            FALLOC_FL_KEEP_SIZE,
            1 << 20,
            1 << 20,
        )
        r.fd("fstat", fd)
        before = _blocks(fd) if fd is not None else 0
        r.call(
            "fallocate(PUNCH_HOLE|KEEP_SIZE, 4096, 32768)",
            fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 32768,
        )  # fmt: skip
        r.call("blocks decreased", lambda: _blocks(fd) < before)  # type: ignore[arg-type]
        r.fd("pread", fd, 65536, 0)
        r.fd("fstat", fd)
        r.call(
            "fallocate(PUNCH_HOLE without KEEP_SIZE)", fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 10
        )  # EOPNOTSUPP
        r.call("fallocate(ZERO_RANGE, 10, 100)", fallocate, fd, FALLOC_FL_ZERO_RANGE, 10, 100)
        r.fd("pread", fd, 200, 0)
        r.call("fallocate(0, -1, 1)", fallocate, fd, 0, -1, 1)  # EINVAL
        r.fd("close", fd)
        fd = r.open("f", os.O_RDONLY)
        r.call("fallocate on read-only fd", fallocate, fd, 0, 0, 10)  # EBADF
        r.fd("close", fd)
        r.read_file("f")

    if twin.session == "fusefs":
        twin.run(scenario)
        return
    # pyfuse3 has no FALLOCATE: the kernel answers EOPNOTSUPP for every mode (and remembers)
    rec = Rec(twin.mnt)
    scenario(rec)
    results = {label: out for label, out in rec.log if label.startswith("fallocate")}
    assert results, rec.log
    expected = {label: ("error", errno.errorcode[errno.EOPNOTSUPP]) for label in results}
    expected["fallocate on read-only fd"] = ("error", "EBADF")  # checked by the VFS first
    expected["fallocate(0, -1, 1)"] = ("error", "EINVAL")
    assert results == expected


def _sparse(r: Rec) -> int | None:
    fd = r.open("sparse", os.O_RDWR | os.O_CREAT, 0o644)
    r.fd("pwrite", fd, b"D" * 4096, 0)
    r.fd("pwrite", fd, b"E" * 8192, 1 << 20)
    r.fd("ftruncate", fd, 3 << 20)
    r.fd("fsync", fd)
    return fd


SEEKS = [(os.SEEK_HOLE, 0), (os.SEEK_DATA, 0), (os.SEEK_DATA, 4096), (os.SEEK_DATA, 5000),
         (os.SEEK_HOLE, 1 << 20), (os.SEEK_HOLE, (1 << 20) + 100), (os.SEEK_DATA, (1 << 20) + 8192),
         (os.SEEK_HOLE, (3 << 20) - 1), (os.SEEK_DATA, 3 << 20), (os.SEEK_HOLE, 3 << 20),
         (os.SEEK_DATA, 5 << 20)]  # fmt: skip


def test_seek_data_hole(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        fd = _sparse(r)
        for whence, off in SEEKS:
            name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
            r.call(f"lseek({off}, {name})", os.lseek, fd, off, whence)
        r.fd("close", fd)

    if twin.session == "fusefs":
        twin.run(scenario)
        return
    # pyfuse3 has no LSEEK: the kernel's generic answer is "all data, one hole at EOF"
    rec = Rec(twin.mnt)
    scenario(rec)
    got = {label: out for label, out in rec.log if label.startswith("lseek")}
    size = 3 << 20
    expected = {}
    for whence, off in SEEKS:
        name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
        if off >= size:
            out: Any = ("error", "ENXIO")
        else:
            out = ("ok", off if whence == os.SEEK_DATA else size)
        expected[f"lseek({off}, {name})"] = out
    assert got == expected


def test_copy_file_range(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        data = (bytes(range(251)) * ((3 << 20) // 251 + 1))[: 3 << 20]
        r.write_file("src", data)
        src = r.open("src", os.O_RDONLY)
        dst = r.open("dst", os.O_RDWR | os.O_CREAT, 0o644)

        def copy(n: int, off_in: int, off_out: int) -> int:
            done = 0
            while done < n:
                k = os.copy_file_range(src, dst, n - done, off_in + done, off_out + done)  # type: ignore[arg-type]
                if k == 0:
                    break
                done += k
            return done

        r.call("copy 2 MiB to 0", copy, 2 << 20, 0, 0)
        r.call("copy unaligned", copy, 100_001, 12_345, 3_000_001)  # into a hole past EOF
        r.call("copy past src EOF", copy, 1 << 20, (3 << 20) - 10, 10)  # short
        r.call("copy from EOF", copy, 100, 3 << 20, 0)  # nothing
        r.fd("fstat", dst)
        r.fd("pread", dst, 4 << 20, 0)
        # the fd offsets move when no offsets are given
        r.call("copy at fd offsets", lambda: os.copy_file_range(src, dst, 1000))  # type: ignore[arg-type]
        r.call("offsets", lambda: (os.lseek(src, 0, os.SEEK_CUR), os.lseek(dst, 0, os.SEEK_CUR)))  # type: ignore[arg-type]
        r.fd("close", src)
        r.fd("close", dst)
        r.read_file("dst")
        ro = r.open("dst", os.O_RDONLY)
        r.call("copy into read-only fd", lambda: os.copy_file_range(ro, ro, 10, 0, 100))  # type: ignore[arg-type]
        r.fd("close", ro)

    # Under pyfuse3 (no COPY_FILE_RANGE) the kernel copies by splicing: the result is the same.
    twin.run(scenario)


# ================================================================================================
# Reading directories while they change; long names and paths; every byte in a name
# ================================================================================================


def test_readdir_stable_while_mutating(twin: Twin) -> None:
    """Entries neither added nor removed during a listing appear exactly once."""
    count = 800
    names = [f"entry-{i:05d}-" + "p" * 100 for i in range(count)]
    for root in (twin.backing, twin.plain):
        (root / "d").mkdir()
        for n in names:
            (root / "d" / n).touch()
    doomed = set(names[::7])

    def scenario(r: Rec) -> None:
        d = os.fsdecode(r.p("d"))
        seen: list[str] = []
        added: set[str] = set()
        victims = iter(sorted(doomed, reverse=True))  # remove from the end: ahead of the cursor
        with os.scandir(d) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i % 10 == 0:
                    new = f"new-{i:05d}"
                    with open(f"{d}/{new}", "wb"):
                        pass
                    added.add(new)
                    victim = next(victims, None)
                    if victim is not None:
                        os.unlink(f"{d}/{victim}")
        touched = added | doomed
        r.note("duplicates", sorted(n for n in set(seen) if seen.count(n) > 1))
        r.note("unchanged missing", sorted(set(names) - touched - set(seen)))
        r.note("strangers", sorted(set(seen) - set(names) - added))
        r.note("listing afterwards", len(os.listdir(d)))

    # How many entries a listing meets depends on the directory's hash order, and so does the
    # number of changes made during it: the mount is compared with its backing only.
    twin.run(scenario, trees=False)
    assert_same_trees(twin.mnt, twin.backing, "mount vs its backing directory")


def test_long_names(twin: Twin) -> None:
    def scenario(r: Rec) -> None:
        n255 = "n" * 255
        r.write_file(n255, b"longest")
        r.os("stat", n255)
        r.read_file(n255)
        r.call("listdir", lambda: os.listdir(r.root) == [n255])
        r.os("mkdir", "d" * 255)
        r.os2("rename", n255, "d" * 255 + "/" + "m" * 255)
        r.read_file("d" * 255 + "/" + "m" * 255)
        r.open("x" * 256, os.O_WRONLY | os.O_CREAT)  # ENAMETOOLONG
        r.os("mkdir", "x" * 256)  # ENAMETOOLONG
        r.os("stat", "x" * 256)  # ENAMETOOLONG
        r.call("symlink", os.symlink, "t", r.p("s" * 255))
        r.os("readlink", "s" * 255)
        r.os2("link", "d" * 255 + "/" + "m" * 255, "l" * 255)
        r.os("stat", "l" * 255)

    twin.run(scenario)


def test_path_near_path_max(twin: Twin) -> None:
    """A relative path of ~4000 bytes from the root: created, stat'ed, used and removed."""
    comps = [f"c{i:02d}" + "q" * 196 for i in range(19)]  # 19 * 200 = 3800 bytes of components
    leaf = "leaf" + "z" * 180

    def scenario(r: Rec) -> None:
        rootfd = os.open(r.root, os.O_RDONLY | os.O_DIRECTORY)
        try:

            def at(name: str, fn: Callable[..., Any], rel: str, *args: Any, **kw: Any) -> Any:
                return r.call(f"{name}({len(rel)} bytes)", fn, rel, *args, dir_fd=rootfd, **kw)

            path = ""
            for c in comps:
                path = f"{path}/{c}" if path else c
                at("mkdir", os.mkdir, path, 0o755)
            full = f"{path}/{leaf}"
            r.note("length", len(full))
            assert 3950 < len(full) < 4096
            fd = at("open", os.open, full, os.O_RDWR | os.O_CREAT, 0o644, norm=ignore)
            r.fd("write", fd, b"deep down")
            r.fd("close", fd)
            at("stat", os.stat, full)
            fd = at("open", os.open, full, os.O_RDONLY, norm=ignore)
            r.fd("read", fd, 100)
            r.fd("close", fd)
            at(
                "rename",
                lambda p, dir_fd: os.rename(p, p + "2", src_dir_fd=dir_fd, dst_dir_fd=dir_fd),
                full,
            )
            at("stat", os.stat, full + "2")
            at("open too long", os.open, full + "/" + "y" * 200, os.O_RDONLY)  # ENAMETOOLONG
            at("unlink", os.unlink, full + "2")
            for i in range(len(comps), 0, -1):
                at("rmdir", os.rmdir, "/".join(comps[:i]))
            r.call("listdir", lambda: os.listdir(r.root))
        finally:
            os.close(rootfd)

    twin.run(scenario)


def test_names_with_every_byte(twin: Twin) -> None:
    low = bytes(b for b in range(1, 128) if b != ord("/"))
    high = bytes(range(128, 256))
    odd = [
        low,
        high,
        b"\n",
        b" ",
        b"-",
        b"...",
        b"\\",
        b"*?[",
        b"\xff\xfe",
        b" lead",
        b"trail ",
        b"a\tb",
    ]

    def scenario(r: Rec) -> None:
        for i, name in enumerate(odd):
            r.write_file(name, b"%d" % i)
        r.call("listdir", lambda: sorted(os.listdir(r.root)) == sorted(odd))
        for name in odd:
            r.os("stat", name)
            r.read_file(name)
        r.os("mkdir", low[:100] + b"d")
        r.os2("rename", high, low[:100] + b"d/" + high)
        r.read_file(low[:100] + b"d/" + high)
        r.call("symlink", os.symlink, high + low, r.p(b"link\x01"))
        r.os("readlink", b"link\x01")
        r.os("mkdir", ".")  # EEXIST
        r.os("mkdir", "..")  # EEXIST
        for name in odd[2:]:
            r.os("unlink", name)
        r.call("listdir", lambda: sorted(os.listdir(r.root)))

    twin.run(scenario)


# ================================================================================================
# Locks between processes
# ================================================================================================


def test_locks_between_processes(twin: Twin) -> None:
    def try_in_child(path: bytes, what: str) -> str:
        def attempt() -> str:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                return f"open: {errno.errorcode[e.errno]}"
            try:
                if what == "flock":
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                elif what == "flock_sh":
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                else:
                    start, length = map(int, what.split(":"))
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                return "locked"
            except OSError as e:
                return errno.errorcode[e.errno]
            finally:
                os.close(fd)

        result: str = in_child(attempt)
        return result

    def scenario(r: Rec) -> None:
        r.write_file("lockme", b"x" * 1000)
        path = r.p("lockme")
        fd = os.open(path, os.O_RDWR)
        try:
            r.note("unlocked: child flock", try_in_child(path, "flock"))
            fcntl.flock(fd, fcntl.LOCK_EX)
            r.note("held: child flock", try_in_child(path, "flock"))
            r.note("held: child flock shared", try_in_child(path, "flock_sh"))
            fcntl.flock(fd, fcntl.LOCK_SH)
            r.note("shared: child flock shared", try_in_child(path, "flock_sh"))
            fcntl.flock(fd, fcntl.LOCK_UN)
            r.note("released: child flock", try_in_child(path, "flock"))
            # POSIX record locks: bytes 0..99
            fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
            r.note("posix held: child 50+10", try_in_child(path, "50:10"))
            r.note("posix held: child 100+100", try_in_child(path, "100:100"))
            r.note("posix held: child 0+0 (all)", try_in_child(path, "0:0"))
            fcntl.lockf(fd, fcntl.LOCK_UN, 100, 0)
            r.note("posix released: child 50+10", try_in_child(path, "50:10"))
            # closing any fd of the file drops this process's POSIX locks
            fcntl.lockf(fd, fcntl.LOCK_EX, 0, 0)
            other = r.open("lockme", os.O_RDONLY)
            r.fd("close", other)
            r.note("posix after close of another fd: child", try_in_child(path, "0:0"))
        finally:
            os.close(fd)

    twin.run(scenario)


# ================================================================================================
# Inode numbers, changes behind the mount's back
# ================================================================================================


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _forgets(mnt: Path) -> int:
    requests = stats_of(mnt)["requests"]
    return int(requests.get("FORGET", 0)) + int(requests.get("BATCH_FORGET", 0))


def test_inode_numbers_stable_across_lookups(twin: Twin) -> None:
    mnt = twin.mnt
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"x")
    (mnt / "g").write_bytes(b"y")
    os.link(mnt / "g", mnt / "d" / "g2")
    paths = [mnt / "d", mnt / "d" / "f", mnt / "g", mnt / "d" / "g2"]
    first = [os.stat(p).st_ino for p in paths]
    assert first[2] == first[3], "hard links must share st_ino on the mount"
    assert len(set(first)) == 3
    forgets = _forgets(mnt) if twin.session == "fusefs" else 0
    _drop_caches()
    if twin.session == "fusefs":  # the kernel really forgot the inodes (and looks them up anew)
        assert _forgets(mnt) > forgets
    second = [os.stat(p).st_ino for p in paths]
    assert second == first
    # readdir reports the same numbers as stat
    with os.scandir(mnt / "d") as it:
        by_name = {e.name: e.inode() for e in it}
    assert by_name == {"f": first[1], "g2": first[3]}
    # the mount shows the backing inode numbers (mirrorfs: "the st_ino a program sees is the
    # backing st_ino whenever that is unambiguous")
    backing = [os.stat(twin.backing / p.relative_to(mnt)).st_ino for p in paths]
    assert first == backing
    # a renamed file keeps its number
    os.rename(mnt / "d" / "f", mnt / "f-moved")
    assert os.stat(mnt / "f-moved").st_ino == first[1]
    _drop_caches()
    assert os.stat(mnt / "f-moved").st_ino == first[1]


def test_changes_in_backing_become_visible(mount_factory: Any, backing: Path, variant: str) -> None:
    (backing / "keep").write_bytes(b"v1")
    (backing / "dir").mkdir()
    (backing / "dir" / "old").write_bytes(b"old")
    m: Mount = mount_factory(options=["attr_timeout=0.1,entry_timeout=0.1", *VARIANTS[variant][1]])
    mnt = m.mountpoint
    # the mount has seen everything once (cached names and attributes)
    assert (mnt / "keep").read_bytes() == b"v1"
    assert sorted(os.listdir(mnt / "dir")) == ["old"]
    assert os.stat(mnt / "keep").st_size == 2
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "dir" / "new")  # a negative entry, cached too
    fd = os.open(mnt / "keep", os.O_RDONLY)
    try:
        # behind the mount's back
        (backing / "keep").write_bytes(b"version two")
        (backing / "dir" / "new").write_bytes(b"new")
        (backing / "dir" / "old").unlink()
        os.chmod(backing / "keep", 0o600)
        os.mkdir(backing / "sub")
        os.symlink("keep", backing / "link")
        time.sleep(0.5)
        assert os.stat(mnt / "keep").st_size == len(b"version two")
        assert stat.S_IMODE(os.stat(mnt / "keep").st_mode) == 0o600
        assert (mnt / "keep").read_bytes() == b"version two"
        assert os.pread(fd, 100, 0) == b"version two"  # an fd opened before the change
        assert (mnt / "dir" / "new").read_bytes() == b"new"
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "dir" / "old")
        assert sorted(os.listdir(mnt / "dir")) == ["new"]
        assert sorted(os.listdir(mnt)) == ["dir", "keep", "link", "sub"]
        assert os.readlink(mnt / "link") == "keep"
        # a name replaced by a different file of the same name
        os.rename(backing / "dir" / "new", backing / "renamed")
        (backing / "dir" / "new").write_bytes(b"another file")
        time.sleep(0.5)
        assert (mnt / "dir" / "new").read_bytes() == b"another file"
        assert (mnt / "renamed").read_bytes() == b"new"
        assert os.stat(mnt / "renamed").st_ino == os.stat(backing / "renamed").st_ino
    finally:
        os.close(fd)
    assert_same_trees(mnt, backing, "mount vs backing after changes behind its back")


# ================================================================================================
# Another user, through allow_other and default_permissions
# ================================================================================================

NOBODY = 65534


@pytest.fixture
def public_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """backing, mountpoint and plain dirs that user nobody can reach (tmp_path is 0700).

    Request it before ``mount_factory`` so that it is torn down after the unmount.
    """
    top = Path(tempfile.mkdtemp(prefix="fusefs-posix-", dir="/tmp"))
    os.chmod(top, 0o755)
    dirs = []
    for name in ("backing", "mnt", "plain"):
        (top / name).mkdir()
        os.chmod(top / name, 0o755)
        dirs.append(top / name)
    yield dirs[0], dirs[1], dirs[2]
    with contextlib.suppress(OSError):
        shutil.rmtree(top)


def test_other_user_allow_other_default_permissions(
    public_dirs: tuple[Path, Path, Path], mount_factory: Any, variant: str
) -> None:
    backing, mountpoint, plain = public_dirs
    mount_factory(
        backing, mountpoint, options=["allow_other,default_permissions", *VARIANTS[variant][1]]
    )

    def setup(root: Path) -> None:
        (root / "pub").mkdir()
        os.chmod(root / "pub", 0o777)
        (root / "sticky").mkdir()
        os.chmod(root / "sticky", 0o1777)
        (root / "sticky" / "roots").write_bytes(b"r")
        (root / "private").write_bytes(b"secret")
        os.chmod(root / "private", 0o600)
        (root / "readable").write_bytes(b"hello")
        os.chmod(root / "readable", 0o644)
        (root / "closed").mkdir()
        os.chmod(root / "closed", 0o700)
        (root / "closed" / "inside").write_bytes(b"i")

    def as_nobody(root: Path) -> list[tuple[str, Any]]:
        def scenario() -> list[tuple[str, Any]]:
            r = Rec(root)
            fd = r.open("pub/mine", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            r.fd("write", fd, b"by nobody")
            r.fd("close", fd)
            r.os("mkdir", "pub/mydir", 0o755)
            r.call("symlink", os.symlink, "mine", r.p("pub/mylink"))
            r.os("stat", "pub/mine")
            r.os("stat", "pub/mydir")
            r.os("lstat", "pub/mylink")
            r.open("private", os.O_RDONLY)  # EACCES
            r.open("readable", os.O_WRONLY)  # EACCES
            r.read_file("readable")
            r.os("unlink", "readable")  # EACCES: the root directory is 0755 root
            r.os("mkdir", "newdir")  # EACCES
            r.os("listdir", "closed")  # EACCES
            r.os("stat", "closed/inside")  # EACCES
            r.os("unlink", "sticky/roots")  # EPERM: sticky directory, not the owner
            r.os("chmod", "readable", 0o777)  # EPERM: not the owner
            r.os("chown", "pub/mine", 0, 0)  # EPERM
            r.os("chmod", "pub/mine", 0o4755)
            r.os("stat", "pub/mine")
            r.os("utime", "readable", ns=(1, 1))  # EPERM: not the owner
            r.os("utime", "pub/mine", ns=(5 * 10**9, 6 * 10**9))
            r.os("access", "private", os.R_OK)
            r.os("access", "readable", os.R_OK)
            r.os("access", "readable", os.W_OK)
            r.os("setxattr", "readable", "user.x", b"1")  # EACCES
            r.os("setxattr", "pub/mine", "user.x", b"1")
            r.os("truncate", "readable", 0)  # EACCES
            fd = r.open("pub/mine", os.O_WRONLY | os.O_APPEND)
            r.fd("write", fd, b"!")
            r.fd("close", fd)
            r.os2("rename", "pub/mine", "pub/renamed")
            r.os2("rename", "readable", "pub/stolen")  # EACCES
            return r.log

        log: list[tuple[str, Any]] = in_child(scenario, uid=NOBODY, gid=NOBODY)
        return log

    setup(mountpoint)
    setup(plain)
    assert_same_logs(as_nobody(mountpoint), as_nobody(plain))
    st = os.stat(backing / "pub" / "renamed")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), "files made by nobody belong to nobody"
    assert (
        os.stat(backing / "pub" / "mydir").st_uid,
        os.lstat(backing / "pub" / "mylink").st_uid,
    ) == (
        NOBODY,
        NOBODY,
    )
    assert_same_trees(mountpoint, plain)
    assert_same_trees(mountpoint, backing, "mount vs its backing directory")


def test_unprivileged_write_clears_setid_bits(
    public_dirs: tuple[Path, Path, Path], mount_factory: Any, variant: str
) -> None:
    """A write or truncate by a user without CAP_FSETID clears set-user-ID and set-group-ID."""
    backing, mountpoint, plain = public_dirs
    mount_factory(
        backing, mountpoint, options=["allow_other,default_permissions", *VARIANTS[variant][1]]
    )
    for root in (mountpoint, plain):
        os.chmod(root, 0o777)
        for name in ("w", "t", "rootw"):
            (root / name).write_bytes(b"0123456789")
            os.chown(root / name, NOBODY, NOBODY)
            os.chmod(root / name, 0o6777)

    def scenario(r: Rec) -> None:
        fd = r.open("w", os.O_WRONLY)
        r.fd("pwrite", fd, b"x", 3)
        r.fd("close", fd)
        r.os("stat", "w")
        r.os("truncate", "t", 4)
        r.os("stat", "t")
        # the bits set while the file is already open for writing
        fd = r.open("late", os.O_WRONLY | os.O_CREAT, 0o644)
        r.fd("write", fd, b"first")
        r.os("chmod", "late", 0o6777)
        r.fd("write", fd, b"second")
        r.fd("fstat", fd)
        r.fd("close", fd)
        r.os("stat", "late")

    def as_nobody(root: Path) -> list[tuple[str, Any]]:
        def run() -> list[tuple[str, Any]]:
            r = Rec(root)
            scenario(r)
            return r.log

        log: list[tuple[str, Any]] = in_child(run, uid=NOBODY, gid=NOBODY)
        return log

    assert_same_logs(as_nobody(mountpoint), as_nobody(plain))
    # root (CAP_FSETID) keeps the bits
    logs = []
    for root in (mountpoint, plain):
        r = Rec(root)
        fd = r.open("rootw", os.O_WRONLY)
        r.fd("pwrite", fd, b"x", 3)
        r.fd("close", fd)
        r.os("stat", "rootw")
        logs.append(r.log)
    assert_same_logs(*logs)
    assert_same_trees(mountpoint, plain)
