"""Mounting and unmounting a FUSE filesystem: the part of a session that talks to mount(2).

As root, :func:`open_mount` opens ``/dev/fuse`` and calls mount(2) itself.  Otherwise (or when
mount(2) says EPERM, e.g. in a user namespace) it asks the setuid helper ``fusermount3`` to mount
and receives the ``/dev/fuse`` fd over a socket (SCM_RIGHTS), as libfuse does.  Every check that
can fail before mounting raises a typed :class:`~fusefs.errors.MountError` with a one-line message.

This module does no FUSE protocol work: the fd it returns is served by a session
(:mod:`fusefs.session.session` or :mod:`fusefs.session.pyfuse3_backend`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from fusefs.errors import (
    AlreadyMountedError,
    FuseDeviceError,
    FusermountError,
    MountError,
    MountpointMissingError,
    MountpointNotDirectoryError,
    MountpointNotEmptyError,
    UnmountError,
)
from fusefs.options import MountOptions

__all__ = [
    "FUSE_CONNECTIONS",
    "FUSE_DEVICE",
    "MountInfo",
    "MountedDevice",
    "abort_connection",
    "check_mountpoint",
    "find_mount",
    "open_mount",
    "set_read_ahead",
    "unmount",
    "unmount_or_detach",
]

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
FUSE_CONNECTIONS = "/sys/fs/fuse/connections"
MNT_DETACH = 2
FUSERMOUNT_TIMEOUT = 30.0


# -- libc --------------------------------------------------------------------------------------

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        libc.mount.restype = ctypes.c_int
        libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        libc.umount2.restype = ctypes.c_int
        _libc = libc
    return _libc


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2); raises OSError with errno set."""
    rc = _get_libc().mount(
        os.fsencode(source),
        os.fsencode(target),
        os.fsencode(fstype),
        flags,
        None if data is None else os.fsencode(data),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _sys_umount2(target: str, flags: int) -> None:
    """umount2(2); raises OSError with errno set."""
    if _get_libc().umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


# -- /proc/self/mountinfo ----------------------------------------------------------------------


class MountInfo(NamedTuple):
    """One line of /proc/self/mountinfo (the fields fusefs uses)."""

    mount_id: int
    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str


def _unescape_mountinfo(text: str) -> str:
    """Undo the octal escapes (``\\040`` for a space...) of /proc/self/mountinfo."""
    if "\\" not in text:
        return text
    out = bytearray()
    raw = os.fsencode(text)
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse the contents of a mountinfo file."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        major, _, minor = fields[2].partition(":")
        mounts.append(
            MountInfo(
                mount_id=int(fields[0]),
                major=int(major),
                minor=int(minor),
                mountpoint=_unescape_mountinfo(fields[4]),
                fstype=fields[sep + 1],
                source=_unescape_mountinfo(fields[sep + 2]) if len(fields) > sep + 2 else "",
            )
        )
    return mounts


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount on ``mountpoint`` (an absolute path; not resolved, so never blocks)."""
    path = os.path.normpath(os.path.abspath(mountpoint))
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return None
    found = None
    for info in mounts:  # later lines are mounted on top of earlier ones
        if info.mountpoint == path:
            found = info
    return found


# -- checks ------------------------------------------------------------------------------------


def check_mountpoint(mountpoint: str, *, nonempty: bool = False) -> str:
    """Check that ``mountpoint`` can be mounted on; return its resolved absolute path."""
    # mountinfo first: stat() of a FUSE mount whose daemon does not answer would block.
    if find_mount(mountpoint) is not None:
        raise AlreadyMountedError(
            f"mount point {mountpoint} is already a mount point; unmount it first"
        )
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountpointMissingError(f"mount point {mountpoint} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise AlreadyMountedError(
                f"mount point {mountpoint} is a dead FUSE mount (transport endpoint is not "
                f"connected); clear it with: fusermount3 -uz {mountpoint}"
            ) from None
        raise MountError(f"cannot access mount point {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountpointNotDirectoryError(f"mount point {mountpoint} is not a directory")
    path = os.path.realpath(mountpoint)
    parent = os.path.dirname(path)
    try:
        parent_dev = os.stat(parent).st_dev
    except OSError:
        parent_dev = st.st_dev
    if find_mount(path) is not None or (path != "/" and parent_dev != st.st_dev):
        raise AlreadyMountedError(
            f"mount point {mountpoint} is already a mount point; unmount it first"
        )
    if not nonempty:
        try:
            with os.scandir(path) as entries:
                has_entries = next(iter(entries), None) is not None
        except OSError as e:
            raise MountError(f"cannot read mount point {mountpoint}: {e.strerror}") from None
        if has_entries:
            raise MountpointNotEmptyError(
                f"mount point {mountpoint} is not empty (use -o nonempty to mount over it anyway)"
            )
    return path


# -- mounting ----------------------------------------------------------------------------------


@dataclass
class MountedDevice:
    """An open ``/dev/fuse`` fd with a filesystem mounted on it (not yet served)."""

    fd: int
    mountpoint: str
    #: True when ``fusermount3`` mounted it (so it must also unmount it).
    via_fusermount: bool = False
    _closed: bool = field(default=False, repr=False)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd (idempotent).  The mount stays until unmounted (or aborted)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def unmount(self, *, lazy: bool = False) -> None:
        """Unmount the filesystem the way it was mounted."""
        unmount(self.mountpoint, lazy=lazy, via_fusermount=self.via_fusermount)


def open_mount(mountpoint: str, opts: MountOptions) -> MountedDevice:
    """Mount a FUSE filesystem on ``mountpoint``; return the ``/dev/fuse`` fd that serves it.

    The fd is opened O_RDWR|O_CLOEXEC and is blocking; the session makes it non-blocking.
    """
    path = check_mountpoint(mountpoint, nonempty=opts.nonempty)
    if os.geteuid() == 0:
        fd = _open_fuse_device()
        data = opts.kernel_mount_data(fd, stat.S_IFDIR, os.getuid(), os.getgid())
        try:
            _sys_mount(opts.source, path, opts.fstype, opts.mount_flags(), data)
        except OSError as e:
            os.close(fd)
            if e.errno != errno.EPERM:
                raise MountError(f"cannot mount on {mountpoint}: {e.strerror}") from None
            log.info("mount(2) refused with EPERM; trying fusermount3")
        else:
            log.info("mounted %s on %s (type %s, %s)", opts.source, path, opts.fstype, data)
            return MountedDevice(fd, path)
    fd = _fusermount(path, opts)
    log.info("mounted %s on %s through fusermount3", opts.source, path)
    return MountedDevice(fd, path, via_fusermount=True)


def _open_fuse_device() -> int:
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FuseDeviceError(
            f"{FUSE_DEVICE} does not exist: load the fuse module (modprobe fuse) "
            "or, in a container, pass the device through (--device /dev/fuse)"
        ) from None
    except OSError as e:
        raise FuseDeviceError(f"cannot open {FUSE_DEVICE}: {e.strerror}") from None


def _fusermount_binary() -> str:
    binary = shutil.which("fusermount3")
    if binary is None:
        raise FusermountError("fusermount3 not found: install the fuse3 package (or mount as root)")
    return binary


def _helper_message(stderr: bytes, fallback: str) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return fallback
    return re.sub(r"^\S*fusermount3?: ", "", lines[-1])


def _fusermount(path: str, opts: MountOptions) -> int:
    """Mount through ``fusermount3``; receive the /dev/fuse fd it opened over a socketpair."""
    binary = _fusermount_binary()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            proc = subprocess.run(
                [binary, "-o", opts.fusermount_options(), "--", path],
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=FUSERMOUNT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise FusermountError(
                f"fusermount3 did not finish mounting {path} within {FUSERMOUNT_TIMEOUT:.0f} s"
            ) from None
        theirs.close()  # so recv() sees EOF if the helper sent nothing
        if proc.returncode != 0:
            message = _helper_message(proc.stderr, f"exit status {proc.returncode}")
            raise FusermountError(f"fusermount3 could not mount {path}: {message}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1, socket.MSG_CMSG_CLOEXEC)
        if not fds:
            raise FusermountError(f"fusermount3 mounted {path} but sent no /dev/fuse fd")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(mountpoint: str, *, lazy: bool = False, via_fusermount: bool | None = None) -> None:
    """Unmount ``mountpoint``: umount2(2) as root, else ``fusermount3 -u`` (``-z`` if lazy).

    ``via_fusermount`` forces the helper (None: use it only when not root).
    """
    path = os.path.normpath(os.path.abspath(mountpoint))
    if via_fusermount is None:
        via_fusermount = os.geteuid() != 0
    if not via_fusermount:
        try:
            _sys_umount2(path, MNT_DETACH if lazy else 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise UnmountError(f"{mountpoint} is not a mount point") from None
            if e.errno == errno.EBUSY:
                raise UnmountError(
                    f"{mountpoint} is busy; close the files using it or unmount lazily "
                    f"(fusermount3 -uz {mountpoint})"
                ) from None
            raise UnmountError(f"cannot unmount {mountpoint}: {e.strerror}") from None
        log.info("unmounted %s", path)
        return
    cmd = [_fusermount_binary(), "-u", *(["-z"] if lazy else []), "--", path]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=FUSERMOUNT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UnmountError(f"fusermount3 -u {mountpoint} did not finish") from None
    if proc.returncode != 0:
        message = _helper_message(proc.stderr, f"exit status {proc.returncode}")
        raise UnmountError(f"cannot unmount {mountpoint}: {message}")
    log.info("unmounted %s through fusermount3", path)


def unmount_or_detach(mountpoint: str, *, via_fusermount: bool | None = None) -> bool:
    """Unmount; if that fails (busy), detach lazily.  False (and a warning) if neither worked.

    What a session does on SIGINT/SIGTERM: a lazily detached mount ends its session once the
    last open file on it is closed.
    """
    for lazy in (False, True):
        try:
            unmount(mountpoint, lazy=lazy, via_fusermount=via_fusermount)
            return True
        except UnmountError as e:
            log.warning("%s", e)
    return False


# -- after INIT --------------------------------------------------------------------------------


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Set the read-ahead of the mount's bdi to ``kb`` KiB (best effort; True if done).

    Call it once the session serves requests: it stat()s the mount root.  Only root may.
    """
    if os.geteuid() != 0:
        log.debug("not root: leaving read_ahead_kb of %s at the kernel default", mountpoint)
        return False
    try:
        st = os.stat(mountpoint)
        bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        # The kernel lowers read-ahead to INIT's max_readahead when it takes the INIT reply;
        # if that lands after our write, write again (a few times, a little later).
        for _ in range(5):
            with open(bdi, "w", encoding="ascii") as f:
                f.write(f"{kb}\n")
            time.sleep(0.02)
            with open(bdi, encoding="ascii") as f:
                if f.read().strip() == str(kb):
                    break
    except OSError as e:
        log.warning("could not set read_ahead_kb=%d for %s: %s", kb, mountpoint, e)
        return False
    log.debug("read_ahead_kb=%d for %s (%s)", kb, mountpoint, bdi)
    return True


def connection_dir(mountpoint: str) -> str | None:
    """The /sys/fs/fuse/connections/N directory of a FUSE mount (mounting fusectl if needed).

    Found through /proc/self/mountinfo, so it works (and never blocks) on a hung mount.
    """
    info = find_mount(mountpoint)
    if info is None or not (info.fstype == "fuse" or info.fstype.startswith("fuse.")):
        return None
    try:
        empty = not os.listdir(FUSE_CONNECTIONS)
    except OSError:
        empty = True
    if empty:
        try:
            _sys_mount("fusectl", FUSE_CONNECTIONS, "fusectl", 0, None)
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.warning("cannot mount fusectl on %s: %s", FUSE_CONNECTIONS, e.strerror)
    path = os.path.join(FUSE_CONNECTIONS, str(info.minor))
    return path if os.path.isdir(path) else None


def abort_connection(mountpoint: str) -> bool:
    """Abort the FUSE connection of a (hung) mount; True if the abort file was written."""
    directory = connection_dir(mountpoint)
    if directory is None:
        return False
    try:
        with open(os.path.join(directory, "abort"), "w", encoding="ascii") as f:
            f.write("1\n")
    except OSError as e:
        log.warning("cannot abort FUSE connection %s: %s", directory, e)
        return False
    return True
