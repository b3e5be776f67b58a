"""Where replicated changes go: the abstract :class:`Target`, and :class:`LocalTarget`.

The replication client (:mod:`fusefs.replica.client`) drives a target through this small
interface only, so another backend (rsync, S3, ...) is one more subclass:

- :meth:`Target.apply` a change and :meth:`Target.send_range` a byte range of a backing file,
  each with the sequence number of the log record it came from;
- :meth:`Target.sync` asks for everything up to a sequence number to be made durable;
- :meth:`Target.next_ack` delivers acknowledgements (:class:`~fusefs.replica.wire.Ack`):
  ``seq`` applied (``durable``: on disk; ``failed``: that change could not be applied);
- :meth:`Target.list_tree` and :meth:`Target.checksum` compare trees;
  :meth:`Target.read_range` reads a file back (``fusefs restore``).

Targets are opened with an async context manager (a "target factory"), so a connection's
lifetime is a ``with`` block; the wire target is ``fusefs.replica.client.open_wire_target``.
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import trio

from fusefs.errors import FusefsError
from fusefs.mirror.changes import Change
from fusefs.replica.apply import ReplicaDir
from fusefs.replica.wire import Ack, Entry

__all__ = [
    "LocalTarget",
    "Target",
    "TargetClosed",
    "TargetError",
    "TargetFactory",
    "open_local_target",
]


class TargetError(FusefsError):
    """The replication target cannot be reached, refused us, or broke the connection."""


class TargetClosed(TargetError):
    """The server closed a working connection: it went away, or another connection with the
    same source name took over (a mount reconnecting while `verify` ran)."""


class Target(abc.ABC):
    """An open connection to a replica."""

    #: a name for logs and status (e.g. ``host:port``)
    name: str = "target"

    @abc.abstractmethod
    async def apply(self, seq: int, change: Change) -> None:
        """Send (or apply) one change; its acknowledgement comes through :meth:`next_ack`."""

    @abc.abstractmethod
    async def send_range(self, seq: int, path: bytes, fd: int, offset: int, length: int) -> None:
        """Write ``length`` bytes of ``fd`` at ``offset`` into ``path`` at the same offset
        (zeros where ``fd`` is shorter)."""

    @abc.abstractmethod
    async def sync(self, seq: int) -> None:
        """Ask for everything up to ``seq`` to be made durable (a durable Ack follows)."""

    @abc.abstractmethod
    async def next_ack(self) -> Ack:
        """The next acknowledgement; raises :class:`TargetError` once the connection is gone."""

    @abc.abstractmethod
    async def list_tree(self) -> dict[bytes, Entry]:
        """Every object of the replica by path (``b"."`` is its root)."""

    @abc.abstractmethod
    async def checksum(self, path: bytes, block_size: int) -> tuple[bool, int, tuple[bytes, ...]]:
        """(is a regular file, size, SHA-256 of each block) of ``path`` in the replica."""

    @abc.abstractmethod
    async def read_range(self, path: bytes, offset: int, length: int, fd: int) -> int:
        """Copy up to ``length`` bytes of ``path`` at ``offset`` into ``fd`` at ``offset``."""


TargetFactory = Callable[[], AbstractAsyncContextManager[Target]]


class LocalTarget(Target):
    """A replica directory on this host (tests, and backups to a locally mounted disk)."""

    def __init__(self, replica: ReplicaDir) -> None:
        self.replica = replica
        self.name = replica.root
        self._acks_in, self._acks_out = trio.open_memory_channel[Ack](math.inf)

    async def apply(self, seq: int, change: Change) -> None:
        try:
            self.replica.apply(change)
        except OSError:
            self._acks_in.send_nowait(Ack(seq, failed=True))
        else:
            self._acks_in.send_nowait(Ack(seq))

    async def send_range(self, seq: int, path: bytes, fd: int, offset: int, length: int) -> None:
        try:
            out = self.replica.open_for_write(path)
        except OSError:  # in the way (a symlink, not a regular file), EACCES: as the server
            self._acks_in.send_nowait(Ack(seq, failed=True))
            return
        if out is None:  # gone: a later change removed it (dropped as done, as the server)
            self._acks_in.send_nowait(Ack(seq))
            return
        try:
            data = os.pread(fd, length, offset)
            data += bytes(length - len(data))
            os.pwrite(out, data, offset)
        finally:
            os.close(out)
        self._acks_in.send_nowait(Ack(seq))

    async def sync(self, seq: int) -> None:
        await trio.to_thread.run_sync(self.replica.sync)
        self._acks_in.send_nowait(Ack(seq, durable=True))

    async def next_ack(self) -> Ack:
        try:
            return await self._acks_out.receive()
        except trio.EndOfChannel:
            raise TargetError(f"{self.name}: closed") from None

    async def list_tree(self) -> dict[bytes, Entry]:
        entries = await trio.to_thread.run_sync(lambda: list(self.replica.list()))
        return {e.path: e for e in entries}

    async def checksum(self, path: bytes, block_size: int) -> tuple[bool, int, tuple[bytes, ...]]:
        return await trio.to_thread.run_sync(self.replica.checksum, path, block_size)

    async def read_range(self, path: bytes, offset: int, length: int, fd: int) -> int:
        src = self.replica.open_for_read(path)
        if src is None:
            return 0
        try:
            data = os.pread(src, length, offset)
            os.pwrite(fd, data, offset)
            return len(data)
        finally:
            os.close(src)


def open_local_target(path: str) -> TargetFactory:
    """A factory of :class:`LocalTarget` for the directory ``path``."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Target]:
        replica = ReplicaDir(path, create=True)
        try:
            yield LocalTarget(replica)
        finally:
            replica.close()

    return factory
