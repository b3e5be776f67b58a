"""Helpers for the replica tests (no tests here): tree snapshots and waiting."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import trio

from tests.mounting import is_mounted

KEY = b"test-key-0123456789abcdef"


def snapshot(root: Path, *, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything that replication must preserve, by relative path (dir mtimes excluded)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            if name == "." and dirpath != str(root):
                continue
            p = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
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
                with open(p, "rb") as f:
                    item += (st.st_size, hashlib.sha256(f.read()).hexdigest())
                if mtimes:
                    item += (st.st_mtime_ns,)
            elif stat.S_ISLNK(st.st_mode):
                item += (os.readlink(p),)
            out[rel] = item
    return out


def diff_snapshots(a: dict[str, tuple[object, ...]], b: dict[str, tuple[object, ...]]) -> str:
    lines = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return "\n".join(lines[:20])


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


def same_tree(a: Path, b: Path, *, mtimes: bool = True) -> bool:
    try:
        return snapshot(a, mtimes=mtimes) == snapshot(b, mtimes=mtimes)
    except OSError:
        return False


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
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False)
