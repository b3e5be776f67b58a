"""Scenarios through a real mount with live replication: after each, the replica must equal
BACKING over the whole tree (SHA-256 of every file, types, modes, owners, xattrs, file
mtimes, symlink targets, device numbers, and which paths are hard links of each other), and
the replication must have got there by applying the changes: no change failed, no repair by
comparison beyond the one every start does (``fusefs status --json``).

The processes (``fusefs serve``, ``fusefs mount -f --target``) and the comparison are in
tests/test_replica_helpers.py; every mount is unmounted in ``finally`` (with timeouts)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.reliability_ops import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    fallocate,
    random_run,
    renameat2,
)
from tests.test_replica_helpers import (
    CONVERGE,
    KEY,
    Mounted,
    Serve,
    assert_replication_clean,
    assert_same_tree,
    converge,
    diff_snapshots,
    link_groups,
    replication_status,
    run_cli,
    settled_status,
    snapshot,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="owners and device nodes need root"),
]

MiB = 1 << 20


@dataclass
class Env:
    tmp: Path
    backing: Path
    key_file: Path
    serves: list[Serve] = field(default_factory=list)

    def serve(self, name: str = "replica") -> Serve:
        """A started ``fusefs serve`` of a new replica directory ``tmp/NAME``."""
        replica = self.tmp / name
        replica.mkdir()
        s = Serve(self.tmp, replica, self.key_file, name=f"serve-{name}")
        self.serves.append(s)
        s.start()
        return s


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    backing = tmp_path / "backing"
    backing.mkdir()
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    e = Env(tmp_path, backing, key_file)
    try:
        yield e
    finally:
        for s in e.serves:
            s.stop()


def blob(seed: int, size: int) -> bytes:
    """``size`` bytes that differ with ``seed`` and along the file."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += f"{seed}:{i}:".encode() + bytes((seed * 131 + i) % 251 for _ in range(61))
        i += 1
    return bytes(out[:size])


def make_rich_tree(root: Path) -> None:
    """Regular files of several sizes, a hard-link pair across directories (and a triple),
    symlinks (relative, absolute, dangling, to a directory), xattrs (on files, directories,
    large and binary), odd modes (setuid, setgid, sticky, 000, read-only directory), foreign
    owners, a fifo, fixed mtimes with nanoseconds, and a deeper subdirectory tree."""
    root.mkdir()
    sizes = [0, 1, 4095, 4096, 4097, 65_543, MiB + 3, 3 * MiB + 17]
    (root / "a").mkdir()
    for i, size in enumerate(sizes):
        (root / "a" / f"f{size}").write_bytes(blob(i, size))
    for depth in range(1, 5):
        d = root.joinpath(*(f"lvl{k}" for k in range(depth)))
        d.mkdir(parents=True)
        for j in range(6):
            (d / f"n{j}.txt").write_bytes(blob(100 * depth + j, 300 * j + depth))
    # hard links: a pair across directories and a triple in one
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a" / "h1").write_bytes(blob(7, 200_000))
    os.link(root / "a" / "h1", root / "b" / "deep" / "h2")
    (root / "b" / "t1").write_bytes(blob(8, 5000))
    os.link(root / "b" / "t1", root / "b" / "t2")
    os.link(root / "b" / "t1", root / "b" / "t3")
    # symlinks
    os.symlink("a/f4096", root / "rel")
    os.symlink("/etc/hostname", root / "abs")
    os.symlink("nowhere/at/all", root / "dangling")
    os.symlink("lvl0/lvl1", root / "dirlink")
    # xattrs
    os.setxattr(root / "a" / "f1", "user.colour", b"blue")
    os.setxattr(root / "a" / "f1", "user.binary", bytes(range(256)))
    os.setxattr(root / "a" / "h1", "user.big", blob(9, 3000))
    os.setxattr(root / "lvl0", "user.dir", b"on a directory")
    os.setxattr(root / "b" / "t1", "user.shared", b"seen from every link")
    # odd modes
    (root / "modes").mkdir()
    for name, mode in (("suid", 0o4755), ("sgid", 0o2711), ("none", 0o000), ("ro", 0o444),
                       ("grp", 0o640), ("all", 0o777)):  # fmt: skip
        (root / "modes" / name).write_bytes(name.encode() * 10)
        os.chmod(root / "modes" / name, mode)
    (root / "modes" / "sticky").mkdir()
    os.chmod(root / "modes" / "sticky", 0o1777)
    (root / "modes" / "setgid-dir").mkdir()
    os.chmod(root / "modes" / "setgid-dir", 0o2750)
    (root / "modes" / "rodir").mkdir()
    (root / "modes" / "rodir" / "inside").write_text("in a read-only directory")
    os.chmod(root / "modes" / "rodir", 0o555)
    # owners
    os.chown(root / "a" / "f4097", 1234, 5678)
    os.chown(root / "modes" / "setgid-dir", 4321, 8765)
    os.chown(root / "rel", 2222, 3333, follow_symlinks=False)
    # a fifo
    os.mkfifo(root / "b" / "fifo", 0o620)
    # mtimes (with nanoseconds)
    for i, p in enumerate(sorted((root / "a").iterdir())):
        if not p.is_symlink():
            os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i * 1000))


def test_rsync_aHAX_tree_reaches_the_replica(env: Env) -> None:
    """``rsync -aHAX`` of a rich tree into the mount: the copy in BACKING equals the source,
    the replica equals BACKING, hard links included, by applying the changes."""
    src = env.tmp / "src"
    make_rich_tree(src)
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve)
    try:
        r = subprocess.run(
            ["rsync", "-aHAX", f"{src}/", str(m.mountpoint / "dst")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        # rsync itself worked through the mount (else the replica test proves little)
        assert_same_tree(src, env.backing / "dst")
        assert {("a/h1", "b/deep/h2"), ("b/t1", "b/t2", "b/t3")} == link_groups(src)
        converge(env.backing, serve.replica, m)
        assert_same_tree(env.backing, serve.replica)
        assert_replication_clean(m)
    finally:
        m.close()


SYNC_CLOSE_SCRIPT = r"""
import os, subprocess, sys
mnt, rep = sys.argv[1], sys.argv[2]

def check(name, data):
    # right after close() returned: no waiting, no retry
    with open(f"{rep}/{name}", "rb") as f:
        got = f.read()
    assert got == data, (name, len(got), len(data))
    a, b = os.stat(f"{mnt}/{name}"), os.stat(f"{rep}/{name}")
    assert a.st_mtime_ns == b.st_mtime_ns, (name, a.st_mtime_ns, b.st_mtime_ns)

for i in range(4):
    data = os.urandom(200_000 + 4096 * i + i)
    fd = os.open(f"{mnt}/w{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
    check(f"w{i}", data)
# overwrite in the middle through a read-write open, then append: each checked after close
with open(f"{mnt}/w0", "r+b") as f:
    f.seek(5000)
    f.write(b"MIDDLE" * 1000)
with open(f"{mnt}/w0", "rb") as f:
    expect = f.read()
check("w0", expect)
with open(f"{mnt}/w1", "ab") as f:
    f.write(b"appended" * 100)
with open(f"{mnt}/w1", "rb") as f:
    expect = f.read()
check("w1", expect)
# cp closes its destination before it exits
data = os.urandom(3 << 20)
with open(f"{sys.argv[3]}/src", "wb") as f:
    f.write(data)
subprocess.run(["cp", f"{sys.argv[3]}/src", f"{mnt}/copied"], check=True)
check("copied", data)
print("ok")
"""


def test_sync_mode_close_returns_only_once_the_replica_holds_the_data(env: Env) -> None:
    """--replicate sync: when close() of a written file returns (no fsync), the target
    already holds its bytes and mtime (checked right after the call, no waiting loop).
    Compare tests/test_replica_e2e.py::test_sync_mode_fsync_returns_only_once_the_replica_...
    The writer is a subprocess with a timeout: a barrier that never returns fails the test."""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve, data="auto", replicate="sync")
    try:
        out = subprocess.run(
            [sys.executable, "-c", SYNC_CLOSE_SCRIPT, m.mountpoint, serve.replica, env.tmp],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
        converge(env.backing, serve.replica, m)
        assert_replication_clean(m)
    finally:
        m.close()


def test_rename_flags_fallocate_chown_mknod_truncate_xattrs(env: Env) -> None:
    """renameat2 with RENAME_NOREPLACE and RENAME_EXCHANGE (files, directories, a file with a
    directory), posix_fallocate and fallocate (KEEP_SIZE past EOF, PUNCH_HOLE|KEEP_SIZE,
    ZERO_RANGE), chown to other owners, mknod (fifos, a character device), truncate up and
    down, xattrs set, replaced and removed: the replica equals BACKING, no change failed."""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve)
    mnt = m.mountpoint
    try:
        (mnt / "a").write_bytes(blob(1, 10_000))
        (mnt / "b").write_bytes(blob(2, 20_000))
        (mnt / "d1").mkdir()
        (mnt / "d1" / "x").write_text("in d1")
        (mnt / "d2").mkdir()
        (mnt / "d2" / "y").write_text("in d2")
        # RENAME_NOREPLACE: refused onto an existing name, done onto a free one
        with pytest.raises(OSError) as refused:
            renameat2(str(mnt / "a"), str(mnt / "b"), RENAME_NOREPLACE)
        assert refused.value.errno == errno.EEXIST
        renameat2(str(mnt / "a"), str(mnt / "c"), RENAME_NOREPLACE)
        # RENAME_EXCHANGE: two files, two directories, a file with a directory
        renameat2(str(mnt / "c"), str(mnt / "b"), RENAME_EXCHANGE)
        renameat2(str(mnt / "d1"), str(mnt / "d2"), RENAME_EXCHANGE)
        renameat2(str(mnt / "b"), str(mnt / "d1"), RENAME_EXCHANGE)
        assert (mnt / "b" / "y").read_text() == "in d2"
        assert (mnt / "d1").read_bytes() == blob(1, 10_000)
        assert (mnt / "c").read_bytes() == blob(2, 20_000)

        # fallocate: extend, preallocate past EOF keeping the size, punch a hole, zero a range
        fd = os.open(mnt / "alloc", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, 3 * MiB)
            os.pwrite(fd, blob(3, 3 * MiB), 0)
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 3 * MiB, MiB)
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100_000, 700_000)
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 2 * MiB, 4096 * 3)
            os.posix_fallocate(fd, 3 * MiB, 50_001)  # extends the size
        finally:
            os.close(fd)
        assert os.stat(mnt / "alloc").st_size == 3 * MiB + 50_001
        assert (mnt / "alloc").read_bytes()[100_000:800_000] == bytes(700_000)

        # chown (as root) of a file, a directory and a symlink itself
        os.chown(mnt / "c", 1234, 5678)
        os.chown(mnt / "d2", 4321, 8765)
        os.symlink("c", mnt / "ln")
        os.chown(mnt / "ln", 2222, 3333, follow_symlinks=False)
        os.chown(mnt / "alloc", -1, 4444)

        # mknod: fifos (two ways) and a character device
        os.mkfifo(mnt / "fifo", 0o640)
        os.mknod(mnt / "fifo2", stat.S_IFIFO | 0o600)
        os.mknod(mnt / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(mnt / "fifo", 1000, 1000)

        # truncate up (a hole) and down, by path and by fd
        os.truncate(mnt / "c", 5 * MiB + 3)
        os.truncate(mnt / "d1", 1234)
        with open(mnt / "t", "wb") as f:
            f.write(blob(4, 70_000))
            f.truncate(10)
            f.truncate(200_000)
            f.seek(150_000)
            f.write(b"after the hole")

        # xattrs: set, replace, remove (files, a directory, a fifo)
        os.setxattr(mnt / "c", "user.k", b"v1")
        os.setxattr(mnt / "c", "user.k", b"v2")
        os.setxattr(mnt / "c", "user.gone", b"soon")
        os.removexattr(mnt / "c", "user.gone")
        os.setxattr(mnt / "d2", "user.dir", b"dir value")
        os.setxattr(mnt / "b", "user.tmp", b"x")
        os.removexattr(mnt / "b", "user.tmp")
        os.setxattr(mnt / "fifo", "trusted.fifo", b"on a fifo")
        os.chmod(mnt / "c", 0o4750)
        os.utime(mnt / "t", ns=(1_000_000_000_000_000_001, 1_100_000_000_000_000_007))

        converge(env.backing, serve.replica, m)
        assert_same_tree(env.backing, serve.replica)
        rep = serve.replica
        assert stat.S_ISFIFO(os.lstat(rep / "fifo").st_mode)
        assert os.lstat(rep / "null").st_rdev == os.makedev(1, 3)
        assert (os.lstat(rep / "ln").st_uid, os.lstat(rep / "ln").st_gid) == (2222, 3333)
        assert os.getxattr(rep / "c", "user.k") == b"v2"
        assert (rep / "alloc").read_bytes()[100_000:800_000] == bytes(700_000)
        assert_replication_clean(m)
    finally:
        m.close()


def test_two_targets_both_equal_backing(env: Env) -> None:
    """Two ``--target``s on one mount (two ``fusefs serve``, two replica directories): after
    a ``cp -a``, renames and deletes both replicas equal BACKING, and neither target failed a
    change or needed a repair."""
    s1, s2 = env.serve("replica1"), env.serve("replica2")
    m = Mounted(env.tmp, env.backing, [s1, s2])
    mnt = m.mountpoint
    try:
        src = env.tmp / "src"
        make_rich_tree(src)
        r = subprocess.run(["cp", "-a", str(src), str(mnt / "copy")], capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr
        os.rename(mnt / "copy" / "a", mnt / "copy" / "a2")
        os.rename(mnt / "copy" / "lvl0" / "lvl1", mnt / "copy" / "lvl1-moved")
        os.rename(mnt / "copy" / "a2" / "f1", mnt / "copy" / "b" / "f1-moved")
        os.unlink(mnt / "copy" / "b" / "t2")
        os.unlink(mnt / "copy" / "a2" / "f65543")
        shutil.rmtree(mnt / "copy" / "lvl1-moved")
        os.rename(mnt / "copy", mnt / "final")
        (mnt / "after").write_bytes(blob(5, 100_000))
        for s in (s1, s2):
            converge(env.backing, s.replica, m)
            assert_same_tree(env.backing, s.replica)
        states = assert_replication_clean(m)
        assert sorted(s["target"] for s in states) == sorted((s1.address, s2.address))
    finally:
        m.close()


def test_restore_keeps_hard_links(env: Env) -> None:
    """``fusefs restore`` of a replica that holds hard links: the restored tree has the same
    contents and the same hard links (the listing names each inode's first name as the
    others' ``link``)."""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve)
    try:
        (m.mountpoint / "f").write_bytes(blob(6, 50_000))
        os.link(m.mountpoint / "f", m.mountpoint / "g")
        converge(env.backing, serve.replica, m)
        assert link_groups(serve.replica) == {("f", "g")}
    finally:
        m.close()
    out = env.tmp / "restored"
    r = run_cli("restore", str(out), "--target", serve.address, "--key-file", str(env.key_file))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_tree(serve.replica, out)


def test_repair_keeps_hard_links(env: Env) -> None:
    """A replica rebuilt by the tree comparison at start (a new, empty replica directory for
    a BACKING that holds hard links made through an earlier mount): contents and hard links
    converge (the repair links further names of an inode instead of copying them)."""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve)
    try:
        (m.mountpoint / "d").mkdir()
        (m.mountpoint / "d" / "f").write_bytes(blob(7, 50_000))
        os.link(m.mountpoint / "d" / "f", m.mountpoint / "g")
        converge(env.backing, serve.replica, m)
        assert link_groups(serve.replica) == {("d/f", "g")}
    finally:
        m.close()
    serve.stop()
    shutil.rmtree(serve.replica)
    serve.replica.mkdir()
    serve.start()
    m = Mounted(env.tmp, env.backing, serve)
    try:
        converge(env.backing, serve.replica, m)
        assert_replication_clean(m)
        assert_same_tree(env.backing, serve.replica)
    finally:
        m.close()


class ReplicaDiverged(AssertionError):
    """The replica settled (nothing pending, no repair to come) with contents unlike
    BACKING's; a class of its own for the xfail of the test below."""


def test_replayed_exchange_of_look_alike_files_converges(env: Env) -> None:
    """A RENAME_EXCHANGE that the server applied but did not acknowledge as durable before
    it was killed is sent again after the restart, and applied twice it swaps the files
    back.  The client repairs by comparison after a replay; comparing regular files by size
    and mtime alone, two files of one size and one mtime (as ``cp -a``, ``rsync`` or ``tar``
    leave them) swapped back look unchanged, so it checksums what replayed renames touched.

    The kill must land between the apply and the durable acknowledgement (the SYNC follows
    20 ms after the queue drained): the test watches the replica for the exchange and kills
    the server at once, and retries when the status shows the acknowledgement came first."""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve)
    mnt, rep = m.mountpoint, serve.replica
    same_mtime = 1_500_000_000_000_000_000
    try:
        for attempt in range(6):
            a, b = f"a{attempt}", f"b{attempt}"
            (mnt / a).write_bytes(blob(10 + attempt, 8192))
            (mnt / b).write_bytes(blob(20 + attempt, 8192))
            for name in (a, b):
                os.utime(mnt / name, ns=(same_mtime, same_mtime))
            settled_status(m)
            assert (rep / a).read_bytes() == blob(10 + attempt, 8192)
            inode = os.lstat(rep / a).st_ino
            renameat2(str(mnt / a), str(mnt / b), RENAME_EXCHANGE)
            # poll tightly: the SYNC follows 20 ms after the queue drained
            deadline = time.monotonic() + 10
            while os.lstat(rep / a).st_ino == inode:
                assert time.monotonic() < deadline, "the exchange never reached the replica"
                time.sleep(0.0005)
            serve.kill9()
            wait_until_sync(
                lambda: not replication_status(mnt)[0]["connected"], 10, "the disconnect"
            )
            replayed = replication_status(mnt)[0]["ops_pending"] > 0
            serve.start()
            if replayed:
                break
        else:
            pytest.skip("the durable acknowledgement came before the kill every time")
        settled_status(m, timeout=CONVERGE)
        states = replication_status(mnt)
        assert states[0]["failed_changes"] == 0, states
        sa, sb = snapshot(env.backing), snapshot(rep)
        if sa != sb:
            raise ReplicaDiverged(diff_snapshots(sa, sb) + m.logs())
    finally:
        m.close()


@pytest.mark.parametrize(("replicate", "kill"), [("async", True), ("sync", False)])
def test_random_operations_replicate_through_serve_kills(
    env: Env, replicate: str, kill: bool
) -> None:
    """tools/torture's random operations (files, directories, links, renames with flags,
    truncates, fallocate, xattrs, mmap, ...; checked against a plain directory as they go)
    through a replicating mount, in async mode with the serve killed with SIGKILL and
    restarted in the middle: once settled, the replica equals BACKING, hard links included.
    (Not in sync mode: restarting the serve from this process would deadlock - the new
    process's exec closes its inherited fds of files on the mount, and each close is a FLUSH
    that waits, in sync mode, for the very target being started.  tools/torture restarts it
    through a launcher started before the mount.)"""
    serve = env.serve()
    m = Mounted(env.tmp, env.backing, serve, data="splice", replicate=replicate)
    plain = env.tmp / "plain"
    plain.mkdir()
    kills = []

    def tick(i: int) -> None:
        if kill and i == 1000:
            serve.kill9()
            kills.append(i)
            serve.start()

    def replica_equal(tag: str) -> str | None:
        settled_status(m, timeout=CONVERGE)
        a, b = snapshot(env.backing / tag), snapshot(serve.replica / tag)
        return None if a == b else diff_snapshots(a, b) + m.logs()

    try:
        result = random_run(
            m.mountpoint, plain, env.backing, seed=606 + (replicate == "sync"), n_ops=2000,
            check_every=500, tag="t", progress=tick, at_end=replica_equal,
        )  # fmt: skip
        assert result.mismatch is None, str(result.mismatch)
        assert kills == ([1000] if kill else [])
    finally:
        m.close()
