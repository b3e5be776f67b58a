"""The replication client: :class:`ReplicationSink` (the mirror's change sink) and the wire
target (:func:`open_wire_target`).

``record()`` runs in the mirror's request, before the reply to the kernel: it appends the change
to the durable log (:class:`~fusefs.replica.log.ChangeLog`, one ``write(2)``), takes a read-only
fd of the file for data changes (so the bytes can be re-read from BACKING at send time even if
the name is renamed or unlinked meanwhile) and queues it.  Everything else happens in a thread
of its own running its own trio loop, so neither a slow network nor a dead target ever stalls
the FUSE session: it connects, replays what the log holds, repairs the replica by tree
comparison at start (and after any change the target could not apply), ships new changes as
they come (DATA payloads with ``sendfile`` from the backing file), asks for durable
acknowledgements in batches, trims the log, and reconnects with exponential back-off on any
failure.  See docs/replication.md.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import json
import logging
import math
import os
import random
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

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
from fusefs.replica import wire as w
from fusefs.replica.log import ChangeLog
from fusefs.replica.target import Target, TargetClosed, TargetError, TargetFactory
from fusefs.replica.transport import FdTransport, TransportClosed, tune_socket
from fusefs.replica.tree import Difference, block_size_for, checksum_fd, differences, walk

__all__ = [
    "ReplicationSink",
    "WireTarget",
    "describe_error",
    "open_wire_target",
    "run_wire_target",
]

log = logging.getLogger(__name__)

MIN_BACKOFF = 0.2
MAX_BACKOFF = 30.0
CONNECT_TIMEOUT = 10.0
#: Ask for a durable acknowledgement at least this often while changes flow ...
SYNC_INTERVAL = 0.2
#: ... and after this many changes or bytes, whichever comes first.
SYNC_OPS = 1024
SYNC_BYTES = 64 << 20
#: ... and once the queue stayed empty this long after a change was sent (the end of a burst).
IDLE_SYNC = 0.02
#: Fsync the log at least this often (a crash of the host loses at most this much of it;
#: the tree comparison at the next start repairs that).
LOG_FSYNC_INTERVAL = 0.05
STATUS_INTERVAL = 1.0
#: Read-only fds of backing files kept for changes in flight (beyond: re-open by path).
MAX_SOURCES = 4096
_CACHED_SOURCES = 256
#: Pending changes kept in memory (a few hundred bytes each); beyond, they stay only in the
#: durable log and are read back from it in batches of REFILL_BATCH (see docs/replication.md).
MAX_QUEUED = 16384
REFILL_BATCH = 4096
#: Adjacent or overlapping Write ranges of one file queued back to back are merged into one
#: range of at most this size (a 1 GiB dd arrives as ~1 MiB WRITEs).
MAX_MERGE = w.MAX_DATA
#: When the sender wakes up for a lone Write, it lets this long pass (or BATCH_BYTES queue)
#: first, so that the WRITEs which follow merge: fewer, larger sendfiles and wake-ups.
BATCH_DELAY = 0.02
BATCH_BYTES = 8 << 20
#: Scheduling priority (nice) of the replication thread in async mode (see _thread_main).
ASYNC_NICE = 19
#: Async mode's bound on written bytes not yet durable on a connected target (--max-lag).
DEFAULT_MAX_LAG = 1 << 30
#: ... unless the target makes no durable progress for this long (s) while the mount waits.
LAG_STALL = 10.0
#: Do not repeat a repair triggered by failed changes more often than this.
REPAIR_INTERVAL = 30.0
#: ... and how soon when an fsync waits on it (or a reconnect replayed changes)
REPAIR_RETRY = 1.0
_DATA_CHANGES = (Write, Create, Truncate, Fallocate)


def describe_error(e: BaseException) -> str:
    """One line for an exception, flattening exception groups."""
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(describe_error(x) for x in e.exceptions))
    text = " ".join(str(e).split())
    return text or type(e).__name__


# -- the wire target ---------------------------------------------------------------------------


class WireTarget(Target):
    """A ``fusefs serve`` reached over a connected socket (see :func:`open_wire_target`)."""

    def __init__(self, transport: FdTransport, conn: w.Connection, name: str) -> None:
        self.t = transport
        self.conn = conn
        self.name = name
        self._acks_in, self._acks_out = trio.open_memory_channel[w.Ack](math.inf)
        self._next_req = 0
        self._lists: dict[int, list[w.Entry]] = {}
        self._sums: dict[int, w.ChecksumReply] = {}
        self._reads: dict[int, list[int]] = {}  # req -> [fd, bytes received]
        self._done: dict[int, trio.Event] = {}
        self._cur_read: list[int] | None = None
        self._cur_pos = 0
        self.error: TargetError | None = None

    def _req(self) -> int:
        self._next_req = (self._next_req + 1) & 0xFFFFFFFF
        self._done[self._next_req] = trio.Event()
        return self._next_req

    async def _send(self, ev: w.Event) -> None:
        if self.error is not None:
            raise self.error
        try:
            async with self.t.send_lock:
                await self.t.send_all(self.conn.send(ev))
        except TransportClosed as e:
            raise TargetError(f"{self.name}: {e}") from None

    async def apply(self, seq: int, change: Change) -> None:
        await self._send(w.Op(seq, change))

    async def send_range(self, seq: int, path: bytes, fd: int, offset: int, length: int) -> None:
        if self.error is not None:
            raise self.error
        try:
            async with self.t.send_lock:
                await self.t.send_all(self.conn.send(w.Data(seq, path, offset, length)))
                sent = await self.t.send_file(fd, offset, length)
                if sent < length:  # the file shrank since: pad as announced
                    await self.t.send_all(bytes(length - sent))
                self.conn.payload_sent(length)
        except TransportClosed as e:
            raise TargetError(f"{self.name}: {e}") from None

    async def sync(self, seq: int) -> None:
        await self._send(w.Sync(seq))

    async def next_ack(self) -> w.Ack:
        try:
            return await self._acks_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self.error or TargetError(f"{self.name}: connection closed") from None

    async def _wait(self, req: int) -> None:
        await self._done[req].wait()
        del self._done[req]
        if self.error is not None:
            raise self.error

    async def list_tree(self) -> dict[bytes, w.Entry]:
        req = self._req()
        self._lists[req] = []
        await self._send(w.List(req))
        await self._wait(req)
        return {e.path: e for e in self._lists.pop(req)}

    async def checksum(self, path: bytes, block_size: int) -> tuple[bool, int, tuple[bytes, ...]]:
        req = self._req()
        await self._send(w.Checksum(req, path, block_size))
        await self._wait(req)
        r = self._sums.pop(req)
        return r.found, r.size, r.digests

    async def read_range(self, path: bytes, offset: int, length: int, fd: int) -> int:
        req = self._req()
        self._reads[req] = [fd, 0]
        await self._send(w.Read(req, path, offset, length))
        await self._wait(req)
        return self._reads.pop(req)[1]

    async def close(self) -> None:
        """Say goodbye (best effort)."""
        if self.error is None:
            with contextlib.suppress(TargetError, w.WireError), trio.move_on_after(1):
                await self._send(w.Bye())

    async def reader(self) -> None:
        """Receive acknowledgements and replies until the connection ends; then raise."""
        err: TargetError
        try:
            await self._read_loop()
        except w.WireError as e:
            err = TargetError(f"{self.name}: protocol error: {e}")
        except TransportClosed as e:
            err = TargetError(f"{self.name}: {e}")
        except OSError as e:
            err = TargetError(f"{self.name}: {e.strerror or e}")
        except TargetError as e:
            err = e
        self.error = err
        self._acks_in.close()
        for ev in self._done.values():
            ev.set()
        raise err

    async def _read_loop(self) -> None:
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, w._NeedData):
                if self.conn.payload_left and self._cur_read is not None:
                    n = await self.t.recv_into_file(
                        self._cur_read[0], self._cur_pos, self.conn.payload_left
                    )
                    self._cur_pos += n
                    self._cur_read[1] += n
                    self.conn.payload_received(n)
                    continue
                data = await self.t.recv()
                if not data:
                    raise TargetClosed(f"{self.name}: the server closed the connection")
                self.conn.receive_data(data)
            elif isinstance(ev, w.Ack):
                self._acks_in.send_nowait(ev)
            elif isinstance(ev, w.ListReply):
                if ev.req in self._lists:
                    self._lists[ev.req].extend(ev.entries)
                if ev.done and ev.req in self._done:
                    self._done[ev.req].set()
            elif isinstance(ev, w.ChecksumReply):
                self._sums[ev.req] = ev
                if ev.req in self._done:
                    self._done[ev.req].set()
            elif isinstance(ev, w.Data):
                slot = self._reads.get(ev.seq)
                if slot is None:
                    raise w.WireError("unrequested DATA from the server")
                self._cur_read, self._cur_pos = slot, ev.offset
            elif isinstance(ev, w.DataChunk):
                assert self._cur_read is not None
                os.pwrite(self._cur_read[0], ev.data, self._cur_pos)
                self._cur_pos += len(ev.data)
                self._cur_read[1] += len(ev.data)
            elif isinstance(ev, w.DataEnd):
                self._cur_read = None
                if ev.seq in self._done:
                    self._done[ev.seq].set()
            elif isinstance(ev, w.Error):
                raise TargetError(f"{self.name} refused: {ev.message}")
            elif isinstance(ev, w.Bye):
                raise TargetError(f"{self.name}: the server said goodbye")


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, or ``:PORT``) -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or default_host
    return host, int(port)


def open_wire_target(
    host: str, port: int, key: bytes, source: bytes, *, timeout: float = CONNECT_TIMEOUT
) -> TargetFactory:
    """A factory of connections to ``fusefs serve`` on ``host:port``."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Target]:
        name = f"{host}:{port}"
        try:
            with trio.fail_after(timeout):
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                if not infos:
                    raise OSError(f"cannot resolve {host}")
                family, type_, proto, _, addr = infos[0]
                sock = trio.socket.socket(family, type_, proto)
                try:
                    await sock.connect(addr)
                except BaseException:
                    sock.close()
                    raise
        except trio.TooSlowError:
            raise TargetError(f"cannot connect to {name}: timed out") from None
        except OSError as e:
            raise TargetError(f"cannot connect to {name}: {e.strerror or e}") from None
        with sock:
            tune_socket(sock)
            transport = FdTransport(sock.fileno())
            try:
                async with run_wire_target(transport, key, source, name, timeout) as target:
                    yield target
            finally:
                transport.close()

    return factory


@asynccontextmanager
async def run_wire_target(
    transport: FdTransport, key: bytes, source: bytes, name: str, timeout: float = CONNECT_TIMEOUT
) -> AsyncIterator[WireTarget]:
    """Handshake over a connected byte stream, then the target with its reader running
    (shared by the TCP and the ssh targets); every failure is one :class:`TargetError`."""
    conn = w.Connection(w.Role.CLIENT, key, source)
    target = WireTarget(transport, conn, name)
    try:
        with trio.fail_after(timeout):
            await _handshake(target)
    except trio.TooSlowError:
        raise TargetError(f"{name}: no answer to the handshake") from None
    except w.WireError as e:
        if e.code == w.E_AUTH:
            raise TargetError(f"{name}: authentication failed ({e})") from None
        raise TargetError(f"{name}: protocol error: {e}") from None
    except TransportClosed as e:
        raise TargetError(f"{name}: {e}") from None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(target.reader)
            yield target
            await target.close()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _single_target_error(group) from None


def _single_target_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The TargetError of a group that holds nothing else (else the group itself)."""
    match, rest = group.split(TargetError)
    if rest is None and match is not None:
        found = leaves(match)
        if found:
            return found[0]
    return group


def leaves(e: BaseException) -> list[BaseException]:
    """The exceptions in ``e``, nested groups flattened (``[e]`` for a plain one)."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for x in e.exceptions for leaf in leaves(x)]
    return [e]


async def _handshake(target: WireTarget) -> None:
    t, conn = target.t, target.conn
    await t.send_all(conn.hello())
    want: tuple[type, ...] = (w.Challenge,)
    while True:
        ev = conn.next_event()
        if isinstance(ev, w._NeedData):
            data = await t.recv()
            if not data:
                raise TransportClosed("the server closed the connection during the handshake")
            conn.receive_data(data)
            continue
        if isinstance(ev, w.Error):
            if ev.code == w.E_AUTH:
                raise w.WireError(ev.message, w.E_AUTH)
            raise TargetError(f"{target.name} refused: {ev.message}")
        if not isinstance(ev, want):
            raise w.WireError(f"unexpected {type(ev).__name__} during the handshake")
        if isinstance(ev, w.Challenge):
            await t.send_all(conn.auth())
            want = (w.AuthOk,)
            continue
        return  # AuthOk, verified by the connection


# -- the sink ----------------------------------------------------------------------------------


class _Source:
    """A read-only fd of a backing file, shared by the queued changes that need its bytes."""

    __slots__ = ("cached", "fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 0
        self.cached = True


@dataclass(slots=True)
class _Entry:
    """A change not yet durable on the target (merged Writes carry the last merged seq)."""

    seq: int
    change: Change
    at: float
    src: _Source | None
    #: Write bytes this entry stands for (sum over merged records), for ``bytes_pending``
    nbytes: int = 0


class ReplicationSink:
    """A :class:`~fusefs.mirror.changes.ChangeSink` that replicates to one target.

    ``mode``: ``"async"`` (``record`` returns once the change is logged) or ``"sync"``
    (additionally :meth:`barrier`, which the mirror's fsync and flush await, returns only once
    the target holds every change recorded so far durably).
    """

    #: ``record`` appends to the log and the queue and never suspends (see ChangeSink).
    quick_record = True

    def __init__(
        self,
        backing: str | os.PathLike[str],
        log_dir: str | os.PathLike[str],
        target: TargetFactory,
        *,
        name: str = "target",
        mode: str = "async",
        repair_at_start: bool = True,
        max_lag_bytes: int = DEFAULT_MAX_LAG,
        sync_timeout: float | None = None,
    ) -> None:
        if mode not in ("async", "sync"):
            raise ValueError(f"replication mode must be async or sync, not {mode!r}")
        #: while connected, ``record()`` holds the mount back once this many written bytes
        #: are not yet durable on the target (0: never; see :meth:`_hold_back`)
        self.max_lag_bytes = max_lag_bytes
        #: sync mode: a barrier that waits longer fails (EIO for the fsync/close); None: wait
        self.sync_timeout = sync_timeout
        self.sync_timeouts = 0
        #: the target made no durable progress for LAG_STALL while the mount was held back:
        #: stop holding back until it does (a hung peer must not hang the mount)
        self._stalled = False
        self.held_back_seconds = 0.0
        self.backing = os.fspath(backing)
        self.name = name
        self.mode = mode
        #: Only sync mode makes fsync/close wait (see DurableSink.barrier_waits).
        self.barrier_waits = mode == "sync"
        self.factory = target
        self.log = ChangeLog(log_dir, max_pending=MAX_QUEUED)
        self.status_path = os.path.join(self.log.dir, "status.json")
        self._backing_fd = os.open(self.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._is_root = os.geteuid() == 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._unsent: collections.deque[_Entry] = collections.deque()
        #: Write bytes recorded and not yet durable on the target (in memory or only logged)
        self._bytes_pending = self.log.pending_bytes
        #: Write bytes in ``_unsent`` (to decide when to wake the sender)
        self._unsent_bytes = 0
        #: the seq of the first change kept only in the log (None: all pending are in memory)
        self._spill_from: int | None = self.log.more_from
        #: data was sent re-read by path (no fd held): compare the trees once caught up
        self._imprecise = False
        #: paths (and everything under them) the next repair compares by checksum even when
        #: size and mtime agree: the names replayed renames touched
        self._recheck: set[bytes] = set()
        now = time.time()
        for r in self.log.pending:
            self._queue(r.seq, r.change, now, None)
            if isinstance(r.change, Rename):
                self._recheck.update((r.change.old, r.change.new))
        self.log.pending = []
        self._inflight: collections.deque[_Entry] = collections.deque()
        self._sources: dict[bytes, _Source] = {}
        self._open_sources = 0
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._idle = False
        self.durable_seq = self.log.acked
        self.applied_seq = self.log.acked
        self.sent_seq = self.log.acked
        self._sync_requested = self.log.acked
        self._last_sync = 0.0
        self._last_sent = 0.0
        self._barrier_seq = 0
        self.needs_repair = repair_at_start
        #: the highest seq the target failed to apply, and the highest seq a repair that
        #: fixed everything it found has covered since: a sync barrier waits for the second to
        #: reach the first (a failed change is not on the replica until a repair puts it there)
        self._failed_seq = 0
        self._repaired_seq = 0
        #: until the start's comparison is through, the replica may lack files that a DATA
        #: needs (the server drops data for a missing file): sync barriers wait for it
        self._compared = not repair_at_start
        #: repair at the next idle moment, without waiting out REPAIR_INTERVAL
        self._repair_now = False
        #: changes were replayed and the repair that follows has not started yet: renames
        #: sent meanwhile may move replayed content too, so they join ``_recheck``
        self._replayed = repair_at_start
        #: sync barriers waiting right now (a failed repair is retried soon only for them)
        self._barrier_waiters = 0
        #: after (re)connecting, until the backlog is down to the lag bound's low mark: the
        #: lag bound holds nothing back while a backlog from an outage drains
        self._catching_up = True
        #: a comparison is under way
        self.repairing = False
        self._durable_acks = trio.Event()
        self._last_repair = -math.inf
        self.repairs = 0
        #: what the last completed repair found different (0: the replica was equal)
        self.last_repair_differences: int | None = None
        self.connected = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.failed_changes = 0
        self.bytes_sent = 0
        self.log_errors = 0
        #: the in-memory queue overflowed at least once (logged once)
        self.spilled = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the replication thread (after any fork: call it in the serving process)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._thread_main, name=f"fusefs-replica {self.name}", daemon=True
        )
        self._thread.start()
        self._started.wait(10)

    def close(self, drain_timeout: float = 5.0) -> None:
        """Give the target up to ``drain_timeout`` s to catch up, then stop; keeps the log."""
        if self._closed:
            return
        if self._thread is not None and drain_timeout > 0:
            self._wait_durable(self.log.last_seq, drain_timeout)
        self._closed = True
        if self._thread is not None and self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(10)
        with self._cond:
            self._cond.notify_all()
        self._write_status()
        self.log.close()
        with self._lock:
            for src in self._sources.values():
                src.cached = False
            for e in list(self._inflight) + list(self._unsent):
                if e.src is not None:
                    e.src.refs = 0
                    _close_quietly(e.src.fd)
                    e.src = None
            for src in self._sources.values():
                _close_quietly(src.fd)
            self._sources.clear()
        os.close(self._wake_fd)
        os.close(self._backing_fd)

    # -- the ChangeSink interface (runs in the mirror's thread) --------------------------------

    async def record(self, change: Change) -> None:
        """Log ``change`` durably-ordered and queue it for the target."""
        try:
            seq = self.log.append(change)
        except (OSError, w.WireError) as e:
            # The change is applied to BACKING but cannot be logged: repair by comparison.
            self.log_errors += 1
            self.needs_repair = True
            self._note_error(f"cannot log a change: {describe_error(e)}")
            return
        with self._lock:
            if isinstance(change, Write):
                self._bytes_pending += change.size
            if self._spill_from is not None:
                # catching up from the log: this change is read back from there unless the
                # sender has read everything before it and the queue has room again
                if seq != self._spill_from or self._queued() >= MAX_QUEUED - REFILL_BATCH:
                    self._track_names(change)
                    if self._idle:
                        self._wake()
                    return
                self._spill_from = None
            elif self._queued() >= MAX_QUEUED:
                self._spill_from = seq
                self._track_names(change)
                if not self.spilled:
                    self.spilled = True
                    log.warning(
                        "replication to %s: %d changes pending; keeping further ones only "
                        "in the log until it catches up",
                        self.name,
                        MAX_QUEUED,
                    )
                return
            was_empty = not self._unsent
            self._queue(seq, change, time.time(), self._source_for(change))
            wake = self._idle and (
                was_empty
                or not isinstance(change, Write)
                or self._unsent_bytes - change.size < BATCH_BYTES <= self._unsent_bytes
            )
        if wake:
            self._wake()
        if (
            self.max_lag_bytes
            and self._bytes_pending > self.max_lag_bytes
            and self.mode == "async"
            and self.connected
            and not self._catching_up
            and not self.repairing
            and not self._stalled
        ):
            self._hold_back()

    def _hold_back(self) -> None:
        """Bound the lag of a connected target (DRBD protocol A's full send buffer): block
        the caller - the mount's request loop, so the application's writes - until the
        target has made all but 3/4 of ``max_lag_bytes`` durable.  It does not suspend the
        loop for other tasks on purpose: nothing the mount does should outrun the target.
        Disconnected, or without durable progress for LAG_STALL, it lets go: the lag then
        grows (the log keeps every change) and ``fusefs status`` shows it."""
        started = time.monotonic()
        low = self.max_lag_bytes * 3 // 4
        with self._cond:
            progress, durable = started, self.durable_seq
            while self._bytes_pending > low and self.connected and not self._closed:
                now = time.monotonic()
                if self.durable_seq != durable:
                    progress, durable = now, self.durable_seq
                elif now - progress >= LAG_STALL:
                    self._stalled = True
                    self._note_error(
                        f"no durable progress for {LAG_STALL:.0f} s: not holding the mount back"
                    )
                    break
                self._cond.wait(min(0.5, LAG_STALL - (now - progress)))
        self.held_back_seconds += time.monotonic() - started

    def _queued(self) -> int:
        return len(self._unsent) + len(self._inflight)

    def _queue(self, seq: int, change: Change, at: float, src: _Source | None) -> None:
        """(With the lock held.)  Append to the unsent queue, merging a Write with the Write
        of the same file queued just before it when their ranges touch."""
        if isinstance(change, Write):
            self._unsent_bytes += change.size
            tail = self._unsent[-1] if self._unsent else None
            if tail is not None and isinstance(tail.change, Write):
                t = tail.change
                start = min(t.offset, change.offset)
                end = max(t.offset + t.size, change.offset + change.size)
                if (
                    t.path == change.path
                    and change.offset <= t.offset + t.size
                    and t.offset <= change.offset + change.size
                    and end - start <= MAX_MERGE
                ):
                    # nothing came in between, so the tail's fd is this path's file
                    tail.change = Write(t.path, start, end - start)
                    tail.seq = seq
                    tail.nbytes += change.size
                    if tail.src is None:
                        tail.src = src
                    elif src is not None and src is not tail.src:
                        self._release(src)
                    elif src is not None:
                        src.refs -= 1  # the tail already holds a reference
                    return
            self._unsent.append(_Entry(seq, change, at, src, change.size))
            return
        self._unsent.append(_Entry(seq, change, at, src))

    async def barrier(self) -> None:
        """In sync mode: wait until everything recorded so far is durable on the target."""
        if self.mode != "sync" or self._closed:
            return
        seq = self.log.last_seq
        if self._holds(seq):
            return
        self._barrier_seq = max(self._barrier_seq, seq)
        if self._failed_seq > self._repaired_seq or not self._compared:
            self._repair_now = True
        self._wake()
        self._barrier_waiters += 1
        try:
            held = await trio.to_thread.run_sync(
                self._wait_durable, seq, self.sync_timeout, abandon_on_cancel=True
            )
        finally:
            self._barrier_waiters -= 1
        if held:
            return
        if self._closed:
            return
        # The change stays in the log and reaches the target later; the caller learns that
        # it is not there now, as from a soft NFS mount.
        self.sync_timeouts += 1
        message = f"not durable on {self.name} within {self.sync_timeout:g} s"
        self._note_error(f"sync: {message}")
        log.warning("replication: fsync/close failed with EIO: %s", message)
        raise OSError(errno.EIO, message)

    def _holds(self, seq: int) -> bool:
        """The target holds every change up to ``seq`` durably, failed ones repaired."""
        return (
            self.durable_seq >= seq and self._failed_seq <= self._repaired_seq and self._compared
        )

    def _wait_durable(self, seq: int, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._holds(seq) and not self._closed:
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._holds(seq)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def _track_names(self, change: Change) -> None:
        """(With the lock held.)  Drop cached fds of names a change removes or replaces."""
        if isinstance(change, Rename):
            self._forget_sources(change.old)
            self._forget_sources(change.new)
        elif isinstance(change, Unlink | Rmdir):
            self._forget_sources(change.path)

    def _source_for(self, change: Change) -> _Source | None:
        """(With the lock held.)  Track names; an fd of the file for data changes."""
        self._track_names(change)
        if not isinstance(change, _DATA_CHANGES):
            return None
        src = self._sources.get(change.path)
        if src is None:
            if self._open_sources >= MAX_SOURCES:
                return None
            try:
                fd = os.open(
                    change.path,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=self._backing_fd,
                )
            except OSError:
                return None
            src = _Source(fd)
            self._open_sources += 1
            self._sources[change.path] = src
            if len(self._sources) > _CACHED_SOURCES:
                old_path = next(iter(self._sources))
                self._uncache(self._sources.pop(old_path))
        src.refs += 1
        return src

    def _forget_sources(self, path: bytes) -> None:
        prefix = path + b"/"
        for p in [p for p in self._sources if p == path or p.startswith(prefix)]:
            self._uncache(self._sources.pop(p))

    def _uncache(self, src: _Source) -> None:
        src.cached = False
        if src.refs == 0:
            _close_quietly(src.fd)
            self._open_sources -= 1

    @property
    def caught_up(self) -> bool:
        """Everything recorded so far is durable on the target and no repair is pending."""
        return (
            self.durable_seq >= self.log.last_seq and not self.needs_repair and not self.repairing
        )

    def _release(self, src: _Source) -> None:
        src.refs -= 1
        if src.refs == 0 and not src.cached:
            _close_quietly(src.fd)
            self._open_sources -= 1

    # -- the replication thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        nice = ASYNC_NICE if self.mode == "async" else 0
        with contextlib.suppress(ValueError):  # for measurements (tools/bench --replica-cp)
            nice = int(os.environ.get("FUSEFS_REPLICA_NICE", nice))
        if nice:
            # Background work: when the CPUs are busy the FUSE session (the application's
            # writes) goes first and replication catches up after; the threads this one starts
            # inherit it.  Measured on 2 cores (docs/replication.md): `cp` of 1 GiB onto ext4
            # with a target 4.8 s at nice 19, 5.0 s at 10, 7.3 s at 0.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("replication to %s stopped unexpectedly", self.name)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._started.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._housekeeping)
            nursery.start_soon(self._connect_loop)
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            self.log.sync()

    async def _housekeeping(self) -> None:
        """Fsync the log in batches; refresh status.json."""
        last_status = 0.0
        while True:
            await trio.sleep(LOG_FSYNC_INTERVAL)
            try:
                if self.log.dirty:
                    await trio.to_thread.run_sync(self.log.sync)
            except OSError as e:
                self._note_error(f"cannot fsync the log: {e.strerror}")
            now = time.monotonic()
            if now - last_status >= STATUS_INTERVAL:
                last_status = now
                self._write_status()

    def _note_error(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = time.time()

    async def _connect_loop(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            try:
                async with self.factory() as target:
                    self.connected = True
                    self.repairing = False
                    backoff = MIN_BACKOFF
                    log.info("replicating to %s", target.name)
                    self._write_status()
                    await self._session(target)
            except Exception as e:
                message = describe_error(e)
                self._note_error(message)
                log.warning(
                    "replication to %s: %s (retrying in %.1f s)", self.name, message, backoff
                )
            finally:
                self.connected = False
                if self.repairing:  # interrupted: do it again
                    self.repairing = False
                    self.needs_repair = True
            self._write_status()
            await trio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _session(self, target: Target) -> None:
        with self._lock:
            # everything the target has not made durable is sent again, in order
            if self._inflight:
                # The target may have applied some of these already, and a rename is not
                # idempotent (applied twice, RENAME_EXCHANGE swaps back; a plain rename moves
                # whatever took the old name since): compare the trees once replayed, and
                # until then count them as failed (a sync barrier waits for that repair).
                # Files that swapped names often look alike (same size and mtime after cp -a
                # or tar), so the comparison checksums every file a replayed rename touched.
                self.needs_repair = self._repair_now = self._replayed = True
                self._failed_seq = max(self._failed_seq, self._inflight[-1].seq)
                for e in self._inflight:
                    if isinstance(e.change, Rename):
                        self._recheck.update((e.change.old, e.change.new))
            self._catching_up = self._bytes_pending > self.max_lag_bytes * 3 // 4
            self._unsent_bytes += sum(e.nbytes for e in self._inflight)
            self._unsent.extendleft(reversed(self._inflight))
            self._inflight.clear()
        self.sent_seq = self._sync_requested = self.durable_seq
        self.applied_seq = self.durable_seq
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ack_reader, target)
            await self._sender(target)

    async def _ack_reader(self, target: Target) -> None:
        while True:
            ack = await target.next_ack()
            if ack.failed:
                self.failed_changes += 1
                self.needs_repair = True
                with self._cond:
                    self._failed_seq = max(self._failed_seq, ack.seq)
                    if self._barrier_waiters:
                        self._repair_now = True  # an fsync waits for it
                continue
            self.applied_seq = max(self.applied_seq, ack.seq)
            if ack.durable:
                self._durable(ack.seq)
                self._durable_acks.set()

    def _durable(self, seq: int) -> None:
        if seq <= self.durable_seq:
            return
        try:
            self.log.trim(seq)
        except OSError as e:
            self._note_error(f"cannot trim the log: {e.strerror}")
        self._stalled = False
        with self._cond:
            if self._catching_up and self._bytes_pending <= self.max_lag_bytes * 3 // 4:
                self._catching_up = False
            while self._inflight and self._inflight[0].seq <= seq:
                done = self._inflight.popleft()
                self._bytes_pending -= done.nbytes
                if done.src is not None:
                    self._release(done.src)
                    done.src = None
            self.durable_seq = seq
            self._cond.notify_all()
        if seq >= self.log.last_seq:
            self._write_status()  # caught up: say so at once, not at the next tick

    async def _sender(self, target: Target) -> None:
        ops = nbytes = 0
        while True:
            with self._lock:
                entry = self._unsent.popleft() if self._unsent else None
                if entry is not None:
                    self._inflight.append(entry)
                    self._unsent_bytes -= entry.nbytes
                spilled = self._spill_from
            if entry is None:
                if spilled is not None:
                    if self._queued() > MAX_QUEUED - REFILL_BATCH:
                        # memory is full of changes in flight: wait for durable acks
                        if self.sent_seq > self._sync_requested:
                            await self._request_sync(target)
                        await trio.sleep(0.05)
                    else:
                        await self._refill(spilled)
                    continue
                await self._idle_step(target)
                ops = nbytes = 0
                continue
            nbytes += await self._send_entry(target, entry)
            self.sent_seq = entry.seq
            self._last_sent = time.monotonic()
            ops += 1
            if ops >= SYNC_OPS or nbytes >= SYNC_BYTES or self._barrier_seq > self._sync_requested:
                await self._request_sync(target)
                ops = nbytes = 0

    async def _request_sync(self, target: Target) -> None:
        self._sync_requested = self.sent_seq
        self._last_sync = time.monotonic()
        await target.sync(self.sent_seq)

    async def _refill(self, start: int) -> None:
        """Read the next batch of changes kept only in the log back into the queue."""
        records = await trio.to_thread.run_sync(self.log.read, start, REFILL_BATCH)
        with self._lock:
            if self._spill_from != start:
                return  # record() found the queue complete again meanwhile
            now = time.time()
            for r in records:
                self._queue(r.seq, r.change, now, None)
            if records:
                self._spill_from = records[-1].seq + 1
            elif self.log.next_seq == start:
                # read everything: the next record() (seq >= start) queues in memory again
                self._spill_from = None
                return
        if not records:
            await trio.sleep(0.01)  # the next record is being appended right now

    async def _idle_step(self, target: Target) -> None:
        """Nothing queued: repair if needed, ask for durability, or sleep until woken."""
        if self._imprecise and self.durable_seq >= self.sent_seq:
            # some data was re-read by path (its file may have been renamed since): compare
            self._imprecise = False
            self.needs_repair = True
        now = time.monotonic()
        if self.needs_repair and (
            self.repairs == 0
            or now - self._last_repair >= (REPAIR_RETRY if self._repair_now else REPAIR_INTERVAL)
        ):
            await self._repair(target)
            return
        if self.sent_seq > self._sync_requested:
            # the burst is over when nothing came for IDLE_SYNC: make it durable now rather
            # than at the next SYNC_INTERVAL tick (up to 0.2 s of lag at the end of a copy)
            wait = min(SYNC_INTERVAL - (now - self._last_sync), IDLE_SYNC - (now - self._last_sent))
            if wait <= 0 or self._barrier_seq > self._sync_requested:
                await self._request_sync(target)
                return
            await self._sleep(wait)
            return
        await self._sleep(1.0)

    async def _sleep(self, timeout: float) -> None:
        """Wait for ``record()`` (or a barrier) to wake us, at most ``timeout`` s.

        Woken for a Write, wait up to BATCH_DELAY more (``record()`` wakes us again once
        BATCH_BYTES are queued), so the WRITEs that follow merge into one large range: one
        wake-up and one sendfile per several MiB instead of per WRITE.
        """
        self._idle = True
        try:
            if self._unsent or self._barrier_seq > self._sync_requested:
                return
            await self._wait_wake(timeout)
            if (
                self._unsent
                and self._unsent_bytes < BATCH_BYTES
                and isinstance(self._unsent[-1].change, Write)
                and self._barrier_seq <= self._sync_requested
            ):
                await self._wait_wake(BATCH_DELAY)
        finally:
            self._idle = False

    async def _wait_wake(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self._wake_fd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def _open_backing(self, path: bytes) -> int | None:
        try:
            return os.open(
                path,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=self._backing_fd,
            )
        except OSError:
            return None

    async def _send_entry(self, target: Target, e: _Entry) -> int:
        """Send one logged change; returns the data bytes sent."""
        c = e.change
        if not isinstance(c, _DATA_CHANGES):
            if self._replayed and isinstance(c, Rename):
                self._recheck.update((c.old, c.new))
            await target.apply(e.seq, c)
            return 0
        if e.src is None:
            self._imprecise = True
        fd = e.src.fd if e.src is not None else self._open_backing(c.path)
        try:
            sent = 0
            if isinstance(c, Write):
                if fd is None:
                    return 0  # gone from BACKING: a later change removed it
                size = os.fstat(fd).st_size
                length = max(0, min(c.offset + c.size, size) - c.offset)
                pos = c.offset
                while length > 0:
                    n = min(length, w.MAX_DATA)
                    await target.send_range(e.seq, c.path, fd, pos, n)
                    pos += n
                    length -= n
                    sent += n
            else:
                await target.apply(e.seq, c)
            if fd is not None and not self._more_data_for(c.path):
                # carry the file's modification time (writes set it on both sides apart)
                mtime = os.fstat(fd).st_mtime_ns
                await target.apply(e.seq, SetAttr(c.path, mtime_ns=mtime))
            self.bytes_sent += sent
            return sent
        finally:
            if fd is not None and e.src is None:
                os.close(fd)

    def _more_data_for(self, path: bytes) -> bool:
        with self._lock:
            if not self._unsent:
                return False
            nxt = self._unsent[0].change
        return isinstance(nxt, _DATA_CHANGES) and nxt.path == path

    # -- repair by comparison --------------------------------------------------------------

    async def _repair(self, target: Target) -> None:
        """Compare the trees and send what differs (the initial sync, and divergence repair)."""
        self.needs_repair = self._repair_now = False
        self._imprecise = False  # the comparison covers whatever was re-read by path
        self.repairing = True
        self.repairs += 1
        self._last_repair = time.monotonic()
        started = time.monotonic()
        # every change logged so far is applied to BACKING, so the comparison covers it
        covers = self.log.last_seq
        failed_before = self.failed_changes
        recheck, self._recheck = self._recheck, set()
        self._replayed = False
        try:
            # A durable ack still owed for an earlier SYNC would look like the repair's own
            # (its SYNC carries the same seq): take them all first.
            while self.durable_seq < self._sync_requested:
                self._durable_acks = trio.Event()
                await self._durable_acks.wait()
            theirs = await target.list_tree()
            ours = await trio.to_thread.run_sync(self._list_backing)
            diffs = differences(ours, theirs, owners=self._is_root)
            if recheck:
                diffs += _rechecks(ours, theirs, recheck, {d.path for d in diffs})
            seq = self.sent_seq
            fixed = 0
            for d in diffs:
                if await self._fix(target, seq, d):
                    fixed += 1
            self._durable_acks = trio.Event()
            await self._request_sync(target)
            await self._durable_acks.wait()  # the replica holds the repair
        except BaseException:
            self._recheck |= recheck  # interrupted: the next repair checks them still
            self._repair_now = True
            raise
        self.repairing = False
        self.last_repair_differences = len(diffs)
        if fixed == len(diffs) and self.failed_changes == failed_before:
            with self._cond:
                self._repaired_seq = max(self._repaired_seq, covers)
                self._compared = True
                self._cond.notify_all()
        elif self._barrier_waiters:
            self._repair_now = True  # an fsync still waits: try again soon
        self._write_status()  # say so at once (fusefs status, tools/bench wait for it)
        log.info(
            "%s: compared %d objects, %d differed, fixed %d in %.2f s",
            self.name,
            len(ours),
            len(diffs),
            fixed,
            time.monotonic() - started,
        )

    def _vanished(self, path: bytes) -> bool:
        """``path`` is gone from BACKING since the listing: nothing to fix (its removal,
        if made through the mount, is a later change in the log)."""
        try:
            os.stat(path, dir_fd=self._backing_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            pass
        return False

    def _list_backing(self) -> dict[bytes, w.Entry]:
        return {e.path: e for e in walk(self._backing_fd)}

    async def _fix(self, target: Target, seq: int, d: Difference) -> bool:
        s, r = d.source, d.replica
        if d.kind in ("extra", "type") and r is not None:
            await target.apply(seq, Rmdir(d.path) if stat.S_ISDIR(r.mode) else Unlink(d.path))
        if s is None:
            return True
        if d.kind == "link" and r is not None:
            await target.apply(seq, Unlink(d.path))
        if d.kind in ("missing", "type", "link"):
            return await self._create(target, seq, s)
        if d.kind == "content" and s.link:
            return True  # a hard link: the fix of its first name mends the shared inode
        if d.kind == "content":
            if stat.S_ISREG(s.mode) and r is not None:
                ok = await self._sync_file(target, seq, s, r)
            else:
                await target.apply(seq, Unlink(d.path))
                return await self._create(target, seq, s)
            await self._fix_meta(target, seq, s, r)
            return ok
        await self._fix_meta(target, seq, s, r)
        return True

    async def _create(self, target: Target, seq: int, s: w.Entry) -> bool:
        perm = stat.S_IMODE(s.mode)
        p = s.path
        if s.link:
            # another name of an inode listed (and so fixed) before it: link, do not copy
            await target.apply(seq, Link(p, s.link))
            return True
        if stat.S_ISDIR(s.mode):
            await target.apply(seq, Mkdir(p, perm, s.uid, s.gid))
        elif stat.S_ISREG(s.mode):
            fd = self._open_backing(p)
            if fd is None:
                return self._vanished(p)
            try:
                await target.apply(seq, Create(p, perm, s.uid, s.gid))
                await target.apply(seq, Truncate(p, 0))
                size = os.fstat(fd).st_size
                await self._send_file_range(target, seq, p, fd, 0, size)
                await target.apply(seq, SetAttr(p, mtime_ns=os.fstat(fd).st_mtime_ns))
            finally:
                os.close(fd)
        elif stat.S_ISLNK(s.mode):
            await target.apply(seq, Symlink(p, s.target, s.uid, s.gid))
        else:
            await target.apply(seq, Mknod(p, s.mode, s.rdev, s.uid, s.gid))
        for name, value in s.xattrs:
            await target.apply(seq, SetXattr(p, name, value))
        return True

    async def _send_file_range(
        self, target: Target, seq: int, path: bytes, fd: int, offset: int, length: int
    ) -> None:
        while length > 0:
            n = min(length, w.MAX_DATA)
            await target.send_range(seq, path, fd, offset, n)
            self.bytes_sent += n
            offset += n
            length -= n

    async def _sync_file(self, target: Target, seq: int, s: w.Entry, r: w.Entry) -> bool:
        fd = self._open_backing(s.path)
        if fd is None:
            return self._vanished(s.path)
        try:
            size = os.fstat(fd).st_size
            bs = block_size_for(max(size, r.size))
            found, their_size, theirs = await target.checksum(s.path, bs)
            _, ours = await trio.to_thread.run_sync(checksum_fd, fd, bs)
            if not found:
                theirs = ()
            if their_size != size:
                await target.apply(seq, Truncate(s.path, size))
            for i, digest in enumerate(ours):
                if i < len(theirs) and theirs[i] == digest and (i + 1) * bs <= their_size:
                    continue
                off = i * bs
                await self._send_file_range(
                    target, seq, s.path, fd, off, max(0, min(bs, size - off))
                )
            await target.apply(seq, SetAttr(s.path, mtime_ns=os.fstat(fd).st_mtime_ns))
            return True
        finally:
            os.close(fd)

    async def _fix_meta(self, target: Target, seq: int, s: w.Entry, r: w.Entry | None) -> None:
        p = s.path
        if not stat.S_ISLNK(s.mode) or self._is_root:
            await target.apply(
                seq,
                SetAttr(
                    p,
                    mode=None if stat.S_ISLNK(s.mode) else stat.S_IMODE(s.mode),
                    uid=s.uid if self._is_root else None,
                    gid=s.gid if self._is_root else None,
                ),
            )
        theirs = dict(r.xattrs) if r is not None else {}
        ours = dict(s.xattrs)
        for name in theirs.keys() - ours.keys():
            await target.apply(seq, RemoveXattr(p, name))
        for name, value in ours.items():
            if theirs.get(name) != value:
                await target.apply(seq, SetXattr(p, name, value))

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The sink's state (what ``fusefs status`` shows)."""
        oldest = None
        with self._lock:
            for e in itertools.chain(self._inflight, self._unsent):
                if e.seq > self.applied_seq:
                    oldest = e.at
                    break
            bytes_pending = self._bytes_pending
            queued = self._queued()
        return {
            "target": self.name,
            "mode": self.mode,
            "connected": self.connected,
            "ops_pending": max(0, self.log.last_seq - self.durable_seq),
            "bytes_pending": bytes_pending,
            "ops_in_memory": queued,
            "spilled_to_log": self._spill_from is not None,
            "lag_seconds": 0.0 if oldest is None else round(max(0.0, time.time() - oldest), 3),
            "last_seq": self.log.last_seq,
            "durable_seq": self.durable_seq,
            "bytes_sent": self.bytes_sent,
            "repairs": self.repairs,
            "last_repair_differences": self.last_repair_differences,
            "needs_repair": self.needs_repair or self.repairing,
            "failed_changes": self.failed_changes,
            "max_lag_bytes": self.max_lag_bytes,
            "sync_timeouts": self.sync_timeouts,
            "held_back_seconds": round(self.held_back_seconds, 3),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "pid": os.getpid(),
            "updated": time.time(),
        }

    def _write_status(self) -> None:
        tmp = self.status_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, self.status_path)
        except OSError as e:
            log.debug("cannot write %s: %s", self.status_path, e)


def _rechecks(
    ours: dict[bytes, w.Entry], theirs: dict[bytes, w.Entry], paths: set[bytes], seen: set[bytes]
) -> list[Difference]:
    """Regular files at or under ``paths`` on both sides, not already in ``seen``, as
    "content" differences: :meth:`ReplicationSink._fix` then compares them block by block."""
    prefixes = tuple(p + b"/" for p in paths)
    out = []
    for p, s in ours.items():
        r = theirs.get(p)
        if (
            p not in seen
            and (p in paths or p.startswith(prefixes))
            and stat.S_ISREG(s.mode)
            and r is not None
            and stat.S_ISREG(r.mode)
        ):
            out.append(Difference(p, "content", s, r))
    return out


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
