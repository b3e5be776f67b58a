"""The replication client against a target that misbehaves on purpose (in process, no
network): replays after a lost connection and failed changes under sync replication."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from fusefs.mirror import changes as ch
from fusefs.replica import client
from fusefs.replica.apply import ReplicaDir
from fusefs.replica.client import ReplicationSink
from fusefs.replica.target import LocalTarget, Target, TargetFactory
from fusefs.replica.wire import Ack
from tests.test_replica_helpers import diff_snapshots, snapshot, wait_until

RENAME_EXCHANGE = 2


class Controls:
    """What the flaky target does; the test flips these while the sink runs."""

    def __init__(self) -> None:
        self.durable = True  # answer sync() with a durable ack
        self.fail_once: set[type[ch.Change]] = set()  # fail the first change of these types
        self.connections = 0
        self.current: FlakyTarget | None = None


class FlakyTarget(LocalTarget):
    def __init__(self, replica: ReplicaDir, controls: Controls) -> None:
        super().__init__(replica)
        self.controls = controls
        self.dead = False

    async def apply(self, seq: int, change: ch.Change) -> None:
        if type(change) in self.controls.fail_once:
            self.controls.fail_once.discard(type(change))
            self._acks_in.send_nowait(Ack(seq, failed=True))
            return
        await super().apply(seq, change)

    async def sync(self, seq: int) -> None:
        # a slow disk: the durable ack comes once the test allows it (never after a cut)
        while not self.controls.durable or self.dead:
            await trio.sleep(0.01)
        await super().sync(seq)

    def cut(self) -> None:
        """The connection breaks: everything applied but not acknowledged durable is lost
        to the client's knowledge (the replica keeps it)."""
        self.dead = True
        self._acks_in.close()


def flaky_factory(path: Path, controls: Controls) -> TargetFactory:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Target]:
        replica = ReplicaDir(str(path), create=True)
        controls.connections += 1
        t = FlakyTarget(replica, controls)
        controls.current = t
        try:
            yield t
        finally:
            replica.close()

    return factory


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


async def _sink(tmp: Path, controls: Controls, mode: str, **kw: float) -> ReplicationSink:
    (tmp / "backing").mkdir()
    sink = ReplicationSink(
        tmp / "backing", tmp / "log", flaky_factory(tmp / "replica", controls), mode=mode, **kw
    )
    sink.start()
    return sink


async def test_replayed_exchange_after_a_lost_connection_is_repaired(tmp_path: Path) -> None:
    """A RENAME_EXCHANGE the replica applied but never acknowledged as durable is sent again
    after the reconnect; applied twice it swaps the files back, so the client compares the
    trees after any replay, by checksum where a replayed rename touched (fails without either:
    the replica keeps a and b swapped, and their size and mtime alone do not show it)."""
    controls = Controls()
    sink = await _sink(tmp_path, controls, "async")
    b = tmp_path / "backing"
    try:
        # look-alikes, as cp -a leaves them: same size, same mtime; only the bytes differ
        for name, data, mtime in ((b"a", b"A" * 4000, 1 << 30), (b"b", b"B" * 4000, 1 << 30)):
            (b / name.decode()).write_bytes(data)
            os.utime(b / name.decode(), ns=(mtime, mtime))
            await sink.record(ch.Create(name, 0o644, 0, 0))
            await sink.record(ch.Write(name, 0, len(data)))
        await wait_until(lambda: sink.caught_up, 15, "the files to be durable")
        repairs = sink.repairs
        controls.durable = False
        renameat2(b / "a", b / "b", RENAME_EXCHANGE)
        await sink.record(ch.Rename(b"a", b"b", RENAME_EXCHANGE))
        await wait_until(
            lambda: (tmp_path / "replica/a").read_bytes()[:1] == b"B", 15, "the exchange applied"
        )
        t, token = controls.current, sink._token
        assert t is not None and token is not None
        # the sink's own trio loop runs in its thread: cut there
        await trio.to_thread.run_sync(lambda: trio.from_thread.run_sync(t.cut, trio_token=token))
        controls.durable = True
        await wait_until(lambda: controls.connections == 2, 15, "a reconnect")
        await wait_until(lambda: sink.caught_up, 15, "the replay to be durable")
        a, r = snapshot(b), snapshot(tmp_path / "replica")
        assert a == r, diff_snapshots(a, r)
        assert sink.repairs == repairs + 1
    finally:
        await trio.to_thread.run_sync(sink.close, 0)


async def test_sync_barrier_waits_until_a_failed_change_is_repaired(tmp_path: Path) -> None:
    """In sync mode fsync returns only once the replica holds the change: when the target
    failed to apply it, that is after the repair that puts it there (fails without: the
    barrier returned at the durable ack and the xattr was missing for REPAIR_INTERVAL)."""
    controls = Controls()
    sink = await _sink(tmp_path, controls, "sync")
    b = tmp_path / "backing"
    try:
        (b / "f").write_bytes(b"data")
        await sink.record(ch.Create(b"f", 0o644, 0, 0))
        await sink.record(ch.Write(b"f", 0, 4))
        await wait_until(lambda: sink.repairs == 1 and sink.caught_up, 15, "the initial sync")
        controls.fail_once.add(ch.SetXattr)
        os.setxattr(b / "f", "user.k", b"v")
        await sink.record(ch.SetXattr(b"f", b"user.k", b"v"))
        with trio.fail_after(15):
            await sink.barrier()
        assert sink.failed_changes == 1
        assert os.getxattr(tmp_path / "replica/f", "user.k") == b"v"
    finally:
        await trio.to_thread.run_sync(sink.close, 0)


def _record_in_a_thread(sink: ReplicationSink, changes: list[ch.Change]) -> threading.Thread:
    """Record as the mount's request loop does: a thread of its own, which the sink may hold
    back (blocking it) while the target lags."""

    async def run() -> None:
        for c in changes:
            await sink.record(c)

    t = threading.Thread(target=trio.run, args=(run,), daemon=True)
    t.start()
    return t


async def _initial_sync_done(sink: ReplicationSink) -> None:
    await wait_until(lambda: sink.connected and sink.caught_up, 15, "the initial sync")


async def _writes_a_stalled_target_waits_for(
    sink: ReplicationSink, controls: Controls, mib: int
) -> list[ch.Change]:
    """After the initial sync: a file of ``mib`` MiB in BACKING, the target no longer making
    anything durable, and the 1 MiB Writes of that file (not yet recorded)."""
    await _initial_sync_done(sink)
    (Path(sink.backing) / "f").write_bytes(os.urandom(mib << 20))
    controls.durable = False
    return [ch.Write(b"f", off, 1 << 20) for off in range(0, mib << 20, 1 << 20)]


async def test_a_lagging_target_holds_the_writer_back(tmp_path: Path) -> None:
    """Async mode bounds the lag: once more than max_lag_bytes of writes are not durable on a
    connected target, record() blocks until it catches up (fails without: the writer ran
    ahead by all 8 MiB)."""
    controls = Controls()
    sink = await _sink(tmp_path, controls, "async", max_lag_bytes=2 << 20)
    b = tmp_path / "backing"
    try:
        writes = await _writes_a_stalled_target_waits_for(sink, controls, 8)
        t = _record_in_a_thread(sink, [ch.Create(b"f", 0o644, 0, 0), *writes])
        await trio.sleep(1.0)
        assert t.is_alive(), "the writer was not held back"
        assert sink.status()["bytes_pending"] <= 3 << 20
        controls.durable = True
        await trio.to_thread.run_sync(t.join, 15)
        assert not t.is_alive()
        assert sink.held_back_seconds > 0.5  # held from early in the 1 s above
        await wait_until(lambda: sink.caught_up, 15, "catching up")
        assert (tmp_path / "replica/f").read_bytes() == (b / "f").read_bytes()
    finally:
        controls.durable = True
        await trio.to_thread.run_sync(sink.close, 0)


async def test_a_stuck_target_does_not_hang_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected but making no durable progress (a hung peer): the sink holds the writer back
    for LAG_STALL at most, then lets it run and says why in the status."""
    monkeypatch.setattr(client, "LAG_STALL", 0.5)
    controls = Controls()
    sink = await _sink(tmp_path, controls, "async", max_lag_bytes=1 << 20)
    try:
        writes = await _writes_a_stalled_target_waits_for(sink, controls, 4)
        started = time.monotonic()
        t = _record_in_a_thread(sink, writes)
        await trio.to_thread.run_sync(t.join, 10)
        assert not t.is_alive()
        assert time.monotonic() - started < 5
        assert "no durable progress" in (sink.status()["last_error"] or "")
    finally:
        controls.durable = True
        await trio.to_thread.run_sync(sink.close, 0)


async def test_sync_timeout_fails_the_barrier_with_eio_and_keeps_the_change(
    tmp_path: Path,
) -> None:
    """--sync-timeout: a barrier the target does not confirm in time raises EIO (what fsync
    and close then return); the change stays pending and reaches the target afterwards."""
    controls = Controls()
    sink = await _sink(tmp_path, controls, "sync", sync_timeout=0.5)
    b = tmp_path / "backing"
    try:
        await _initial_sync_done(sink)
        controls.durable = False
        (b / "f").write_bytes(b"late")
        await sink.record(ch.Create(b"f", 0o644, 0, 0))
        await sink.record(ch.Write(b"f", 0, 4))
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            await sink.barrier()
        assert failed.value.errno == errno.EIO
        assert 0.4 < time.monotonic() - started < 5
        assert sink.status()["sync_timeouts"] == 1
        assert "not durable" in (sink.status()["last_error"] or "")
        controls.durable = True
        with trio.fail_after(15):
            await sink.barrier()
        assert (tmp_path / "replica/f").read_bytes() == b"late"
    finally:
        controls.durable = True
        await trio.to_thread.run_sync(sink.close, 0)
