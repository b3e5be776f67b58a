"""Our FUSE session: a trio loop on /dev/fuse driving a pyfuse3-style ``Operations`` object.

The loop reads one request at a time from the non-blocking device, decodes it with the sans-IO
codec (:mod:`fusefs.protocol`), and starts one trio task per request, so a slow backing call
never stalls the others.  Each task calls the filesystem, encodes the reply and writes it to the
device.  READ replies may instead be spliced from the backing fd (:mod:`.datapath`), and OPEN
replies may hand the backing fd to the kernel (passthrough), after which the kernel serves that
file's I/O without us.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import select
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from fusefs import _libc
from fusefs.ops import (
    EntryAttributes,
    FileRange,
    FUSEError,
    ReaddirToken,
    RequestContext,
    SetattrFields,
)
from fusefs.protocol import abi
from fusefs.protocol import replies as rp
from fusefs.protocol import requests as rq
from fusefs.protocol.init import InitConfig, Negotiated, negotiate
from fusefs.session.counters import Counters
from fusefs.session.datapath import (
    THREAD_MIN,
    BytesPayload,
    PipePayload,
    PipePool,
    SpliceShort,
    backing_close,
    backing_open,
    splice_pipe_size,
    splice_read_reply,
    splice_request,
    spliceable_pages,
)
from fusefs.session.mount import set_read_ahead

log = logging.getLogger("fusefs.session")

STATS_XATTR = b"user.fusefs.stats"
DATA_MODES = ("auto", "passthrough", "splice", "copy")

Reply = bytes | list[bytes] | None
#: Spins in a row that caught no request before the loop stops spinning (see serve).
_SPIN_MISSES = 4
_INTERRUPTIBLE = frozenset(
    {
        abi.Opcode.READ,
        abi.Opcode.WRITE,
        abi.Opcode.FSYNC,
        abi.Opcode.FSYNCDIR,
        abi.Opcode.FALLOCATE,
        abi.Opcode.COPY_FILE_RANGE,
        abi.Opcode.FLUSH,
    }
)
#: Which requests each Operations method answers (for ``quick_methods``).
_METHOD_OPCODES: dict[str, tuple[int, ...]] = {
    "lookup": (abi.Opcode.LOOKUP,),
    "getattr": (abi.Opcode.GETATTR,),
    "setattr": (abi.Opcode.SETATTR,),
    "readlink": (abi.Opcode.READLINK,),
    "symlink": (abi.Opcode.SYMLINK,),
    "mknod": (abi.Opcode.MKNOD,),
    "mkdir": (abi.Opcode.MKDIR,),
    "unlink": (abi.Opcode.UNLINK,),
    "rmdir": (abi.Opcode.RMDIR,),
    "rename": (abi.Opcode.RENAME, abi.Opcode.RENAME2),
    "link": (abi.Opcode.LINK,),
    "open": (abi.Opcode.OPEN,),
    "create": (abi.Opcode.CREATE,),
    "statfs": (abi.Opcode.STATFS,),
    "release": (abi.Opcode.RELEASE,),
    "flush": (abi.Opcode.FLUSH,),
    "setxattr": (abi.Opcode.SETXATTR,),
    "getxattr": (abi.Opcode.GETXATTR,),
    "listxattr": (abi.Opcode.LISTXATTR,),
    "removexattr": (abi.Opcode.REMOVEXATTR,),
    "opendir": (abi.Opcode.OPENDIR,),
    "releasedir": (abi.Opcode.RELEASEDIR,),
    "access": (abi.Opcode.ACCESS,),
}
# READDIR(PLUS) may give lookups back through forget(): quick only if both are.
_OPNAMES = {int(op): op.name for op in abi.Opcode}


def _in_group(pid: int, gid: int, group: int) -> bool:
    """Whether the caller (primary ``gid``, supplementary groups of ``pid``) is in ``group``."""
    if gid == group:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(group) in line.split()[1:]
    except OSError:
        pass
    return False  # the caller is gone or hidden: clearing is the safe answer


_SETS_ATIME = abi.FATTR_ATIME | abi.FATTR_ATIME_NOW
_IDLE_POLL_MS = 20
#: The reader loop lets trio run other tasks at least this often.
_YIELD_NS = 20_000_000
#: READ replies larger than this go out with writev instead of being joined to their header.
_JOIN_MAX = 16 * 1024


def _describe(req: Any) -> str:
    """One log line per request: opcode, unique, node and the fields that name things."""
    parts = [f"{_opname(req.opcode)} #{req.unique} node={req.nodeid}"]
    for field in ("name", "newname", "fh", "offset", "size", "flags", "valid"):
        value = getattr(req, field, None)
        if value is not None:
            parts.append(f"{field}={bytes(value)!r}" if "name" in field else f"{field}={value}")
    return " ".join(parts)


def _opname(op: int) -> str:
    return _OPNAMES.get(op) or f"opcode_{op}"


#: st_blksize of regular files on the mount: the largest request.  cp, cat and friends size
#: their buffers by it (coreutils: max(128 KiB, st_blksize)); with the backing file's 4 KiB a
#: `cp` into the mount made 8 WRITE round trips per MiB instead of one or two.
IO_BLKSIZE = 1 << 20


def attr_of(e: EntryAttributes) -> rp.Attr:
    blksize = e.st_blksize
    if stat.S_ISREG(e.st_mode) and blksize < IO_BLKSIZE:
        blksize = IO_BLKSIZE
    return rp.Attr(
        ino=e.st_ino,
        size=e.st_size,
        blocks=e.st_blocks,
        atime_ns=e.st_atime_ns,
        mtime_ns=e.st_mtime_ns,
        ctime_ns=e.st_ctime_ns,
        mode=e.st_mode,
        nlink=e.st_nlink,
        uid=e.st_uid,
        gid=e.st_gid,
        rdev=e.st_rdev,
        blksize=blksize,
    )


def entry_reply(unique: int, e: EntryAttributes) -> bytes:
    return rp.reply_entry(
        unique, e.st_ino, e.generation, e.entry_timeout, e.attr_timeout, attr_of(e)
    )


class _DirToken(ReaddirToken):
    """Fills one READDIR(PLUS) reply; counts entries so a plain READDIR can undo lookups."""

    __slots__ = ("added", "buf", "plus")

    def __init__(self, size: int, plus: bool) -> None:
        self.buf = rp.DirentBuffer(size, plus)
        self.plus = plus
        self.added: list[int] = []

    def add(self, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
        dtype = (attr.st_mode >> 12) & 0o17
        entry = (
            (attr.st_ino, attr.generation, attr.entry_timeout, attr.attr_timeout, attr_of(attr))
            if self.plus
            else None
        )
        if not self.buf.add(attr.st_ino, next_id, dtype, name, entry):
            return False
        self.added.append(attr.st_ino)
        return True


#: Errors of taking a request off the device after which the session goes on (once INIT is
#: done): fuse_dev_do_read answers a request EIO itself when copying it out fails.
_REQUEST_LOST = frozenset({errno.EIO, errno.ENOMEM, errno.EFAULT})


class Session:
    """One mounted filesystem: the device fd, the Operations object, and what was negotiated."""

    def __init__(
        self,
        ops: Any,
        devfd: int,
        mountpoint: str,
        *,
        data: str = "auto",
        writeback_cache: bool = False,
        max_pages: int = 256,
        max_background: int = 64,
        read_ahead_kb: int = 1016,
        idle_spin_us: int = 50,
        min_spliced_write: int = 4096,
        max_copied_read: int = 4096,
        ready: Callable[[], None] | None = None,
        debug: bool = False,
    ) -> None:
        if data not in DATA_MODES:
            raise ValueError(f"data mode must be one of {', '.join(DATA_MODES)}")
        self.ops = ops
        self.devfd = devfd
        self.mountpoint = mountpoint
        self.data_wanted = data
        self.writeback_cache = writeback_cache
        self.max_pages = max_pages
        self.max_background = max_background
        self.read_ahead_kb = read_ahead_kb
        self.idle_spin_ns = idle_spin_us * 1000
        self.min_spliced_write = min_spliced_write
        # A one-page READ costs fewer syscalls copied (pread + write) than spliced (fstat,
        # header write, two splices); such replies are copied and counted as copied.
        self.max_copied_read = max_copied_read
        self.ready = ready
        self.debug = debug
        self.counters = Counters()
        self.negotiated: Negotiated | None = None
        #: requests the kernel could not hand over (see _request_lost)
        self._lost_requests = 0
        self.splice_reads = False
        self.passthrough = False
        self.splice_writes = False
        self._pipes = PipePool(splice_pipe_size())
        #: READ ranges the loop looked at and left to a task (not cached): unique -> range
        self._cold: dict[int, FileRange] = {}
        try:
            params = inspect.signature(ops.setxattr).parameters
            self._setxattr_takes_flags = "flags" in params
        except (TypeError, ValueError, AttributeError):
            self._setxattr_takes_flags = False
        # Passthrough registrations: the kernel allows one backing file per inode, so all
        # opens sharing a backing fd share one backing id, closed at their last RELEASE.
        self._backing: dict[int, list[int]] = {}  # backing fd -> [backing id, opens]
        self._fh_backing: dict[int, int] = {}  # fh -> backing fd
        self._inflight: dict[int, trio.CancelScope | None] = {}
        self._interrupted: set[int] = set()
        #: Uniques of the READs being served, per node, and events for SETATTRs waiting for
        #: some of them to finish (see _setattr_after_reads).
        self._reading: dict[int, set[int]] = {}
        self._reads_done: dict[int, trio.Event] = {}
        #: Tasks we spawned that are still alive (see serve: idle waits).
        self._tasks = 0
        #: Asked after each OPEN/CREATE: False gives FOPEN_NOFLUSH (two of rsync's ~17
        #: requests per file).
        self._needs_flush: Callable[[int], bool] | None = getattr(ops, "needs_flush", None)
        #: READs and WRITEs up to this size run in the reader task (below THREAD_MIN our own
        #: splices are synchronous too).
        self._quick_io = min(getattr(ops, "quick_io_max", 0), THREAD_MIN - 1)
        quick = set(getattr(ops, "quick_methods", ()))
        self._quick_forget = "forget" in quick
        #: read_range never suspends: a spliced READ can be served in the loop, no task.
        self._quick_range = "read_range" in quick
        #: write_payload suspends only in payload.to_fd: a big spliced WRITE runs in the loop
        #: while the StallGuard keeps to_fd inline (no task: ~15% of a WRITE's CPU is trio's).
        self._quick_write = "write_payload" in quick
        self._quick = frozenset(
            op for name in quick for op in _METHOD_OPCODES.get(name, ()) if op not in _INTERRUPTIBLE
        ) | (
            frozenset({abi.Opcode.READDIR, abi.Opcode.READDIRPLUS})
            if {"readdir", "forget"} <= quick
            else frozenset()
        )
        self._bufsize = max(abi.FUSE_MIN_READ_BUFFER, max_pages * 4096 + abi.IN_HEADER_SIZE + 4096)
        self._handlers: dict[int, Callable[[Any], Awaitable[Reply]]] = {
            abi.Opcode.LOOKUP: self._lookup,
            abi.Opcode.GETATTR: self._getattr,
            abi.Opcode.SETATTR: self._setattr,
            abi.Opcode.READLINK: self._readlink,
            abi.Opcode.SYMLINK: self._symlink,
            abi.Opcode.MKNOD: self._mknod,
            abi.Opcode.MKDIR: self._mkdir,
            abi.Opcode.UNLINK: self._unlink,
            abi.Opcode.RMDIR: self._rmdir,
            abi.Opcode.RENAME: self._rename,
            abi.Opcode.RENAME2: self._rename,
            abi.Opcode.LINK: self._link,
            abi.Opcode.OPEN: self._open,
            abi.Opcode.READ: self._counted_read,
            abi.Opcode.WRITE: self._write,
            abi.Opcode.STATFS: self._statfs,
            abi.Opcode.RELEASE: self._release,
            abi.Opcode.FSYNC: self._fsync,
            abi.Opcode.SETXATTR: self._setxattr,
            abi.Opcode.GETXATTR: self._getxattr,
            abi.Opcode.LISTXATTR: self._listxattr,
            abi.Opcode.REMOVEXATTR: self._removexattr,
            abi.Opcode.FLUSH: self._flush,
            abi.Opcode.OPENDIR: self._opendir,
            abi.Opcode.READDIR: self._readdir,
            abi.Opcode.READDIRPLUS: self._readdir,
            abi.Opcode.RELEASEDIR: self._releasedir,
            abi.Opcode.FSYNCDIR: self._fsyncdir,
            abi.Opcode.ACCESS: self._access,
            abi.Opcode.CREATE: self._create,
            abi.Opcode.FALLOCATE: self._fallocate,
            abi.Opcode.LSEEK: self._lseek,
            abi.Opcode.COPY_FILE_RANGE: self._copy_file_range,
        }

    # ----------------------------------------------------------------- the loop

    async def serve(self) -> None:
        """Serve requests until the filesystem is unmounted (the device reports ENODEV)."""
        os.set_blocking(self.devfd, False)
        bufsize = self._bufsize
        fd = self.devfd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        spin = self.idle_spin_ns
        try:
            async with trio.open_nursery() as nursery:
                last_yield = time.perf_counter_ns()
                misses = idle = 0  # spins in a row that caught no request; waits so far
                while True:
                    # Our tasks, and whatever else trio runs (signal handlers: SIGTERM must
                    # unmount promptly), get the loop at least every _YIELD_NS even while
                    # requests keep coming and run inline.
                    now = time.perf_counter_ns()
                    if now - last_yield > _YIELD_NS:
                        last_yield = now
                        await trio.lowlevel.checkpoint()
                    payload: PipePayload | None = None
                    try:
                        if self.splice_writes:
                            buf, payload = splice_request(
                                self._pipes, fd, bufsize, self.min_spliced_write
                            )
                        else:
                            buf = os.read(fd, bufsize)
                    except BlockingIOError:
                        if not self._tasks and spin and (misses < _SPIN_MISSES or not idle % 16):
                            # A short busy poll first: sleeping and being woken costs this
                            # VM ~100 us per request (idle CPUs wake slowly); the next
                            # request of a busy caller usually comes sooner than that.  Not
                            # after a run of spins that caught nothing (a writer copying a
                            # MiB between WRITEs): then spinning only burns a CPU that a
                            # replication sender needs; every 16th wait tries again.
                            end = time.perf_counter_ns() + spin
                            while not poller.poll(0):
                                if time.perf_counter_ns() >= end:
                                    misses += 1
                                    break
                            else:
                                misses = 0
                        idle += 1
                        if not self._tasks and poller.poll(_IDLE_POLL_MS):
                            # No task of ours alive: waiting in poll(2) directly skips a pass
                            # of trio's scheduler per request (the storm case: a process
                            # issuing one request after another).  Anything else trio runs
                            # waits at most _YIELD_NS (above) or _IDLE_POLL_MS, when trio's
                            # own wait takes over.
                            continue
                        last_yield = time.perf_counter_ns()
                        await trio.lowlevel.wait_readable(fd)
                        continue
                    except OSError as e:
                        if e.errno == errno.ENODEV:  # unmounted
                            break
                        if e.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                            continue
                        if e.errno in _REQUEST_LOST and self.negotiated is not None:
                            self._request_lost(e)
                            if e.errno == errno.ENOMEM:  # let memory come back first
                                await trio.sleep(0.01)
                            continue
                        raise
                    try:
                        if payload is None:
                            req = rq.decode_request(buf)
                        else:
                            pre = rq.decode_write_prefix(buf)
                            h = pre.header
                            req = rq.Write(
                                h.unique, h.opcode, h.nodeid, h.uid, h.gid, h.pid, pre.fh,
                                pre.offset, pre.size, pre.write_flags, pre.lock_owner,
                                pre.flags, memoryview(b""),
                            )  # fmt: skip
                    except rq.ProtocolError as e:
                        if payload is not None:
                            payload.close()
                        self._reject(buf, e)
                        continue
                    op = req.opcode
                    self.counters.requests[_opname(op)] += 1
                    if self.debug:
                        log.debug("request %s", _describe(req))
                    if payload is not None:
                        self._inflight[req.unique] = None
                        if 0 < pre.size <= self._quick_io or (
                            self._quick_write and self._pipes.guard.inline_ok()
                        ):
                            await self._handle(req, payload, inline=True)
                        else:
                            self._spawn(nursery, self._handle, req, payload)
                        continue
                    if op == abi.Opcode.FORGET or op == abi.Opcode.BATCH_FORGET:
                        if self._quick_forget:
                            await self._forget(req)
                        else:
                            self._spawn(nursery, self._forget, req)
                    elif op == abi.Opcode.INTERRUPT:
                        self._interrupt(req)
                    elif op == abi.Opcode.INIT:
                        self._init(req, nursery)
                    elif op == abi.Opcode.DESTROY:
                        self._send(rp.reply_empty(req.unique))
                        break
                    else:
                        # Known as in flight from now on, so an INTERRUPT that overtakes the
                        # task's start is not answered EAGAIN (the kernel would resend it at
                        # once, forever, since tasks run only when this loop yields).
                        self._inflight[req.unique] = None
                        if (
                            isinstance(req, rq.Setattr)
                            and req.valid & _SETS_ATIME
                            and req.nodeid in self._reading
                        ):
                            self._spawn(nursery, self._setattr_after_reads, req)
                        else:
                            if op == abi.Opcode.READ:
                                if (
                                    self._quick_range
                                    and self.splice_reads
                                    and await self._read_in_loop(req)
                                ):
                                    del self._inflight[req.unique]
                                    continue
                                self._reading.setdefault(req.nodeid, set()).add(req.unique)
                            if op in self._quick or (
                                isinstance(req, rq.Read | rq.Write)
                                and 0 < req.size <= self._quick_io
                            ):
                                # The filesystem promised this never suspends: no task needed.
                                await self._handle(req)
                            else:
                                self._spawn(nursery, self._handle, req)
                nursery.cancel_scope.cancel()
        finally:
            self._close()
            if self.debug:
                log.info("counters at unmount:\n%s", self.counters.to_json().decode())

    def _close(self) -> None:
        for bid, _ in self._backing.values():
            with contextlib.suppress(OSError):
                backing_close(self.devfd, bid)
        self._backing.clear()
        self._fh_backing.clear()
        self._pipes.close()

    def _request_lost(self, exc: OSError) -> None:
        """Taking a request off the device failed (no memory for it, or it did not fit the
        pipe); the kernel then fails that request with EIO itself.  One failed request must
        not take the whole mount down; a splicing failure other than memory means requests
        are read from now on (copied: counted as such).  Logged at 1, 2, 4, 8, ... times."""
        self.counters.errors += 1
        self._lost_requests += 1
        n = self._lost_requests
        if n & (n - 1) == 0:
            log.warning(
                "a request could not be taken off the device (%s; %d so far); it may have "
                "failed with EIO",
                os.strerror(exc.errno or errno.EIO),
                n,
            )
        if self.splice_writes and exc.errno != errno.ENOMEM:
            self.splice_writes = False
            log.warning("taking requests off the device by read(2), not splice, from now on")

    def _reject(self, buf: bytes, exc: Exception) -> None:
        """A request we cannot parse still gets an answer, or the caller would hang."""
        self.counters.errors += 1
        log.warning("malformed request: %s", exc)
        try:
            hdr = rq.decode_header(buf)
        except rq.ProtocolError:
            return
        if hdr.opcode not in (abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET):
            self._send(rp.reply_error(hdr.unique, errno.EINVAL))

    def _send(self, reply: bytes | list[bytes]) -> None:
        try:
            if isinstance(reply, list):
                os.writev(self.devfd, reply)
            else:
                os.write(self.devfd, reply)
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                raise

    async def _handle(
        self, req: Any, payload: PipePayload | None = None, *, inline: bool = False
    ) -> None:
        """One request's task.  Only requests that can block for long get a cancel scope
        (INTERRUPT cancels it); scopes cost more than the quick metadata calls themselves.
        ``inline``: run by the loop itself, never suspending, so no INTERRUPT can come
        between and no scope is needed."""
        unique = req.unique
        inflight = self._inflight
        reply: Reply
        if req.opcode in _INTERRUPTIBLE and not inline:
            with trio.CancelScope() as scope:
                if unique in self._interrupted:  # interrupted before it started
                    self._interrupted.discard(unique)
                    scope.cancel()
                inflight[unique] = scope
                try:
                    reply = await self._call(req, payload)
                finally:
                    del inflight[unique]
            if scope.cancelled_caught:
                reply = rp.reply_error(unique, errno.EINTR)
        else:
            try:
                reply = await self._call(req, payload)
            finally:
                del inflight[unique]
                if self._interrupted:
                    self._interrupted.discard(unique)
        if reply is not None:
            self._send(reply)

    async def _call(self, req: Any, payload: PipePayload | None) -> Reply:
        """Run the handler; every failure becomes an errno reply, never a dead request."""
        unique = req.unique
        try:
            if payload is not None:
                return await self._write_payload(req, payload)
            handler = self._handlers.get(req.opcode)
            if handler is None:
                return rp.reply_error(unique, errno.ENOSYS)
            return await handler(req)
        except FUSEError as e:
            return rp.reply_error(unique, e.errno)
        except OSError as e:
            return rp.reply_error(unique, e.errno or errno.EIO)
        except Exception:
            self.counters.errors += 1
            log.exception("error handling %s", _opname(req.opcode))
            return rp.reply_error(unique, errno.EIO)
        finally:
            if payload is not None:
                payload.close()

    def _interrupt(self, req: Any) -> None:
        target = req.target_unique
        if target not in self._inflight:
            # Not seen yet (or answered already): EAGAIN asks the kernel to resend it later.
            self._send(rp.reply_error(req.unique, errno.EAGAIN))
            return
        self.counters.interrupts += 1
        scope = self._inflight[target]
        if scope is not None:
            scope.cancel()
        else:  # not started yet; a quick request finishes on its own (ignoring is allowed)
            self._interrupted.add(target)

    # ----------------------------------------------------------------- INIT

    def _init(self, req: Any, nursery: trio.Nursery) -> None:
        want_pt = (
            self.data_wanted in ("auto", "passthrough")
            and not self.writeback_cache
            and getattr(self.ops, "passthrough_allowed", True)
        )
        cfg = InitConfig(
            want_writeback_cache=self.writeback_cache,
            want_passthrough=want_pt and os.geteuid() == 0,
            # The kernel then trusts us to clear setuid/setgid on writes (flag per request)
            # instead of asking for security.capability before every single WRITE.
            want_handle_killpriv_v2=True,
            # A spliced message must fit one pipe whole (datapath.spliceable_pages).
            max_pages=(
                min(self.max_pages, spliceable_pages(self._pipes.size))
                if self.data_wanted != "copy"
                else self.max_pages
            ),
            max_background=self.max_background,
        )
        try:
            reply, neg = negotiate(req, cfg)
        except rq.ProtocolError as e:
            log.error("INIT failed: %s", e)
            self._send(rp.reply_error(req.unique, errno.EPROTO))
            return
        self.negotiated = neg
        self.counters.max_pages = neg.max_pages
        self._choose_data_mode(neg)
        init = getattr(self.ops, "init", None)
        if init is not None:
            init()
        self._send(reply)
        self._spawn(nursery, self._after_init)

    def _choose_data_mode(self, neg: Negotiated) -> None:
        wanted = self.data_wanted
        has_range = hasattr(self.ops, "read_range")
        may_pass = getattr(self.ops, "passthrough_allowed", True)
        if (
            wanted in ("auto", "passthrough")
            and neg.passthrough
            and hasattr(self.ops, "passthrough_fd")
            and may_pass
        ):
            mode, why = "passthrough", "kernel offers FUSE_PASSTHROUGH and we hold CAP_SYS_ADMIN"
        elif wanted in ("auto", "passthrough", "splice") and has_range:
            mode = "splice"
            if wanted == "splice":
                why = "asked for"
            elif not may_pass:
                why = "the filesystem must see every read and write (a replication target)"
            elif self.writeback_cache:
                why = "passthrough does not combine with writeback_cache"
            elif os.geteuid() != 0:
                why = "passthrough needs CAP_SYS_ADMIN (not root)"
            else:
                why = "kernel did not grant FUSE_PASSTHROUGH"
        else:
            mode = "copy"
            why = "asked for" if wanted == "copy" else "filesystem offers no read_range()"
        self.passthrough = mode == "passthrough"
        self.splice_reads = mode in ("passthrough", "splice")
        # Writable opens may not be passed through (a change sink must see them): splice those.
        self.splice_writes = self.splice_reads and hasattr(self.ops, "write_payload")
        self.counters.data_mode = mode
        self.counters.data_mode_reason = why
        level = logging.WARNING if wanted not in ("auto", mode) else logging.INFO
        log.log(level, "data path: %s (%s); asked for %s", mode, why, wanted)

    async def _after_init(self) -> None:
        """Once the kernel can reach us: raise readahead (root only), then say we are ready."""
        if self.read_ahead_kb and os.geteuid() == 0:
            await trio.to_thread.run_sync(set_read_ahead, self.mountpoint, self.read_ahead_kb)
        if self.ready is not None:
            self.ready()

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _ctx(req: Any, umask: int = 0) -> RequestContext:
        return RequestContext(req.uid, req.gid, req.pid, umask)

    # ----------------------------------------------------------------- handlers

    async def _forget(self, req: Any) -> None:
        if req.opcode == abi.Opcode.FORGET:
            items: Any = [(req.nodeid, req.nlookup)]
        else:
            items = list(req.items)
        try:
            await self.ops.forget(items)
        except Exception:
            log.exception("forget failed")

    async def _lookup(self, req: Any) -> Reply:
        e = await self.ops.lookup(req.nodeid, req.name, self._ctx(req))
        return entry_reply(req.unique, e)

    async def _getattr(self, req: Any) -> Reply:
        e = await self.ops.getattr(req.nodeid, self._ctx(req))
        return rp.reply_attr(req.unique, e.attr_timeout, attr_of(e))

    async def _setattr(self, req: Any) -> Reply:
        v = req.valid
        attr = EntryAttributes()
        fields = SetattrFields()
        if v & abi.FATTR_MODE:
            fields.update_mode = True
            attr.st_mode = req.mode
        if v & abi.FATTR_UID:
            fields.update_uid = True
            attr.st_uid = req.new_uid
        if v & abi.FATTR_GID:
            fields.update_gid = True
            attr.st_gid = req.new_gid
        if v & abi.FATTR_SIZE:
            fields.update_size = True
            attr.st_size = req.size
        now = 0
        if v & (abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW):
            now = time.time_ns()
        if v & abi.FATTR_ATIME:
            fields.update_atime = True
            attr.st_atime_ns = now if v & abi.FATTR_ATIME_NOW else req.atime_ns
        if v & abi.FATTR_MTIME:
            fields.update_mtime = True
            attr.st_mtime_ns = now if v & abi.FATTR_MTIME_NOW else req.mtime_ns
        if v & abi.FATTR_CTIME:
            fields.update_ctime = True
            attr.st_ctime_ns = req.ctime_ns
        fh = req.fh if v & abi.FATTR_FH else None
        e = await self.ops.setattr(req.nodeid, attr, fields, fh, self._ctx(req))
        if v & abi.FATTR_KILL_SUIDGID:
            await self._kill_suidgid(req)
            e = await self.ops.getattr(req.nodeid, self._ctx(req))
        return rp.reply_attr(req.unique, e.attr_timeout, attr_of(e))

    async def _readlink(self, req: Any) -> Reply:
        target = await self.ops.readlink(req.nodeid, self._ctx(req))
        return rp.reply_data(req.unique, target)

    async def _symlink(self, req: Any) -> Reply:
        e = await self.ops.symlink(req.nodeid, req.name, req.target, self._ctx(req))
        return entry_reply(req.unique, e)

    async def _mknod(self, req: Any) -> Reply:
        ctx = self._ctx(req, req.umask)
        e = await self.ops.mknod(req.nodeid, req.name, req.mode, req.rdev, ctx)
        return entry_reply(req.unique, e)

    async def _mkdir(self, req: Any) -> Reply:
        # The kernel sends the mode without the file type bits; pyfuse3 adds S_IFDIR.
        ctx = self._ctx(req, req.umask)
        e = await self.ops.mkdir(req.nodeid, req.name, req.mode | 0o040000, ctx)
        return entry_reply(req.unique, e)

    async def _unlink(self, req: Any) -> Reply:
        await self.ops.unlink(req.nodeid, req.name, self._ctx(req))
        return rp.reply_empty(req.unique)

    async def _rmdir(self, req: Any) -> Reply:
        await self.ops.rmdir(req.nodeid, req.name, self._ctx(req))
        return rp.reply_empty(req.unique)

    async def _rename(self, req: Any) -> Reply:
        await self.ops.rename(
            req.nodeid, req.name, req.newdir, req.newname, req.flags, self._ctx(req)
        )
        return rp.reply_empty(req.unique)

    async def _link(self, req: Any) -> Reply:
        e = await self.ops.link(req.oldnodeid, req.nodeid, req.newname, self._ctx(req))
        return entry_reply(req.unique, e)

    def _open_flags(self, fi: Any) -> int:
        flags = 0
        if self._needs_flush is not None and not self._needs_flush(fi.fh):
            flags |= abi.FOPEN_NOFLUSH
        if fi.direct_io:
            flags |= abi.FOPEN_DIRECT_IO
        if fi.keep_cache:
            flags |= abi.FOPEN_KEEP_CACHE
        if fi.nonseekable:
            flags |= abi.FOPEN_NONSEEKABLE
        return flags

    def _file_flags(self, fi: Any) -> tuple[int, int]:
        """OPEN/CREATE reply flags and backing id; direct-I/O opens are counted (the writes
        of write-only opens that skip the kernel's page cache)."""
        flags, bid = self._passthrough(fi.fh, self._open_flags(fi))
        if flags & abi.FOPEN_DIRECT_IO:
            self.counters.direct_io_opens += 1
        return flags, bid

    def _passthrough(self, fh: int, open_flags: int) -> tuple[int, int]:
        """Hand the backing fd to the kernel if we may; returns (open_flags, backing_id)."""
        if not self.passthrough:
            return open_flags, 0
        fd = self.ops.passthrough_fd(fh)
        if fd is None:
            return open_flags, 0
        reg = self._backing.get(fd)
        if reg is None:
            try:
                bid = backing_open(self.devfd, fd)
            except OSError as e:
                self.counters.passthrough_open_failures += 1
                log.info("passthrough refused (%s); this file uses splice", e)
                return open_flags, 0
            reg = self._backing[fd] = [bid, 0]
        reg[1] += 1
        bid = reg[0]
        self._fh_backing[fh] = fd
        self.counters.passthrough_opens += 1
        return (open_flags & ~abi.FOPEN_DIRECT_IO) | abi.FOPEN_PASSTHROUGH, bid

    async def _open(self, req: Any) -> Reply:
        fi = await self.ops.open(req.nodeid, req.flags, self._ctx(req))
        if req.open_flags & abi.FUSE_OPEN_KILL_SUIDGID:
            await self._kill_suidgid(req)
        flags, bid = self._file_flags(fi)
        return rp.reply_open(req.unique, fi.fh, flags, bid)

    async def _create(self, req: Any) -> Reply:
        ctx = self._ctx(req, req.umask)
        fi, e = await self.ops.create(req.nodeid, req.name, req.mode, req.flags, ctx)
        flags, bid = self._file_flags(fi)
        return rp.reply_create(
            req.unique,
            e.st_ino,
            e.generation,
            e.entry_timeout,
            e.attr_timeout,
            attr_of(e),
            fi.fh,
            flags,
            bid,
        )

    def _spawn(self, nursery: trio.Nursery, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a task of ours, counted from now: while any is alive or waiting to start,
        the loop waits through trio (see serve)."""
        self._tasks += 1
        nursery.start_soon(self._task, fn, *args)

    async def _task(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        finally:
            self._tasks -= 1

    async def _counted_read(self, req: Any) -> Reply:
        """READ, taken out of _reading when done (the reader loop put it in)."""
        node = req.nodeid
        try:
            return await self._read(req)
        finally:
            uniques = self._reading.get(node)
            if uniques is not None:
                uniques.discard(req.unique)
                if not uniques:
                    del self._reading[node]
            done = self._reads_done.pop(node, None)
            if done is not None:
                done.set()

    async def _setattr_after_reads(self, req: Any) -> None:
        """Set atime only once the READs in flight on the node have read the backing file.

        Readahead READs are the kernel's own and may still be in flight when the application,
        whose read returned long ago, sets atime; served afterwards they would touch the
        backing file's atime again (relatime does when mtime >= atime), undoing the SETATTR.
        """
        node, unique = req.nodeid, req.unique
        before = set(self._reading.get(node, ()))  # later READs do not hold it up
        with trio.CancelScope() as scope:
            if unique in self._interrupted:
                self._interrupted.discard(unique)
                scope.cancel()
            self._inflight[unique] = scope  # INTERRUPT gives EINTR instead of a long wait
            while before & self._reading.get(node, set()):
                done = self._reads_done.get(node)
                if done is None:
                    done = self._reads_done[node] = trio.Event()
                await done.wait()
        if scope.cancelled_caught:
            del self._inflight[unique]
            self._send(rp.reply_error(unique, errno.EINTR))
            return
        self._inflight[unique] = None
        await self._handle(req)

    async def _read_in_loop(self, req: Any) -> bool:
        """Serve a READ whose reply can be spliced without blocking right here, without a task
        of its own; False leaves it to a task (a range that may need the disk, or a splice
        that failed and needs the copying fallback).  Never suspends."""
        if req.size <= self.max_copied_read:
            return False  # one page: pread + write beat the splices (the usual inline path)
        unique = req.unique
        try:
            rng = await self.ops.read_range(req.fh, req.offset, req.size)
        except FUSEError as e:
            self._send(rp.reply_error(unique, e.errno))
            return True
        except OSError as e:
            self._send(rp.reply_error(unique, e.errno or errno.EIO))
            return True
        st_size = None
        if rng.size >= THREAD_MIN:
            st_size = self._in_loop(rng)
            if st_size is None:
                self._cold[unique] = rng  # the task splices it in a thread, no second look
                return False
        try:
            n = self._splice_here(unique, rng, st_size)
        except SpliceShort as short:
            self.counters.splice_fallbacks += 1
            self._send(self._copied_reply(unique, short.data))
            return True
        except OSError as e:
            return e.errno in (errno.ENOENT, errno.ENODEV)  # interrupted: no answer wanted
        self._count_spliced(n)
        return True

    def _count_spliced(self, n: int) -> None:
        self.counters.read_requests_spliced += 1
        self.counters.read_bytes_spliced += n

    def _copied_reply(self, unique: int, data: bytes) -> bytes | list[bytes]:
        """The reply to a READ answered with bytes that went through Python, counted so."""
        self.counters.read_requests_copied += 1
        self.counters.read_bytes_copied += len(data)
        if len(data) > _JOIN_MAX:
            return rp.reply_data_parts(unique, data)  # no join: the header goes by writev
        return rp.reply_data(unique, data)

    def _splice_here(self, unique: int, rng: FileRange, st_size: int | None = None) -> int:
        """Splice a READ reply in the loop's own thread; big moves are timed for the
        StallGuard, which sends them to worker threads for a while after a slow one."""
        args = (self._pipes, self.devfd, unique, rng.fd, rng.offset, rng.size, st_size)
        if rng.size < THREAD_MIN:
            return splice_read_reply(*args)
        start = time.monotonic_ns()
        try:
            return splice_read_reply(*args)
        finally:
            self._pipes.guard.took(time.monotonic_ns() - start)

    def _in_loop(self, rng: FileRange) -> int | None:
        """The backing file's size if a big READ reply is spliced in the loop rather than in
        a worker thread (the splice then needs no fstat of its own), else None.

        A thread hop costs more CPU than splicing a MiB already in the page cache of a local
        filesystem; a range that may need the disk or the network (NFS revalidates) goes to a
        thread, and so does everything for a while after an in-loop move was slow (pages
        cachestat counts may still be under read I/O).
        """
        if not self._pipes.guard.inline_ok():
            return None
        try:
            st = os.fstat(rng.fd)
        except OSError:
            return None
        if not _libc.on_local_fs(rng.fd, st.st_dev):
            return None
        size = min(rng.size, st.st_size - rng.offset)  # no pages past EOF
        if size <= 0 or _libc.cached(rng.fd, rng.offset, size):
            return st.st_size
        return None

    async def _read(self, req: Any) -> Reply:
        c = self.counters
        if self.splice_reads and req.size > self.max_copied_read:
            cold = self._cold.pop(req.unique, None)  # before any await: never left behind
            rng = cold or await self.ops.read_range(req.fh, req.offset, req.size)
            try:
                st_size = None if cold or rng.size < THREAD_MIN else self._in_loop(rng)
                if not cold and (rng.size < THREAD_MIN or st_size is not None):
                    n = self._splice_here(req.unique, rng, st_size)
                else:
                    args = (self._pipes, self.devfd, req.unique, rng.fd, rng.offset, rng.size)
                    n = await trio.to_thread.run_sync(splice_read_reply, *args)
            except SpliceShort as short:
                c.splice_fallbacks += 1
                data = short.data
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENODEV):
                    return None  # interrupted: the kernel no longer wants an answer
                c.splice_fallbacks += 1
                log.debug("splice read failed (%s); copying", e)
                data = await self.ops.read(req.fh, req.offset, req.size)
            else:
                self._count_spliced(n)
                return None
        else:
            data = await self.ops.read(req.fh, req.offset, req.size)
        return self._copied_reply(req.unique, data)

    async def _kill_suidgid(self, req: Any) -> None:
        """What the kernel leaves to us under HANDLE_KILLPRIV_V2 (it sends the flag only for
        callers without CAP_FSETID): a write, truncate or O_TRUNC open clears setuid, and
        setgid when group-executable or when the caller is not in the file's group (the
        Linux 6.2 rule of setattr_should_drop_sgid)."""
        ctx = self._ctx(req)
        e = await self.ops.getattr(req.nodeid, ctx)
        mode = e.st_mode
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID and (
            mode & stat.S_IXGRP or not _in_group(req.pid, req.gid, e.st_gid)
        ):
            kill |= stat.S_ISGID
        if kill:
            attr = EntryAttributes()
            attr.st_mode = mode & ~kill
            await self.ops.setattr(req.nodeid, attr, SetattrFields(update_mode=True), None, ctx)

    async def _write(self, req: Any) -> Reply:
        """A WRITE whose data came in with the request (small, or splicing is off)."""
        if req.write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
            await self._kill_suidgid(req)
        if self.splice_writes and hasattr(self.ops, "write_payload"):
            payload = BytesPayload(req.data)
            n = await self.ops.write_payload(req.fh, req.offset, payload)
        else:
            n = await self.ops.write(req.fh, req.offset, bytes(req.data))
        self.counters.write_requests_copied += 1
        self.counters.write_bytes_copied += n
        return rp.reply_write(req.unique, n)

    async def _write_payload(self, req: Any, payload: PipePayload) -> Reply:
        """A WRITE whose data is still in a pipe: splice it into the backing file."""
        c = self.counters
        if req.write_flags & abi.FUSE_WRITE_KILL_SUIDGID:
            await self._kill_suidgid(req)
        n = await self.ops.write_payload(req.fh, req.offset, payload)
        if payload.fallback is not None:
            c.splice_fallbacks += 1
            log.debug("splice write fell back to copying: %s", payload.fallback)
        if payload.spliced:
            c.write_requests_spliced += 1
            c.write_bytes_spliced += payload.spliced
        if payload.copied:
            c.write_requests_copied += 1
            c.write_bytes_copied += payload.copied
        return rp.reply_write(req.unique, n)

    async def _statfs(self, req: Any) -> Reply:
        s = await self.ops.statfs(self._ctx(req))
        return rp.reply_statfs(
            req.unique,
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize,
            s.f_namemax,
            s.f_frsize,
        )

    async def _release(self, req: Any) -> Reply:
        fd = self._fh_backing.pop(req.fh, None)
        if fd is not None:
            reg = self._backing[fd]
            reg[1] -= 1
            if reg[1] == 0:
                del self._backing[fd]
                try:
                    backing_close(self.devfd, reg[0])
                except OSError as e:
                    log.warning("could not close backing id %d: %s", reg[0], e)
        await self.ops.release(req.fh)
        return rp.reply_empty(req.unique)

    async def _fsync(self, req: Any) -> Reply:
        await self.ops.fsync(req.fh, bool(req.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return rp.reply_empty(req.unique)

    async def _fsyncdir(self, req: Any) -> Reply:
        await self.ops.fsyncdir(req.fh, bool(req.fsync_flags & abi.FUSE_FSYNC_FDATASYNC))
        return rp.reply_empty(req.unique)

    async def _setxattr(self, req: Any) -> Reply:
        if req.nodeid == 1 and req.name == STATS_XATTR:
            raise FUSEError(errno.EPERM)
        ctx = self._ctx(req)
        flags = req.flags & (os.XATTR_CREATE | os.XATTR_REPLACE)
        if self._setxattr_takes_flags:
            await self.ops.setxattr(req.nodeid, req.name, bytes(req.value), ctx, flags=flags)
            return rp.reply_empty(req.unique)
        if flags:  # pyfuse3's signature has no flags: check them as libfuse's users must
            try:
                await self.ops.getxattr(req.nodeid, req.name, ctx)
                exists = True
            except FUSEError as e:
                if e.errno != errno.ENODATA:
                    raise
                exists = False
            if exists and flags & os.XATTR_CREATE:
                raise FUSEError(errno.EEXIST)
            if not exists and flags & os.XATTR_REPLACE:
                raise FUSEError(errno.ENODATA)
        await self.ops.setxattr(req.nodeid, req.name, bytes(req.value), ctx)
        return rp.reply_empty(req.unique)

    async def _getxattr(self, req: Any) -> Reply:
        if req.nodeid == 1 and req.name == STATS_XATTR:
            value = self.counters.to_json()
        else:
            value = await self.ops.getxattr(req.nodeid, req.name, self._ctx(req))
        return self._sized(req, value)

    async def _listxattr(self, req: Any) -> Reply:
        names = await self.ops.listxattr(req.nodeid, self._ctx(req))
        return self._sized(req, b"".join(n + b"\0" for n in names))

    @staticmethod
    def _sized(req: Any, value: bytes) -> Reply:
        if req.size == 0:
            return rp.reply_xattr_size(req.unique, len(value))
        if len(value) > req.size:
            raise FUSEError(errno.ERANGE)
        return rp.reply_data(req.unique, value)

    async def _removexattr(self, req: Any) -> Reply:
        await self.ops.removexattr(req.nodeid, req.name, self._ctx(req))
        return rp.reply_empty(req.unique)

    async def _flush(self, req: Any) -> Reply:
        await self.ops.flush(req.fh)
        return rp.reply_empty(req.unique)

    async def _opendir(self, req: Any) -> Reply:
        fh = await self.ops.opendir(req.nodeid, self._ctx(req))
        return rp.reply_open(req.unique, fh, 0, 0)

    async def _readdir(self, req: Any) -> Reply:
        plus = req.opcode == abi.Opcode.READDIRPLUS
        token = _DirToken(req.size, plus)
        await self.ops.readdir(req.fh, req.offset, token)
        if not plus and token.added:
            # pyfuse3 filesystems count a lookup per entry they return; a plain READDIR
            # creates no kernel references, so give those lookups back.
            await self.ops.forget([(ino, 1) for ino in token.added])
        return rp.reply_data(req.unique, token.buf.to_bytes())

    async def _releasedir(self, req: Any) -> Reply:
        await self.ops.releasedir(req.fh)
        return rp.reply_empty(req.unique)

    async def _access(self, req: Any) -> Reply:
        ok = await self.ops.access(req.nodeid, req.mask, self._ctx(req))
        if not ok:
            raise FUSEError(errno.EACCES)
        return rp.reply_empty(req.unique)

    async def _fallocate(self, req: Any) -> Reply:
        fn = getattr(self.ops, "fallocate", None)
        if fn is None:
            raise FUSEError(errno.EOPNOTSUPP)
        await fn(req.fh, req.mode, req.offset, req.length)
        return rp.reply_empty(req.unique)

    async def _lseek(self, req: Any) -> Reply:
        fn = getattr(self.ops, "lseek", None)
        if fn is None or (self.negotiated is not None and self.negotiated.writeback_cache):
            # Under the writeback cache written data may still be dirty in the kernel, where
            # the backing file cannot show it (the kernel does not flush before LSEEK): with
            # ENOSYS the kernel answers SEEK_DATA/SEEK_HOLE itself, from its own size, with no
            # holes, which is never wrong.
            raise FUSEError(errno.ENOSYS)
        off = await fn(req.fh, req.offset, req.whence)
        return rp.reply_lseek(req.unique, off)

    async def _copy_file_range(self, req: Any) -> Reply:
        fn = getattr(self.ops, "copy_file_range", None)
        if fn is None:
            raise FUSEError(errno.ENOSYS)
        n = await fn(req.fh_in, req.off_in, req.fh_out, req.off_out, req.length, req.flags)
        return rp.reply_write(req.unique, n)


# --------------------------------------------------------------------- entry point


def run_session(
    ops: Any,
    mountpoint: str,
    opts: Any,
    ready: Callable[[], None] | None = None,
    debug: bool = False,
) -> None:
    """Mount ``mountpoint``, serve ``ops`` until unmounted or signalled, then clean up."""
    from fusefs.session import mount as mnt

    device = mnt.open_mount(mountpoint, opts)
    session = Session(
        ops,
        device.fd,
        mountpoint,
        data=getattr(opts, "data", "auto"),
        writeback_cache=getattr(opts, "writeback_cache", False),
        max_pages=getattr(opts, "max_pages", 256),
        max_background=getattr(opts, "max_background", 64) or 64,
        read_ahead_kb=getattr(opts, "read_ahead_kb", 1016),
        idle_spin_us=getattr(opts, "idle_spin_us", 50),
        ready=ready,
        debug=debug,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for signum in sigs:
                        log.info("signal %d: unmounting %s", signum, mountpoint)
                        await trio.to_thread.run_sync(
                            partial(
                                mnt.unmount_or_detach,
                                mountpoint,
                                via_fusermount=device.via_fusermount,
                            )
                        )

            nursery.start_soon(on_signals)
            await session.serve()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        with contextlib.suppress(OSError):
            os.close(device.fd)
