"""Mounting and unmounting for real: signals, options the kernel sees, fusermount3, mount.fuse3."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fusefs.errors import (
    AlreadyMountedError,
    MountError,
    MountpointMissingError,
    MountpointNotDirectoryError,
    MountpointNotEmptyError,
    UnmountError,
)
from fusefs.options import MountOptions
from fusefs.session import mount as mnt_api
from tests.mounting import (
    Mount,
    MountFactory,
    find_mount,
    is_mounted,
    run_as,
    user_tmpdir,
    wait_pid,
)

#: The PATH a shell gets when mount(8) runs mount.fuse3 (mount(8) drops PATH from the env).
MOUNT_HELPER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def fill(backing: Path) -> None:
    (backing / "a.txt").write_text("alpha\n")
    (backing / "dir").mkdir()
    (backing / "dir" / "b.txt").write_text("beta\n")


# -- mount.py without a session ----------------------------------------------------------------


def test_check_mountpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(MountpointMissingError, match="does not exist"):
        mnt_api.check_mountpoint(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("")
    with pytest.raises(MountpointNotDirectoryError, match="not a directory"):
        mnt_api.check_mountpoint(str(tmp_path / "file"))
    with pytest.raises(MountpointNotEmptyError, match="-o nonempty"):
        mnt_api.check_mountpoint(str(tmp_path))
    assert mnt_api.check_mountpoint(str(tmp_path), nonempty=True) == str(tmp_path)
    with pytest.raises(AlreadyMountedError):
        mnt_api.check_mountpoint("/proc", nonempty=True)
    (tmp_path / "empty").mkdir()
    assert mnt_api.check_mountpoint(str(tmp_path / "empty")) == str(tmp_path / "empty")


def test_unmount_of_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(UnmountError, match=r"not a mount point|not mounted|not found"):
        mnt_api.unmount(str(tmp_path))
    assert not mnt_api.set_read_ahead(str(tmp_path / "nope"), 128)


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) needs root")
def test_open_mount_and_unmount_without_serving(tmp_path: Path) -> None:
    """mount(2) needs no answer from the filesystem; umount2(2) neither (no INIT was read)."""
    opts = MountOptions(fsname="fusefs-api-test", subtype="apitest", allow_other=True)
    device = mnt_api.open_mount(str(tmp_path), opts)
    try:
        info = find_mount(str(tmp_path))
        assert info is not None
        assert info.fstype == "fuse.apitest" and info.source == "fusefs-api-test"
        assert not device.via_fusermount
        assert os.get_blocking(device.fd)
        assert not os.get_inheritable(device.fd)
        with pytest.raises(AlreadyMountedError):
            mnt_api.open_mount(str(tmp_path), opts)
    finally:
        try:
            device.unmount()
        finally:
            device.close()
            device.close()  # idempotent
    assert not is_mounted(tmp_path)


# -- signals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_unmounts_cleanly(mnt_handle: Mount, backing: Path, signum: int) -> None:
    fill(backing)
    assert (mnt_handle.mountpoint / "a.txt").read_text() == "alpha\n"
    mnt_handle.signal(signum)
    assert mnt_handle.wait(10) == 0, mnt_handle.log()
    assert not mnt_handle.mounted
    assert (backing / "a.txt").read_text() == "alpha\n"
    assert "Traceback" not in mnt_handle.log()


def test_signal_while_busy_detaches_lazily(mnt_handle: Mount, backing: Path) -> None:
    """A mount with an open file cannot be unmounted; SIGTERM detaches it, exits once closed."""
    fill(backing)
    with open(mnt_handle.mountpoint / "a.txt") as f:
        mnt_handle.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while mnt_handle.mounted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not mnt_handle.mounted, "not detached"
        assert f.read() == "alpha\n"  # the open file still works
    assert mnt_handle.wait(10) == 0, mnt_handle.log()


# -- options the kernel sees -------------------------------------------------------------------


def test_mount_shows_fsname_and_subtype(mount_factory: MountFactory, backing: Path) -> None:
    mount = mount_factory(options=["subtype=mirror,fsname=my-data,allow_other"])
    info = find_mount(str(mount.mountpoint))
    assert info is not None
    assert info.fstype == "fuse.mirror"
    assert info.source == "my-data"
    with open("/proc/self/mountinfo") as f:
        line = next(line for line in f if f" {mount.mountpoint} " in line)
    assert "allow_other" in line and "nosuid" in line and "nodev" in line


def test_default_source_is_backing(mnt_handle: Mount, backing: Path) -> None:
    info = find_mount(str(mnt_handle.mountpoint))
    assert info is not None
    assert info.source == str(backing) and info.fstype == "fuse.fusefs"


def test_read_only_mount(mount_factory: MountFactory, backing: Path) -> None:
    fill(backing)
    mount = mount_factory(options=["ro"])
    assert (mount.mountpoint / "a.txt").read_text() == "alpha\n"
    with pytest.raises(OSError) as info:
        (mount.mountpoint / "new.txt").write_text("x")
    assert info.value.errno == errno.EROFS
    assert not (backing / "new.txt").exists()


def test_read_ahead_is_set(mount_factory: MountFactory) -> None:
    mount = mount_factory(options=["read_ahead_kb=384"])
    st = os.stat(mount.mountpoint)
    bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    if not bdi.exists():
        pytest.skip(f"{bdi} does not exist")
    # With -f nothing waits for the daemon's post-INIT step that sets it: poll a while.
    deadline = time.monotonic() + 10
    while bdi.read_text().strip() != "384" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bdi.read_text().strip() == "384", mount.log()


# -- unprivileged: fusermount3 -----------------------------------------------------------------


def test_unprivileged_mount(test_user: str, session: str) -> None:
    base = user_tmpdir(test_user)
    mount = None
    try:
        backing = base / "backing"
        mountpoint = base / "mnt"
        for path in (backing, mountpoint):
            path.mkdir()
            shutil.chown(path, test_user)
        (backing / "mine.txt").write_text("user data\n")
        shutil.chown(backing / "mine.txt", test_user)
        mount = Mount(
            backing=backing,
            mountpoint=mountpoint,
            session=session,
            user=test_user,
            log_path=base / "fusefs.log",
        )
        mount.start()
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if f" {mountpoint} " in line)
        uid = pwd.getpwnam(test_user).pw_uid
        assert f"user_id={uid}" in line, line
        result = run_as(test_user, ["cat", str(mountpoint / "mine.txt")])
        assert result.stdout == "user data\n", result.stderr
        result = run_as(test_user, ["sh", "-c", f"echo new > {mountpoint}/new.txt"])
        assert result.returncode == 0, result.stderr
        assert (backing / "new.txt").read_text() == "new\n"
        assert os.stat(backing / "new.txt").st_uid == uid
        result = run_as(test_user, ["fusermount3", "-u", str(mountpoint)])
        assert result.returncode == 0, result.stderr
        assert mount.wait(10) == 0, mount.log()
        assert not is_mounted(mountpoint)
    finally:
        if mount is not None:
            mount.close(check=False)
        shutil.rmtree(base)


# -- fstab: mount -t fuse.fusefs through mount.fuse3 -------------------------------------------


def _daemon_pids(mountpoint: Path) -> list[int]:
    """Processes whose command line names ``mountpoint`` (the daemon mount.fuse3 started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mountpoint) in args and any(b"fusefs" in a for a in args):
            pids.append(int(entry.name))
    return pids


@pytest.mark.mount
@pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) with a fuse.* type needs root")
@pytest.mark.usefixtures("subreaper")
def test_fstab_style_mount(backing: Path, tmp_path: Path, session: str) -> None:
    if shutil.which("fusefs") is None:
        pytest.skip("fusefs is not installed on PATH (pip install -e .)")
    if shutil.which("fusefs", path=MOUNT_HELPER_PATH) is None:
        pytest.skip(
            "fusefs is not on the PATH mount.fuse3 uses "
            f"({MOUNT_HELPER_PATH}); tools/setup links it into /usr/local/bin"
        )
    if shutil.which("mount.fuse3") is None and not Path("/sbin/mount.fuse3").exists():
        pytest.skip("mount.fuse3 is not installed (apt-get install fuse3)")
    fill(backing)
    mountpoint = tmp_path / "fstab"
    mountpoint.mkdir()
    # what an /etc/fstab line "BACKING MOUNTPOINT fuse.fusefs defaults,allow_other 0 0" does
    proc = subprocess.run(
        [
            "mount",
            "-t",
            "fuse.fusefs",
            "-o",
            f"defaults,allow_other,session={session}",
            str(backing),
            str(mountpoint),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    daemons: list[int] = []
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        daemons = _daemon_pids(mountpoint)
        assert len(daemons) == 1, daemons
        info = find_mount(str(mountpoint))
        assert info is not None and info.fstype == "fuse.fusefs", info
        assert (mountpoint / "dir" / "b.txt").read_text() == "beta\n"
        subprocess.run(["umount", str(mountpoint)], check=True, timeout=10)
        assert wait_pid(daemons[0], 10) == 0
        daemons = []
        assert not is_mounted(mountpoint)
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=10)
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
            wait_pid(pid, 5)


def test_mount_error_is_typed() -> None:
    assert issubclass(AlreadyMountedError, MountError)
    assert issubclass(MountpointNotEmptyError, MountError)
