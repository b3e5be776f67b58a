"""The mirror on a real mount (both sessions): things only a kernel in the loop shows.

Lookup-count bookkeeping (forgets really release the backing fds), inode numbers as the backing
has them, and whole-tree tools (rsync -aHAX, tar) producing what they produce natively.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.mounting import Mount

ROOT = os.geteuid() == 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _make_tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "dir" / f"f{i}").write_bytes(os.urandom(i * 100))
    (root / "dir" / "sub" / "big").write_bytes(os.urandom(300_000))
    os.link(root / "dir" / "f1", root / "dir" / "sub" / "hard")
    os.symlink("../f2", root / "dir" / "sub" / "sym")
    os.mkfifo(root / "dir" / "fifo")
    os.setxattr(root / "dir" / "f3", "user.k", b"v")
    os.chmod(root / "dir" / "f4", 0o4750)
    os.utime(root / "dir" / "f5", ns=(1_000_000_000_123, 2_000_000_000_456))
    (root / ("n" * 255)).write_bytes(b"long name")


def _same(a: Path, b: Path) -> str:
    """rsync's own verdict of what differs between two trees (empty: identical)."""
    out = subprocess.run(
        ["rsync", "-naHAXc", "--delete", "--itemize-changes", f"{a}/", f"{b}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "\n".join(line for line in out.splitlines() if line and not line.startswith(".d"))


def test_inode_numbers_are_the_backing_ones(mnt: Path, backing: Path) -> None:
    (backing / "a").write_bytes(b"x")
    os.link(backing / "a", backing / "b")
    (backing / "d").mkdir()
    for name in ("a", "b", "d"):
        assert os.stat(mnt / name).st_ino == os.stat(backing / name).st_ino
    os.link(mnt / "a", mnt / "d" / "c")
    assert os.stat(mnt / "d" / "c").st_ino == os.stat(backing / "a").st_ino
    assert os.stat(mnt / "a").st_nlink == 3


@pytest.mark.skipif(not ROOT, reason="dropping the kernel's caches needs root")
def test_forgotten_inodes_release_their_fds(mnt_handle: Mount, backing: Path) -> None:
    mnt = mnt_handle.mountpoint
    pid = mnt_handle.pid
    assert pid is not None
    (backing / "d").mkdir()
    for i in range(300):
        (backing / "d" / f"f{i}").write_bytes(b"x")
    before = _fds(pid)
    os.listdir(mnt / "d")
    for i in range(300):
        (mnt / "d" / f"f{i}").read_bytes()
    assert _fds(pid) >= before + 300  # one O_PATH fd per inode the kernel holds
    os.sync()
    deadline = time.monotonic() + 10
    while True:
        Path("/proc/sys/vm/drop_caches").write_text("2\n")  # evicts inodes: FORGETs follow
        if _fds(pid) <= before + 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _fds(pid) <= before + 5
    # and the mount still works after forgetting
    assert (mnt / "d" / "f7").read_bytes() == b"x"


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync_and_tar_into_the_mount(mnt: Path, backing: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_tree(src)
    subprocess.run(["rsync", "-aHAX", f"{src}/", f"{mnt}/rs/"], check=True)
    assert _same(src, mnt / "rs") == ""
    assert _same(src, backing / "rs") == ""
    hard = os.stat(mnt / "rs" / "dir" / "sub" / "hard")
    assert hard.st_ino == os.stat(mnt / "rs" / "dir" / "f1").st_ino
    (mnt / "tar").mkdir()
    pack = subprocess.Popen(
        ["tar", "--xattrs", "-C", str(src), "-cf", "-", "."], stdout=subprocess.PIPE
    )
    subprocess.run(
        ["tar", "--xattrs", "-C", str(mnt / "tar"), "-xpf", "-"], stdin=pack.stdout, check=True
    )
    assert pack.wait() == 0
    assert _same(src, backing / "tar") == ""
    # and back out again: reading through the mount gives the same tree
    out = tmp_path / "out"
    subprocess.run(["rsync", "-aHAX", f"{mnt}/rs/", f"{out}/"], check=True)
    assert _same(src, out) == ""


def test_backing_removed_while_mounted(mnt_handle: Mount, backing: Path) -> None:
    """Removing BACKING under a live mount behaves like a deleted working directory: nothing
    new can be created (ENOENT), files still open or cached stay readable, the daemon keeps
    serving, and the unmount is clean (the fixture asserts the daemon exits 0)."""
    mnt = mnt_handle.mountpoint
    (mnt / "f").write_bytes(b"kept")
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        shutil.rmtree(backing)
        with pytest.raises(FileNotFoundError):
            (mnt / "new").write_bytes(b"x")
        with pytest.raises(FileNotFoundError):
            os.mkdir(mnt / "newdir")
        assert os.pread(fd, 4, 0) == b"kept"
        assert not backing.exists()  # nothing was recreated behind our back
        assert os.statvfs(mnt).f_bsize > 0  # still served
    finally:
        os.close(fd)
        backing.mkdir()  # for the fixture's teardown checks
