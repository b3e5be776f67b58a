"""End to end: ``fusefs serve`` in a subprocess, a real FUSE mount with a target, ordinary
tools writing through the mount; the replica must end up equal to BACKING (contents by
SHA-256, modes, owners, xattrs, symlinks, file mtimes), also across kill -9 of the server and
a target that is down when the mount starts."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_replica_helpers import (
    CONVERGE,
    KEY,
    Mounted,
    Serve,
    assert_replication_clean,
    converge,
    diff_snapshots,
    free_port,
    replication_status,
    run_cli,
    settled_status,
    snapshot,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Serve]]:
    backing, replica = tmp_path / "backing", tmp_path / "replica"
    backing.mkdir()
    replica.mkdir()
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    serve = Serve(tmp_path, replica, key_file)
    yield backing, replica, serve
    serve.stop()


def make_tree(root: Path, files: int = 30, size: int = 100_000) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / f"d{i % 4}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(size * (i % 5) // 4))
    (root / "empty").write_bytes(b"")
    os.symlink("d0/sub0/f0", root / "link")
    os.setxattr(root / "d1", "user.tag", b"blue")
    (root / "d2" / "ro").write_text("read only")
    (root / "d2" / "ro").chmod(0o444)


def tree_bytes(root: Path) -> int:
    """The bytes of the regular files under ``root`` (each inode once)."""
    sizes = {}
    for d, _, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if stat.S_ISREG(st.st_mode):
                sizes[st.st_dev, st.st_ino] = st.st_size
    return sum(sizes.values())


def mount_stats(mountpoint: Path) -> dict[str, object]:
    r = run_cli("stats", str(mountpoint), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    stats: dict[str, object] = json.loads(r.stdout)
    return stats


#: every data mode; with a target the mirror refuses passthrough (it must see every write), so
#: ``passthrough`` and ``auto`` fall back to splice, and writable opens are served by the daemon
DATA_MODES = ["copy", "splice", "auto", "passthrough", "auto,writeback_cache"]


@pytest.mark.parametrize("data", DATA_MODES)
def test_everything_through_the_mount_reaches_the_replica(
    tmp_path: Path, dirs: tuple[Path, Path, Serve], data: str
) -> None:
    backing, replica, serve = dirs
    serve.start()
    m = Mounted(tmp_path, backing, serve, data)
    try:
        mnt = m.mountpoint
        src = tmp_path / "src"
        make_tree(src)
        subprocess.run(["cp", "-a", str(src), str(mnt / "copy")], check=True)
        # overwrite in place through a writable open (passthrough must not hide it)
        target = mnt / "copy" / "d1" / "sub1" / "f1"
        with open(target, "r+b") as f:
            f.seek(10)
            f.write(b"OVERWRITTEN" * 1000)
            f.flush()
            os.fsync(f.fileno())
        with open(mnt / "copy" / "empty", "ab") as f:
            f.write(b"appended")
        if "writeback_cache" in data:
            # the kernel buffers these and writes them back later (at close, or from a shared
            # mapping whenever it likes): the replica must get them all the same
            with open(mnt / "copy" / "d1" / "sub0" / "f9", "r+b") as f:
                for off in range(0, 60_000, 7_000):
                    f.seek(off)
                    f.write(b"small buffered write")
            with open(mnt / "copy" / "mapped", "w+b") as f:
                f.truncate(3 * 4096 + 100)
                with mmap.mmap(f.fileno(), 0) as mapping:
                    mapping[5000:5011] = b"via mmap ok"
                    mapping[-3:] = b"end"
        os.rename(mnt / "copy" / "d0", mnt / "copy" / "renamed")
        os.rename(mnt / "copy" / "d3" / "sub0" / "f3", mnt / "copy" / "moved")
        os.unlink(mnt / "copy" / "d2" / "sub2" / "f2")
        shutil.rmtree(mnt / "copy" / "d3")
        os.truncate(mnt / "copy" / "renamed" / "sub1" / "f4", 12345)
        os.truncate(mnt / "copy" / "moved", 0)
        os.setxattr(mnt / "copy" / "moved", "user.k", b"v")
        os.removexattr(mnt / "copy" / "d1", "user.tag")
        os.chmod(mnt / "copy" / "renamed", 0o700)
        os.link(mnt / "copy" / "moved", mnt / "copy" / "hard")
        os.mkdir(mnt / "copy" / "newdir")
        os.symlink("../moved", mnt / "copy" / "newdir" / "ln")
        # an editor's save: write a temp file and rename it over the original
        (mnt / "copy" / "doc.tmp").write_text("new contents")
        os.replace(mnt / "copy" / "doc.tmp", mnt / "copy" / "empty")
        converge(backing, replica, m)
        # no change failed and none needed the repair by comparison (the replica converged
        # by applying the changes themselves, not by a repair within CONVERGE)
        states = assert_replication_clean(m)
        # the written bytes went through the daemon (never kernel passthrough) and were sent
        stats = mount_stats(mnt)
        assert stats["passthrough_opens"] == 0, stats
        written = "write_bytes_copied" if data == "copy" else "write_bytes_spliced"
        assert stats["data_mode"] == ("copy" if data == "copy" else "splice"), stats
        assert isinstance(stats[written], int) and stats[written] >= tree_bytes(src), stats
        if data in ("auto", "passthrough"):
            assert "replication target" in str(stats["data_mode_reason"]), stats
        # every byte of the final files was written through the mount and sent (the start's
        # comparison found an empty BACKING; "mapped" was only partly written, the rest zeros)
        final = tree_bytes(backing / "copy") - sum(
            p.stat().st_size for p in [backing / "copy" / "mapped"] if p.exists()
        )
        assert states[0]["bytes_sent"] >= final > 0, states
        r = run_cli("verify", str(backing), "--target", f"127.0.0.1:{serve.port}",
                    "--key-file", str(serve.key_file), "--source", "e2e")  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        # a difference behind the mount's back is reported
        (replica / "copy" / "moved").write_text("tampered")
        r = run_cli("verify", str(backing), "--target", f"127.0.0.1:{serve.port}",
                    "--key-file", str(serve.key_file), "--source", "e2e")  # fmt: skip
        assert r.returncode == 1 and "copy/moved" in r.stdout, r.stdout + r.stderr
        # verify used the mount's source name, which replaces the mount's connection on the
        # server: the mount reconnects (after its back-off) and says so
        wait_until_sync(
            lambda: "connected      yes" in run_cli("status", str(mnt)).stdout, 15, "reconnection"
        )
    finally:
        m.close()
    # restore the replica elsewhere: equal to the replica
    out = tmp_path / "restored"
    r = run_cli("restore", str(out), "--target", f"127.0.0.1:{serve.port}",
                "--key-file", str(serve.key_file))  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = snapshot(out), snapshot(replica)
    assert a == b, diff_snapshots(a, b)


def _room(path: Path, need: int) -> bool:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize >= need


@pytest.fixture
def big_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Serve]]:
    """(source dir, backing, replica, serve) with room for three copies of a 1 GiB file:
    under tmp_path if its filesystem has the room, else in /dev/shm; the big files are
    removed afterwards either way (pytest keeps the last runs' tmp_path)."""
    need = 3 * GiB + 512 * MiB
    if _room(tmp_path, need):
        base = tmp_path / "big"
    elif _room(Path("/dev/shm"), need):
        base = Path("/dev/shm") / f"fusefs-kill9-{os.getpid()}-{tmp_path.name}"
    else:
        pytest.skip("no filesystem with 3.5 GiB free for the 1 GiB copy")
    src, backing, replica = base / "src", base / "backing", base / "replica"
    for d in (src, backing, replica):
        d.mkdir(parents=True)
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    serve = Serve(tmp_path, replica, key_file)
    try:
        yield src, backing, replica, serve
    finally:
        serve.stop()
        shutil.rmtree(base, ignore_errors=True)


def write_big_file(path: Path, size: int) -> None:
    """``size`` bytes, every MiB different (a counter in front of one random MiB): a block
    sent to the wrong offset cannot look right."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            struct.pack_into("<Q", block, 0, i)
            f.write(block)


def test_kill9_server_mid_copy_converges(
    tmp_path: Path, big_dirs: tuple[Path, Path, Path, Serve]
) -> None:
    """``cp`` of a 1 GiB file through the mount; ``fusefs serve`` is killed with SIGKILL while
    the ``cp`` is provably still running (alive, BACKING and the replica each hold part of the
    file) and the replica is receiving it; restarted a second later: the copy finishes, and the
    replica converges to BACKING (whole tree by SHA-256) without any change failing.

    The sender runs at low priority, so on 2 CPUs the replica receives little while the ``cp``
    runs flat out: the ``cp`` is paused (SIGSTOP) once 256 MiB are in BACKING until the replica
    has 16 MiB, resumed, and the server killed at once."""
    src, backing, replica, serve = big_dirs
    write_big_file(src / "big", GiB)
    serve.start()
    m = Mounted(tmp_path, backing, serve)
    cp = subprocess.Popen(["cp", str(src / "big"), str(m.mountpoint / "big")])
    try:

        def size(p: Path) -> int:
            return p.stat().st_size if p.exists() else -1

        def copied_or_done(p: Path, n: int) -> Callable[[], bool]:
            return lambda: size(p) >= n or cp.poll() is not None

        wait_until_sync(copied_or_done(backing / "big", 256 * MiB), 30, "256 MiB in BACKING")
        cp.send_signal(signal.SIGSTOP)
        try:
            wait_until_sync(copied_or_done(replica / "big", 16 * MiB), 30, "16 MiB replicated")
        finally:
            cp.send_signal(signal.SIGCONT)
        serve.kill9()
        running, in_backing, in_replica = (
            cp.poll() is None,
            size(backing / "big"),
            size(replica / "big"),
        )
        assert running and in_backing < GiB, f"cp finished before the kill ({in_backing} B)"
        assert 0 < in_replica < GiB, in_replica
        time.sleep(1.0)
        serve.start()
        assert cp.wait(60) == 0
        settled_status(m, timeout=CONVERGE)
        converge(backing, replica, m, timeout=30)
        assert (replica / "big").stat().st_size == GiB
        states = replication_status(m.mountpoint)
        # the outage is an error (reconnects), and a replay may be followed by a comparison,
        # but no change may have failed to apply
        assert states[0]["failed_changes"] == 0, states
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
        m.close()


def test_target_down_at_mount_time_catches_up(
    tmp_path: Path, dirs: tuple[Path, Path, Serve]
) -> None:
    backing, replica, serve = dirs
    (backing / "before").write_text("existed before the mount")
    m = Mounted(tmp_path, backing, serve)  # serve is not running
    try:
        (m.mountpoint / "while-down").write_bytes(os.urandom(300_000))
        os.mkdir(m.mountpoint / "dir")
        (m.mountpoint / "dir" / "x").write_text("x")
        time.sleep(1.5)
        r = run_cli("status", str(m.mountpoint))
        assert "connected      no" in r.stdout, r.stdout + r.stderr
        serve.start()
        converge(backing, replica, m)
        # the changes made while it was down were replayed, not repaired (the start's
        # comparison ran when the target came up); the refused connects are errors
        assert_replication_clean(m, errors=True)
    finally:
        m.close()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = run_cli("serve", str(tmp_path / "r"), "--key-file", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "key file" in r.stderr
    key = tmp_path / "key"
    key.write_bytes(KEY)
    r = run_cli("verify", str(tmp_path), "--target", f"127.0.0.1:{free_port()}",
                "--key-file", str(key))  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("fusefs: error: cannot connect"), r.stderr
    assert r.stderr.count("\n") == 1
    r = run_cli("status", str(tmp_path))
    assert r.returncode == 1 and "replication target" in r.stderr


def test_sync_mode_fsync_returns_only_once_the_replica_holds_the_data(
    tmp_path: Path, dirs: tuple[Path, Path, Serve]
) -> None:
    """--replicate sync: when fsync() on the mount returns, the target already has the bytes
    (checked right after the call, no waiting).  The writer runs in a subprocess with a timeout:
    a sync barrier that never returns must fail the test, not hang it."""
    backing, replica, serve = dirs
    serve.start()
    mounted = Mounted(tmp_path, backing, serve, data="auto", replicate="sync")
    script = """
import os, sys
mnt, rep = sys.argv[1], sys.argv[2]
for i in range(5):
    data = os.urandom(300_000 + i)
    fd = os.open(f"{mnt}/s{i}", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    with open(f"{rep}/s{i}", "rb") as f:
        assert f.read() == data, i
    os.close(fd)
print("ok")
"""
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, str(mounted.mountpoint), str(replica)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        converge(backing, replica, mounted)
        assert_replication_clean(mounted)
    finally:
        mounted.close()


def test_kill9_mount_daemon_then_remount_converges(
    tmp_path: Path, dirs: tuple[Path, Path, Serve]
) -> None:
    """kill -9 of the mount's daemon while it copies (the log and the target hold whatever
    they hold), lazy unmount, mount again with the same log: the replica converges to BACKING
    (the log is replayed and the trees compared at start, so nothing written is lost)."""
    backing, replica, serve = dirs
    serve.start()
    m = Mounted(tmp_path, backing, serve)
    # the writer runs in its own process: its syscalls fail (ENOTCONN) once the daemon is gone
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "for i in range(100000):\n"
            "    with open(f'{sys.argv[1]}/w{i}', 'wb') as f:\n"
            "        f.write(os.urandom(65536))\n"
            "    time.sleep(0.002)\n",
            str(m.mountpoint),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.6)
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        assert writer.wait(30) != 0  # it was still writing when the daemon died
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        subprocess.run(["fusermount3", "-uz", str(m.mountpoint)], check=False)
    assert any(backing.iterdir())
    m2 = Mounted(tmp_path, backing, serve)
    try:
        (m2.mountpoint / "after-restart").write_bytes(os.urandom(50_000))
        converge(backing, replica, m2)
    finally:
        m2.close()
