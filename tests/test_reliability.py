"""Reliability (issue #4): randomized equivalence with a plain directory, concurrency, crash
safety, resource bounds and permission semantics as another user.

The equivalence tests apply the same operations (tests/reliability_ops.py) to a tree on the
mount and to a plain directory on the same filesystem as the backing directory, and compare
every outcome and, at the end, both whole trees and the backing tree.  Short runs here (a few
thousand operations and a hypothesis state machine per data mode); long runs with
``tools/torture``.  Bugs found and not fixed yet are listed in ``reliability_ops.KNOWN_BUGS``
with their regression test below; the random runs leave their triggers out so they keep
looking for other bugs.

Every test is bounded in time: blocking calls on the mount run in threads or subprocesses with
timeouts, and a watchdog aborts the FUSE connection if a run stops making progress.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests import reliability_ops as ro
from tests.mounting import Mount, MountFactory

pytestmark = pytest.mark.reliability

#: (session, data mode) pairs the equivalence tests run on.  pyfuse3's session always copies.
COMBOS = [
    pytest.param("fusefs", "copy", id="fusefs-copy"),
    pytest.param("fusefs", "splice", id="fusefs-splice"),
    pytest.param("fusefs", "passthrough", id="fusefs-passthrough"),
    pytest.param("pyfuse3", "copy", id="pyfuse3"),
]
#: Seeds of the short random runs (FUSEFS_RELIABILITY_SEED adds one more).
SEEDS = [1, 2, 3]
if os.environ.get("FUSEFS_RELIABILITY_SEED"):
    SEEDS.append(int(os.environ["FUSEFS_RELIABILITY_SEED"]))
RANDOM_OPS = 1500
STATS_XATTR = "user.fusefs.stats"


# --- helpers ---------------------------------------------------------------------------------


def mount_mode(
    mount_factory: MountFactory,
    session: str,
    mode: str,
    *,
    options: tuple[str, ...] = (),
    **kw: Any,
) -> Mount:
    """A mount of ``backing`` on ``session`` with data mode ``mode``, checked to be in effect.

    Skips only when passthrough was asked for and the kernel did not grant it.
    """
    opts = (f"data={mode}", *options) if session == "fusefs" else options
    mount = mount_factory(options=opts, session_name=session, **kw)
    if session == "fusefs":
        stats = json.loads(os.getxattr(mount.mountpoint, STATS_XATTR))
        if stats["data_mode"] != mode:
            reason = stats.get("data_mode_reason", "")
            if mode == "passthrough" and "kernel did not grant" in reason:
                pytest.skip(f"this kernel lacks FUSE_PASSTHROUGH: {reason}")
            pytest.fail(f"asked for data={mode}, the session uses {stats['data_mode']}: {reason}")
    return mount


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A plain directory on the same filesystem as ``backing`` (the reference)."""
    path = tmp_path / "plain"
    path.mkdir()
    return path


@contextlib.contextmanager
def watchdog(mount: Mount, timeout: float = 120.0) -> Iterator[ro.Watchdog]:
    """Abort the mount's connection if the test stops kicking for ``timeout`` seconds."""
    with ro.Watchdog(mount.connection, timeout) as dog:
        yield dog
    assert not dog.fired, f"no progress for {timeout:.0f} s: the FUSE connection was aborted"


def run_bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging) if it does not return in time."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish within {timeout:.0f} s")
    if error:
        raise error[0]
    return result[0] if result else None


def stats_of(mnt: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mnt, STATS_XATTR))


# --- regression tests for bugs the random runs found -------------------------------------------


def test_setxattr_create_replace_flags(mnt: Path, backing: Path) -> None:
    """XATTR_CREATE fails with EEXIST on an existing attribute, XATTR_REPLACE with ENODATA on
    a missing one (found by the random runs: our session dropped SETXATTR's flags)."""
    p = mnt / "f"
    p.write_bytes(b"")
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.x", b"1", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    assert "user.x" not in os.listxattr(backing / "f")
    os.setxattr(p, "user.x", b"1", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.x", b"2", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    os.setxattr(p, "user.x", b"3", os.XATTR_REPLACE)
    assert os.getxattr(backing / "f", "user.x") == b"3"


@pytest.mark.parametrize(
    ("session", "mode"),
    [COMBOS[0], COMBOS[1], COMBOS[3]],
    indirect=["session"],
)
def test_mmap_write_through_append_handle(
    mount_factory: MountFactory, session: str, mode: str, backing: Path
) -> None:
    """Pages written through a shared mapping of a file opened O_APPEND reach the backing
    file at their offset (found by the random runs: the mirror opened the backing file
    O_APPEND too, so the kernel's page writeback, which carries offsets, appended instead)."""
    mnt = mount_mode(mount_factory, session, mode).mountpoint
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.ftruncate(fd, 8192)
        with mmap.mmap(fd, 4096) as m:
            m[100:105] = b"hello"
            m.flush()
    finally:
        os.close(fd)
    data = (backing / "f").read_bytes()
    assert len(data) == 8192, f"the backing file grew to {len(data)} bytes"
    assert data[100:105] == b"hello"
    assert (mnt / "f").read_bytes() == data


@pytest.mark.parametrize("session", ["fusefs"], indirect=True)
def test_passthrough_second_open(mount_factory: MountFactory, session: str) -> None:
    """With data=passthrough a file can be opened while it is open already (found by the
    random runs: every open registered its own backing id, and the kernel refuses a second
    backing file for an inode with EIO)."""
    mnt = mount_mode(mount_factory, session, "passthrough").mountpoint
    p = mnt / "f"
    p.write_bytes(b"abc")
    fd = os.open(p, os.O_RDONLY)
    try:
        fd2 = os.open(p, os.O_RDWR)
        try:
            os.pwrite(fd2, b"X", 1)
            assert os.pread(fd, 3, 0) == b"aXc"
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


# --- randomized equivalence -------------------------------------------------------------------


def _fail_with_reproducer(
    result: ro.RunResult, mnt: Path, plain: Path, backing: Path, what: str
) -> None:
    assert result.mismatch is not None
    small = ro.minimize(result, mnt, plain, backing, budget=60)
    again = ro.replay(small, mnt, plain, backing, "reproduce", result.avoid)
    pytest.fail(
        f"{what}, seed {result.seed}: {result.mismatch}\n"
        f"minimal reproducer ({len(small)} of {len(result.ops)} operations; replayed: {again}):\n"
        + ro.format_reproducer(small, result.seed)
    )


@pytest.mark.parametrize(("session", "mode"), COMBOS, indirect=["session"])
def test_random_equivalence(
    mount_factory: MountFactory, session: str, mode: str, plain: Path, backing: Path
) -> None:
    """Seeded random operation sequences give the same results on the mount as on a plain
    directory, and leave the same trees (through the mount and in the backing directory)."""
    mount = mount_mode(mount_factory, session, mode)
    avoid = ro.avoid_for(session, mode)
    with watchdog(mount) as dog:
        for seed in SEEDS:
            result = ro.random_run(
                mount.mountpoint, plain, backing, seed, RANDOM_OPS, check_every=250,
                progress=lambda _: dog.kick(), avoid=avoid,
            )  # fmt: skip
            dog.kick()
            if result.mismatch is not None:
                _fail_with_reproducer(result, mount.mountpoint, plain, backing, f"{session}/{mode}")


# The hypothesis state machine: the same operations as rules, shrunk by hypothesis itself.

# Existing names (see populate()) more often than missing ones.
PATHS = st.sampled_from(
    ["f0", "f0", "f0", "d0/f1", "d0/f1", "d0/f1", "d0", "d0", "f1", "d0/f0", "d0/d1",
     "d0/d1/f0", "f0/x", "l0"]
)  # fmt: skip
SLOTS = st.sampled_from([0, 0, 1, 1, 2])
OFFSETS = st.one_of(
    st.integers(0, 3 * ro.PAGE),
    st.sampled_from([ro.MiB - 1, ro.MiB, ro.MiB + 1, 2 * ro.MiB - 7, ro.PAGE, ro.PAGE - 1]),
    st.integers(0, 3 * ro.MiB),
)
SIZES = st.one_of(
    st.integers(0, 3 * ro.PAGE),
    st.sampled_from([ro.PAGE, ro.PAGE + 1, ro.MiB, ro.MiB + 5]),
    st.integers(0, 300 * ro.KiB),
)
MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o1777, 0o000])
ACCESS = st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR])
EXTRA_FLAGS = st.sets(st.sampled_from([os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND]))
SEEDS32 = st.integers(0, 2**32 - 1)
XATTRS = st.sampled_from(ro.XATTR_NAMES)


class EquivalenceMachine(RuleBasedStateMachine):
    """Each rule is one engine operation; every step compares outcomes, every few steps the
    trees.  Configured per mount by :func:`machine_for`."""

    mount_dir: ClassVar[Path]
    plain_dir: ClassVar[Path]
    backing_dir: ClassVar[Path]
    avoid: ClassVar[frozenset[str]] = frozenset()
    dog: ClassVar[ro.Watchdog | None] = None
    _counter: ClassVar[Iterator[int]]

    def __init__(self) -> None:
        super().__init__()
        tag = f"hyp-{next(self._counter)}"
        self.tags = (self.mount_dir / tag, self.plain_dir / tag)
        self.engine = ro.Engine(
            self.mount_dir / tag, self.plain_dir / tag, backing_root=self.backing_dir / tag,
            check_every=0, close_before_check="passthrough-reopen" in self.avoid,
        )  # fmt: skip
        self.ops: list[ro.Op] = []

    def do(self, *op: Any) -> None:
        clean = ro.sanitize(op, self.avoid)
        if clean is None:
            return
        self.ops.append(clean)
        if self.dog is not None:
            self.dog.kick()
        found = self.engine.step(clean)
        assert found is None, f"{found}\n{ro.format_reproducer(self.ops)}"

    @initialize(size0=SIZES, size1=SIZES, seed=SEEDS32)
    def populate(self, size0: int, size1: int, seed: int) -> None:
        """Start from a small tree with two open files, so that most rules have a target."""
        self.do("mkdir", "d0", 0o755)
        self.do("open", 0, "f0", os.O_RDWR | os.O_CREAT, 0o644)
        self.do("pwrite", 0, 0, size0, seed)
        self.do("open", 1, "d0/f1", os.O_RDWR | os.O_CREAT, 0o600)
        self.do("pwrite", 1, 0, size1, seed + 1)

    @rule(slot=SLOTS, path=PATHS, access=ACCESS, extra=EXTRA_FLAGS, mode=MODES)
    def open(self, slot: int, path: str, access: int, extra: set[int], mode: int) -> None:
        flags = access
        for bit in extra:
            flags |= bit
        self.do("open", slot, path, flags, mode)

    @rule(slot=SLOTS)
    def close(self, slot: int) -> None:
        self.do("close", slot)

    @rule(slot=SLOTS, off=OFFSETS, size=SIZES)
    def pread(self, slot: int, off: int, size: int) -> None:
        self.do("pread", slot, off, size)

    @rule(slot=SLOTS, off=OFFSETS, size=SIZES, seed=SEEDS32)
    def pwrite(self, slot: int, off: int, size: int, seed: int) -> None:
        self.do("pwrite", slot, off, size, seed)

    @rule(slot=SLOTS, size=SIZES, seed=SEEDS32)
    def write(self, slot: int, size: int, seed: int) -> None:
        self.do("write", slot, size, seed)

    @rule(slot=SLOTS, size=SIZES)
    def read(self, slot: int, size: int) -> None:
        self.do("read", slot, size)

    @rule(slot=SLOTS, off=OFFSETS, whence=st.sampled_from([0, 1, 2, 3, 4]))
    def lseek(self, slot: int, off: int, whence: int) -> None:
        self.do("lseek", slot, off, whence)

    @rule(slot=SLOTS, size=OFFSETS)
    def ftruncate(self, slot: int, size: int) -> None:
        self.do("ftruncate", slot, size)

    @rule(path=PATHS, size=OFFSETS)
    def truncate(self, path: str, size: int) -> None:
        self.do("truncate", path, size)

    @rule(slot=SLOTS, mode=st.sampled_from(ro.FALLOC_MODES), off=OFFSETS, size=SIZES)
    def fallocate(self, slot: int, mode: int, off: int, size: int) -> None:
        self.do("fallocate", slot, mode, off, size)

    @rule(slot=SLOTS, datasync=st.integers(0, 1))
    def fsync(self, slot: int, datasync: int) -> None:
        self.do("fsync", slot, datasync)

    @rule(slot=SLOTS, off=OFFSETS, size=SIZES)
    def mmap_read(self, slot: int, off: int, size: int) -> None:
        self.do("mmap_read", slot, off, size)

    @rule(slot=SLOTS, off=OFFSETS, size=SIZES, seed=SEEDS32)
    def mmap_write(self, slot: int, off: int, size: int, seed: int) -> None:
        self.do("mmap_write", slot, off, size, seed)

    @rule(src=SLOTS, off_in=OFFSETS, dst=SLOTS, off_out=OFFSETS, size=SIZES)
    def copy_file_range(self, src: int, off_in: int, dst: int, off_out: int, size: int) -> None:
        self.do("copy_file_range", src, off_in, dst, off_out, size)

    @rule(src=PATHS, dst=PATHS, flags=st.sampled_from([0, 0, ro.RENAME_NOREPLACE,
                                                       ro.RENAME_EXCHANGE]))  # fmt: skip
    def rename(self, src: str, dst: str, flags: int) -> None:
        self.do("rename", src, dst, flags)

    @rule(src=PATHS, dst=PATHS)
    def link(self, src: str, dst: str) -> None:
        self.do("link", src, dst)

    @rule(dest=st.sampled_from(["f0", "d0", "nowhere", "l0"]), path=PATHS)
    def symlink(self, dest: str, path: str) -> None:
        self.do("symlink", dest, path)

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self.do("unlink", path)

    @rule(path=PATHS, mode=st.sampled_from([0o755, 0o700, 0o1777, 0o2755]))
    def mkdir(self, path: str, mode: int) -> None:
        self.do("mkdir", path, mode)

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        self.do("rmdir", path)

    @rule(path=PATHS, mode=MODES)
    def chmod(self, path: str, mode: int) -> None:
        self.do("chmod", path, mode)

    @rule(path=PATHS, atime=st.integers(0, 2**62), mtime=st.integers(0, 2**62))
    def utime(self, path: str, atime: int, mtime: int) -> None:
        self.do("utime", path, atime, mtime)

    @rule(path=PATHS)
    def stat(self, path: str) -> None:
        self.do("stat", path)

    @rule(path=PATHS)
    def listdir(self, path: str) -> None:
        self.do("listdir", path)

    @rule(path=PATHS)
    def readlink(self, path: str) -> None:
        self.do("readlink", path)

    @rule(
        path=PATHS, name=XATTRS, size=st.integers(0, 300), seed=SEEDS32,
        flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    )  # fmt: skip
    def setxattr(self, path: str, name: str, size: int, seed: int, flags: int) -> None:
        self.do("setxattr", path, name, size, seed, flags)

    @rule(path=PATHS, name=XATTRS)
    def getxattr(self, path: str, name: str) -> None:
        self.do("getxattr", path, name)

    @rule(path=PATHS)
    def listxattr(self, path: str) -> None:
        self.do("listxattr", path)

    @rule(path=PATHS, name=XATTRS)
    def removexattr(self, path: str, name: str) -> None:
        self.do("removexattr", path, name)

    @invariant()
    def open_files_agree(self) -> None:
        problems = ro.compare_slots(self.engine.mount, self.engine.plain)
        assert not problems, f"{problems}\n{ro.format_reproducer(self.ops)}"

    def teardown(self) -> None:
        try:
            found = self.engine.check(backing=True)
            assert found is None, f"{found}\n{ro.format_reproducer(self.ops)}"
        finally:
            self.engine.close()
            for root in self.tags:
                ro.remove_tree(str(root))


def machine_for(mount: Path, plain: Path, backing: Path, avoid: frozenset[str]) -> type:
    return type(
        "Equivalence",
        (EquivalenceMachine,),
        {"mount_dir": mount, "plain_dir": plain, "backing_dir": backing, "avoid": avoid,
         "_counter": itertools.count()},
    )  # fmt: skip


@pytest.mark.parametrize(("session", "mode"), COMBOS, indirect=["session"])
def test_equivalence_state_machine(
    mount_factory: MountFactory, session: str, mode: str, plain: Path, backing: Path
) -> None:
    """Hypothesis-driven operation sequences (shrunk by hypothesis on failure)."""
    mount = mount_mode(mount_factory, session, mode)
    machine = machine_for(mount.mountpoint, plain, backing, ro.avoid_for(session, mode))
    with watchdog(mount) as dog:
        machine.dog = dog
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            ),
        )
