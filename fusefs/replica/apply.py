"""Applying changes to a replica directory, safely.

Every path is relative to the replica root and is resolved one component at a time with
directory fds opened ``O_NOFOLLOW``: a path that is absolute, empty, has ``.`` or ``..``
components (other than the root itself, ``b"."``) raises :class:`UnsafePathError`; a symlink in
a directory position makes the operation fail (ENOTDIR/ELOOP) instead of being followed; the
last component is always acted on without following it (``*at`` calls with
``AT_SYMLINK_NOFOLLOW``, ``O_NOFOLLOW``).  Nothing is ever created outside the root.

A ``fusefs serve`` that is not root owns every file it creates, and must still be able to
update one whose mode denies its owner access (``cp -a`` of a 0444 file, git objects):
:meth:`ReplicaDir._open_regular` then adds the owner bits it needs for the open and puts the
mode back at once (permissions are checked at open only).  The same holds for extended
attributes and for an existing file that a replayed Create opens again.

Replay is tolerant: the client may resend changes the replica already has (after a reconnect,
or after a tree repair that already brought the replica up to date), so "already done" outcomes
(unlinking a missing name, renaming a name that was already renamed, creating an existing
directory) succeed quietly.  Anything else raises ``OSError`` for the caller to report.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator

from fusefs import _libc as _sys
from fusefs.mirror.changes import (
    Change,
    Create,
    Fallocate,
    Link,
    Mkdir,
    Mknod,
    RemoveXattr,
    Rename,
    Rmdir,
    SetAttr,
    SetXattr,
    Symlink,
    Truncate,
    Unlink,
    Write,
)
from fusefs.replica.tree import checksum_fd, walk
from fusefs.replica.wire import MAX_CHECKSUM_BLOCKS, Entry

__all__ = ["ReplicaDir", "UnsafePathError", "split_path"]

log = logging.getLogger(__name__)

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_AT_REMOVEDIR = 0x200
#: Owner permission bits an open with these access flags needs.
_NEEDS = {
    os.O_RDONLY: stat.S_IRUSR,
    os.O_WRONLY: stat.S_IWUSR,
    os.O_RDWR: stat.S_IRUSR | stat.S_IWUSR,
}


class UnsafePathError(Exception):
    """A path that could reach outside the replica root (absolute, ``..``, empty parts)."""


def split_path(path: bytes) -> list[bytes]:
    """The components of a relative path; ``b"."`` (the root) is ``[]``."""
    if path == b".":
        return []
    parts = path.split(b"/")
    for p in parts:
        if p in (b"", b".", b"..") or b"\x00" in p or len(p) > 255:
            raise UnsafePathError(f"unsafe path {path!r}")
    return parts


class ReplicaDir:
    """A replica directory: applies changes, writes ranges, lists and checksums its tree."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        if create:
            os.makedirs(root, mode=0o755, exist_ok=True)
        self.root = os.fspath(root)
        self.root_fd = os.open(self.root, _DIR & ~os.O_NOFOLLOW)
        self._chown = os.geteuid() == 0
        self._euid = os.geteuid()

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> ReplicaDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution ------------------------------------------------------------------------

    @contextlib.contextmanager
    def parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """(directory fd, last name) for ``path``; the root is (root fd, ``b"."``)."""
        parts = split_path(path)
        if not parts:
            yield self.root_fd, b"."
            return
        fd = self.root_fd
        try:
            for part in parts[:-1]:
                nfd = os.open(part, _DIR, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nfd
            yield fd, parts[-1]
        finally:
            if fd != self.root_fd:
                os.close(fd)

    def _lstat(self, dfd: int, name: bytes) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, dfd: int, name: bytes) -> None:
        """Remove a non-directory, or an empty directory, that is in the way."""
        st = self._lstat(dfd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def _owner(self, dfd: int, name: bytes, uid: int | None, gid: int | None) -> None:
        if self._chown and (uid is not None or gid is not None):
            os.chown(
                name,
                -1 if uid is None else uid,
                -1 if gid is None else gid,
                dir_fd=dfd,
                follow_symlinks=False,
            )

    def _open_regular(self, dfd: int, name: bytes, flags: int) -> int:
        """Open an existing regular file (never a symlink, fifo or device).

        EACCES on a file this process owns (a non-root server, a file whose mode denies its
        owner) is overcome: see :meth:`_open_as_owner`.
        """
        st = self._lstat(dfd, name)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", name)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except PermissionError:
            if st.st_uid != self._euid or self._chown:
                raise
            return self._open_as_owner(dfd, name, flags, st)
        st2 = os.fstat(fd)
        if not stat.S_ISREG(st2.st_mode) or st2.st_ino != st.st_ino:
            os.close(fd)
            raise OSError(errno.EAGAIN, "file replaced while opening", name)
        return fd

    def _open_as_owner(self, dfd: int, name: bytes, flags: int, st: os.stat_result) -> int:
        """Open a file we own whose mode denies us ``flags``: add the owner bits needed,
        open, and restore the mode.  Everything goes through one O_PATH fd of the inode
        checked with fstat, so a name swapped meanwhile is never chmodded nor opened."""
        need = _NEEDS[flags & os.O_ACCMODE]
        pfd = os.open(name, _PATH, dir_fd=dfd)
        try:
            pst = os.fstat(pfd)
            mode = stat.S_IMODE(pst.st_mode)
            if (
                not stat.S_ISREG(pst.st_mode)
                or pst.st_ino != st.st_ino
                or pst.st_uid != self._euid
                or mode & need == need  # denied for another reason (ACL, LSM): not ours to fix
            ):
                raise PermissionError(errno.EACCES, "permission denied", name)
            proc = f"/proc/self/fd/{pfd}"
            os.chmod(proc, mode | need)
            try:
                # the magic link reopens exactly this inode (O_NOFOLLOW would refuse the link)
                return os.open(proc, (flags & ~os.O_NOFOLLOW) | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                os.chmod(proc, mode)
        finally:
            os.close(pfd)

    def _as_owner(self, fd: int, op: Callable[[], None]) -> None:
        """Run ``op`` on the object of the O_PATH ``fd``; if it fails with EACCES and we own a
        file or directory without S_IWUSR (user xattrs need write permission), run it again
        with S_IWUSR added, and restore the mode."""
        try:
            op()
            return
        except PermissionError:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if (
                self._chown
                or st.st_uid != self._euid
                or mode & stat.S_IWUSR
                or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))
            ):
                raise
        proc = f"/proc/self/fd/{fd}"
        os.chmod(proc, mode | stat.S_IWUSR)
        try:
            op()
        finally:
            os.chmod(proc, mode)

    # -- changes ---------------------------------------------------------------------------

    def apply(self, change: Change) -> None:
        """Apply one change (tolerant of replays); raises OSError or UnsafePathError."""
        match change:
            case Create(path, mode, uid, gid):
                with self.parent(path) as (d, n):
                    fd = self._create(d, n, mode)
                    try:
                        if self._chown:
                            os.fchown(fd, uid, gid)
                        os.fchmod(fd, mode & 0o7777)
                    finally:
                        os.close(fd)
            case Mkdir(path, mode, uid, gid):
                with self.parent(path) as (d, n):
                    try:
                        os.mkdir(n, 0o700, dir_fd=d)
                    except FileExistsError:
                        st = self._lstat(d, n)
                        if st is None or not stat.S_ISDIR(st.st_mode):
                            self._remove(d, n)
                            os.mkdir(n, 0o700, dir_fd=d)
                    self._owner(d, n, uid, gid)
                    os.chmod(n, mode & 0o7777, dir_fd=d, follow_symlinks=False)
            case Mknod(path, mode, rdev, uid, gid):
                with self.parent(path) as (d, n):
                    self._remove(d, n)
                    os.mknod(n, mode, rdev, dir_fd=d)
                    self._owner(d, n, uid, gid)
                    os.chmod(n, mode & 0o7777, dir_fd=d, follow_symlinks=False)
            case Symlink(path, target, uid, gid):
                with self.parent(path) as (d, n):
                    try:
                        os.symlink(target, n, dir_fd=d)
                    except FileExistsError:
                        self._remove(d, n)
                        os.symlink(target, n, dir_fd=d)
                    self._owner(d, n, uid, gid)
            case Link(path, target):
                with self.parent(target) as (td, tn), self.parent(path) as (d, n):
                    try:
                        os.link(tn, n, src_dir_fd=td, dst_dir_fd=d, follow_symlinks=False)
                    except FileExistsError:
                        a, b = self._lstat(td, tn), self._lstat(d, n)
                        if a is None or b is None or (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                            self._remove(d, n)
                            os.link(tn, n, src_dir_fd=td, dst_dir_fd=d, follow_symlinks=False)
            case Unlink(path):
                with self.parent(path) as (d, n), contextlib.suppress(FileNotFoundError):
                    os.unlink(n, dir_fd=d)
            case Rmdir(path):
                with self.parent(path) as (d, n), contextlib.suppress(FileNotFoundError):
                    os.rmdir(n, dir_fd=d)
            case Rename(old, new, flags):
                with self.parent(old) as (od, on), self.parent(new) as (nd, nn):
                    if on == b"." or nn == b".":
                        raise OSError(errno.EBUSY, "cannot rename the root")
                    try:
                        if flags:
                            _sys.renameat2(od, on, nd, nn, flags)
                        else:
                            os.rename(on, nn, src_dir_fd=od, dst_dir_fd=nd)
                    except FileNotFoundError:
                        if flags & 2 or self._lstat(nd, nn) is None:
                            raise
                        # already renamed (a replay)
            case Write():
                pass  # data travels as DATA frames, see open_for_write
            case Truncate(path, size):
                with self.parent(path) as (d, n):
                    try:
                        fd = self._open_regular(d, n, os.O_WRONLY)
                    except FileNotFoundError:
                        return
                    try:
                        os.ftruncate(fd, size)
                    finally:
                        os.close(fd)
            case Fallocate(path, mode, offset, length):
                with self.parent(path) as (d, n):
                    try:
                        fd = self._open_regular(d, n, os.O_RDWR)
                    except FileNotFoundError:
                        return
                    try:
                        _sys.fallocate(fd, mode, offset, length)
                    finally:
                        os.close(fd)
            case SetAttr(path, mode, uid, gid, atime_ns, mtime_ns):
                with self.parent(path) as (d, n):
                    st = self._lstat(d, n)
                    if st is None:
                        return
                    self._owner(d, n, uid, gid)
                    if mode is not None and not stat.S_ISLNK(st.st_mode):
                        os.chmod(n, mode & 0o7777, dir_fd=d, follow_symlinks=False)
                    if atime_ns is not None or mtime_ns is not None:
                        times = (
                            st.st_atime_ns if atime_ns is None else atime_ns,
                            st.st_mtime_ns if mtime_ns is None else mtime_ns,
                        )
                        os.utime(n, ns=times, dir_fd=d, follow_symlinks=False)
            case SetXattr(path, name, value):
                with self._object(path) as fd:
                    if fd >= 0:
                        proc = f"/proc/self/fd/{fd}"
                        self._as_owner(fd, lambda: os.setxattr(proc, name, value))
            case RemoveXattr(path, name):
                with self._object(path) as fd:
                    if fd >= 0:
                        proc = f"/proc/self/fd/{fd}"
                        try:
                            self._as_owner(fd, lambda: os.removexattr(proc, name))
                        except OSError as e:
                            if e.errno != errno.ENODATA:
                                raise

    def _create(self, d: int, n: bytes, mode: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        for _ in range(3):
            st = self._lstat(d, n)
            if st is not None and not stat.S_ISREG(st.st_mode):
                self._remove(d, n)
            try:
                fd = os.open(n, flags, mode & 0o777, dir_fd=d)
            except PermissionError:
                if st is None or not stat.S_ISREG(st.st_mode):
                    raise
                return self._open_regular(d, n, os.O_WRONLY)  # a replay; maybe read-only
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                    continue
                raise
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        raise OSError(errno.EEXIST, "cannot replace the object in the way", n)

    @contextlib.contextmanager
    def _object(self, path: bytes) -> Iterator[int]:
        """An O_PATH fd of the object itself (never followed), or -1 if it is missing."""
        with self.parent(path) as (d, n):
            if n == b".":
                yield d
                return
            try:
                fd = os.open(n, _PATH, dir_fd=d)
            except FileNotFoundError:
                yield -1
                return
            try:
                yield fd
            finally:
                os.close(fd)

    # -- data ------------------------------------------------------------------------------

    def open_for_write(self, path: bytes) -> int | None:
        """A writable fd of the regular file ``path``, or None if it does not exist (the
        range is then dropped: a later change removed or replaced the file)."""
        with self.parent(path) as (d, n):
            try:
                return self._open_regular(d, n, os.O_WRONLY)
            except FileNotFoundError:
                return None

    def open_for_read(self, path: bytes) -> int | None:
        """A readable fd of the regular file ``path``, or None if it is not one."""
        try:
            with self.parent(path) as (d, n):
                return self._open_regular(d, n, os.O_RDONLY)
        except OSError:
            return None

    def sync(self) -> None:
        """Make every change so far durable (syncfs of the replica's filesystem)."""
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root_fd)
        try:
            _sys.syncfs(fd)
        finally:
            os.close(fd)

    # -- comparison ------------------------------------------------------------------------

    def list(self) -> Iterator[Entry]:
        """The whole tree, parents first (the root as ``b"."``)."""
        return walk(self.root_fd)

    def checksum(self, path: bytes, block_size: int) -> tuple[bool, int, tuple[bytes, ...]]:
        """(found, size, block digests) of the regular file ``path``.

        A request for more than MAX_CHECKSUM_BLOCKS blocks (block_size 1 of a big file) gets
        no digests, decided from the size before reading anything: each digest costs memory
        and the reply must fit a frame.  The client then treats every block as different.
        """
        fd = self.open_for_read(path)
        if fd is None:
            return False, 0, ()
        try:
            size = os.fstat(fd).st_size
            if -(-size // block_size) > MAX_CHECKSUM_BLOCKS:
                log.warning(
                    "checksum of %r: %d-byte blocks of %d bytes refused", path, block_size, size
                )
                return True, size, ()
            size, digests = checksum_fd(fd, block_size)
            if len(digests) > MAX_CHECKSUM_BLOCKS:  # it grew meanwhile
                return True, size, ()
            return True, size, digests
        finally:
            os.close(fd)
