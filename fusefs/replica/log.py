"""The durable, ordered log of changes the target has not yet acknowledged as durable.

A log directory holds:

- ``seg-<first seq, 16 hex digits>.log``: append-only segments of records
  ``u32 length | u32 crc32 | u64 seq | change`` (the change in its wire encoding,
  :func:`fusefs.replica.wire.encode_change`; a Write record stores only the range: the bytes are
  re-read from BACKING when they are sent);
- ``acked``: the highest sequence number the target acknowledged as durable (records up to it
  are dead; whole dead segments are deleted);
- ``status.json``: the sink's state for ``fusefs status`` (written by the client);
- ``lock``: held (flock) by the one process using the log.

Appending is one ``write(2)`` (the record is then safe from a crash of the process); the client
fsyncs the log in batches and before any barrier (see docs/replication.md).  At open, a torn or
corrupt tail of the last segment (a crash in the middle of an append) is cut off.

The client keeps at most a bounded number of pending changes in memory; the rest stay only
here and are read back in order with :meth:`ChangeLog.read` (so a dead target never makes the
mount daemon grow: the log on disk holds the backlog).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass

from fusefs.errors import FusefsError
from fusefs.mirror.changes import Change, Write
from fusefs.replica.wire import WireError, decode_change, encode_change

__all__ = ["ChangeLog", "LogError", "LogRecord"]

log = logging.getLogger(__name__)

_REC = struct.Struct(">IIQ")
_SEQ = struct.Struct(">Q")
#: Start a new segment once the current one is this large.
SEGMENT_SIZE = 8 << 20
_MAX_RECORD = 1 << 20


class LogError(FusefsError):
    """The replication log directory cannot be used."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    seq: int
    change: Change


def _seg_name(first: int) -> str:
    return f"seg-{first:016x}.log"


class ChangeLog:
    """An on-disk log of changes with consecutive sequence numbers (from 1)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, max_pending: int | None = None
    ) -> None:
        """Open (or create) the log; :attr:`pending` gets the first ``max_pending``
        unacknowledged records (all if None), :attr:`more_from` the seq of the first one left
        out (None if none), :attr:`pending_count` and :attr:`pending_bytes` (Write sizes) the
        totals."""
        self.dir = os.fspath(directory)
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._lock_fd = os.open(
                os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise LogError(
                f"cannot use replication log directory {self.dir}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise LogError(
                f"replication log {self.dir} is in use by another fusefs process"
            ) from None
        self._mutex = threading.Lock()
        self.acked = self._read_acked()
        #: first seq of each segment, in order (the last one is being appended to)
        self._segments: list[int] = []
        self.pending: list[LogRecord] = []
        self.more_from: int | None = None
        self.pending_count = 0
        self.pending_bytes = 0
        self._max_pending = max_pending
        #: where the last :meth:`read` stopped: (next seq, segment first seq, file offset)
        self._cursor: tuple[int, int, int] | None = None
        self._dir_dirty = False
        self._recover()
        last = self._last_pending
        self.next_seq = max(last, self.acked, self._max_seq) + 1
        self._fd = -1
        self._size = 0
        self._dirty = False
        self._open_segment(self.next_seq)

    # -- opening ---------------------------------------------------------------------------

    def _read_acked(self) -> int:
        try:
            with open(os.path.join(self.dir, "acked")) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError):
            log.warning("%s: unreadable 'acked' file; resending the whole log", self.dir)
            return 0

    def _recover(self) -> None:
        self._max_seq = 0
        self._last_pending = self.acked
        names = sorted(
            n for n in os.listdir(self.dir) if n.startswith("seg-") and n.endswith(".log")
        )
        for i, name in enumerate(names):
            try:
                first = int(name[4:-4], 16)
            except ValueError:
                continue
            path = os.path.join(self.dir, name)
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos + _REC.size <= len(data):
                length, crc, seq = _REC.unpack_from(data, pos)
                end = pos + _REC.size + length
                if length > _MAX_RECORD or end > len(data):
                    break
                body = data[pos + _REC.size : end]
                if zlib.crc32(struct.pack(">Q", seq) + body) != crc:
                    break
                try:
                    change = decode_change(body)
                except WireError:
                    break
                self._max_seq = max(self._max_seq, seq)
                if seq > self.acked:
                    self._last_pending = seq
                    self.pending_count += 1
                    if isinstance(change, Write):
                        self.pending_bytes += change.size
                    if self._max_pending is None or len(self.pending) < self._max_pending:
                        self.pending.append(LogRecord(seq, change))
                    elif self.more_from is None:
                        self.more_from = seq
                pos = end
            if pos != len(data):
                log.warning("%s: cutting a torn tail of %d bytes", path, len(data) - pos)
                if i == len(names) - 1:
                    os.truncate(path, pos)
            self._segments.append(first)

    def _open_segment(self, first: int, *, sync_dir: bool = True) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        if self._segments and self._segments[-1] <= first and self._fd < 0:
            # keep appending to the last segment found at open
            first = self._segments[-1]
        path = os.path.join(self.dir, _seg_name(first))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        if not self._segments or self._segments[-1] != first:
            self._segments.append(first)
        if sync_dir:
            _fsync_dir(self.dir)
        else:
            self._dir_dirty = True  # the next sync() makes the new name durable

    # -- appending -------------------------------------------------------------------------

    def append(self, change: Change) -> int:
        """Append ``change`` (one write(2)); return its sequence number."""
        body = encode_change(change)
        with self._mutex:
            seq = self.next_seq
            crc = zlib.crc32(body, zlib.crc32(_SEQ.pack(seq)))
            rec = _REC.pack(len(body), crc, seq) + body
            if self._size + len(rec) > SEGMENT_SIZE and self._size:
                self._open_segment(seq)
            n = os.write(self._fd, rec)
            if n != len(rec):  # disk full: do not leave a torn record behind
                os.ftruncate(self._fd, self._size)
                raise OSError(28, "short write to the replication log")
            self._size += n
            self.next_seq = seq + 1
            self._dirty = True
            return seq

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    @property
    def dirty(self) -> bool:
        """Records were appended since the last :meth:`sync`."""
        return self._dirty or self._dir_dirty

    def sync(self) -> None:
        """fsync what was appended so far."""
        with self._mutex:
            if not self._dirty and not self._dir_dirty:
                return
            fd = self._fd
            sync_dir, self._dir_dirty = self._dir_dirty, False
            self._dirty = False
            if fd >= 0:
                fd = os.dup(fd)  # trim() may close the segment meanwhile
        if sync_dir:
            _fsync_dir(self.dir)
        if fd >= 0:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    # -- reading back ----------------------------------------------------------------------

    def read(self, start: int, limit: int) -> list[LogRecord]:
        """Up to ``limit`` records from seq ``start`` on, in order, as far as they are complete
        on disk (for changes the client did not keep in memory)."""
        with self._mutex:
            segments = list(self._segments)
            end = self.next_seq
        out: list[LogRecord] = []
        cur = self._cursor
        if cur is not None and cur[0] == start and cur[1] in segments:
            i, pos = segments.index(cur[1]), cur[2]
        else:
            i = max((k for k, first in enumerate(segments) if first <= start), default=0)
            pos = 0
        seq = start
        while i < len(segments) and len(out) < limit and seq < end:
            path = os.path.join(self.dir, _seg_name(segments[i]))
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            p = 0
            while p + _REC.size <= len(data) and len(out) < limit:
                length, crc, rseq = _REC.unpack_from(data, p)
                stop = p + _REC.size + length
                if length > _MAX_RECORD or stop > len(data):
                    break  # being appended right now
                if rseq >= start:
                    body = data[p + _REC.size : stop]
                    if zlib.crc32(struct.pack(">Q", rseq) + body) != crc:
                        break
                    try:
                        out.append(LogRecord(rseq, decode_change(body)))
                    except WireError:
                        break
                    seq = rseq + 1
                p = stop
            pos += p
            if len(out) >= limit or p < len(data) or i == len(segments) - 1:
                break
            i, pos = i + 1, 0
        if i < len(segments):
            self._cursor = (seq, segments[i], pos)
        return out

    # -- trimming --------------------------------------------------------------------------

    def trim(self, upto: int) -> None:
        """The target holds everything up to ``upto`` durably: forget it."""
        with self._mutex:
            if upto <= self.acked:
                return
            self.acked = upto
            tmp = os.path.join(self.dir, "acked.tmp")
            with open(tmp, "w") as f:
                f.write(f"{upto}\n")
            os.replace(tmp, os.path.join(self.dir, "acked"))
            # a segment is dead when the next one starts at or before upto + 1
            while len(self._segments) > 1 and self._segments[1] <= upto + 1:
                first = self._segments.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, _seg_name(first)))
            if len(self._segments) == 1 and upto >= self.next_seq - 1 and self._size:
                # everything is acknowledged: start afresh (keeps the log small when idle);
                # nothing in the old segment matters any more, so no fsync here
                os.close(self._fd)
                old = self._segments.pop()
                self._fd = -1
                self._dirty = False
                os.unlink(os.path.join(self.dir, _seg_name(old)))
                self._open_segment(self.next_seq, sync_dir=False)
                self._cursor = None

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
