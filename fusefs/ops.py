"""The filesystem interface: pyfuse3's ``Operations`` API plus fusefs's zero-copy extensions.

A filesystem for fusefs is a :class:`pyfuse3.Operations` subclass.  The same object runs under
pyfuse3's own session (``pyfuse3.main()``) and under ours (:mod:`fusefs.session`).  Our session
speaks every method pyfuse3 defines, with the same arguments and return types, and in addition
looks for a few optional methods that pyfuse3 has no way to express:

``fallocate(fh, mode, offset, length) -> None``
``lseek(fh, offset, whence) -> int``
``copy_file_range(fh_in, off_in, fh_out, off_out, length, flags) -> int``
    Operations the kernel protocol has and pyfuse3 lacks.  Without them the kernel gets ENOSYS
    (and falls back where it can).

``read_range(fh, off, size) -> FileRange``
    The zero-copy read hook: instead of bytes, say *which bytes of which fd* answer the read.  The
    session then decides how they move (splice into /dev/fuse, or a copying fallback).

``write_payload(fh, off, payload: Payload) -> int``
    The zero-copy write hook: the session hands over the request's payload still in the kernel
    (a pipe), and the filesystem moves it into its backing fd with ``payload.to_fd`` -- and so
    still sees every written range, which replication needs.

``quick_methods: frozenset[str]`` (an attribute)
    Names of methods that never suspend (no ``await`` that can block: plain syscalls).  Our
    session runs their requests in its reader task instead of spawning a task each, which
    halves the per-request CPU; a method that blocks would stall the reader, so list only
    what is truly quick.  Without it every request gets its own task.  ``write_payload`` listed
    here promises it suspends only in ``payload.to_fd``: the session then runs big spliced
    WRITEs in its reader task while its own splices into backing files are fast (they move to
    worker threads for a while after a slow one).

``quick_io_max: int`` (an attribute)
    READ and WRITE requests of at most this many bytes never suspend in ``read``, ``write``,
    ``read_range`` and ``write_payload``; our session runs them in its reader task like
    ``quick_methods``.  Without it (or 0) every READ and WRITE gets a task.

``needs_flush(fh) -> bool``
    Asked right after OPEN/CREATE: False when ``flush()`` (each close() of that open file) does
    nothing an application could observe; our session then opens it with FOPEN_NOFLUSH and
    the kernel sends no FLUSH for it.  Without it every close() is a FLUSH round trip, as under
    pyfuse3.

``passthrough_allowed: bool`` (an attribute)
    False when ``passthrough_fd`` will never give an fd (the filesystem must see all I/O, e.g.
    to replicate it); the session then serves data by splice and reports that, and why.

``passthrough_fd(fh) -> int | None``
    Asked right after OPEN/CREATE: the fd the kernel may serve this open file's I/O from directly
    (FUSE passthrough), or None when the filesystem must see the I/O itself.

The pyfuse3 types live in a C extension whose objects cannot be built with every attribute set
from Python (RequestContext, SetattrFields, ReaddirToken).  Our session therefore passes small
duck-typed stand-ins, defined here; filesystems use only their attributes.  ``readdir_reply`` is
the one pyfuse3 *function* a filesystem calls back into: use the one from this module, which
serves both sessions.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyfuse3
from pyfuse3 import (
    ROOT_INODE,
    EntryAttributes,
    FileInfo,
    FUSEError,
    Operations,
    StatvfsData,
)

__all__ = [
    "ROOT_INODE",
    "EntryAttributes",
    "FUSEError",
    "FileInfo",
    "FileRange",
    "Operations",
    "Payload",
    "ReaddirToken",
    "RequestContext",
    "SetattrFields",
    "StatvfsData",
    "readdir_reply",
]


@dataclass(slots=True)
class RequestContext:
    """Who made the request; mirrors ``pyfuse3.RequestContext``."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0


@dataclass(slots=True)
class SetattrFields:
    """Which attributes SETATTR changes; mirrors ``pyfuse3.SetattrFields``."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class ReaddirToken(abc.ABC):
    """Collects directory entries for one READDIR/READDIRPLUS reply (our session's token)."""

    @abc.abstractmethod
    def add(self, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
        """Append an entry; False once the reply buffer is full (entry not added)."""


def readdir_reply(token: Any, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
    """Report one directory entry to whichever session asked; same contract as pyfuse3's."""
    if isinstance(token, ReaddirToken):
        return token.add(name, attr, next_id)
    return pyfuse3.readdir_reply(token, name, attr, next_id)


class FileRange(NamedTuple):
    """``size`` bytes at ``offset`` of the open ``fd``: the answer to a READ, not yet moved."""

    fd: int
    offset: int
    size: int


class Payload(abc.ABC):
    """A WRITE request's data, still held by the session (in a pipe or a buffer)."""

    size: int

    @abc.abstractmethod
    async def to_fd(self, fd: int, offset: int) -> int:
        """Move the data into ``fd`` at ``offset`` (pwrite semantics); return bytes written."""

    @abc.abstractmethod
    async def to_bytes(self) -> bytes:
        """The data as bytes, for filesystems that must look at it (a copy: counted as such)."""
