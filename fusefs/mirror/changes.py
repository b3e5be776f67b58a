"""The changes a mirror applies to its backing directory, as events for a replication layer.

The mirror reports each change *after* applying it to the backing directory and *before*
replying to the kernel, in the order it applied them.  Paths are relative to the backing
directory (``b"."`` is the backing directory itself; never a leading slash), as raw bytes because
Linux names are bytes.  Data changes carry only the byte range: a consumer reads the bytes from
the backing file (the mirror does not copy them).

A change to a file that has no name the mirror knows of (it was unlinked while open, or it was
only ever reached through a name created behind the mount's back) is not reported: it has no
path to replicate to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "Change",
    "ChangeSink",
    "Create",
    "Fallocate",
    "Link",
    "ListSink",
    "Mkdir",
    "Mknod",
    "NullSink",
    "RemoveXattr",
    "Rename",
    "Rmdir",
    "SetAttr",
    "SetXattr",
    "Symlink",
    "Truncate",
    "Unlink",
    "Write",
]


@dataclass(frozen=True, slots=True)
class Create:
    """A regular file was created (mode is the permission bits it got, owner as chowned)."""

    path: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Mkdir:
    """A directory was created."""

    path: bytes
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Mknod:
    """A fifo, socket or device node was created; ``mode`` includes the file type bits."""

    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symbolic link ``path`` -> ``target`` was created."""

    path: bytes
    target: bytes
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Link:
    """A hard link ``path`` to the existing file ``target`` was created."""

    path: bytes
    target: bytes


@dataclass(frozen=True, slots=True)
class Unlink:
    """A non-directory name was removed."""

    path: bytes


@dataclass(frozen=True, slots=True)
class Rmdir:
    """An empty directory was removed."""

    path: bytes


@dataclass(frozen=True, slots=True)
class Rename:
    """``old`` was renamed to ``new``; ``flags`` as for renameat2 (NOREPLACE=1, EXCHANGE=2)."""

    old: bytes
    new: bytes
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Write:
    """Bytes ``[offset, offset + size)`` of ``path`` were written (write or copy_file_range)."""

    path: bytes
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Truncate:
    """``path`` was truncated or extended to ``size`` bytes (setattr or O_TRUNC)."""

    path: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Fallocate:
    """fallocate(2) with ``mode`` (e.g. FALLOC_FL_PUNCH_HOLE) was applied to a range."""

    path: bytes
    mode: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class SetAttr:
    """Attributes were changed; None means "left unchanged".  Times in ns since the epoch."""

    path: bytes
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class SetXattr:
    """Extended attribute ``name`` of ``path`` was set to ``value``."""

    path: bytes
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RemoveXattr:
    """Extended attribute ``name`` of ``path`` was removed."""

    path: bytes
    name: bytes


Change = (
    Create
    | Mkdir
    | Mknod
    | Symlink
    | Link
    | Unlink
    | Rmdir
    | Rename
    | Write
    | Truncate
    | Fallocate
    | SetAttr
    | SetXattr
    | RemoveXattr
)


@runtime_checkable
class ChangeSink(Protocol):
    """Where a mirror reports the changes it applies.

    ``record`` is awaited once per change, in the order the changes were applied, before the
    mirror replies to the kernel; a sink that makes changes durable does so before returning.
    Requests run concurrently, so a sink that cares about order must take its place in the
    order (e.g. append to a queue) synchronously, before its first checkpoint.

    A sink whose ``record`` never suspends (it only appends to a log and a queue) says so with
    a true ``quick_record`` attribute: the mirror then lets the session run big writes in its
    reader task instead of a task each (see ``quick_methods`` in :mod:`fusefs.ops`).
    """

    async def record(self, change: Change) -> None:
        """Take note of one applied change."""


class DurableSink(ChangeSink, Protocol):
    """A sink that can promise durability: the mirror awaits ``barrier()`` at the end of every
    fsync, fsyncdir and flush (close), so with synchronous replication those return only once
    every change recorded so far is durable at the target."""

    async def barrier(self) -> None:
        """Return once every change recorded before this call is durable."""

    @property
    def barrier_waits(self) -> bool:
        """False when ``barrier()`` returns at once (asynchronous replication): then a close()
        through the mount needs no FLUSH round trip on its account."""


class NullSink:
    """The sink of a mirror without a target: records nothing (and the mirror skips it)."""

    quick_record = True

    async def record(self, change: Change) -> None:
        """Discard ``change``."""


class ListSink:
    """Keeps every change in a list, in order: for tests and debugging."""

    quick_record = True

    def __init__(self) -> None:
        self.changes: list[Change] = []

    async def record(self, change: Change) -> None:
        """Append ``change`` to :attr:`changes`."""
        self.changes.append(change)
