"""Randomized equivalence (fsx-style): the same operations on a mount and on a plain directory.

An *operation* is a plain tuple ``(name, *args)`` of ints and strings, so a sequence of them
is data: it can be replayed, shrunk, printed and saved as JSON.  :class:`World` applies one
operation to one directory tree (paths are relative to its root; files are opened into numbered
*slots*) and returns its *outcome*: the result value, or the errno name.  :class:`Engine` applies
each operation to two worlds (the tree on the mount and a plain directory on the same backing
filesystem) and reports the first operation whose outcomes differ; every ``check_every``
operations, and at the end, :func:`compare_trees` compares the whole trees (names, types,
modes, sizes, link counts, symlink targets, xattrs, file contents).

:class:`Generator` produces random operations from a seed, looking at the plain world to pick
paths and offsets that mostly mean something (existing files, offsets around the file size,
across 1 MiB boundaries, past EOF).  :func:`shrink` reduces a failing operation list by delta
debugging (ddmin) to a minimal reproducer.

Used by tests/test_reliability.py (short runs, hypothesis) and tools/torture (long runs).
Everything here uses only the OS and ctypes: no fusefs code, so the tests judge fusefs from the
outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import mmap
import os
import random
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = mmap.PAGESIZE

Op = tuple[Any, ...]
Outcome = tuple[Any, ...]

# --- libc calls Python lacks --------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]  # fmt: skip
_libc.renameat2.restype = ctypes.c_int

AT_FDCWD = -100
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: fallocate modes FUSE forwards (the kernel refuses COLLAPSE/INSERT_RANGE with EOPNOTSUPP
#: before asking the filesystem, so they would differ from ext4 by design).  PUNCH_HOLE without
#: KEEP_SIZE is refused by the VFS on both sides.
FALLOC_MODES = (
    0,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --- data ---------------------------------------------------------------------------------


def data_for(seed: int, size: int) -> bytes:
    """Deterministic bytes for a write (random, so misplaced data cannot look right)."""
    return random.Random(seed).randbytes(size)


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def _stat_summary(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    """What must agree between the mount and the plain directory (no times, no st_blocks;
    directory sizes are an ext4 detail of their history)."""
    size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, size, st.st_uid,
            st.st_gid)  # fmt: skip


def _fmt_outcome(o: Outcome) -> str:
    parts = []
    for v in o:
        if isinstance(v, bytes) and len(v) > 48:
            parts.append(f"<{len(v)} bytes {_digest(v)}>")
        else:
            parts.append(repr(v))
    return "(" + ", ".join(parts) + ")"


def first_difference(a: bytes, b: bytes) -> str:
    """Where two byte strings first differ, for messages."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return (f"first difference at byte {i} ({a[i]:#04x} vs {b[i]:#04x}); "
                    f"sizes {len(a)}, {len(b)}")  # fmt: skip
    return f"equal up to byte {n}; sizes {len(a)}, {len(b)}"


def zeros_where_data(fd: int, guide: int, start: int, end: int) -> bool:
    """Whether bytes [start, end) of ``fd`` read as zeros, reading only where the file
    ``guide`` (same contents, e.g. the plain world's copy) has data: holes of terabytes cost
    nothing.  A write-only ``fd`` counts as zeros (nothing to judge with).  File offsets are
    left as they were."""
    saved = os.lseek(guide, 0, os.SEEK_CUR)
    try:
        return _zeros_where_data(fd, guide, start, end)
    finally:
        os.lseek(guide, saved, os.SEEK_SET)


def _zeros_where_data(fd: int, guide: int, start: int, end: int) -> bool:
    pos = start
    while pos < end:
        try:
            data = os.lseek(guide, pos, os.SEEK_DATA)
            hole = os.lseek(guide, data, os.SEEK_HOLE)
        except OSError:
            return True  # ENXIO: no more data in the guide
        a, b = max(data, start), min(hole, end)
        while a < b:
            try:
                chunk = os.pread(fd, min(MiB, b - a), a)
            except OSError:
                return True
            if not chunk:
                return True
            if chunk.count(0) != len(chunk):
                return False
            a += len(chunk)
        pos = max(hole, pos + 1)
    return True


# --- one world ----------------------------------------------------------------------------


class World:
    """A directory tree operations are applied to, with its open files in numbered slots."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.fds: dict[int, int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def apply(self, op: Op) -> Outcome:
        """Run ``op``; its outcome: ("ok", values...) or ("err", ERRNO_NAME)."""
        fn: Callable[..., Outcome] = getattr(self, "op_" + op[0])
        try:
            return fn(*op[1:])
        except OSError as e:
            return ("err", errname(e))
        except (ValueError, OverflowError) as e:  # mmap argument errors, same on both sides
            return ("exc", type(e).__name__)

    def close_all(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def _fd(self, slot: int) -> int:
        try:
            return self.fds[slot]
        except KeyError:
            raise OSError(errno.EBADF, "empty slot") from None

    # file descriptors

    def op_open(self, slot: int, path: str, flags: int, mode: int) -> Outcome:
        self.op_close(slot)
        fd = os.open(self.path(path), flags | os.O_CLOEXEC, mode)
        self.fds[slot] = fd
        return ("ok", _stat_summary(os.fstat(fd)))

    def op_close(self, slot: int) -> Outcome:
        fd = self.fds.pop(slot, None)
        if fd is None:
            return ("ok", False)
        os.close(fd)
        return ("ok", True)

    def op_pread(self, slot: int, off: int, size: int) -> Outcome:
        return ("ok", os.pread(self._fd(slot), size, off))

    def op_pwrite(self, slot: int, off: int, size: int, seed: int) -> Outcome:
        fd = self._fd(slot)
        n = os.pwrite(fd, data_for(seed, size), off)
        return ("ok", n, os.fstat(fd).st_size)

    def op_read(self, slot: int, size: int) -> Outcome:
        fd = self._fd(slot)
        data = os.read(fd, size)
        return ("ok", data, os.lseek(fd, 0, os.SEEK_CUR))

    def op_write(self, slot: int, size: int, seed: int) -> Outcome:
        fd = self._fd(slot)
        n = os.write(fd, data_for(seed, size))
        return ("ok", n, os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size)

    def op_lseek(self, slot: int, off: int, whence: int) -> Outcome:
        fd = self._fd(slot)
        if whence not in (os.SEEK_SET, os.SEEK_CUR) and stat.S_ISDIR(os.fstat(fd).st_mode):
            # ext4 directory offsets are hashes with their own SEEK_END/DATA/HOLE rules;
            # FUSE directories use the generic ones.  Not a file data question: skipped.
            return ("ok", "directory")
        return ("ok", os.lseek(fd, off, whence))

    def op_ftruncate(self, slot: int, size: int) -> Outcome:
        fd = self._fd(slot)
        os.ftruncate(fd, size)
        return ("ok", os.fstat(fd).st_size)

    def op_fallocate(self, slot: int, mode: int, off: int, length: int) -> Outcome:
        fd = self._fd(slot)
        fallocate(fd, mode, off, length)
        return ("ok", os.fstat(fd).st_size)

    def op_fsync(self, slot: int, datasync: int) -> Outcome:
        (os.fdatasync if datasync else os.fsync)(self._fd(slot))
        return ("ok",)

    def op_fstat(self, slot: int) -> Outcome:
        return ("ok", _stat_summary(os.fstat(self._fd(slot))))

    def op_mmap_read(self, slot: int, off: int, size: int) -> Outcome:
        fd = self._fd(slot)
        fsize = os.fstat(fd).st_size
        if size == 0 or off >= fsize:
            return ("ok", "beyond eof", fsize)
        end = min(off + size, fsize)
        start = off - off % PAGE
        with mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as m:
            return ("ok", m[off - start : end - start])

    def op_mmap_write(self, slot: int, off: int, size: int, seed: int) -> Outcome:
        """Store through a shared writable mapping (inside the file: mappings do not extend it),
        msync, unmap."""
        fd = self._fd(slot)
        fsize = os.fstat(fd).st_size
        if size == 0 or off >= fsize:
            return ("ok", "beyond eof", fsize)
        end = min(off + size, fsize)
        start = off - off % PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        with mmap.mmap(fd, end - start, mmap.MAP_SHARED, prot, offset=start) as m:
            m[off - start : end - start] = data_for(seed, end - off)
            m.flush()
        return ("ok", end - off)

    def op_copy_file_range(
        self, src: int, off_in: int, dst: int, off_out: int, length: int
    ) -> Outcome:
        fd_out = self._fd(dst)
        n = os.copy_file_range(self._fd(src), fd_out, length, off_in, off_out)
        return ("ok", n, os.fstat(fd_out).st_size)

    # names

    def op_stat(self, path: str) -> Outcome:
        return ("ok", _stat_summary(os.lstat(self.path(path))))

    def op_truncate(self, path: str, size: int) -> Outcome:
        os.truncate(self.path(path), size)
        return ("ok", os.stat(self.path(path)).st_size)

    def op_rename(self, src: str, dst: str, flags: int) -> Outcome:
        if flags:
            renameat2(self.path(src), self.path(dst), flags)
        else:
            os.rename(self.path(src), self.path(dst))
        return ("ok",)

    def op_link(self, src: str, dst: str) -> Outcome:
        os.link(self.path(src), self.path(dst), follow_symlinks=False)
        return ("ok", os.lstat(self.path(dst)).st_nlink)

    def op_symlink(self, target: str, path: str) -> Outcome:
        os.symlink(target, self.path(path))
        return ("ok",)

    def op_readlink(self, path: str) -> Outcome:
        return ("ok", os.readlink(self.path(path)))

    def op_unlink(self, path: str) -> Outcome:
        os.unlink(self.path(path))
        return ("ok",)

    def op_mkdir(self, path: str, mode: int) -> Outcome:
        os.mkdir(self.path(path), mode)
        return ("ok", _stat_summary(os.lstat(self.path(path))))

    def op_rmdir(self, path: str) -> Outcome:
        os.rmdir(self.path(path))
        return ("ok",)

    def op_chmod(self, path: str, mode: int) -> Outcome:
        os.chmod(self.path(path), mode)
        return ("ok", stat.S_IMODE(os.stat(self.path(path)).st_mode))

    def op_utime(self, path: str, atime_ns: int, mtime_ns: int) -> Outcome:
        os.utime(self.path(path), ns=(atime_ns, mtime_ns))
        st = os.stat(self.path(path))
        return ("ok", st.st_atime_ns, st.st_mtime_ns)

    def op_listdir(self, path: str) -> Outcome:
        return ("ok", sorted(os.listdir(self.path(path))))

    def op_setxattr(self, path: str, name: str, size: int, seed: int, flags: int) -> Outcome:
        os.setxattr(self.path(path), name, data_for(seed, size), flags, follow_symlinks=False)
        return ("ok",)

    def op_getxattr(self, path: str, name: str) -> Outcome:
        return ("ok", os.getxattr(self.path(path), name, follow_symlinks=False))

    def op_listxattr(self, path: str) -> Outcome:
        return ("ok", sorted(os.listxattr(self.path(path), follow_symlinks=False)))

    def op_removexattr(self, path: str, name: str) -> Outcome:
        os.removexattr(self.path(path), name, follow_symlinks=False)
        return ("ok",)


OP_NAMES = sorted(n[3:] for n in dir(World) if n.startswith("op_"))


# --- comparing whole trees ----------------------------------------------------------------


def snapshot(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything that must agree about a tree but file contents, keyed by relative path."""
    out: dict[str, tuple[Any, ...]] = {}

    def walk(rel: str) -> None:
        path = os.path.join(root, rel) if rel else root
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        for name in names:
            child = os.path.join(rel, name) if rel else name
            cpath = os.path.join(root, child)
            try:
                st = os.lstat(cpath)
            except FileNotFoundError:
                continue
            info: tuple[Any, ...] = _stat_summary(st)
            try:
                xattrs = sorted(
                    (x, os.getxattr(cpath, x, follow_symlinks=False))
                    for x in os.listxattr(cpath, follow_symlinks=False)
                )
            except OSError as e:
                xattrs = [("error", errname(e))]  # type: ignore[list-item]
            info += (tuple(xattrs),)
            if stat.S_ISLNK(st.st_mode):
                info += (os.readlink(cpath),)
            out[child] = info
            if stat.S_ISDIR(st.st_mode):
                walk(child)

    walk("")
    return out


def compare_trees(a_root: str, b_root: str, contents: bool = True) -> list[str]:
    """Differences between two trees (empty: equal).  ``a`` is the mount (or backing) side."""
    a = snapshot(a_root)
    b = snapshot(b_root)
    problems = []
    for path in sorted(set(a) | set(b)):
        if path not in a:
            problems.append(f"{path}: missing on {a_root}")
        elif path not in b:
            problems.append(f"{path}: only on {a_root}")
        elif a[path] != b[path]:
            problems.append(f"{path}: {a[path]} != {b[path]}")
        elif contents and a[path][0] == stat.S_IFREG:
            problem = compare_contents(os.path.join(a_root, path), os.path.join(b_root, path))
            if problem:
                problems.append(f"{path}: {problem}")
    return problems


def compare_contents(a: str, b: str) -> str | None:
    """None if the two files hold the same bytes, else where they first differ."""
    try:
        with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
            done = 0
            while True:
                ca = fa.read(MiB)
                cb = fb.read(MiB)
                if ca != cb:
                    return "contents differ: " + first_difference(ca, cb) + f" of the MiB at {done}"
                if not ca:
                    return None
                done += len(ca)
    except OSError as e:
        return f"cannot read: {e}"


def compare_slots(mount: World, plain: World) -> list[str]:
    """The open files must have the same attributes on both sides."""
    problems = []
    for slot in sorted(set(mount.fds) | set(plain.fds)):
        a = mount.apply(("fstat", slot))
        b = plain.apply(("fstat", slot))
        if a != b:
            problems.append(f"slot {slot}: fstat {a} != {b}")
    return problems


# --- the engine ---------------------------------------------------------------------------


@dataclass
class Mismatch:
    """The first disagreement of a run."""

    index: int  # of the operation after which it was seen
    kind: str  # the operation's name, or "tree" for a whole-tree comparison
    message: str

    def __str__(self) -> str:
        return f"after operation #{self.index} ({self.kind}): {self.message}"


class Engine:
    """Applies operations to the mount world and the plain world and compares."""

    def __init__(
        self,
        mount_root: str | os.PathLike[str],
        plain_root: str | os.PathLike[str],
        *,
        backing_root: str | os.PathLike[str] | None = None,
        check_every: int = 100,
    ) -> None:
        for root in (mount_root, plain_root):
            remove_tree(os.fspath(root))
            os.makedirs(root)
        self.mount = World(mount_root)
        self.plain = World(plain_root)
        self.backing_root = os.fspath(backing_root) if backing_root is not None else None
        self.check_every = check_every
        self.count = 0
        self.per_op: dict[str, int] = dict.fromkeys(OP_NAMES, 0)
        self.errnos: dict[str, int] = {}

    def step(self, op: Op) -> Mismatch | None:
        index = self.count
        self.count += 1
        self.per_op[op[0]] += 1
        a = self.mount.apply(op)
        b = self.plain.apply(op)
        if a[0] == "err":
            self.errnos[a[1]] = self.errnos.get(a[1], 0) + 1
        if a != b and op[0] == "lseek" and op[3] in (os.SEEK_DATA, os.SEEK_HOLE):
            problem = self._judge_seek(op, a, b)
            if problem is None:
                a = b
            else:
                b += (problem,)
        if a != b:
            msg = f"{op!r}: mount {_fmt_outcome(a)} != plain {_fmt_outcome(b)}"
            if len(a) > 1 and len(b) > 1 and isinstance(a[1], bytes) and isinstance(b[1], bytes):
                msg += "; " + first_difference(a[1], b[1])
            return Mismatch(index, op[0], msg)
        if self.check_every and self.count % self.check_every == 0:
            return self.check(index)
        return None

    def _judge_seek(self, op: Op, a: Outcome, b: Outcome) -> str | None:
        """Two different SEEK_DATA/SEEK_HOLE answers may both be right: where ext4 reports
        data inside unwritten extents depends on which of their pages happen to be cached
        (read-ahead through the mount caches others than direct reads).  Both are right if
        the range between them reads as zeros on both sides (SEEK_DATA; "no data" = EOF) or
        each lands on a zero byte or EOF (SEEK_HOLE).  Then the mount's fd offset is moved to
        the plain one so later sequential I/O stays comparable.  None if both are right."""
        _, slot, off, whence = op
        if {a[0], b[0]} - {"ok", "err"} or ("err" in (a[0], b[0]) and whence == os.SEEK_HOLE):
            return "different outcomes"
        if ("err" in (a[0], b[0])) and "ENXIO" not in (a[-1], b[-1]):
            return "different errors"
        fd_m, fd_p = self.mount.fds[slot], self.plain.fds[slot]
        size = os.fstat(fd_p).st_size
        pos_m = a[1] if a[0] == "ok" else size
        pos_p = b[1] if b[0] == "ok" else size
        if whence == os.SEEK_DATA:
            lo, hi = sorted((pos_m, pos_p))
            for fd in (fd_m, fd_p):
                if not zeros_where_data(fd, fd_p, lo, hi):
                    return f"data in [{lo}, {hi}) that one answer skipped"
        else:
            for pos in (pos_m, pos_p):
                if pos > size or pos < off:
                    return f"SEEK_HOLE answer {pos} outside [{off}, {size}]"
                if pos < size and not (
                    zeros_where_data(fd_m, fd_p, pos, pos + 1)
                    and zeros_where_data(fd_p, fd_p, pos, pos + 1)
                ):
                    return f"SEEK_HOLE answer {pos} is not in a hole"  # fmt: skip
        os.lseek(fd_m, os.lseek(fd_p, 0, os.SEEK_CUR), os.SEEK_SET)
        return None

    def check(self, index: int | None = None, backing: bool = False) -> Mismatch | None:
        """Compare open files and whole trees (and the backing tree too, if asked)."""
        index = self.count - 1 if index is None else index
        problems = compare_slots(self.mount, self.plain)
        problems += compare_trees(self.mount.root, self.plain.root)
        if backing and self.backing_root is not None:
            problems += [f"backing: {p}" for p in compare_trees(self.backing_root,
                                                                self.plain.root)]  # fmt: skip
        if problems:
            return Mismatch(index, "tree", "; ".join(problems[:10]))
        return None

    def run(self, ops: Sequence[Op]) -> Mismatch | None:
        for op in ops:
            found = self.step(op)
            if found is not None:
                return found
        return self.check(backing=True)

    def close(self) -> None:
        self.mount.close_all()
        self.plain.close_all()


def replay(
    ops: Sequence[Op],
    mount_dir: str | os.PathLike[str],
    plain_dir: str | os.PathLike[str],
    backing_dir: str | os.PathLike[str] | None,
    tag: str,
) -> Mismatch | None:
    """Run ``ops`` on fresh subdirectories ``tag`` of the three roots; the first mismatch.

    ``backing_dir`` is the backing directory of ``mount_dir`` (so ``backing_dir/tag`` is the
    backing side of ``mount_dir/tag``), compared at the end when given.
    """
    mount_root = os.path.join(mount_dir, tag)
    plain_root = os.path.join(plain_dir, tag)
    backing_root = os.path.join(backing_dir, tag) if backing_dir is not None else None
    engine = Engine(mount_root, plain_root, backing_root=backing_root, check_every=0)
    try:
        return engine.run(ops)
    finally:
        engine.close()
        for root in (mount_root, plain_root):
            remove_tree(root)


def remove_tree(root: str) -> None:
    """rm -rf that copes with modes an operation left behind (directories without x)."""

    def fix(func: Any, path: str, exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    if os.path.lexists(root):
        shutil.rmtree(root, onerror=fix)


# --- shrinking ----------------------------------------------------------------------------


def shrink(
    ops: Sequence[Op],
    fails: Callable[[Sequence[Op]], bool],
    budget: float = 120.0,
    log: Callable[[str], None] | None = None,
) -> list[Op]:
    """Delta debugging (ddmin): a smaller list for which ``fails`` still holds.

    Stops when 1-minimal or when ``budget`` seconds have passed (returning the best so far).
    """
    deadline = time.monotonic() + budget
    current = list(ops)
    n = 2
    while len(current) >= 2 and time.monotonic() < deadline:
        chunk = max(1, len(current) // n)
        reduced = False
        start = 0
        while start < len(current) and time.monotonic() < deadline:
            candidate = current[:start] + current[start + chunk :]
            if candidate and fails(candidate):
                current = candidate
                reduced = True
                if log:
                    log(f"shrink: {len(current)} operations")
            else:
                start += chunk
        if reduced:
            n = max(n - 1, 2)
        elif chunk == 1:
            break
        else:
            n = min(n * 2, len(current))
    return current


def format_reproducer(ops: Sequence[Op], seed: int | None = None) -> str:
    head = f"# seed {seed}\n" if seed is not None else ""
    return head + "ops = [\n" + "".join(f"    {op!r},\n" for op in ops) + "]\n"


def save_reproducer(path: str | os.PathLike[str], ops: Sequence[Op], **meta: Any) -> None:
    Path(path).write_text(json.dumps({**meta, "ops": [list(op) for op in ops]}, indent=1))


def load_reproducer(path: str | os.PathLike[str]) -> tuple[list[Op], dict[str, Any]]:
    doc = json.loads(Path(path).read_text())
    ops = [tuple(op) for op in doc.pop("ops")]
    return ops, doc


# --- random operations --------------------------------------------------------------------


@dataclass(frozen=True)
class KnownBug:
    """A bug found and not fixed yet (or a limitation): what triggers it is left out of
    random runs of the sessions and data modes it affects, so they keep finding other bugs.
    A bug has a regression test in tests/test_reliability.py; its entry goes once fixed."""

    what: str
    test: str
    sessions: frozenset[str] = frozenset({"fusefs", "pyfuse3"})
    #: Data modes affected (the pyfuse3 session always copies: its mode is "copy").
    modes: frozenset[str] = frozenset({"copy", "splice", "passthrough"})


#: Bugs found and not fixed yet.  Fixed so far (their regression tests stay):
#: setxattr-flags (test_setxattr_create_replace_flags), append-writeback
#: (test_mmap_write_through_append_handle), passthrough-reopen (test_passthrough_second_open),
#: the INTERRUPT livelock (test_kill_application_mid_write), allow_other without
#: default_permissions (test_permissions_as_another_user).
KNOWN_BUGS: dict[str, KnownBug] = {}

#: What a session or data mode cannot do by design (not bugs): left out of its random runs.
LIMITATIONS: dict[str, KnownBug] = {
    "fallocate": KnownBug(
        "pyfuse3 has no fallocate handler: the kernel answers EOPNOTSUPP",
        "",
        sessions=frozenset({"pyfuse3"}),
    ),
    "passthrough-suid": KnownBug(
        "data=passthrough registers backing files without CAP_FSETID (so that unprivileged "
        "writers clear set-ID bits, as natively); a write by root through a file opened "
        "before it became set-ID then clears the bits too",
        "test_root_write_keeps_setuid",
        sessions=frozenset({"fusefs"}),
        modes=frozenset({"passthrough"}),
    ),
}


def avoid_for(session: str, mode: str) -> frozenset[str]:
    """Known bugs and limitations that random runs on this session and mode leave out."""
    mode = "copy" if session == "pyfuse3" else mode
    return frozenset(
        name
        for name, b in (*KNOWN_BUGS.items(), *LIMITATIONS.items())
        if session in b.sessions and mode in b.modes
    )


NAMES = ("f0", "f1", "f2", "f3", "d0", "d1")
XATTR_NAMES = ("user.a", "user.b", "user.long." + "x" * 40)
SLOTS = 6
#: Operations on an open file (slot).
FD_OPS = frozenset({"close", "pread", "pwrite", "read", "write", "lseek", "ftruncate",
                    "fallocate", "fsync", "fstat", "mmap_read", "mmap_write",
                    "copy_file_range"})  # fmt: skip
MAX_DEPTH = 3


def sanitize(op: Op, avoid: frozenset[str]) -> Op | None:
    """``op`` without what ``avoid`` leaves out (None: leave the whole operation out).  For
    operations not made by :class:`Generator` (hypothesis rules)."""
    name = op[0]
    if name in avoid:
        return None
    if name == "open" and "passthrough-suid" in avoid:
        op = (*op[:4], op[4] & ~0o6000)
    if name == "chmod" and "passthrough-suid" in avoid:
        return (*op[:2], op[2] & ~0o6000)
    return op


def _open_flags(r: random.Random) -> int:
    flags = r.choice((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR, os.O_RDWR))
    for bit, p in (
        (os.O_CREAT, 0.5),
        (os.O_EXCL, 0.1),
        (os.O_TRUNC, 0.1),
        (os.O_APPEND, 0.1),
        (os.O_NOFOLLOW, 0.05),
        (os.O_DIRECTORY, 0.03),
    ):
        if r.random() < p:
            flags |= bit
    return flags


@dataclass
class Generator:
    """Random operations from ``seed``, aimed using the current state of ``plain``."""

    seed: int
    plain: World
    max_offset: int = 4 * MiB
    #: Known bugs (names in :data:`KNOWN_BUGS`) whose triggers are not generated.
    avoid: frozenset[str] = frozenset()
    rng: random.Random = field(init=False)
    _entries: list[tuple[str, bool]] = field(init=False, default_factory=list)
    _age: int = field(init=False, default=1 << 30)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        weights = {
            "open": 10, "close": 4, "pread": 10, "pwrite": 14, "read": 3, "write": 4,
            "lseek": 3, "ftruncate": 5, "truncate": 2, "fallocate": 4, "mmap_read": 3,
            "mmap_write": 3, "fsync": 2, "fstat": 2, "stat": 3, "copy_file_range": 2,
            "rename": 4, "link": 2, "symlink": 1, "readlink": 1, "unlink": 3, "mkdir": 3,
            "rmdir": 2, "chmod": 2, "utime": 2, "listdir": 2, "setxattr": 3, "getxattr": 2,
            "listxattr": 1, "removexattr": 2,
        }  # fmt: skip
        assert set(weights) == set(OP_NAMES), set(OP_NAMES) ^ set(weights)
        for name in self.avoid & set(weights):
            del weights[name]
        self._names = list(weights)
        self._cum = list(_accumulate(weights.values()))

    # state of the plain world (refreshed every few operations: it only steers choices)

    def _scan(self) -> list[tuple[str, bool]]:
        if self._age >= 8:
            self._age = 0
            entries: list[tuple[str, bool]] = []
            for dirpath, dirnames, filenames in os.walk(self.plain.root):
                rel = os.path.relpath(dirpath, self.plain.root)
                rel = "" if rel == "." else rel
                for name in dirnames:
                    entries.append((os.path.join(rel, name) if rel else name, True))
                for name in filenames:
                    entries.append((os.path.join(rel, name) if rel else name, False))
            self._entries = entries
        self._age += 1
        return self._entries

    def _dir(self) -> str:
        r = self.rng
        dirs = [p for p, is_dir in self._scan() if is_dir and p.count("/") < MAX_DEPTH - 1]
        if not dirs or r.random() < 0.4:
            return ""
        return r.choice(dirs)

    def new_path(self) -> str:
        d = self._dir()
        name = self.rng.choice(NAMES)
        return f"{d}/{name}" if d else name

    def path(self, want_dir: bool | None = None) -> str:
        """Mostly an existing entry (of the wanted kind), sometimes any name."""
        r = self.rng
        entries = [p for p, d in self._scan() if want_dir is None or d == want_dir]
        if entries and r.random() < 0.8:
            return r.choice(entries)
        return self.new_path()

    def _size_of(self, slot: int) -> int:
        fd = self.plain.fds.get(slot)
        if fd is None:
            return 0
        try:
            return os.fstat(fd).st_size
        except OSError:
            return 0

    def offset(self, size: int) -> int:
        r = self.rng
        x = r.random()
        if x < 0.3:
            off = r.randrange(0, 8 * KiB)
        elif x < 0.5:
            off = r.randrange(1, 4) * MiB + r.randrange(-4 * KiB, 4 * KiB)
        elif x < 0.75:
            off = size + r.randrange(-6 * KiB, 6 * KiB)
        elif x < 0.88:
            off = r.randrange(0, self.max_offset // PAGE) * PAGE
        else:
            off = r.randrange(0, self.max_offset)
        return max(0, min(off, self.max_offset))

    def length(self) -> int:
        r = self.rng
        x = r.random()
        if x < 0.05:
            return 0
        if x < 0.35:
            return r.randrange(1, 512)
        if x < 0.6:
            return r.randrange(512, 16 * KiB)
        if x < 0.75:
            return PAGE * r.randrange(1, 9) + r.choice((-1, 0, 0, 1))
        if x < 0.92:
            return r.randrange(16 * KiB, 256 * KiB)
        return r.randrange(256 * KiB, MiB + 300 * KiB)

    def slot(self) -> int:
        r = self.rng
        if self.plain.fds and r.random() < 0.9:
            return r.choice(list(self.plain.fds))
        return r.randrange(SLOTS)

    def mode(self) -> int:
        r = self.rng
        if r.random() < 0.8:
            return r.choice((0o644, 0o600, 0o755, 0o666, 0o700))
        mode = r.randrange(0, 0o10000)
        return mode & ~0o6000 if "passthrough-suid" in self.avoid else mode

    # one operation

    def next(self) -> Op:
        r = self.rng
        name = self._names[_bisect(self._cum, r.random() * self._cum[-1])]
        if name in FD_OPS and not self.plain.fds and r.random() < 0.9:
            name = "open"  # nothing open: an fd operation would only say EBADF
        return getattr(self, "_gen_" + name)()

    def _gen_open(self) -> Op:
        r = self.rng
        flags = _open_flags(r)
        x = r.random()
        if x < 0.2 or (flags & os.O_CREAT and x < 0.4):
            path = self.new_path()
        elif x < 0.9:
            path = self.path(False)
        else:
            path = self.path()
        return ("open", r.randrange(SLOTS), path, flags, self.mode())

    def _gen_close(self) -> Op:
        return ("close", self.slot())

    def _gen_pread(self) -> Op:
        s = self.slot()
        return ("pread", s, self.offset(self._size_of(s)), self.length())

    def _gen_pwrite(self) -> Op:
        s = self.slot()
        return ("pwrite", s, self.offset(self._size_of(s)), self.length(), self.rng.getrandbits(32))

    def _gen_read(self) -> Op:
        return ("read", self.slot(), self.length())

    def _gen_write(self) -> Op:
        return ("write", self.slot(), self.length(), self.rng.getrandbits(32))

    def _gen_lseek(self) -> Op:
        r = self.rng
        s = self.slot()
        whence = r.choice((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE))
        off = self.offset(self._size_of(s))
        if whence in (os.SEEK_CUR, os.SEEK_END) and r.random() < 0.5:
            off = -r.randrange(0, 8 * KiB)
        return ("lseek", s, off, whence)

    def _gen_ftruncate(self) -> Op:
        s = self.slot()
        return ("ftruncate", s, self.offset(self._size_of(s)))

    def _gen_truncate(self) -> Op:
        return ("truncate", self.path(False), self.offset(0))

    def _gen_fallocate(self) -> Op:
        s = self.slot()
        r = self.rng
        return ("fallocate", s, r.choice(FALLOC_MODES), self.offset(self._size_of(s)),
                self.length())  # fmt: skip

    def _gen_fsync(self) -> Op:
        return ("fsync", self.slot(), self.rng.randrange(2))

    def _gen_fstat(self) -> Op:
        return ("fstat", self.slot())

    def _gen_mmap_read(self) -> Op:
        s = self.slot()
        size = self._size_of(s)
        return ("mmap_read", s, self.rng.randrange(0, max(size, 1) + PAGE), self.length())

    def _gen_mmap_write(self) -> Op:
        s = self.slot()
        size = self._size_of(s)
        return ("mmap_write", s, self.rng.randrange(0, max(size, 1) + PAGE), self.length(),
                self.rng.getrandbits(32))  # fmt: skip

    def _gen_copy_file_range(self) -> Op:
        a, b = self.slot(), self.slot()
        return ("copy_file_range", a, self.offset(self._size_of(a)), b,
                self.offset(self._size_of(b)), self.length())  # fmt: skip

    def _gen_stat(self) -> Op:
        return ("stat", self.path())

    def _gen_rename(self) -> Op:
        r = self.rng
        flags = r.choice((0, 0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE))
        dst = self.path() if r.random() < 0.4 else self.new_path()
        return ("rename", self.path(), dst, flags)

    def _gen_link(self) -> Op:
        return ("link", self.path(False), self.new_path())

    def _gen_symlink(self) -> Op:
        # Relative targets that stay inside the tree (never "..": runs share a parent).
        return ("symlink", self.rng.choice(NAMES), self.new_path())

    def _gen_readlink(self) -> Op:
        return ("readlink", self.path(False))

    def _gen_unlink(self) -> Op:
        return ("unlink", self.path(False))

    def _gen_mkdir(self) -> Op:
        r = self.rng
        mode = r.choice((0o755, 0o700, 0o777, 0o1777, 0o2755)) if r.random() < 0.9 else self.mode()
        return ("mkdir", self.new_path(), mode)

    def _gen_rmdir(self) -> Op:
        return ("rmdir", self.path(True))

    def _gen_chmod(self) -> Op:
        return ("chmod", self.path(), self.mode())

    def _gen_utime(self) -> Op:
        r = self.rng
        return ("utime", self.path(), r.randrange(0, 2**33) * 10**9 + r.randrange(10**9),
                r.randrange(0, 2**33) * 10**9 + r.randrange(10**9))  # fmt: skip

    def _gen_listdir(self) -> Op:
        return ("listdir", self.path(True))

    def _gen_setxattr(self) -> Op:
        r = self.rng
        size = r.randrange(0, 300) if r.random() < 0.95 else r.randrange(300, 5000)
        flags = r.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        return ("setxattr", self.path(), r.choice(XATTR_NAMES), size, r.getrandbits(32), flags)

    def _gen_getxattr(self) -> Op:
        return ("getxattr", self.path(), self.rng.choice(XATTR_NAMES))

    def _gen_listxattr(self) -> Op:
        return ("listxattr", self.path())

    def _gen_removexattr(self) -> Op:
        return ("removexattr", self.path(), self.rng.choice(XATTR_NAMES))


def _accumulate(values: Any) -> Iterator[int]:
    total = 0
    for v in values:
        total += v
        yield total


def _bisect(cum: list[int], x: float) -> int:
    lo, hi = 0, len(cum) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cum[mid] > x:
            hi = mid
        else:
            lo = mid + 1
    return lo


# --- a random run with shrinking ----------------------------------------------------------


@dataclass
class RunResult:
    seed: int
    ops: list[Op]
    mismatch: Mismatch | None
    per_op: dict[str, int]
    errnos: dict[str, int]
    seconds: float
    avoid: frozenset[str] = frozenset()


def random_run(
    mount_dir: str | os.PathLike[str],
    plain_dir: str | os.PathLike[str],
    backing_dir: str | os.PathLike[str] | None,
    seed: int,
    n_ops: int,
    *,
    check_every: int = 200,
    tag: str | None = None,
    progress: Callable[[int], None] | None = None,
    avoid: frozenset[str] = frozenset(),
    at_end: Callable[[str], str | None] | None = None,
) -> RunResult:
    """``n_ops`` random operations from ``seed`` in fresh subdirectories; stops at a mismatch.

    Long runs are many such runs (segments) so that trees stay small and a failure's
    reproducer starts from an empty tree.  ``at_end(tag)``, when the run passed, may compare
    more (a replica of BACKING: ``tools/torture --replicate``) before the trees are removed; a
    message it returns is the run's mismatch (kind ``replica``).
    """
    tag = tag or f"run-{seed}"
    mount_root = os.path.join(mount_dir, tag)
    plain_root = os.path.join(plain_dir, tag)
    backing_root = os.path.join(backing_dir, tag) if backing_dir is not None else None
    engine = Engine(mount_root, plain_root, backing_root=backing_root, check_every=check_every)
    gen = Generator(seed, engine.plain, avoid=avoid)
    ops: list[Op] = []
    started = time.monotonic()
    mismatch = None
    try:
        for i in range(n_ops):
            op = gen.next()
            ops.append(op)
            mismatch = engine.step(op)
            if mismatch is not None:
                break
            if progress is not None and i % 1000 == 0:
                progress(i)
        else:
            mismatch = engine.check(backing=True)
            if mismatch is None and at_end is not None:
                message = at_end(tag)
                if message is not None:
                    mismatch = Mismatch(len(ops) - 1, "replica", message)
    finally:
        engine.close()
    if mismatch is None:
        for root in (mount_root, plain_root):
            remove_tree(root)
    return RunResult(seed, ops, mismatch, engine.per_op, engine.errnos,
                     time.monotonic() - started, avoid)  # fmt: skip


def minimize(
    result: RunResult,
    mount_dir: str | os.PathLike[str],
    plain_dir: str | os.PathLike[str],
    backing_dir: str | os.PathLike[str] | None,
    budget: float = 120.0,
    log: Callable[[str], None] | None = None,
) -> list[Op]:
    """Shrink a failing run's operations to a small list that still fails the same way."""
    assert result.mismatch is not None
    kind = result.mismatch.kind
    counter = iter(range(1 << 30))

    def fails(ops: Sequence[Op]) -> bool:
        tag = f"shrink-{result.seed}-{next(counter)}"
        found = replay(ops, mount_dir, plain_dir, backing_dir, tag)
        return found is not None and found.kind == kind

    ops = result.ops[: result.mismatch.index + 1]
    if not fails(ops):
        if log:
            log("the failure did not reproduce on a fresh tree; not shrinking")
        return ops
    return shrink(ops, fails, budget, log)


# --- mounts for the tests ----------------------------------------------------------------------

#: (session, data mode) pairs the tests run on.  pyfuse3's session always copies.
COMBOS = [
    pytest.param("fusefs", "copy", id="fusefs-copy"),
    pytest.param("fusefs", "splice", id="fusefs-splice"),
    pytest.param("fusefs", "passthrough", id="fusefs-passthrough"),
    pytest.param("pyfuse3", "copy", id="pyfuse3"),
]
STATS_XATTR = "user.fusefs.stats"


def mount_mode(
    mount_factory: Callable[..., Any],
    session: str,
    mode: str,
    *,
    options: tuple[str, ...] = (),
    **kw: Any,
) -> Any:
    """A mount (tests.mounting.Mount) of ``backing`` on ``session`` with data mode ``mode``,
    checked to be in effect.  Skips only when passthrough was asked for and the kernel did
    not grant it."""
    opts = (f"data={mode}", *options) if session == "fusefs" else options
    mount = mount_factory(options=opts, session_name=session, **kw)
    if session == "fusefs":
        stats = json.loads(os.getxattr(mount.mountpoint, STATS_XATTR))
        if stats["data_mode"] != mode:
            reason = stats.get("data_mode_reason", "")
            if mode == "passthrough" and "kernel did not grant" in reason:
                pytest.skip(f"this kernel lacks FUSE_PASSTHROUGH: {reason}")
            pytest.fail(f"asked for data={mode}, the session uses {stats['data_mode']}: {reason}")
    return mount


# --- watching for hangs -------------------------------------------------------------------


class Watchdog:
    """Aborts a FUSE connection when nobody called :meth:`kick` for ``timeout`` seconds.

    A hung daemon then fails the blocked system calls (ENOTCONN) instead of hanging the test.
    """

    def __init__(self, connection: int | None, timeout: float = 120.0) -> None:
        self.connection = connection
        self.timeout = timeout
        self.fired = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="watchdog")

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def kick(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last > self.timeout and self.connection is not None:
                self.fired = True
                abort_connection(self.connection)
                return


def abort_connection(connection: int) -> bool:
    try:
        Path(f"/sys/fs/fuse/connections/{connection}/abort").write_text("1\n")
        return True
    except OSError:
        return False


# --- looking at the daemon ----------------------------------------------------------------

O_PATH = 0o10000000


def daemon_fds(pid: int) -> dict[str, int]:
    """The daemon's open fds by kind: ``path`` (O_PATH: the inode table), ``file`` (other fds
    on regular files and directories: open handles), ``other`` (device, pipes, sockets...)."""
    counts = {"path": 0, "file": 0, "other": 0}
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue  # closed meanwhile
        if flags & O_PATH:
            counts["path"] += 1
        elif target.startswith("/"):
            counts["file"] += 1
        else:
            counts["other"] += 1
    return counts


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --- stress: patterned writers ----------------------------------------------------------------
# A block is one 32-byte record repeated: (magic, writer, block index, sequence number).  A
# block holding records of more than one write is torn; a record naming another block index is
# misplaced data; an all-zero block was never written.

RECORD = struct.Struct("<8sIIQQ")
RECORD_MAGIC = b"FUSEFSRL"


def record_check(writer: int, block: int, seq: int) -> int:
    return writer * 1_000_003 + block + seq


def block_bytes(writer: int, block: int, seq: int, block_size: int) -> bytes:
    rec = RECORD.pack(RECORD_MAGIC, writer, block, seq, record_check(writer, block, seq))
    return rec * (block_size // RECORD.size)


def check_block(data: bytes, block: int, whole: bool) -> str | None:
    """None if ``data`` (a block, or any record-aligned part of one) is sound.

    ``whole``: the block must be one write (not torn) and written (not zero).  Otherwise (a
    read racing with writers) a record may be torn between two writes or a write and the zeros
    before it: Linux does not make a buffered read atomic against a buffered write (ext4 and
    tmpfs tear 32-byte records about once in 5,000 racing 192 KiB preads, docs/reliability.md),
    so each byte of the fields every write of this block shares (magic, block number) must be
    zero or that field's byte, and a record that is whole must be this block's.
    """
    zero = bytes(RECORD.size)
    records = {data[i : i + RECORD.size] for i in range(0, len(data), RECORD.size)}
    if whole:
        if records == {zero}:
            return f"block {block} was never written"
        if len(records) != 1:
            return f"block {block} is torn: {len(records)} different records"
    shared = RECORD_MAGIC + bytes(4) + block.to_bytes(4, "little")  # writer bytes vary
    for rec in records - {zero}:
        magic, writer, idx, seq, check = RECORD.unpack(rec)
        if magic == RECORD_MAGIC and check == record_check(writer, idx, seq):
            if idx != block:
                return f"block {block} holds data written for block {idx}"
            continue
        if whole:
            return f"block {block}: garbage record {rec!r}"
        for i in (*range(8), *range(12, 16)):
            if rec[i] not in (0, shared[i]):
                return f"block {block}: garbage record {rec!r}"
    return None


def patterned_writer(
    shared: str, own: str, writer: int, writers: int, blocks: int, block_size: int,
    iterations: int, seed: int,
) -> None:  # fmt: skip
    """Write this writer's blocks of ``shared`` (every ``writers``-th), then ``iterations``
    random blocks of it (overlapping other writers), each in one pwrite; append as many blocks
    to ``own`` (fsync every 8).  Raises on any error."""
    r = random.Random(seed)
    fd = os.open(shared, os.O_WRONLY)
    own_fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        order = list(range(writer, blocks, writers))
        order += [r.randrange(blocks) for _ in range(iterations)]
        for i, block in enumerate(order):
            seq = i + 1
            data = block_bytes(writer, block, seq, block_size)
            if os.pwrite(fd, data, block * block_size) != block_size:
                raise OSError(errno.EIO, f"short write to block {block}")
            if os.write(own_fd, block_bytes(writer, i, seq, block_size)) != block_size:
                raise OSError(errno.EIO, "short append")
            if i % 8 == 7:
                os.fsync(own_fd)
    finally:
        os.close(fd)
        os.close(own_fd)


def own_file_length(writer: int, writers: int, blocks: int, iterations: int) -> int:
    """How many blocks :func:`patterned_writer` appends to its own file."""
    return len(range(writer, blocks, writers)) + iterations


def check_shared(path: str, blocks: int, block_size: int) -> list[str]:
    problems = []
    with open(path, "rb") as f:
        for b in range(blocks):
            problem = check_block(f.read(block_size), b, whole=True)
            if problem:
                problems.append(problem)
    return problems


def check_own(path: str, writer: int, count: int, block_size: int) -> list[str]:
    size = os.stat(path).st_size
    if size != count * block_size:
        return [f"{path}: {size} bytes, expected {count * block_size}"]
    problems = []
    with open(path, "rb") as f:
        for i in range(count):
            data = f.read(block_size)
            problem = check_block(data, i, whole=True)
            if problem:
                problems.append(f"{path}: {problem}")
            elif RECORD.unpack_from(data)[1] != writer:
                problems.append(f"{path}: block {i} written by another writer")
    return problems


# --- stress: trees ----------------------------------------------------------------------------


def make_tree(root: str, files: int, seed: int, per_dir: int = 200) -> None:
    """``files`` small files (0-8 KiB, varied modes, a few symlinks and hard links) in
    directories of ``per_dir``."""
    r = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(files):
        d = os.path.join(root, f"d{i // per_dir:03d}")
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"file{i:06d}")
        with open(p, "wb") as f:
            f.write(r.randbytes(r.choice((0, 1, 100, 4095, 4096, 5000, 8192))))
        os.chmod(p, r.choice((0o644, 0o600, 0o755, 0o444)))
        if i % 97 == 0:
            os.symlink(f"file{i:06d}", os.path.join(d, f"link{i:06d}"))
        if i % 101 == 0:
            os.link(p, os.path.join(d, f"hard{i:06d}"))


# --- crash safety: a writer that records what it fsync'd --------------------------------------

CRASH_BLOCK = 64 * KiB


def crash_writer(directory: str, side_file: str, files: int = 4, seconds: float = 60.0) -> None:
    """Append deterministic blocks to ``files`` files in ``directory``; after each fsync,
    record ``name length`` in ``side_file`` (fsync'd too, on another filesystem than the
    mount).  Runs until an error (the daemon died: ENOTCONN) or ``seconds`` pass."""
    fds = [
        os.open(os.path.join(directory, f"c{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for i in range(files)
    ]
    side = os.open(side_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lengths = [0] * files
    deadline = time.monotonic() + seconds
    n = 0
    try:
        while time.monotonic() < deadline:
            i = n % files
            os.write(fds[i], data_for(i * 1_000_000 + lengths[i] // CRASH_BLOCK, CRASH_BLOCK))
            lengths[i] += CRASH_BLOCK
            n += 1
            if n % (files * 2) == 0:
                for j, fd in enumerate(fds):
                    os.fsync(fd)
                    os.write(side, f"c{j} {lengths[j]}\n".encode())
                os.fsync(side)
    except OSError:
        return  # expected: the daemon was killed
    finally:
        for fd in (*fds, side):
            with contextlib.suppress(OSError):
                os.close(fd)


def check_fsynced(directory: str, side_file: str) -> tuple[int, list[str]]:
    """Everything ``side_file`` says was fsync'd must be in ``directory`` (the backing
    directory).  Returns (bytes verified, problems)."""
    last: dict[str, int] = {}
    with open(side_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:  # a torn last line was not fsync'd
                last[parts[0]] = int(parts[1])
    problems = []
    verified = 0
    for name, length in sorted(last.items()):
        i = int(name[1:])
        path = os.path.join(directory, name)
        try:
            size = os.stat(path).st_size
        except OSError as e:
            problems.append(f"{name}: {e}")
            continue
        if size < length:
            problems.append(f"{name}: {size} bytes, but {length} were fsync'd")
            continue
        with open(path, "rb") as f:
            for k in range(length // CRASH_BLOCK):
                if f.read(CRASH_BLOCK) != data_for(i * 1_000_000 + k, CRASH_BLOCK):
                    problems.append(f"{name}: block {k} (fsync'd) differs")
                    break
        verified += length
    return verified, problems
