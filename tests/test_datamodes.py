"""Every data path gives byte-identical results, and the counters prove which path moved the bytes.

Our session only (pyfuse3 has no data paths to choose), mounted with ``-o data=copy``,
``data=splice`` and ``data=passthrough``.  Each access pattern runs on the mount and on a plain
directory of the same filesystem, and the bytes seen must be the same.  The mode actually chosen
is read back from the ``user.fusefs.stats`` xattr of the mount root; passthrough is skipped only
when the kernel does not offer FUSE_PASSTHROUGH (the skip message says so).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fusefs.cli import coherent_direct_writes, kernel_version
from tests.mounting import Mount

MODES = ("copy", "splice", "passthrough")
#: Whether the mirror writes write-only opens directly on this kernel (see fusefs.cli).
DIRECT_WRITES = coherent_direct_writes(kernel_version())
needs_direct_writes = pytest.mark.skipif(
    not DIRECT_WRITES, reason=f"no direct writes on Linux {os.uname().release} (see fusefs.cli)"
)
MiB = 1 << 20


def stats(mnt: Path) -> dict[str, Any]:
    return dict(json.loads(os.getxattr(mnt, "user.fusefs.stats")))


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {
        k: after[k] - before[k]
        for k in after
        if isinstance(after[k], int) and isinstance(before.get(k), int)
    }


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def evict(path: Path | str) -> None:
    """Drop the page cache of ``path`` so the next read has to ask the filesystem."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path | str, chunk: int = MiB) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while True:
            b = os.read(fd, chunk)
            if not b:
                return b"".join(parts)
            parts.append(b)
    finally:
        os.close(fd)


class Pair:
    """A mount in one data mode and a plain directory to compare it with."""

    def __init__(self, mount: Mount, plain: Path, mode: str) -> None:
        self.mount = mount
        self.mnt = mount.mountpoint
        self.backing = mount.backing
        self.plain = plain
        self.mode = mode

    def both(self, fn: Callable[[Path], Any]) -> Any:
        """Run ``fn`` on the mount and on the plain directory; the results must be equal."""
        on_mount = _outcome(fn, self.mnt)
        on_plain = _outcome(fn, self.plain)
        assert on_mount == on_plain, (
            f"data={self.mode}: mount gave {on_mount!r}, plain {on_plain!r}"
        )
        # the mount wrote the same bytes into its backing directory
        for name in sorted(os.listdir(self.plain)):
            p, b = self.plain / name, self.backing / name
            if p.is_file():
                assert sha(b.read_bytes()) == sha(p.read_bytes()), f"backing {name} differs"
        return on_mount

    def stats(self) -> dict[str, Any]:
        return stats(self.mnt)


def _outcome(fn: Callable[[Path], Any], root: Path) -> Any:
    try:
        value = fn(root)
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno or 0, e.errno))
    return _digest(value)


def _digest(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return data if len(data) <= 64 else f"{len(data)} bytes sha1={sha(data)}"
    if isinstance(value, list | tuple):
        return [_digest(v) for v in value]
    return value


@pytest.fixture
def session() -> str:
    """Overrides the shared fixture: data modes exist only in our session."""
    return "fusefs"


@pytest.fixture(params=MODES)
def pair(request: pytest.FixtureRequest, mount_factory: Any, tmp_path: Path) -> Pair:
    mode: str = request.param
    mount: Mount = mount_factory(options=[f"data={mode}"])
    s = stats(mount.mountpoint)
    if mode == "passthrough" and s["data_mode"] != "passthrough":
        reason = s.get("data_mode_reason", "")
        if "did not grant" in reason:
            pytest.skip(f"this kernel ({os.uname().release}) lacks FUSE_PASSTHROUGH: {reason}")
    assert s["data_mode"] == mode, f"asked for data={mode}, got {s}"
    plain = tmp_path / "plain"
    plain.mkdir()
    return Pair(mount, plain, mode)


# -- access patterns -----------------------------------------------------------------------------


def test_sequential(pair: Pair) -> None:
    data = pattern(9 * MiB + 12345, seed=1)

    def write_then_read(root: Path) -> list[Any]:
        out = []
        for name, chunk in (("big", MiB), ("medium", 128 * 1024), ("small", 4096), ("odd", 1000)):
            fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for off in range(0, len(data) if chunk >= 4096 else MiB, chunk):
                    os.write(fd, data[off : off + chunk])
            finally:
                os.close(fd)
            evict(root / name)
            for read_chunk in (MiB, 65536, 4096, 777):
                out.append(read_all(root / name, read_chunk))
            out.append(os.stat(root / name).st_size)
        return out

    pair.both(write_then_read)


def test_random_access(pair: Pair) -> None:
    size = 16 * MiB
    (pair.mnt / "r").write_bytes(pattern(size, seed=2))
    (pair.plain / "r").write_bytes(pattern(size, seed=2))

    def random_io(root: Path) -> list[Any]:
        rnd = random.Random(3)
        out = []
        evict(root / "r")
        fd = os.open(root / "r", os.O_RDWR)
        try:
            for i in range(300):
                off = rnd.randrange(0, size + 100_000)
                n = rnd.choice((1, 17, 4096, 4097, 65536, 200_000, MiB + 3))
                if i % 3 == 0:
                    os.pwrite(fd, pattern(n, seed=i), off)
                else:
                    out.append(os.pread(fd, n, off))
            out.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
        evict(root / "r")
        out.append(read_all(root / "r"))
        return out

    pair.both(random_io)


def test_unaligned(pair: Pair) -> None:
    def unaligned(root: Path) -> list[Any]:
        out = []
        fd = os.open(root / "u", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            off = 0
            for i, n in enumerate(
                (1, 4095, 4097, 65535, 65537, 131071, 1048575, 1048577, 3, 254 * 4096 + 1)
            ):
                os.pwrite(fd, pattern(n, seed=10 + i), off)
                off += n + (i * 511)  # gaps of odd sizes
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for start, n in (
                (1, 4095),
                (4095, 2),
                (4097, 65535),
                (65535, 1048577),
                (7, 3 * MiB),
                (0, 10),
            ):
                out.append(os.pread(fd, n, start))
        finally:
            os.close(fd)
        evict(root / "u")
        out.append(read_all(root / "u", 1000 * 1000))
        return out

    pair.both(unaligned)


def test_past_eof(pair: Pair) -> None:
    def past_eof(root: Path) -> list[Any]:
        out: list[Any] = []
        fd = os.open(root / "p", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x" * 5000)
            out.append(os.pread(fd, 100, 5000))
            out.append(os.pread(fd, MiB, 4990))
            out.append(os.pread(fd, 10, 10 * MiB))
            os.pwrite(fd, pattern(300_000, seed=5), 3 * MiB + 17)  # a hole, then data
            os.pwrite(fd, b"end", 64 * MiB)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            out.append(os.fstat(fd).st_size)
            out.append(os.pread(fd, 2 * MiB, 2 * MiB))  # hole into data
            out.append(os.pread(fd, 100, 64 * MiB - 50))
            out.append(os.pread(fd, 100, 64 * MiB + 3))
            os.ftruncate(fd, 3 * MiB + 20)
            out.append(os.pread(fd, MiB, 3 * MiB))
            os.ftruncate(fd, 4 * MiB)
            out.append(os.pread(fd, MiB, 3 * MiB))
        finally:
            os.close(fd)
        return out

    pair.both(past_eof)


def test_concurrent_readers(pair: Pair) -> None:
    size = 24 * MiB
    data = pattern(size, seed=6)
    (pair.mnt / "c").write_bytes(data)
    evict(pair.mnt / "c")
    errors: list[str] = []

    def reader(k: int, shared_fd: int) -> None:
        rnd = random.Random(k)
        try:
            own = os.open(pair.mnt / "c", os.O_RDONLY)
            try:
                for i in range(60):
                    fd = own if i % 2 else shared_fd
                    off = rnd.randrange(0, size)
                    n = rnd.choice((4096, 100_000, MiB, 3 * MiB + 1))
                    got = os.pread(fd, n, off)
                    if got != data[off : off + n]:
                        errors.append(f"reader {k}: pread({n}, {off}) gave wrong bytes")
                        return
                if k == 0:
                    whole = read_all(pair.mnt / "c", 256 * 1024)
                    if whole != data:
                        errors.append("sequential reader: wrong bytes")
            finally:
                os.close(own)
        except OSError as e:
            errors.append(f"reader {k}: {e!r}")

    shared = os.open(pair.mnt / "c", os.O_RDONLY)
    try:
        threads = [threading.Thread(target=reader, args=(k, shared)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "readers hung"
    finally:
        os.close(shared)
    assert errors == []
    assert (pair.backing / "c").read_bytes() == data


def test_o_append(pair: Pair) -> None:
    def appends(root: Path) -> list[Any]:
        results: list[Any] = []
        a = os.open(root / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            b = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
            try:
                for i in range(20):
                    fd = a if i % 2 else b
                    n = (1, 100, 4096, 65536, 70_000, 300_000, MiB)[i % 7]
                    results.append(os.write(fd, pattern(n, seed=100 + i)))
                    results.append(os.pwrite(fd, b"<pwrite>", 0))  # O_APPEND: appends as well
            finally:
                os.close(b)
        finally:
            os.close(a)
        evict(root / "log")
        return [results, os.stat(root / "log").st_size, read_all(root / "log")]

    pair.both(appends)


def test_file_growing_while_read(pair: Pair) -> None:
    chunks = [
        pattern(n, seed=200 + i) for i, n in enumerate([5000, 65536, 300_000, MiB, 1, 777_777] * 4)
    ]
    expected = b"".join(chunks)

    def grow_and_read(root: Path) -> bytes:
        path = root / "growing"
        path.write_bytes(b"")
        done = threading.Event()
        problems: list[BaseException] = []

        def writer() -> None:
            try:
                fd = os.open(path, os.O_WRONLY)  # not O_APPEND: test_o_append covers that
                try:
                    for c in chunks:
                        os.write(fd, c)
                finally:
                    os.close(fd)
            except BaseException as e:
                problems.append(e)
            finally:
                done.set()

        t = threading.Thread(target=writer)
        got = bytearray()
        rfd = os.open(path, os.O_RDONLY)
        try:
            t.start()
            while len(got) < len(expected):
                b = os.read(rfd, 200_000)
                if b:
                    got += b
                elif done.is_set():
                    # everything is written: what is left must be readable now
                    rest = os.read(rfd, len(expected))
                    got += rest
                    if not rest:
                        break
        finally:
            t.join(timeout=60)
            os.close(rfd)
        if problems:
            raise problems[0]
        return bytes(got)

    assert pair.both(grow_and_read) == _digest(expected)


def test_mmap(pair: Pair) -> None:
    size = 3 * MiB + 100

    def mapped(root: Path) -> list[Any]:
        path = root / "m"
        path.write_bytes(pattern(size, seed=7))
        evict(path)
        out: list[Any] = []
        fd = os.open(path, os.O_RDWR)
        try:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                out.append(m[:100])
                out.append(m[MiB - 7 : MiB + 9000])
                out.append(m[size - 50 :])
                m[10:20] = b"0123456789"
                m[2 * MiB : 2 * MiB + 5000] = b"w" * 5000
                m[size - 3 :] = b"END"
                m.flush()
            with mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE) as p:
                p[0:5] = b"priv!"  # a private mapping never reaches the file
                out.append(p[:30])
        finally:
            os.close(fd)
        evict(path)
        out.append(read_all(path))
        # a read-only mapping of a file opened read-only
        fd = os.open(path, os.O_RDONLY)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                out.append(m[:])
        finally:
            os.close(fd)
        return out

    pair.both(mapped)


# -- counters: which path moved the bytes --------------------------------------------------------


def test_utime_right_after_reads(pair: Pair) -> None:
    """atime set just after sequential reads stays set: a readahead READ still in flight must
    not touch the backing file after the SETATTR (with mtime ahead of atime, relatime would
    bump atime).  Found by tools/torture (seed 11000104); failed in ~40% of rounds before."""

    def rounds(root: Path) -> list[int]:
        path = root / "ra"
        path.write_bytes(pattern(4 * MiB, 3))
        seen = [path, pair.backing / "ra"] if root == pair.mnt else [path]
        wrong = []
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in range(60):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.utime(path, ns=(1, 7228068575281045790))
                for k in range(4):  # sequential: the kernel starts async readahead
                    os.pread(fd, 128 * 1024, k * 128 * 1024)
                want = 4035374380315225282 + i
                os.utime(path, ns=(want, 7228068575281045790))
                time.sleep(0.005)  # let a late READ land
                if any(os.stat(p).st_atime_ns != want for p in seen):
                    wrong.append(i)
        finally:
            os.close(fd)
        return wrong

    assert pair.both(rounds) == []


def test_close_sends_no_flush(pair: Pair) -> None:
    """On a local backing filesystem close() needs no FLUSH round trip (FOPEN_NOFLUSH): the
    kernel sends none for 20 open/write/close cycles, and the data is all there."""
    before = pair.stats()["requests"]
    for i in range(20):
        with open(pair.mnt / f"c{i}", "wb") as f:
            f.write(b"x" * i)
    after = pair.stats()["requests"]
    assert after.get("FLUSH", 0) == before.get("FLUSH", 0)
    assert after.get("RELEASE", 0) >= before.get("RELEASE", 0) + 20
    assert [len((pair.backing / f"c{i}").read_bytes()) for i in range(20)] == list(range(20))


def _needs_flush(root: Path | str, name: bytes, changes: Any = None) -> bool:
    """MirrorFS.needs_flush for a fresh read-only open of ``name`` under ``root``."""
    import trio

    from fusefs.mirror.mirrorfs import MirrorFS
    from fusefs.ops import RequestContext

    ctx = RequestContext(uid=0, gid=0, pid=os.getpid(), umask=0)

    async def check() -> bool:
        fs = MirrorFS(root, changes=changes)
        try:
            entry = await fs.lookup(1, name, ctx)
            fi = await fs.open(entry.st_ino, os.O_RDONLY, ctx)
            try:
                return fs.needs_flush(fi.fh)
            finally:
                await fs.release(fi.fh)
        finally:
            fs.close()

    return trio.run(check)


def test_flush_kept_where_close_matters(tmp_path: Path) -> None:
    """Decided per open file by its own filesystem, since BACKING may hold mount points of
    others: a file on a local filesystem needs no FLUSH, one on procfs (standing in for NFS,
    which writes back and reports errors at close) keeps it."""
    (tmp_path / "local").write_text("x")
    assert _needs_flush(tmp_path, b"local") is False
    assert _needs_flush("/proc/self", b"status") is True


def test_flush_kept_only_for_sync_replication(tmp_path: Path) -> None:
    """close() waits for a sync replica (FLUSH kept); an async one never makes it wait, so a
    local file needs no FLUSH for it."""
    from fusefs.mirror.changes import Change

    class Sink:
        def __init__(self, waits: bool) -> None:
            self.barrier_waits = waits

        async def record(self, change: Change) -> None:
            pass

        async def barrier(self) -> None:
            pass

    (tmp_path / "f").write_text("x")
    assert _needs_flush(tmp_path, b"f", Sink(True)) is True
    assert _needs_flush(tmp_path, b"f", Sink(False)) is False


def test_counters_64mib_cp(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(pattern(64 * MiB, seed=8))
    out = tmp_path / "out.bin"
    before = pair.stats()
    subprocess.run(["cp", str(src), str(pair.mnt / "big")], check=True)
    evict(pair.mnt / "big")
    subprocess.run(["cp", str(pair.mnt / "big"), str(out)], check=True)
    d = delta(before, pair.stats())
    subprocess.run(["cmp", str(src), str(out)], check=True)
    subprocess.run(["cmp", str(src), str(pair.backing / "big")], check=True)
    if pair.mode == "copy":
        assert d["bytes_copied"] >= 2 * 64 * MiB, d
        assert d["bytes_spliced"] == 0, d
    elif pair.mode == "splice":
        assert d["bytes_copied"] == 0, d
        assert d["read_bytes_spliced"] >= 64 * MiB, d
        assert d["write_bytes_spliced"] == 64 * MiB, d
        assert d["splice_fallbacks"] == 0, d
    else:
        assert d["bytes_copied"] == 0, d
        assert d["passthrough_opens"] > 0, d
        assert d["bytes_spliced"] == 0, d  # the kernel moved every byte itself


@contextlib.contextmanager
def append_only(*paths: Path) -> Iterator[None]:
    """``chattr +a`` the files (only O_APPEND opens may write them); undone afterwards."""
    try:
        for p in paths:
            subprocess.run(["chattr", "+a", str(p)], check=True, capture_output=True)
        yield
    finally:
        for p in paths:
            subprocess.run(["chattr", "-a", str(p)], check=False, capture_output=True)


def test_splice_fallback_append_only_backing_file(mount_factory: Any, tmp_path: Path) -> None:
    """A backing file that only takes O_APPEND writes refuses splice(2) (EINVAL): the WRITE must
    fall back to copying, and the bytes must be the same as a plain append-only file gets.

    The one refusal a user can cause from outside: a ``chattr +a`` backing file must be opened
    O_APPEND by the mirror, and splice into an O_APPEND file always fails.
    """
    mount: Mount = mount_factory(options=["data=splice"])
    mnt = mount.mountpoint
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in (mount.backing / "a", plain / "a"):
        f.write_bytes(b"head")
    chunks = [pattern(n, seed=300 + i) for i, n in enumerate((MiB, 200_000, 65536, 100, MiB + 1))]
    results = []
    with append_only(mount.backing / "a", plain / "a"):
        before = stats(mnt)
        for root in (mnt, plain):
            try:
                fd = os.open(root / "a", os.O_WRONLY | os.O_APPEND)
            except OSError as e:
                results.append(("open", errno.errorcode[e.errno or 0]))
                continue
            try:
                results.append([os.write(fd, c) for c in chunks])
            except OSError as e:
                results.append(("write", errno.errorcode[e.errno or 0]))
            finally:
                os.close(fd)
        d = delta(before, stats(mnt))
        assert results[0] == results[1], f"mount: {results[0]}, plain: {results[1]}"
        evict(mnt / "a")
        assert read_all(mnt / "a") == (plain / "a").read_bytes() == b"head" + b"".join(chunks)
        assert (mount.backing / "a").read_bytes() == (plain / "a").read_bytes()
        big = sum(len(c) for c in chunks if len(c) >= 65536)
        # The two MiB writes and the 200,000-byte one each make a request over the splice
        # threshold (how the kernel cuts the unaligned 65,536-byte one varies).
        assert d["splice_fallbacks"] >= 3, d
        assert d["write_bytes_copied"] >= big, d
    # the fallback is per request: a write to an ordinary file still splices
    before = stats(mnt)
    (mnt / "b").write_bytes(chunks[0])
    d = delta(before, stats(mnt))
    assert d["splice_fallbacks"] == 0 and d["write_bytes_spliced"] == len(chunks[0]), d


@contextlib.contextmanager
def pipe_limit(size: int) -> Iterator[None]:
    """``fs.pipe-max-size`` set to ``size`` for the block, where this machine lets root set it
    (where it does not, the block runs under the machine's own limit)."""
    knob = Path("/proc/sys/fs/pipe-max-size")
    try:
        old = knob.read_text()
        knob.write_text(str(size))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        knob.write_text(old)


@pytest.mark.parametrize("access", [os.O_WRONLY, os.O_RDWR], ids=["wronly", "rdwr"])
@pytest.mark.parametrize("limit", [1 << 20, 2 << 20], ids=["1MiB-pipes", "2MiB-pipes"])
def test_request_size_follows_the_pipe(
    mount_factory: Any, tmp_path: Path, limit: int, access: int
) -> None:
    """A spliced message must fit one pipe whole: under 1 MiB pipes a 1 MiB write arrives as
    two WRITEs (254 pages, then the rest), with 2 MiB pipes (a raised fs.pipe-max-size, or
    CAP_SYS_RESOURCE) as one.  Either way every byte is spliced and reads back the same, also
    after the limit went back down under the running daemon (its new pipes can no longer be
    that big: what cannot be spliced is copied).  Both ways a write reaches the daemon: a
    write-only open's direct I/O (the writer's pages) and a read-write open's page cache.
    The writes come from a page-aligned buffer, as dd's and cp's do: under direct I/O a
    request spans the writer's pages, and an unaligned MiB spans 257 of them."""
    from fusefs.session.datapath import splice_pipe_size, spliceable_pages

    with pipe_limit(limit):
        pages = spliceable_pages(splice_pipe_size())  # what the daemon, also root, will get
        mount: Mount = mount_factory(options=["data=splice"])
    mnt = mount.mountpoint
    data = pattern(8 * MiB, seed=41)
    buf = mmap.mmap(-1, MiB)
    before = stats(mnt)
    assert before["max_pages"] == pages, before
    fd = os.open(mnt / "f", access | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(data), MiB):
            buf[:] = data[off : off + MiB]
            os.write(fd, buf)
        after_aligned = stats(mnt)
        buf[:] = data[:MiB]
        os.pwrite(fd, buf, 8 * MiB + 100)  # unaligned in the file: spans 257 pages
    finally:
        os.close(fd)
        buf.close()
    d = delta(before, after_aligned)
    writes = after_aligned["requests"]["WRITE"] - before["requests"].get("WRITE", 0)
    assert writes == (8 if pages >= 256 else 16), (pages, writes)
    assert d["write_bytes_copied"] == 0 and d["splice_fallbacks"] == 0, d
    assert d["write_bytes_spliced"] == 8 * MiB, d
    d = delta(after_aligned, stats(mnt))
    assert d["write_bytes_copied"] + d["write_bytes_spliced"] == MiB, d
    if access == os.O_WRONLY and DIRECT_WRITES:
        # direct I/O takes the writer's pages as they are: all spliced
        assert d["write_bytes_copied"] == 0, d
    else:  # the page cache sends the partial first page alone (it cannot mark it up to
        # date), small enough to be copied
        assert d["write_bytes_copied"] < 4096, d
    want = data + bytes(100) + data[:MiB]
    evict(mnt / "f")
    assert read_all(mnt / "f") == want
    assert (mount.backing / "f").read_bytes() == want


def test_seek_data_hole_see_dirty_writeback_pages(mount_factory: Any) -> None:
    """Under -o writeback_cache a write may still be dirty in the kernel when SEEK_DATA or
    SEEK_HOLE comes, and the kernel does not flush before asking: answered from the backing
    file they skipped the new data (ENXIO past the old end).  Found by tools/torture -o
    writeback_cache; the kernel now answers them itself (we say ENOSYS)."""
    mount: Mount = mount_factory(options=["writeback_cache"])
    fd = os.open(mount.mountpoint / "f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, b"x" * 8192, MiB)
        data = os.lseek(fd, 0, os.SEEK_DATA)
        assert data <= MiB and os.pread(fd, MiB - data, data) == bytes(MiB - data)
        hole = os.lseek(fd, MiB, os.SEEK_HOLE)
        assert hole == MiB + 8192
        assert os.lseek(fd, MiB + 100, os.SEEK_DATA) == MiB + 100
        with pytest.raises(OSError) as e:
            os.lseek(fd, MiB + 8192, os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)


def test_cp_writes_in_whole_requests(mount_factory: Any, tmp_path: Path) -> None:
    """Regular files report the largest request as st_blksize, so cp (which sizes its buffer
    by it) writes 1 MiB at a time: at most two WRITEs per MiB, not the eight its default
    128 KiB buffer made; directories keep the backing filesystem's value."""
    mount: Mount = mount_factory(options=["data=splice"])
    mnt = mount.mountpoint
    src = tmp_path / "src"
    src.write_bytes(pattern(8 * MiB, seed=42))
    before = stats(mnt)
    subprocess.run(["cp", str(src), str(mnt / "dst")], check=True)
    writes = stats(mnt)["requests"]["WRITE"] - before["requests"].get("WRITE", 0)
    assert writes <= 16, writes
    assert (mount.backing / "dst").read_bytes() == src.read_bytes()
    assert os.stat(mnt / "dst").st_blksize == MiB
    assert os.stat(mnt).st_blksize == os.stat(mount.backing).st_blksize


def test_mode_is_reported(pair: Pair) -> None:
    s = pair.stats()
    assert s["data_mode"] == pair.mode
    assert s["data_mode_reason"]
    for key in ("bytes_copied", "bytes_spliced", "passthrough_opens", "read_bytes_spliced",
                "write_bytes_spliced", "splice_fallbacks"):  # fmt: skip
        assert isinstance(s[key], int) and s[key] >= 0, key
    # the counters are not an xattr that copies along: not listed, not settable
    assert "user.fusefs.stats" not in os.listxattr(pair.mnt)
    with pytest.raises(OSError):
        os.setxattr(pair.mnt, "user.fusefs.stats", b"{}")


async def test_pipe_payload_falls_back_to_copying_when_splice_is_refused(tmp_path: Path) -> None:
    """A WRITE payload left in its pipe, spliced into an fd that refuses splice (O_APPEND gives
    EINVAL), still lands whole: the payload copies the rest itself and records the fallback,
    so the application never sees the refusal."""
    from fusefs.session.datapath import PipePayload, PipePool

    pool = PipePool(1 << 20)
    pair = pool.get()
    data = os.urandom(200_000)
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        sent += os.write(pair[1], view[sent:])
    payload = PipePayload(pool, pair, len(data))
    target = tmp_path / "f"
    target.write_bytes(b"head")
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
    try:
        n = await payload.to_fd(fd, 4)
    finally:
        os.close(fd)
        pool.close()
    assert n == len(data)
    assert target.read_bytes() == b"head" + data
    assert payload.fallback is not None
    assert payload.copied == len(data) and payload.spliced == 0


@needs_direct_writes
@pytest.mark.parametrize("mode", MODES)
def test_write_only_opens_skip_the_page_cache_and_stay_coherent(
    mount_factory: Any, mode: str
) -> None:
    """A write-only open writes directly (FOPEN_DIRECT_IO, or passthrough): the kernel keeps
    no second cached copy of what is written (the backing file's cache is the first), and a
    reader that has cached the file sees each write at once, as on a plain file."""
    from fusefs import _libc

    mount: Mount = mount_factory(options=[f"data={mode}"])
    path = mount.mountpoint / "f"
    before = stats(mount.mountpoint)
    if before["data_mode"] != mode:  # passthrough needs root and Linux 6.9
        pytest.skip(
            f"asked for data={mode}, got {before['data_mode']}: {before['data_mode_reason']}"
        )
    path.write_bytes(b"A" * (8 * 4096))
    # passthrough: the kernel writes the backing file itself, no direct I/O needed
    opened = delta(before, stats(mount.mountpoint))["direct_io_opens"]
    assert opened == (0 if mode == "passthrough" else 1), opened
    r = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(r, 8 * 4096, 0) == b"A" * (8 * 4096)
        if mode != "passthrough":  # the kernel reads a passed-through file from BACKING
            assert _libc.cached_pages(r, 0, 8 * 4096) == 8
        w = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(w, b"B" * 4096, 4096)
            assert os.pread(r, 3 * 4096, 0) == b"A" * 4096 + b"B" * 4096 + b"A" * 4096
            new = pattern(4 * MiB, seed=5)
            assert os.pwrite(w, new, 8 * 4096) == len(new)
            assert _libc.cached_pages(r, 8 * 4096, len(new)) == 0
            assert os.fstat(r).st_size == 8 * 4096 + len(new)
            assert os.pread(r, len(new), 8 * 4096) == new
        finally:
            os.close(w)
    finally:
        os.close(r)
    assert (mount.backing / "f").read_bytes() == b"A" * 4096 + b"B" * 4096 + b"A" * (6 * 4096) + new


def test_shared_mapping_sees_writes_of_a_write_only_open(pair: Pair) -> None:
    """A write-only open writes directly (not through the page cache) on our session, yet a
    shared mapping of the file sees each write at once, and a write over a page the mapping
    dirtied wins, as on a plain file."""

    def scenario(root: Path) -> list[bytes]:
        path = root / "mapped"
        path.write_bytes(b"A" * (4 * 4096))
        seen = []
        r = os.open(path, os.O_RDWR)
        m = mmap.mmap(r, 4 * 4096)
        w = os.open(path, os.O_WRONLY)
        try:
            seen.append(m[0:4])  # page 0 now mapped, from the cache
            m[2 * 4096 : 2 * 4096 + 4] = b"DDDD"  # a dirty page of the mapping
            os.pwrite(w, b"B" * 4096, 0)
            seen += [m[0:4], m[2 * 4096 : 2 * 4096 + 4]]
            os.pwrite(w, b"C" * 4096, 2 * 4096)
            seen.append(m[2 * 4096 : 2 * 4096 + 4])
            m.flush()
        finally:
            m.close()
            os.close(w)
            os.close(r)
        seen.append(path.read_bytes()[::4096])
        return seen

    assert pair.both(scenario) == [b"AAAA", b"BBBB", b"DDDD", b"CCCC", b"BACA"]


@needs_direct_writes
@pytest.mark.parametrize("mode", ["copy", "splice"])
def test_direct_writes_race_cached_readers(mount_factory: Any, mode: str) -> None:
    """As xfstests generic/209: one thread keeps reading a file through the page cache while
    another rewrites its first page through a write-only (direct) open; after each write
    returns, a read sees the new bytes - never a page a racing read cached from before."""
    mount: Mount = mount_factory(options=[f"data={mode}"])
    path = mount.mountpoint / "race"
    path.write_bytes(bytes(16 * 4096))
    r = os.open(path, os.O_RDONLY)
    w = os.open(path, os.O_WRONLY)
    stop = threading.Event()
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            os.posix_fadvise(r, 0, 0, os.POSIX_FADV_DONTNEED)  # make the next read go out
            os.pread(r, 16 * 4096, 0)
            reads[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    stale = []
    try:
        for gen in range(1, 1500):
            page = gen.to_bytes(4, "little") * 1024
            os.pwrite(w, page, 0)
            got = os.pread(r, 4096, 0)
            if got != page:
                stale.append((gen, int.from_bytes(got[:4], "little")))
    finally:
        stop.set()
        t.join(10)
        os.close(w)
        os.close(r)
    assert reads[0] > 10, reads  # the reader really raced the writes
    assert not stale, stale[:5]
