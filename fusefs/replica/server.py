"""``fusefs serve``: receive replication connections and apply them to REPLICA_DIR.

Each connection is one task: handshake (HMAC challenge-response, see docs/protocol.md), then
OP frames applied in order with :class:`~fusefs.replica.apply.ReplicaDir`, DATA payloads moved
from the socket into the file with ``splice`` a whole piece (896 KiB) at a time, never a piece
that was cut short (:class:`~fusefs.replica.transport.PayloadStage`), acknowledgements batched
when the input is drained (at most every ACK_INTERVAL), and ``syncfs`` before any durable
acknowledgement.  A change or DATA range that cannot be applied is acknowledged as failed (the
client then repairs by comparing the trees), never silently dropped.  The
syncfs runs in a task of its own, so the stream keeps flowing into the page cache meanwhile:
a SYNC only asks for one, and requests that arrive during a syncfs share the next one.  A
connection that sends anything malformed, oversized or unsafe is answered with an ERROR frame and
dropped, with one line in the log; the server and its other connections carry on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from fusefs.replica import wire as w
from fusefs.replica.apply import ReplicaDir, UnsafePathError, split_path
from fusefs.replica.transport import FdTransport, PayloadStage, TransportClosed, tune_socket

__all__ = ["DEFAULT_MAX_CONNECTIONS", "Server", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 16
#: Entries are packed into LIST_REPLY frames up to about this many bytes.
_LIST_FRAME = w.MAX_FRAME // 2
_HANDSHAKE_TIMEOUT = 10.0
#: Plain (not durable) acknowledgements only report progress (lag): at most this often.
ACK_INTERVAL = 0.1


class _Refused(Exception):
    """Drop the connection after telling the peer ``code``/``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Incoming:
    """The DATA frame whose payload is being received (its bytes: ``_Handler.stage``)."""

    seq: int
    path: bytes
    #: the open file; None: dropped (the file is gone) or failed (``error``)
    fd: int | None
    error: str | None = None


@dataclass
class Server:
    """The state shared by every connection of one ``fusefs serve``."""

    replica_dir: str
    key: bytes
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    subtree_per_source: bool = False
    active: int = 0
    #: source name -> cancel scope of the connection currently serving it
    by_source: dict[bytes, trio.CancelScope] = field(default_factory=dict)
    #: without subtree_per_source: the source that first claimed REPLICA_DIR since start
    owner: bytes | None = None
    #: counters, for tests and logs
    connections: int = 0
    refused: int = 0
    ops: int = 0
    failed: int = 0

    async def handle(self, transport: FdTransport, peer: str) -> None:
        """Serve one connection until it ends; never raises (except Cancelled)."""
        self.connections += 1
        if self.active >= self.max_connections:
            self.refused += 1
            log.warning("%s: refused: too many connections (%d)", peer, self.active)
            conn = w.Connection(w.Role.SERVER, self.key)
            await _send_quietly(transport, conn.send(w.Error(w.E_BUSY, "too many connections")))
            return
        self.active += 1
        try:
            await _Handler(self, transport, peer).run()
        finally:
            self.active -= 1


async def _send_quietly(transport: FdTransport, data: bytes) -> None:
    try:
        with trio.move_on_after(2):
            await transport.send_all(data)
    except (TransportClosed, OSError):
        pass


class _Handler:
    def __init__(self, server: Server, transport: FdTransport, peer: str) -> None:
        self.server = server
        self.t = transport
        self.peer = peer
        self.conn = w.Connection(w.Role.SERVER, server.key)
        self.replica: ReplicaDir | None = None
        self.applied = 0  # highest seq applied and not yet acknowledged (0: none)
        self.acked = 0
        self.incoming: _Incoming | None = None
        self.stage = PayloadStage(transport)
        self._last_ack = 0.0
        #: the highest seq a SYNC asked to make durable
        self._sync_wanted = 0
        self._sync_wake = trio.Event()
        #: this connection may change the tree (see _claim_tree)
        self._may_write = False

    async def run(self) -> None:
        try:
            with trio.CancelScope() as scope:
                await self._handshake()
                await self._claim_source(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._syncer)
                        await self._loop()
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    raise _only(group) from None
        except w.WireError as e:
            self.server.refused += 1
            log.warning("%s: dropped: %s", self.peer, e)
            await _send_quietly(self.t, w.encode_frame(w.Error(e.code, str(e))))
        except _Refused as e:
            self.server.refused += 1
            log.warning("%s: dropped: %s", self.peer, e)
            await _send_quietly(self.t, w.encode_frame(w.Error(e.code, str(e))))
        except TransportClosed as e:
            log.info("%s: connection lost: %s", self.peer, e)
        except OSError as e:
            log.warning("%s: dropped after an I/O error: %s", self.peer, e)
            await _send_quietly(self.t, w.encode_frame(w.Error(w.E_INTERNAL, str(e))))
        finally:
            if self.incoming is not None and self.incoming.fd is not None:
                os.close(self.incoming.fd)  # a payload cut short: its staged piece is dropped
            self.stage.close()
            if self.replica is not None:
                self.replica.close()
            src = self.conn.source
            if self.server.by_source.get(src) is getattr(self, "_scope", None):
                self.server.by_source.pop(src, None)

    async def _next(self) -> w.Event:
        """The next event, reading more when needed; EOF is TransportClosed."""
        while True:
            ev = self.conn.next_event()
            if not isinstance(ev, w._NeedData):
                return ev
            data = await self.t.recv()
            if not data:
                raise TransportClosed("peer closed the connection")
            self.conn.receive_data(data)

    async def _handshake(self) -> None:
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            ev = await self._next()
            if not isinstance(ev, w.Hello):
                raise _Refused(w.E_PROTOCOL, "expected HELLO")
            await self.t.send_all(self.conn.challenge())
            ev = await self._next()
            if not isinstance(ev, w.Auth):
                raise _Refused(w.E_AUTH, "expected AUTH")
            await self.t.send_all(self.conn.auth_ok())

    async def _claim_source(self, scope: trio.CancelScope) -> None:
        source = self.conn.source
        root = self.server.replica_dir
        if self.server.subtree_per_source:
            try:
                parts = split_path(source)
            except UnsafePathError:
                parts = []
            if len(parts) != 1:
                raise _Refused(w.E_BAD_PATH, f"unusable source name {source!r}")
            root = os.path.join(root, os.fsdecode(parts[0]))
        self._scope = scope
        self.replica = ReplicaDir(root, create=self.server.subtree_per_source)
        log.info("%s: source %r authenticated; replicating into %s", self.peer, source, root)

    def _claim_tree(self) -> None:
        """Before the first change a connection applies to a shared REPLICA_DIR (no
        ``--subtree-per-source``): two sources in one tree would delete each other's files at
        every start's comparison, so the first source to change it keeps it for this server's
        lifetime.  Reading (verify, restore) is open to any authenticated source."""
        self._may_write = True
        source = self.conn.source
        # A connection of the same source that is still open is a mount's that reconnected
        # (the old one is dead or dying): it goes now.  Readers (verify, restore) never get
        # here, so they do not knock a live mount off.
        old = self.server.by_source.get(source)
        if old is not None and old is not self._scope:
            log.info("%s: source %r reconnected; dropping its old connection", self.peer, source)
            old.cancel()
        self.server.by_source[source] = self._scope
        if self.server.subtree_per_source:
            return
        owner = self.server.owner
        if owner is None:
            self.server.owner = source
        elif owner != source:
            o = os.fsdecode(owner)
            raise _Refused(
                w.E_BUSY,
                f"{self.server.replica_dir} holds the replica of source {o!r}, not "
                f"{os.fsdecode(source)!r}: connect as --source {o}, or serve each source "
                "into a directory of its own (fusefs serve --subtree-per-source)",
            )

    async def _loop(self) -> None:
        assert self.replica is not None
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, w._NeedData):
                if self.conn.payload_left:
                    self.conn.payload_received(await self.stage.receive(self.conn.payload_left))
                    continue
                if (
                    self.applied > self.acked
                    and trio.current_time() - self._last_ack >= ACK_INTERVAL
                ):
                    await self._ack(self.applied)
                data = await self.t.recv()
                if not data:
                    raise TransportClosed("peer closed the connection")
                self.conn.receive_data(data)
                continue
            if isinstance(ev, w.Bye):
                if self.applied > self.acked:
                    await self._ack(self.applied)
                log.info("%s: said goodbye", self.peer)
                return
            if isinstance(ev, w.Error):
                log.warning("%s: peer reported error %d: %s", self.peer, ev.code, ev.message)
                return
            await self._dispatch(ev)

    async def _send(self, ev: w.Event) -> None:
        async with self.t.send_lock:  # the syncer task sends too
            await self.t.send_all(self.conn.send(ev))

    async def _ack(self, seq: int, durable: bool = False, failed: bool = False) -> None:
        await self._send(w.Ack(seq, durable, failed))
        if not failed:
            self.acked = max(self.acked, seq)
            self._last_ack = trio.current_time()

    async def _syncer(self) -> None:
        """syncfs whenever a SYNC asked for it, then acknowledge durably (see module doc)."""
        assert self.replica is not None
        while True:
            await self._sync_wake.wait()
            self._sync_wake = trio.Event()
            seq = self._sync_wanted  # every SYNC gets an answer, even one that repeats a seq
            await trio.to_thread.run_sync(self.replica.sync)
            await self._ack(seq, durable=True)

    def _refuse_path(self, path: bytes) -> NoReturn:
        raise _Refused(w.E_BAD_PATH, f"unsafe path {path!r}")  # logged once, by run()

    def _data_failed(self, inc: _Incoming, e: OSError) -> None:
        """``inc`` could not be written (the rest of its payload is dropped): logged once."""
        self.server.failed += 1
        inc.error = e.strerror or str(e)
        log.warning("%s: data %d for %r failed: %s", self.peer, inc.seq, inc.path, inc.error)

    async def _dispatch(self, ev: w.Event) -> None:
        replica = self.replica
        assert replica is not None
        if isinstance(ev, w.Op | w.Data) and not self._may_write:
            self._claim_tree()
        if isinstance(ev, w.Op):
            self.server.ops += 1
            try:
                replica.apply(ev.change)
            except UnsafePathError:
                self._refuse_path(_first_path(ev.change))
            except (ValueError, OverflowError) as e:  # the codec checks ranges; just in case
                raise _Refused(w.E_PROTOCOL, f"op {ev.seq}: invalid value: {e}") from None
            except OSError as e:
                self.server.failed += 1
                log.warning("%s: op %d %r failed: %s", self.peer, ev.seq, ev.change, e)
                if self.applied > self.acked:
                    await self._ack(self.applied)
                await self._ack(ev.seq, failed=True)
            self.applied = max(self.applied, ev.seq)
        elif isinstance(ev, w.Data):
            self.server.ops += 1
            new = self.incoming = _Incoming(ev.seq, ev.path, None)
            try:
                # None: the file is gone (a later change removed it); the range is dropped
                new.fd = replica.open_for_write(ev.path)
            except UnsafePathError:
                self._refuse_path(ev.path)
            except OSError as e:
                self._data_failed(new, e)
            self.stage.start(new.fd, ev.offset)
        elif isinstance(ev, w.DataChunk):
            self.stage.add(ev.data)
        elif isinstance(ev, w.DataEnd):
            done = self.incoming
            assert done is not None
            error = self.stage.finish()
            self.incoming = None
            if done.fd is not None:
                os.close(done.fd)
            if error is not None and done.error is None:
                self._data_failed(done, error)
            if done.error is not None:
                if self.applied > self.acked:
                    await self._ack(self.applied)
                await self._ack(ev.seq, failed=True)
            self.applied = max(self.applied, ev.seq)
        elif isinstance(ev, w.Sync):
            # everything before this frame is applied; the next syncfs makes it durable
            self.applied = max(self.applied, ev.seq)
            self._sync_wanted = max(self._sync_wanted, self.applied)
            self._sync_wake.set()
        elif isinstance(ev, w.List):
            await self._list(ev.req)
        elif isinstance(ev, w.Checksum):
            try:
                found, size, digests = await trio.to_thread.run_sync(
                    replica.checksum, ev.path, ev.block_size
                )
            except UnsafePathError:
                self._refuse_path(ev.path)
            if len(digests) > w.MAX_CHECKSUM_BLOCKS:  # ReplicaDir.checksum never gives more
                digests = ()
            await self._send(w.ChecksumReply(ev.req, found, size, digests))
        elif isinstance(ev, w.Read):
            await self._read(ev)
        else:
            raise _Refused(w.E_PROTOCOL, f"unexpected {type(ev).__name__}")

    async def _list(self, req: int) -> None:
        assert self.replica is not None
        entries = await trio.to_thread.run_sync(lambda: list(self.replica.list()))  # type: ignore[union-attr]
        batch: list[w.Entry] = []
        size = 0
        for e in entries:
            n = w.entry_size(e)
            if batch and size + n > _LIST_FRAME:
                await self._send(w.ListReply(req, tuple(batch), False))
                batch, size = [], 0
            if n <= _LIST_FRAME:
                batch.append(e)
                size += n
        await self._send(w.ListReply(req, tuple(batch), True))

    async def _read(self, ev: w.Read) -> None:
        assert self.replica is not None
        try:
            fd = self.replica.open_for_read(ev.path)
        except UnsafePathError:
            self._refuse_path(ev.path)
        if fd is None:
            await self._send(w.Data(ev.req, ev.path, ev.offset, 0))
            return
        try:
            size = os.fstat(fd).st_size
            length = max(0, min(ev.length, size - ev.offset))
            async with self.t.send_lock:
                await self.t.send_all(self.conn.send(w.Data(ev.req, ev.path, ev.offset, length)))
                sent = await self.t.send_file(fd, ev.offset, length)
                if sent < length:  # the file shrank: pad, as announced
                    await self.t.send_all(bytes(length - sent))
                self.conn.payload_sent(length)
        finally:
            os.close(fd)


def _only(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a task group ended with (a group of several stays a group)."""
    leaves: list[BaseException] = []
    todo: list[BaseException] = [group]
    while todo:
        e = todo.pop()
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        else:
            leaves.append(e)
    return leaves[0] if len(leaves) == 1 else group


def _first_path(change: Any) -> bytes:
    path = getattr(change, "path", None) or getattr(change, "old", None)
    return path if isinstance(path, bytes) else b"?"


async def serve(
    replica_dir: str,
    key: bytes,
    listen: tuple[str, int] = ("127.0.0.1", 0),
    *,
    stdio: bool = False,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    subtree_per_source: bool = False,
    server: Server | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve replication into ``replica_dir`` until cancelled (or, with ``stdio``, until the
    one connection on stdin/stdout ends).  ``task_status.started`` gets the bound port."""
    srv = server or Server(replica_dir, key, max_connections, subtree_per_source)
    os.makedirs(replica_dir, exist_ok=True)
    if stdio:
        transport = FdTransport(0, 1)
        task_status.started(0)
        try:
            await srv.handle(transport, "stdio")
        except Exception:  # a bug: logged like over TCP (one() below), not a crash
            log.exception("stdio: unexpected error")
        finally:
            transport.close()
        return
    host, port = listen
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=64)
    bound = listeners[0].socket.getsockname()[1]
    log.info("serving %s on %s:%d", replica_dir, host, bound)
    task_status.started(bound)

    async def one(stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        async with stream:
            tune_socket(stream.socket)
            transport = FdTransport(stream.socket.fileno())
            try:
                await srv.handle(transport, peer)
            except Exception:  # a bug must not take the server down
                log.exception("%s: unexpected error", peer)
            finally:
                transport.close()

    await trio.serve_listeners(one, listeners)
