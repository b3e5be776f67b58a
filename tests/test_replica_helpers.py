"""Helpers for the replica tests (no tests here): tree snapshots, waiting, and the processes
of an end-to-end run (``fusefs serve`` and a ``fusefs mount -f`` with ``--target``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from tests.mounting import fusefs_env, is_mounted

KEY = b"test-key-0123456789abcdef"

Snapshot = dict[str, tuple[object, ...]]


class LinksDiffer(AssertionError):
    """Two trees hold the same objects but group their names into inodes differently (hard
    links); a class of its own so that a known bug can be marked ``xfail(raises=LinksDiffer)``
    without hiding any other failure of the same test."""


def _lstat_tree(root: Path) -> list[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, lstat) of everything under ``root``, parents first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            if name == "." and dirpath != str(root):
                continue
            p = os.path.normpath(os.path.join(dirpath, name))
            out.append((os.path.relpath(p, root), p, os.lstat(p)))
    return out


def _link_groups(entries: list[tuple[str, str, os.stat_result]]) -> dict[str, tuple[str, ...]]:
    """For each non-directory: every path of the tree that shares its inode, sorted."""
    by_inode: dict[tuple[int, int], list[str]] = {}
    for rel, _, st in entries:
        if not stat.S_ISDIR(st.st_mode):
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
    return {rel: tuple(sorted(g)) for g in by_inode.values() for rel in g}


def link_groups(root: Path) -> set[tuple[str, ...]]:
    """The hard-link structure of a tree: the sets of paths (of two or more) that are one
    inode (grouped by ``(st_dev, st_ino)``)."""
    return {g for g in _link_groups(_lstat_tree(root)).values() if len(g) > 1}


def snapshot(root: Path, *, mtimes: bool = True, links: bool = True) -> Snapshot:
    """Everything that replication must preserve, by relative path: type, owner, xattrs, mode
    (not of symlinks), size and SHA-256 and mtime of regular files, symlink targets, device
    numbers, and (``links``) which other paths of the tree are the same inode (hard links).
    Directory mtimes are excluded (creating an entry changes them on each side)."""
    entries = _lstat_tree(root)
    groups = _link_groups(entries) if links else {}
    out: Snapshot = {}
    for rel, p, st in entries:
        try:
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                )
            )
        except OSError:
            xattrs = ()
        item: tuple[object, ...] = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, xattrs)
        if not stat.S_ISLNK(st.st_mode):
            item += (stat.S_IMODE(st.st_mode),)
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            item += (st.st_size, h.hexdigest())
            if mtimes:
                item += (st.st_mtime_ns,)
        elif stat.S_ISLNK(st.st_mode):
            item += (os.readlink(p),)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            item += (st.st_rdev,)
        if rel in groups:
            item += (("links", groups[rel]),)
        out[rel] = item
    return out


def diff_snapshots(a: Snapshot, b: Snapshot) -> str:
    lines = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return "\n".join(lines[:20])


def assert_same_tree(a: Path, b: Path, *, mtimes: bool = True) -> None:
    """``a`` and ``b`` are equal by :func:`snapshot`; a difference only in the hard-link
    structure raises :class:`LinksDiffer`, any other an ordinary AssertionError."""
    sa, sb = snapshot(a, mtimes=mtimes, links=False), snapshot(b, mtimes=mtimes, links=False)
    assert sa == sb, f"{a} != {b}:\n" + diff_snapshots(sa, sb)
    la, lb = link_groups(a), link_groups(b)
    if la != lb:
        raise LinksDiffer(
            f"hard links of {a} and {b} differ:\n only in {a.name}: {sorted(la - lb)}"
            f"\n only in {b.name}: {sorted(lb - la)}"
        )


async def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await trio.sleep(0.05)


def wait_until_sync(cond: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


def same_tree(a: Path, b: Path, *, mtimes: bool = True, links: bool = True) -> bool:
    try:
        return snapshot(a, mtimes=mtimes, links=links) == snapshot(b, mtimes=mtimes, links=links)
    except OSError:
        return False


# -- processes -------------------------------------------------------------------------------

#: How long a replica may take to converge (the periodic repair runs every 30 s at most).
CONVERGE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusefs", *args],
        capture_output=True,
        text=True,
        env=fusefs_env(),
        timeout=timeout,
        check=False,
    )


class Serve:
    """A ``fusefs serve REPLICA`` on a free loopback port (``start``, ``kill9``, ``stop``)."""

    def __init__(
        self,
        tmp: Path,
        replica: Path,
        key_file: Path,
        name: str = "serve",
        extra: Sequence[str] = (),
    ) -> None:
        self.replica = replica
        self.key_file = key_file
        self.extra = tuple(extra)  # more `fusefs serve` arguments
        self.port = free_port()
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "fusefs.replica.cli", "serve", str(self.replica),
            "--listen", self.address, "--key-file", str(self.key_file), "-v", *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=fusefs_env())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError("fusefs serve did not start:\n" + self.log.read_text())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()


class MountProcess:
    """A ``fusefs mount -f`` daemon for the replica tests, always unmounted by ``close()``
    (``fusermount3 -u``, then ``-uz`` and a kill if it does not exit)."""

    mountpoint: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def _start(self, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 15
        while not is_mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError("mount failed:\n" + self.log.read_text())
            time.sleep(0.05)

    def close(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, timeout=30)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False, timeout=30)
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False, timeout=30)


class Mounted(MountProcess):
    """``fusefs mount -f BACKING TMP/mnt --target ...`` for one serve or several (one
    ``--target`` each), ``-o data=DATA``, ``--replicate REPLICATE``, ``--source e2e``."""

    def __init__(
        self,
        tmp: Path,
        backing: Path,
        serve: Serve | Sequence[Serve],
        data: str = "auto",
        replicate: str = "async",
    ) -> None:
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.log_dir = tmp / "replog"
        self.log = tmp / "mount.log"
        self.serves = [serve] if isinstance(serve, Serve) else list(serve)
        self.serve = self.serves[0]
        targets = [a for s in self.serves for a in ("--target", s.address)]
        cmd = [
            sys.executable, "-m", "fusefs", "mount", "-f", str(backing),
            str(self.mountpoint), "-o", f"data={data}", *targets,
            "--key-file", str(self.serve.key_file), "--replica-log-dir", str(self.log_dir),
            "--replicate", replicate, "--source", "e2e",
        ]  # fmt: skip
        self._start(cmd, fusefs_env())

    def logs(self) -> str:
        out = "\n--- mount log\n" + self.log.read_text()[-4000:]
        for s in self.serves:
            out += f"\n--- {s.log.name}\n" + s.log.read_text()[-4000:]
        return out


def converge(
    backing: Path,
    replica: Path,
    mounted: Mounted,
    timeout: float = CONVERGE,
    *,
    links: bool = True,
) -> None:
    """Wait until ``replica`` equals ``backing`` by :func:`snapshot` (whole tree, SHA-256 of
    every file, and unless ``links=False`` hard links); fail with the differences and logs."""
    try:
        wait_until_sync(
            lambda: same_tree(backing, replica, links=links), timeout, "the replica to converge"
        )
    except AssertionError:
        a, b = snapshot(backing, links=links), snapshot(replica, links=links)
        raise AssertionError(diff_snapshots(a, b) + mounted.logs()) from None


# -- replication status ---------------------------------------------------------------------


def replication_status(mountpoint: Path) -> list[dict[str, Any]]:
    """``fusefs status MOUNTPOINT --json``: one dict per target (see ReplicationSink.status)."""
    r = run_cli("status", str(mountpoint), "--json", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    states: list[dict[str, Any]] = json.loads(r.stdout)
    return states


def settled_status(mounted: Mounted, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The status of every target once each is connected, has nothing pending and no repair
    pending or running (status.json is rewritten at once when a target caught up, and every
    second anyway)."""
    states: list[dict[str, Any]] = []

    def settled() -> bool:
        nonlocal states
        states = replication_status(mounted.mountpoint)
        return len(states) == len(mounted.serves) and all(
            s.get("connected") and s.get("ops_pending") == 0 and not s.get("needs_repair")
            for s in states
        )

    try:
        wait_until_sync(settled, timeout, "the replication status to settle")
    except AssertionError:
        raise AssertionError(f"status: {states}" + mounted.logs()) from None
    return states


def assert_replication_clean(
    mounted: Mounted, *, repairs: int = 1, errors: bool = False
) -> list[dict[str, Any]]:
    """After a scenario: every target applied every change (``failed_changes == 0``) and
    needed no repair beyond the tree comparison at start (``repairs == 1``), and (unless
    ``errors``) saw no error at all.  Without this a broken apply path is masked: a failed
    change makes the sink repair by comparison, and the replica converges all the same."""
    states = settled_status(mounted)
    for s in states:
        problems = []
        if s.get("failed_changes") != 0:
            problems.append(f"failed_changes={s.get('failed_changes')}")
        if s.get("repairs") != repairs:
            problems.append(f"repairs={s.get('repairs')} (expected {repairs})")
        if not errors and s.get("last_error"):
            problems.append(f"last_error={s.get('last_error')!r}")
        assert not problems, f"{s.get('target')}: {', '.join(problems)}\n{s}" + mounted.logs()
    return states
