"""End to end: ``fusefs serve`` in a subprocess, a real FUSE mount with a target, ordinary
tools writing through the mount; the replica must end up equal to BACKING (contents by
SHA-256, modes, owners, xattrs, symlinks, file mtimes), also across kill -9 of the server and
a target that is down when the mount starts."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounting import fusefs_env
from tests.test_replica_helpers import (
    KEY,
    MountProcess,
    diff_snapshots,
    same_tree,
    snapshot,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

HERE = Path(__file__).resolve().parent
CONVERGE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Serve:
    def __init__(self, tmp: Path, replica: Path, key_file: Path) -> None:
        self.replica = replica
        self.key_file = key_file
        self.port = free_port()
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "fusefs.replica.cli", "serve", str(self.replica),
            "--listen", f"127.0.0.1:{self.port}", "--key-file", str(self.key_file), "-v",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=fusefs_env())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("fusefs serve did not start:\n" + self.log.read_text())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()


class Mounted(MountProcess):
    def __init__(
        self, tmp: Path, backing: Path, serve: Serve, data: str = "auto", replicate: str = "async"
    ) -> None:
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.log_dir = tmp / "replog"
        self.log = tmp / "mount.log"
        self.serve = serve
        cmd = [
            sys.executable, "-m", "fusefs", "mount", "-f", str(backing),
            str(self.mountpoint), "-o", f"data={data}", "--target", f"127.0.0.1:{serve.port}",
            "--key-file", str(serve.key_file), "--replica-log-dir", str(self.log_dir),
            "--replicate", replicate, "--source", "e2e",
        ]  # fmt: skip
        self._start(cmd, fusefs_env())


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


def converge(backing: Path, replica: Path, serve: Serve, mounted: Mounted) -> None:
    try:
        wait_until_sync(lambda: same_tree(backing, replica), CONVERGE, "the replica to converge")
    except AssertionError:
        a, b = snapshot(backing), snapshot(replica)
        raise AssertionError(
            diff_snapshots(a, b)
            + "\n--- mount log\n"
            + mounted.log.read_text()[-4000:]
            + "\n--- serve log\n"
            + serve.log.read_text()[-4000:]
        ) from None


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusefs", *args],
        capture_output=True,
        text=True,
        env=fusefs_env(),
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("data", ["copy", "splice", "auto", "auto,writeback_cache"])
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
        converge(backing, replica, serve, m)
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
    assert snapshot(out) == snapshot(replica), diff_snapshots(snapshot(out), snapshot(replica))


def test_kill9_server_mid_copy_converges(tmp_path: Path, dirs: tuple[Path, Path, Serve]) -> None:
    backing, replica, serve = dirs
    serve.start()
    m = Mounted(tmp_path, backing, serve)
    try:
        src = tmp_path / "src"
        make_tree(src, files=120, size=400_000)
        done = threading.Event()

        def copy() -> None:
            subprocess.run(["cp", "-a", str(src), str(m.mountpoint / "copy")], check=True)
            done.set()

        t = threading.Thread(target=copy)
        t.start()
        time.sleep(0.3)
        serve.kill9()
        time.sleep(1.0)
        serve.start()
        t.join(60)
        assert done.is_set()
        converge(backing, replica, serve, m)
    finally:
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
        converge(backing, replica, serve, m)
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
        converge(backing, replica, serve, mounted)
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
        converge(backing, replica, serve, m2)
    finally:
        m2.close()
