"""MirrorFS: every FUSE operation applied to a backing directory, POSIX semantics preserved.

Shaped after libfuse's ``passthrough_hp.cc``: each inode the kernel knows is an entry in a table
keyed by the backing ``(st_dev, st_ino)`` and holds an ``O_PATH`` fd, so no operation ever builds a
long path (names of 255 bytes and trees deeper than PATH_MAX work) and renames behind our back
cannot make us act on the wrong file.  Operations on an inode use the ``*at()`` calls on its fd
(AT_EMPTY_PATH for chown, utimes and chmod), or ``/proc/self/fd/N`` where Linux has no call that
takes an O_PATH fd (truncate, xattrs, re-opening the file for I/O, linking).  One fd per cached
inode: the constructor raises RLIMIT_NOFILE to its hard limit, as passthrough_hp does.

Node ids.  pyfuse3 uses ``EntryAttributes.st_ino`` as the FUSE node id, so the st_ino a program
sees *is* the node id.  We make it the backing st_ino whenever that is unambiguous (same device
as the backing root, not 1 = ROOT_INODE, not already taken) so ``ls -i`` and hard-link checks
see the backing numbers; inodes of other devices (submounts, btrfs subvolumes) and collisions
get ids from a counter starting at 2**63, far above real inode numbers.  The backing directory
itself is ROOT_INODE.  Hard links are one table entry.

Lookup counts are exact: every reply that hands the kernel an entry (lookup, create, mkdir, mknod,
symlink, link, each readdir entry) adds one; ``forget`` subtracts, and an inode is dropped (its
fd closed) when its count reaches 0.  readdir leaves out "." and "..".

Modes of new objects.  The kernel applies the caller's umask before the request unless the
session negotiated FUSE_DONT_MASK (pyfuse3 does not); we apply ``ctx.umask`` when the mode still
has umask bits (a no-op on an already masked mode), unless the parent has a default ACL, which
replaces the umask.  Bits the daemon's own umask removed are restored with a chmod.  As root, new
objects are chowned to the caller (the group stays the parent's when it is set-group-ID, as the
kernel would do; set-ID bits that chown cleared are restored).

Every OSError becomes ``FUSEError(errno)``; nothing else escapes a handler.  Metadata calls run
inline (they are fast and per-request overhead matters); fsync, fallocate, copy_file_range and
reads/writes over 64 KiB run in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import resource
import stat
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import trio

from fusefs import _libc, errors
from fusefs.mirror.changes import (
    Change,
    ChangeSink,
    Create,
    Fallocate,
    Link,
    Mkdir,
    Mknod,
    NullSink,
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
from fusefs.ops import (
    ROOT_INODE,
    EntryAttributes,
    FileInfo,
    FileRange,
    FUSEError,
    Operations,
    Payload,
    StatvfsData,
    readdir_reply,
)

__all__ = ["MirrorFS"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: Node ids handed out by the counter start here, far above any real inode number.
_COUNTER_BASE = 1 << 63
#: Reads and writes up to this size run inline; bigger ones in a worker thread.
_INLINE_IO = 64 * 1024
_RENAME_FLAGS = 1 | 2 | 4  # RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT
#: Flags never passed to the backing open(): O_NOFOLLOW would refuse the /proc/self/fd magic
#: link (the kernel already resolved the path); O_DIRECT would demand aligned buffers; O_CREAT
#: and O_EXCL are the kernel's business on open(); O_APPEND is the kernel's too: it sends every
#: appending write with the end-of-file offset, and the page writeback of a shared mapping of
#: an O_APPEND file carries real offsets that an O_APPEND backing fd would turn into appends.
_OPATH = os.O_PATH | os.O_CLOEXEC
_STRIP_OPEN = os.O_NOFOLLOW | os.O_DIRECT | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND


_QUICK_ALWAYS = frozenset(
    {
        "lookup", "forget", "getattr", "readlink", "release", "opendir", "readdir",
        "releasedir", "statfs", "access", "getxattr", "listxattr", "read_range",
    }
)  # fmt: skip
_QUICK_UNTRACKED = frozenset(
    {
        "setattr", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "open",
        "create", "flush", "setxattr", "removexattr",
    }
)  # fmt: skip


class _Ctx(Protocol):
    """The request context attributes we use (pyfuse3's RequestContext or fusefs.ops's)."""

    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def umask(self) -> int: ...


class _Fields(Protocol):
    """The SetattrFields attributes we use (pyfuse3's or fusefs.ops's)."""

    @property
    def update_atime(self) -> bool: ...
    @property
    def update_mtime(self) -> bool: ...
    @property
    def update_mode(self) -> bool: ...
    @property
    def update_uid(self) -> bool: ...
    @property
    def update_gid(self) -> bool: ...
    @property
    def update_size(self) -> bool: ...


class _Inode:
    """One backing inode the kernel holds a lookup reference to.

    Normally it holds an O_PATH fd.  When the table has more fds than its budget, inodes used
    least recently are *parked*: their fd is closed and they keep only a file handle, which
    :attr:`fd` turns back into an fd on the next use (open_by_handle_at).
    """

    __slots__ = (
        "_fd",
        "budget",
        "handle",
        "is_dir",
        "is_symlink",
        "key",
        "names",
        "nlookup",
        "nodeid",
        "nopen",
        "shared_fd",
        "used",
    )

    def __init__(
        self, fd: int, key: tuple[int, int], nodeid: int, mode: int, budget: _FdBudget
    ) -> None:
        self._fd = fd
        self.budget = budget
        self.key = key
        self.nodeid = nodeid
        self.nlookup = 0
        self.is_dir = stat.S_ISDIR(mode)
        self.is_symlink = stat.S_ISLNK(mode)
        #: Known (parent, name) links, most recent first; kept only when a sink is configured.
        self.names: list[tuple[_Inode, bytes]] = []
        #: Open handles on this inode, and the one backing fd all of them share for kernel
        #: passthrough (opened on demand, closed with the last handle).
        self.nopen = 0
        self.shared_fd: int | None = None
        #: File handle (None: not taken yet; b"": the filesystem has none, never park).
        self.handle: bytes | None = None
        self.used = True

    @property
    def fd(self) -> int:
        """The O_PATH fd (reopened from the file handle if the inode was parked)."""
        fd = self._fd
        if fd >= 0:
            self.used = True
            return fd
        return self.budget.reopen(self)

    @property
    def parked(self) -> bool:
        return self._fd < 0

    @property
    def proc(self) -> str:
        """The /proc path that reaches this inode through its O_PATH fd."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        """Close the fds this inode holds (it is being dropped)."""
        if self._fd >= 0:
            _close_quietly(self._fd)
            self._fd = -1
            self.budget.open.pop(self.nodeid, None)
        if self.shared_fd is not None:
            _close_quietly(self.shared_fd)
            self.shared_fd = None


class _FdBudget:
    """Keeps the number of O_PATH fds the inode table holds under a limit.

    The kernel keeps inodes until memory pressure, so a big tree (cp -a of 100,000 files) would
    otherwise exhaust RLIMIT_NOFILE.  Over the limit, a clock sweep (second chance on
    :attr:`_Inode.used`) parks inodes: their fd is closed and reopened by file handle when next
    needed.  Parking needs CAP_DAC_READ_SEARCH and file handles (ext4, xfs, btrfs, tmpfs...);
    without them the limit is not enforced.  Eviction only happens in :meth:`trim`, called when
    an inode enters the table; callers hold no other table fd in a local across that call.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.enabled = False
        #: Inodes holding an fd, in clock order (node id -> inode).
        self.open: dict[int, _Inode] = {}
        #: Per device: a readable fd on that filesystem, for open_by_handle_at.
        self.anchors: dict[int, int] = {}

    def enable(self, root_fd: int, dev: int) -> None:
        """Turn parking on if this process can reopen files by handle."""
        try:
            anchor = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError:
            return
        try:
            os.close(_libc.open_by_handle(anchor, _libc.name_to_handle(root_fd), _OPATH))
        except (OSError, AttributeError):
            os.close(anchor)
            return
        self.anchors[dev] = anchor
        self.enabled = True

    def add_anchor(self, dev: int, dir_fd: int) -> None:
        """A directory on a device not seen before (a submount): keep an anchor there."""
        if self.enabled and dev not in self.anchors:
            with contextlib.suppress(OSError):
                self.anchors[dev] = os.open(
                    ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd
                )

    def reopen(self, ino: _Inode) -> int:
        anchor = self.anchors.get(ino.key[0])
        if not ino.handle or anchor is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        fd = _libc.open_by_handle(anchor, ino.handle, _OPATH)
        ino._fd = fd
        ino.used = True
        self.open[ino.nodeid] = ino
        return fd

    def trim(self, keep: _Inode | None) -> None:
        """Park inodes until the table is comfortably under its limit."""
        if len(self.open) <= self.limit or not self.enabled:
            return
        target = self.limit - max(16, self.limit // 16)
        for _ in range(2):  # the first sweep may only clear "used" bits
            for nodeid in list(self.open):
                if len(self.open) <= target:
                    return
                ino = self.open[nodeid]
                if ino is keep or ino.nodeid == ROOT_INODE or ino.key[0] not in self.anchors:
                    continue
                if ino.used:
                    ino.used = False
                    del self.open[nodeid]
                    self.open[nodeid] = ino  # to the back of the clock
                    continue
                if ino.handle is None:
                    try:
                        ino.handle = _libc.name_to_handle(ino._fd)
                    except OSError:
                        ino.handle = b""
                if not ino.handle:
                    continue
                os.close(ino._fd)
                ino._fd = -1
                del self.open[nodeid]

    def close(self) -> None:
        for fd in self.anchors.values():
            _close_quietly(fd)
        self.anchors.clear()
        self.open.clear()


class _Handle:
    """An open file: the backing fd (also the fh we hand out) and its inode."""

    __slots__ = ("fd", "inode", "writable")

    def __init__(self, fd: int, inode: _Inode, writable: bool) -> None:
        self.fd = fd
        self.inode = inode
        self.writable = writable


class _DirHandle:
    """An open directory: a readable fd and the listing snapshot readdir offsets index into."""

    __slots__ = ("fd", "inode", "names")

    def __init__(self, fd: int, inode: _Inode) -> None:
        self.fd = fd
        self.inode = inode
        self.names: list[bytes] | None = None


def _fuse_errors(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn any OSError a handler raises into the FUSEError the kernel should see.

    Also the safe point to park inode fds (no handler holds a table fd yet): reopening parked
    inodes grows the table's fd count without bound otherwise.
    """

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        budget: _FdBudget = args[0]._budget  # type: ignore[attr-defined]
        if len(budget.open) > budget.limit:
            budget.trim(None)
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None

    return wrapper


class MirrorFS(Operations):
    """A pyfuse3 filesystem that mirrors ``backing``, reporting changes to ``changes``."""

    def __init__(
        self,
        backing: str | os.PathLike[str],
        *,
        changes: ChangeSink | None = None,
        attr_timeout: float = 1.0,
        entry_timeout: float = 1.0,
        writeback: bool = False,
        direct_writes: bool = False,
        max_inode_fds: int | None = None,
    ) -> None:
        """``direct_writes``: write-only opens bypass the kernel's page cache (see
        ``_new_handle``).  Only for a session that honours FUSE_WRITE_KILL_SUIDGID (ours):
        the kernel leaves clearing setuid bits on a direct write to the filesystem, and
        pyfuse3 does not pass that flag on."""
        super().__init__()
        path = Path(backing)
        try:
            root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise errors.BackingMissingError(
                f"backing directory {str(path)!r} does not exist"
            ) from None
        except NotADirectoryError:
            raise errors.BackingNotDirectoryError(
                f"backing path {str(path)!r} is not a directory"
            ) from None
        except OSError as exc:
            raise errors.BackingUnreadableError(
                f"cannot open backing directory {str(path)!r}: {exc.strerror}"
            ) from None
        try:
            # Listing it proves we can read it (O_PATH opens need no permission at all).
            probe = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
            os.close(probe)
            if not os.access(f"/proc/self/fd/{root_fd}", os.R_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            st = os.stat(root_fd)
        except OSError as exc:
            os.close(root_fd)
            raise errors.BackingUnreadableError(
                f"cannot read backing directory {str(path)!r}: {exc.strerror}"
            ) from None

        soft = _raise_fd_limit()
        if max_inode_fds is None:
            # leave a quarter for open files, directories being listed, the session's pipes
            max_inode_fds = max(64, soft * 3 // 4)
        self._budget = _FdBudget(max_inode_fds)
        self._budget.enable(root_fd, st.st_dev)
        self.backing = path
        self.attr_timeout = attr_timeout
        self.entry_timeout = entry_timeout
        #: pyfuse3 asks the kernel for the writeback cache when this is set.
        self.enable_writeback_cache = writeback
        self._writeback = writeback
        self._direct_writes = direct_writes and not writeback
        self._sink: ChangeSink = changes if changes is not None else NullSink()
        #: Track names and report changes only for a real sink (keeps the null case cheap).
        self._track = changes is not None and not isinstance(changes, NullSink)
        self._barrier = getattr(changes, "barrier", None) if self._track else None
        self._barrier_waits = bool(getattr(changes, "barrier_waits", True))
        #: Methods that never suspend (plain syscalls, no awaits): our session may run them in
        #: its reader task instead of a task of their own (see fusefs.ops).  With a change
        #: sink, the methods that report changes await the sink and are left out.
        quick = _QUICK_ALWAYS if self._track else _QUICK_ALWAYS | _QUICK_UNTRACKED
        if not self._track or getattr(self._sink, "quick_record", False):
            # write_payload awaits only payload.to_fd (which the session keeps inline when it
            # runs it in its reader task) and a sink that never suspends
            quick = quick | {"write_payload"}
        self.quick_methods = quick
        #: With a sink every write must pass through us, and the kernel does not let an inode
        #: mix passthrough and ordinary opens: then no open is passed through.
        self.passthrough_allowed = not self._track
        #: read/write up to this size are plain syscalls (larger ones go to a worker thread).
        self.quick_io_max = 0 if self._track else _INLINE_IO
        self._is_root = os.geteuid() == 0
        self._dev = st.st_dev
        self._next_id = _COUNTER_BASE

        root = _Inode(root_fd, (st.st_dev, st.st_ino), ROOT_INODE, st.st_mode, self._budget)
        root.nlookup = 1 << 62  # never forgotten
        self._root = root
        self._inodes: dict[int, _Inode] = {ROOT_INODE: root}
        self._by_key: dict[tuple[int, int], _Inode] = {root.key: root}
        #: (parent node id, name) -> inode; maintained only when tracking.
        self._children: dict[tuple[int, bytes], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_fh = 1

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close every backing fd (call after the session ended; the object is then dead)."""
        for h in self._handles.values():
            _close_quietly(h.fd)
        for d in self._dirs.values():
            _close_quietly(d.fd)
        for ino in {id(h.inode): h.inode for h in self._handles.values()}.values():
            ino.close()
        for ino in self._inodes.values():
            ino.close()
        self._budget.close()
        self._handles.clear()
        self._dirs.clear()
        self._inodes.clear()
        self._by_key.clear()
        self._children.clear()

    # -- inode table ------------------------------------------------------------------------

    def _inode(self, nodeid: int) -> _Inode:
        try:
            return self._inodes[nodeid]
        except KeyError:
            raise FUSEError(errno.ESTALE) from None

    def _alloc_id(self, key: tuple[int, int]) -> int:
        dev, ino = key
        if dev == self._dev and ino != ROOT_INODE and ino not in self._inodes:
            return ino
        while self._next_id in self._inodes:
            self._next_id += 1
        nodeid = self._next_id
        self._next_id += 1
        return nodeid

    def _entry(self, nodeid: int, st: os.stat_result) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = nodeid
        e.generation = 0
        e.entry_timeout = self.entry_timeout
        e.attr_timeout = self.attr_timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _lookup(self, parent: _Inode, name: bytes) -> tuple[_Inode, os.stat_result]:
        """Resolve ``name`` in ``parent`` and count one lookup reference to the result."""
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        inode = self._by_key.get((st.st_dev, st.st_ino))
        if inode is None or inode.parked:
            fd = os.open(name, _OPATH | os.O_NOFOLLOW, dir_fd=parent.fd)
            try:
                st = os.stat(fd)
            except BaseException:
                os.close(fd)
                raise
            inode = self._adopt(fd, st)
        inode.nlookup += 1
        if self._track:
            self._add_name(inode, parent, name)
        return inode, st

    def _adopt(self, fd: int, st: os.stat_result) -> _Inode:
        """Enter the O_PATH ``fd`` in the table (or close it if its inode is already there)."""
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not None:
            if not inode.parked:
                os.close(fd)
                return inode
            # A parked inode holds no fd, so its number may have been reused for another file.
            try:
                same = bool(inode.handle) and _libc.name_to_handle(fd) == inode.handle
            except OSError:
                same = False
            if same:
                inode._fd = fd
                inode.used = True
                self._budget.open[inode.nodeid] = inode
                return inode
            del self._by_key[key]  # the old one is gone: it answers ESTALE from now on
        inode = _Inode(fd, key, self._alloc_id(key), st.st_mode, self._budget)
        self._inodes[inode.nodeid] = inode
        self._by_key[key] = inode
        budget = self._budget
        budget.open[inode.nodeid] = inode
        if inode.is_dir and key[0] != self._dev:
            budget.add_anchor(key[0], fd)
        if len(budget.open) > budget.limit:
            budget.trim(inode)
        return inode

    def _forget_one(self, nodeid: int, n: int) -> None:
        inode = self._inodes.get(nodeid)
        if inode is None:
            return
        inode.nlookup -= n
        if inode.nlookup > 0 or inode is self._root:
            return
        del self._inodes[nodeid]
        if self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        for parent, name in inode.names:
            if self._children.get((parent.nodeid, name)) is inode:
                del self._children[(parent.nodeid, name)]
        inode.names.clear()
        if inode.nopen == 0:
            inode.close()

    # -- names and paths (only when a sink is configured) -----------------------------------

    def _add_name(self, inode: _Inode, parent: _Inode, name: bytes) -> None:
        key = (parent.nodeid, name)
        old = self._children.get(key)
        if old is not None and old is not inode:
            old.names = [(p, n) for p, n in old.names if not (p is parent and n == name)]
        self._children[key] = inode
        names = [(p, n) for p, n in inode.names if not (p is parent and n == name)]
        names.insert(0, (parent, name))
        inode.names = names

    def _drop_name(self, parent: _Inode, name: bytes) -> _Inode | None:
        inode = self._children.pop((parent.nodeid, name), None)
        if inode is not None:
            inode.names = [(p, n) for p, n in inode.names if not (p is parent and n == name)]
        return inode

    def _path(self, inode: _Inode) -> bytes | None:
        """The backing-relative path of ``inode`` by its most recent known name, or None."""
        parts: list[bytes] = []
        seen = 0
        while inode is not self._root:
            if not inode.names or seen > 4096:
                return None
            inode, name = inode.names[0]
            parts.append(name)
            seen += 1
        if not parts:
            return b"."
        parts.reverse()
        return b"/".join(parts)

    def _child_path(self, parent: _Inode, name: bytes) -> bytes | None:
        base = self._path(parent)
        if base is None:
            return None
        return name if base == b"." else base + b"/" + name

    # -- creating objects -------------------------------------------------------------------

    def _new_perm(self, parent: _Inode, mode: int, ctx: _Ctx) -> int:
        """Permission bits for a new object: ``mode`` less the caller's umask.

        Without FUSE_DONT_MASK the kernel already applied the umask (so this is a no-op);
        with it, the umask is ours to apply, except under a default ACL, which replaces it.
        """
        perm = mode & 0o7777
        if perm & ctx.umask and not _has_default_acl(parent):
            perm &= ~ctx.umask
        return perm

    def _settle_new(
        self, parent: _Inode, fd: int, perm: int | None, ctx: _Ctx
    ) -> tuple[_Inode, os.stat_result]:
        """Give a just-created object (O_PATH ``fd``) its owner and mode; count one lookup.

        ``perm`` is the permission bits asked for (None for symlinks, which have none).  The
        daemon's umask may have removed some (we undo that), chown clears set-ID bits (we
        restore them), but a default ACL on the parent legitimately masks bits (we keep that).
        """
        try:
            st = os.stat(fd)
            changed = False
            if self._is_root and (st.st_uid != ctx.uid or st.st_gid != ctx.gid):
                gid = ctx.gid
                if st.st_gid != ctx.gid and os.stat(parent.fd).st_mode & stat.S_ISGID:
                    gid = -1  # set-group-ID directory: the group is inherited, as natively
                if st.st_uid != ctx.uid or gid != -1:
                    _libc.fchown_empty(fd, ctx.uid, gid)
                    changed = True
                    if perm is not None and perm & (stat.S_ISUID | stat.S_ISGID):
                        st = os.stat(fd)  # chown cleared them; see below
            if perm is not None:
                cur = stat.S_IMODE(st.st_mode)
                want = perm
                if stat.S_ISDIR(st.st_mode):
                    want |= cur & stat.S_ISGID  # inherited from the parent
                if cur != want and _has_default_acl(parent):
                    want = cur | (perm & (stat.S_ISUID | stat.S_ISGID))
                if cur != want:
                    _libc.fchmod_empty(fd, want)
                    changed = True
            if changed:
                st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self._adopt(fd, st)
        inode.nlookup += 1
        return inode, st

    def _open_path(self, parent: _Inode, name: bytes) -> int:
        return os.open(name, _OPATH | os.O_NOFOLLOW, dir_fd=parent.fd)

    async def _created(
        self,
        parent: _Inode,
        name: bytes,
        inode: _Inode,
        st: os.stat_result,
        kind: str,
        target: bytes = b"",
    ) -> None:
        """Record the name of a new object and report it."""
        if not self._track:
            return
        self._add_name(inode, parent, name)
        path = self._child_path(parent, name)
        if path is None:
            return
        perm = stat.S_IMODE(st.st_mode)
        change: Change
        if kind == "create":
            change = Create(path, perm, st.st_uid, st.st_gid)
        elif kind == "mkdir":
            change = Mkdir(path, perm, st.st_uid, st.st_gid)
        elif kind == "mknod":
            change = Mknod(path, st.st_mode, st.st_rdev, st.st_uid, st.st_gid)
        else:
            change = Symlink(path, target, st.st_uid, st.st_gid)
        await self._sink.record(change)

    # -- lookup and attributes --------------------------------------------------------------

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: _Ctx) -> EntryAttributes:
        """Find ``name``; a missing name is a negative entry cached for entry_timeout."""
        parent = self._inode(parent_inode)
        if name == b"." or (name == b".." and parent is self._root):
            parent.nlookup += 1
            return self._entry(parent.nodeid, os.stat(parent.fd))
        if name == b"..":  # asked for by NFS export; the parent is not a new name
            fd = self._open_path(parent, name)
            inode = self._adopt(fd, os.stat(fd))
            inode.nlookup += 1
            return self._entry(inode.nodeid, os.stat(inode.fd))
        try:
            inode, st = self._lookup(parent, name)
        except FileNotFoundError:
            neg = EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = self.entry_timeout
            return neg
        return self._entry(inode.nodeid, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Drop lookup references; inodes at zero close their fd."""
        for nodeid, n in inode_list:
            self._forget_one(nodeid, n)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: _Ctx) -> EntryAttributes:
        """fstat of the inode's O_PATH fd."""
        ino = self._inode(inode)
        return self._entry(ino.nodeid, os.stat(ino.fd))

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: EntryAttributes,
        fields: _Fields,
        fh: int | None,
        ctx: _Ctx,
    ) -> EntryAttributes:
        """chown, then chmod (chown clears set-ID bits), then size, then times."""
        ino = self._inode(inode)
        handle = self._handles.get(fh) if fh is not None else None
        uid = attr.st_uid if fields.update_uid else -1
        gid = attr.st_gid if fields.update_gid else -1
        if uid != -1 or gid != -1:
            _libc.fchown_empty(ino.fd, uid, gid)
        if fields.update_mode:
            if ino.is_symlink:
                raise FUSEError(errno.EOPNOTSUPP)
            if handle is not None:
                os.fchmod(handle.fd, stat.S_IMODE(attr.st_mode))
            else:
                _libc.fchmod_empty(ino.fd, stat.S_IMODE(attr.st_mode))
        if fields.update_size:
            if handle is not None:
                os.ftruncate(handle.fd, attr.st_size)
            elif ino.is_dir:
                raise FUSEError(errno.EISDIR)
            else:
                os.truncate(ino.proc, attr.st_size)
        atime = attr.st_atime_ns if fields.update_atime else None
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        if atime is not None or mtime is not None:
            _libc.utimens_empty(ino.fd, atime, mtime)
        st = os.stat(ino.fd)
        if self._track:
            path = self._path(ino)
            if path is not None:
                if fields.update_size:
                    await self._sink.record(Truncate(path, attr.st_size))
                if (
                    fields.update_uid
                    or fields.update_gid
                    or fields.update_mode
                    or (atime is not None or mtime is not None)
                ):
                    await self._sink.record(
                        SetAttr(
                            path,
                            mode=stat.S_IMODE(st.st_mode) if fields.update_mode else None,
                            uid=st.st_uid if fields.update_uid else None,
                            gid=st.st_gid if fields.update_gid else None,
                            atime_ns=atime,
                            mtime_ns=mtime,
                        )
                    )
        return self._entry(ino.nodeid, st)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: _Ctx) -> bytes:
        """readlinkat(fd, "") reads an O_PATH symlink fd's target."""
        return os.fsencode(os.readlink("", dir_fd=self._inode(inode).fd))

    # -- namespace changes ------------------------------------------------------------------

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: _Ctx
    ) -> EntryAttributes:
        """Fifos, sockets, and (as root) device nodes."""
        parent = self._inode(parent_inode)
        perm = self._new_perm(parent, mode, ctx)
        os.mknod(name, stat.S_IFMT(mode) | perm, rdev, dir_fd=parent.fd)
        inode, st = self._settle_new(parent, self._open_path(parent, name), perm, ctx)
        await self._created(parent, name, inode, st, "mknod")
        return self._entry(inode.nodeid, st)

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: _Ctx) -> EntryAttributes:
        """mkdirat, then owner and mode."""
        parent = self._inode(parent_inode)
        perm = self._new_perm(parent, mode, ctx)
        os.mkdir(name, perm, dir_fd=parent.fd)
        inode, st = self._settle_new(parent, self._open_path(parent, name), perm, ctx)
        await self._created(parent, name, inode, st, "mkdir")
        return self._entry(inode.nodeid, st)

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: _Ctx
    ) -> EntryAttributes:
        """symlinkat, then lchown."""
        parent = self._inode(parent_inode)
        os.symlink(target, name, dir_fd=parent.fd)
        inode, st = self._settle_new(parent, self._open_path(parent, name), None, ctx)
        await self._created(parent, name, inode, st, "symlink", target)
        return self._entry(inode.nodeid, st)

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: _Ctx
    ) -> EntryAttributes:
        """linkat through /proc/self/fd: the new name joins the same table entry."""
        ino = self._inode(inode)
        parent = self._inode(new_parent_inode)
        os.link(ino.proc, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        st = os.stat(ino.fd)
        ino.nlookup += 1
        if self._track:
            target = self._path(ino)
            self._add_name(ino, parent, new_name)
            path = self._child_path(parent, new_name)
            if path is not None and target is not None:
                await self._sink.record(Link(path, target))
        return self._entry(ino.nodeid, st)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: _Ctx) -> None:
        """unlinkat; the inode lives on while the kernel still references it."""
        parent = self._inode(parent_inode)
        path = self._child_path(parent, name) if self._track else None
        os.unlink(name, dir_fd=parent.fd)
        if self._track:
            self._drop_name(parent, name)
            if path is not None:
                await self._sink.record(Unlink(path))

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: _Ctx) -> None:
        """unlinkat(AT_REMOVEDIR)."""
        parent = self._inode(parent_inode)
        path = self._child_path(parent, name) if self._track else None
        os.rmdir(name, dir_fd=parent.fd)
        if self._track:
            self._drop_name(parent, name)
            if path is not None:
                await self._sink.record(Rmdir(path))

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: _Ctx,
    ) -> None:
        """renameat, or renameat2 when flags (NOREPLACE, EXCHANGE) are given."""
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        if flags & ~_RENAME_FLAGS:
            raise FUSEError(errno.EINVAL)
        old_path = new_path = None
        if self._track:
            old_path = self._child_path(old_parent, name_old)
            new_path = self._child_path(new_parent, name_new)
        if flags:
            _libc.renameat2(old_parent.fd, name_old, new_parent.fd, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd)
        if not self._track:
            return
        moved = self._drop_name(old_parent, name_old)
        replaced = self._drop_name(new_parent, name_new)
        if moved is not None:
            self._add_name(moved, new_parent, name_new)
        if replaced is not None and flags & 2:  # RENAME_EXCHANGE
            self._add_name(replaced, old_parent, name_old)
        if old_path is not None and new_path is not None:
            await self._sink.record(Rename(old_path, new_path, flags))

    # -- files ------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> int:
        flags &= ~_STRIP_OPEN
        if self._writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            # The kernel reads pages of write-only files to fill its cache (as passthrough_hp).
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags | os.O_CLOEXEC

    def _new_handle(self, fd: int, inode: _Inode, flags: int) -> FileInfo:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self._handles[fd] = _Handle(fd, inode, writable)
        inode.nopen += 1
        # keep_cache off: the kernel drops its page cache at each open, so changes made in the
        # backing directory behind the mount's back show up.  So the pages a write-only open
        # would leave in that cache serve nobody (no read or mmap through this fd; the next
        # open drops them); direct I/O skips them: the kernel takes the writer's own pages
        # instead of allocating, filling and keeping a second cached copy of everything
        # written (the backing file's cache is the first).  Readers that have the file open
        # stay coherent where the kernel drops their cached range around a direct write
        # (the cli asks for direct writes only there: see cli.coherent_direct_writes).
        direct = self._direct_writes and flags & os.O_ACCMODE == os.O_WRONLY
        return FileInfo(fh=fd, direct_io=direct, keep_cache=False, nonseekable=False)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: _Ctx) -> FileInfo:
        """Re-open the inode's O_PATH fd for I/O through /proc/self/fd."""
        ino = self._inode(inode)
        if ino.is_symlink:
            raise FUSEError(errno.ELOOP)
        fl = self._open_flags(flags)
        try:
            fd = os.open(ino.proc, fl)
        except PermissionError:
            # An append-only file (chattr +a) opens for writing only with O_APPEND, which we
            # otherwise leave out; every write to such a file lands at its end anyway.
            if not flags & os.O_APPEND or fl & os.O_ACCMODE == os.O_RDONLY:
                raise
            fl |= os.O_APPEND
            fd = os.open(ino.proc, fl)
        fi = self._new_handle(fd, ino, fl)
        if self._track and flags & os.O_TRUNC:
            path = self._path(ino)
            if path is not None:
                await self._sink.record(Truncate(path, 0))
        return fi

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: _Ctx
    ) -> tuple[FileInfo, EntryAttributes]:
        """openat(O_CREAT) with the caller's flags, then owner and mode."""
        parent = self._inode(parent_inode)
        perm = self._new_perm(parent, mode, ctx)
        fl = self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL)
        fd = os.open(name, fl, perm, dir_fd=parent.fd)
        try:
            pfd = os.open(f"/proc/self/fd/{fd}", _OPATH)
            inode, st = self._settle_new(parent, pfd, perm, ctx)
        except BaseException:
            os.close(fd)
            raise
        fi = self._new_handle(fd, inode, fl)
        if self._track:
            await self._created(parent, name, inode, st, "create")
            if flags & os.O_TRUNC:
                path = self._child_path(parent, name)
                if path is not None:
                    await self._sink.record(Truncate(path, 0))
        return fi, self._entry(inode.nodeid, st)

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None

    async def _record_write(self, h: _Handle, off: int, n: int) -> None:
        if self._track and n > 0:
            path = self._path(h.inode)
            if path is not None:
                await self._sink.record(Write(path, off, n))

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """pread; large reads in a worker thread."""
        fd = self._handle(fh).fd
        if size <= _INLINE_IO:
            return os.pread(fd, size, off)
        return await trio.to_thread.run_sync(os.pread, fd, size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """pwrite all of ``buf`` (short writes retried: the kernel expects all or an error)."""
        h = self._handle(fh)
        if len(buf) <= _INLINE_IO:
            n = _pwrite_all(h.fd, buf, off)
        else:
            n = await trio.to_thread.run_sync(_pwrite_all, h.fd, buf, off)
        await self._record_write(h, off, n)
        return n

    @_fuse_errors
    async def flush(self, fh: int) -> None:
        """close(dup(fd)): lets a backing fs that acts on close (NFS) see this close."""
        os.close(os.dup(self._handle(fh).fd))
        if self._barrier is not None:
            await self._barrier()

    @_fuse_errors
    async def release(self, fh: int) -> None:
        """Close the backing fd."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        ino = h.inode
        ino.nopen -= 1
        if ino.nopen == 0:
            if self._inodes.get(ino.nodeid) is not ino:
                ino.close()  # forgotten while open: nothing else will close its fds
            elif ino.shared_fd is not None:
                _close_quietly(ino.shared_fd)
                ino.shared_fd = None
        os.close(h.fd)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        """fsync/fdatasync in a worker thread."""
        fd = self._handle(fh).fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        if self._barrier is not None:
            await self._barrier()

    # -- zero-copy and extra file operations (fusefs.ops extensions) --------------------------

    @_fuse_errors
    async def read_range(self, fh: int, off: int, size: int) -> FileRange:
        """Answer a read with a range of the backing fd; the session moves the bytes."""
        return FileRange(self._handle(fh).fd, off, size)

    @_fuse_errors
    async def write_payload(self, fh: int, off: int, payload: Payload) -> int:
        """Let the session move the payload straight into the backing fd; report the range."""
        h = self._handle(fh)
        n = await payload.to_fd(h.fd, off)
        await self._record_write(h, off, n)
        return n

    def needs_flush(self, fh: int) -> bool:
        """Whether close() of this open file needs a FLUSH: to wait for a replica
        (``barrier``), or because its backing filesystem acts on close (NFS writes back and
        reports errors there).  Local filesystems do not: the session then opens the file
        with FOPEN_NOFLUSH and close costs no round trip."""
        if self._barrier is not None and self._barrier_waits:
            return True
        h = self._handle(fh)
        return not _libc.on_local_fs(h.fd, h.inode.key[0])

    def passthrough_fd(self, fh: int) -> int | None:
        """The backing fd the kernel may serve this open file's I/O from, or None.

        The kernel insists that all concurrent opens of one inode use the *same* backing file
        (another one fails the open with EIO) and refuses to mix passthrough and cached opens
        on an inode.  So every open of an inode gets the same fd, opened read-write (read-only
        if that is all the backing file allows) and kept while any handle is open: a session
        registers it once per fd and reuses the backing id.  With a change sink every answer
        is None, since the sink must see the writes and mixing is not allowed.  Files with
        set-ID bits get None too, so that writes reach the session, which clears the bits.
        """
        h = self._handles.get(fh)
        if h is None or self._track:
            return None
        ino = h.inode
        if ino.shared_fd is None:
            if ino.nopen > 1:
                return None  # others opened without passthrough: stay consistent
            try:
                if os.stat(h.fd).st_mode & (stat.S_ISUID | stat.S_ISGID):
                    # Writes must reach the session so it can clear set-ID bits the way the
                    # kernel would (HANDLE_KILLPRIV_V2).  (The session also registers backing
                    # files without CAP_FSETID, so passthrough writes clear them too; this
                    # keeps set-ID files on the path that is checked by the session.)
                    return None
            except OSError:
                return None
            try:
                ino.shared_fd = os.open(ino.proc, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                if h.writable:
                    return None  # cannot happen when h itself opened for writing; be safe
                try:
                    ino.shared_fd = os.open(ino.proc, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return None
        return ino.shared_fd

    @_fuse_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) with any mode (punch hole, zero range...) in a worker thread."""
        h = self._handle(fh)
        await trio.to_thread.run_sync(_libc.fallocate, h.fd, mode, offset, length)
        if self._track:
            path = self._path(h.inode)
            if path is not None:
                await self._sink.record(Fallocate(path, mode, offset, length))

    @_fuse_errors
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE on the backing fd.

        Moving the fd's offset is harmless: all I/O here is positional (pread/pwrite/splice
        with offsets), and this runs inline so no other request interleaves.
        """
        return os.lseek(self._handle(fh).fd, offset, whence)

    @_fuse_errors
    async def copy_file_range(
        self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int
    ) -> int:
        """copy_file_range(2) between two backing fds (reflinks where the fs can)."""
        if flags:
            raise FUSEError(errno.EINVAL)
        src = self._handle(fh_in).fd
        dst = self._handle(fh_out)
        n = await trio.to_thread.run_sync(os.copy_file_range, src, dst.fd, length, off_in, off_out)
        await self._record_write(dst, off_out, n)
        return n

    # -- directories ------------------------------------------------------------------------

    @_fuse_errors
    async def opendir(self, inode: int, ctx: _Ctx) -> int:
        """Open the directory for reading; its listing is taken at the first readdir."""
        ino = self._inode(inode)
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ino.fd)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = _DirHandle(fd, ino)
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """Entries of the listing snapshot from ``start_id`` on, each with one lookup.

        The snapshot is taken when a listing starts (start_id 0), so next_id values (index + 1)
        stay valid while entries are added or removed: removed ones are skipped, new ones
        appear in the next listing.  "." and ".." are left out (allowed by the contract):
        a session that turns READDIRPLUS lookups back into forgets for a plain READDIR then
        cannot take a reference from the directory itself.
        """
        try:
            d = self._dirs[fh]
        except KeyError:
            raise FUSEError(errno.EBADF) from None
        if start_id == 0 or d.names is None:
            d.names = [os.fsencode(n) for n in os.listdir(d.fd)]
        names = d.names
        parent = d.inode
        for i in range(start_id, len(names)):
            name = names[i]
            try:
                inode, st = self._lookup(parent, name)
            except FileNotFoundError:
                continue  # removed since the snapshot
            if not readdir_reply(token, name, self._entry(inode.nodeid, st), i + 1):
                self._forget_one(inode.nodeid, 1)
                return

    @_fuse_errors
    async def releasedir(self, fh: int) -> None:
        """Close the directory fd and forget the snapshot."""
        d = self._dirs.pop(fh, None)
        if d is not None:
            os.close(d.fd)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync the directory in a worker thread."""
        try:
            fd = self._dirs[fh].fd
        except KeyError:
            raise FUSEError(errno.EBADF) from None
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        if self._barrier is not None:
            await self._barrier()

    # -- filesystem -------------------------------------------------------------------------

    @_fuse_errors
    async def statfs(self, ctx: _Ctx) -> StatvfsData:
        """fstatvfs of the backing directory."""
        sv = os.statvfs(self._root.fd)
        out = StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    @_fuse_errors
    async def access(self, inode: int, mode: int, ctx: _Ctx) -> bool:
        """POSIX permission check for the caller (only asked without default_permissions)."""
        st = os.stat(self._inode(inode).fd)
        if mode == os.F_OK:
            return True
        if ctx.uid == 0:
            # root may do anything but execute a file no one may execute
            return not (mode & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111)
        if st.st_uid == ctx.uid:
            perm = (st.st_mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in _groups(ctx.pid):
            perm = (st.st_mode >> 3) & 7
        else:
            perm = st.st_mode & 7
        return mode & perm == mode

    # -- extended attributes ----------------------------------------------------------------
    # Through /proc/self/fd/N: following the magic link lands on the object itself, symlinks
    # included (user.* on a symlink then fails with EPERM, as natively).

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: _Ctx) -> bytes:
        """getxattr; a missing attribute is ENODATA (== ENOATTR)."""
        return os.getxattr(self._inode(inode).proc, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: _Ctx) -> list[bytes]:
        """listxattr, names as bytes."""
        return [os.fsencode(n) for n in os.listxattr(self._inode(inode).proc)]

    @_fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: _Ctx, flags: int = 0
    ) -> None:
        """setxattr; ``flags`` (XATTR_CREATE / XATTR_REPLACE) is our extension: pyfuse3 has
        no way to pass them, a session that can should pass them by keyword."""
        ino = self._inode(inode)
        os.setxattr(ino.proc, name, value, flags)
        if self._track:
            path = self._path(ino)
            if path is not None:
                await self._sink.record(SetXattr(path, name, value))

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: _Ctx) -> None:
        """removexattr; a missing attribute is ENODATA."""
        ino = self._inode(inode)
        os.removexattr(ino.proc, name)
        if self._track:
            path = self._path(ino)
            if path is not None:
                await self._sink.record(RemoveXattr(path, name))


def _pwrite_all(fd: int, buf: bytes, off: int) -> int:
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], off + done)
        if n == 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        done += n
    return done


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _has_default_acl(d: _Inode) -> bool:
    """Whether directory ``d`` has a default ACL (which then decides new objects' modes)."""
    try:
        return bool(os.getxattr(d.proc, "system.posix_acl_default"))
    except OSError:
        return False


def _raise_fd_limit() -> int:
    """Allow as many fds as the hard limit (we hold one per cached inode); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft


def _groups(pid: int) -> set[int]:
    """Supplementary groups of process ``pid`` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()
