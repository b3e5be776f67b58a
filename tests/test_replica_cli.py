"""``fusefs verify`` / ``fusefs restore``: the progress line (on a real pty, against a real
``fusefs serve``; silent without a terminal), and the default source name (host name and a
hash of BACKING), with two mounts of one host replicating to one ``serve --subtree-per-source``.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.replica import progress as pg
from fusefs.replica.cli import default_source_name
from tests.mounting import fusefs_env
from tests.test_replica_helpers import (
    KEY,
    MountProcess,
    diff_snapshots,
    same_tree,
    snapshot,
    wait_until_sync,
)
from tests.test_replica_helpers import (
    Serve as ServeProcess,
)

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


# -- the progress line, unit ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_redraws_at_most_ten_times_a_second_and_ends_with_a_newline() -> None:
    out, clock = io.StringIO(), Clock()
    p = pg.Progress("verify", enabled=True, stream=out, clock=clock, width=200)
    p.phase("comparing", files_total=4, bytes_total=4 << 20)
    assert out.getvalue() == "\rverify: comparing  0/4 files  0 B/4.0 MiB\x1b[K"
    for _ in range(5):  # within INTERVAL of the last drawing: nothing new
        clock.now += 0.01
        p.refresh()
    assert out.getvalue().count("\r") == 1
    clock.now += 1.0
    p.advance(files=1, nbytes=1 << 20)  # 1 MiB in 1.05 s
    line = out.getvalue().rsplit("\r", 1)[1]
    assert "1/4 files  1.0 MiB/4.0 MiB" in line and "975.2 KiB/s  ETA 0:03" in line
    clock.now += 0.05
    p.partial(512 << 10)  # half of the next file, e.g. from a hashing thread
    p.refresh()
    assert out.getvalue().count("\r") == 2  # too soon
    clock.now += 0.1
    p.refresh()
    assert "1.5 MiB/4.0 MiB" in out.getvalue().rsplit("\r", 1)[1]
    p.advance(files=3, nbytes=3 << 20)
    p.finish()
    final = out.getvalue()
    assert final.endswith("\x1b[K\n")
    want = r"\rverify: comparing  4/4 files  4\.0 MiB/4\.0 MiB  [0-9.]+ MiB/s  in 0:01\x1b\[K\n$"
    assert re.search(want, final), final
    p.finish()  # once only
    assert out.getvalue() == final


def test_progress_off_writes_nothing_and_is_off_without_a_terminal() -> None:
    out = io.StringIO()
    with pg.Progress("restore", enabled=False, stream=out) as p:
        p.phase("listing")
        p.advance(files=3, nbytes=10)
    assert out.getvalue() == ""
    assert not pg.wanted(None, out)  # a StringIO is no terminal
    assert pg.wanted(True, out) and not pg.wanted(False, sys.stderr)
    assert pg.format_bytes(999) == "999 B" and pg.format_bytes(3 << 30) == "3.0 GiB"
    assert pg.format_duration(3725) == "1:02:05" and pg.format_duration(65) == "1:05"


def test_progress_line_is_cut_to_the_terminal_width() -> None:
    out = io.StringIO()
    p = pg.Progress("restore", enabled=True, stream=out, width=20)
    p.phase("restoring", 100000, 1 << 40)
    assert out.getvalue() == "\rrestore: restoring \x1b[K"  # 19 columns: never wraps


# -- default source names, unit ------------------------------------------------------------------


def test_default_source_name_is_per_backing_and_fits_the_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (tmp_path / "link").symlink_to(a)
    host = os.uname().nodename
    na, nb = default_source_name(str(a)), default_source_name(str(b))
    assert na != nb and na.startswith(host + "-") and "/" not in na
    # the same directory however it is named: verify derives what the mount derived
    assert default_source_name(str(tmp_path / "link")) == na
    assert default_source_name(str(a) + "/") == na

    class Uname:
        nodename = "h" * 64 + "/x"

    monkeypatch.setattr(os, "uname", lambda: Uname())
    long = default_source_name(str(a))
    assert len(long.encode()) <= 64 and "/" not in long and long.endswith(na[-13:])


# -- against a real fusefs serve -----------------------------------------------------------------


def fusefs(*args: str) -> list[str]:
    return [sys.executable, "-m", "fusefs", *args]


class Serve(ServeProcess):
    """``fusefs serve --subtree-per-source`` of ``tmp/replica``, started."""

    def __init__(self, tmp: Path) -> None:
        key_file = tmp / "key"
        key_file.write_bytes(KEY)
        super().__init__(tmp, tmp / "replica", key_file, extra=("--subtree-per-source",))
        self.target = self.address
        self.start()

    def args(self) -> list[str]:
        return ["--target", self.target, "--key-file", str(self.key_file)]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    yield s
    s.stop()


def run_on_pty(cmd: list[str], timeout: float = 60) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a pty (stdout a pipe): (status, stdout, what the pty got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=fusefs_env()
    )
    os.close(slave)
    got = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            got += data
        else:
            proc.kill()
            raise AssertionError(f"{cmd} did not finish: {got!r}")
        out = proc.stdout.read().decode() if proc.stdout else ""
        return proc.wait(10), out, got.decode()
    finally:
        os.close(master)
        if proc.stdout:
            proc.stdout.close()


def make_files(root: Path, sizes: list[int]) -> int:
    """Regular files of ``sizes`` in ``root`` (and a subdirectory); their total size."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        (root / ("sub" if i % 2 else ".") / f"f{i}").write_bytes(os.urandom(size))
    os.symlink("f0", root / "link")
    return sum(sizes)


def progress_lines(tty: str, label: str) -> list[str]:
    """The drawings of the progress line (the pty turns "\\n" into "\\r\\n")."""
    assert "\x1b[K" in tty, repr(tty)
    return [d.split("\x1b[K")[0] for d in tty.split("\r") if d.startswith(f"{label}: ")]


def test_verify_and_restore_show_progress_on_a_terminal_only(tmp_path: Path, serve: Serve) -> None:
    backing = tmp_path / "backing"
    sizes = [3 << 20, 5 << 20, 1, 0, 700_000]
    total = make_files(backing, sizes)
    source = default_source_name(str(backing))
    # the replica a mount of BACKING would have made (no --source: the default name)
    shutil.copytree(backing, serve.replica / source, symlinks=True)

    status, out, tty = run_on_pty(fusefs("verify", str(backing), *serve.args()))
    assert status == 0 and out == "identical\n", (out, tty)
    lines = progress_lines(tty, "verify")
    assert lines[0] == "verify: listing", lines
    assert f"verify: comparing  0/{len(sizes)} files  0 B/{pg.format_bytes(total)}" in lines
    want = f"verify: comparing  {len(sizes)}/{len(sizes)} files  " + (
        f"{pg.format_bytes(total)}/{pg.format_bytes(total)}"
    )
    assert lines[-1].startswith(want) and " in 0:" in lines[-1], lines
    assert tty.endswith(lines[-1] + "\x1b[K\r\n"), repr(tty[-200:])  # the final state, ended

    dest = tmp_path / "restored"
    status, out, tty = run_on_pty(fusefs("restore", str(dest), *serve.args(), "--source", source))
    assert status == 0 and out.startswith("restored 8 object(s)"), (out, tty)
    lines = progress_lines(tty, "restore")
    assert lines[0] == "restore: listing", lines
    want = f"restore: restoring  {len(sizes)}/{len(sizes)} files  " + (
        f"{pg.format_bytes(total)}/{pg.format_bytes(total)}"
    )
    assert lines[-1].startswith(want) and " in 0:" in lines[-1], lines
    assert tty.endswith("\x1b[K\r\n"), repr(tty[-200:])
    assert snapshot(dest) == snapshot(backing), diff_snapshots(snapshot(dest), snapshot(backing))

    # --no-progress on a terminal: nothing; --progress into a pipe: the line
    status, out, tty = run_on_pty(fusefs("verify", str(backing), *serve.args(), "--no-progress"))
    assert status == 0 and out == "identical\n" and tty == "", (out, tty)
    r = run(fusefs("verify", str(backing), *serve.args(), "--progress"))
    assert r.returncode == 0 and "verify: comparing  5/5 files" in r.stderr, r.stderr

    # not a terminal: stderr stays clean (scripts, logs)
    r = run(fusefs("verify", str(backing), *serve.args()))
    assert r.returncode == 0 and r.stdout == "identical\n" and r.stderr == "", r.stderr
    shutil.rmtree(dest)
    r = run(fusefs("restore", str(dest), *serve.args(), "--source", source))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # a difference: listed on stdout, the count on stderr, no progress there
    (serve.replica / source / "sub" / "f1").write_bytes(b"tampered")
    r = run(fusefs("verify", str(backing), *serve.args()))
    assert r.returncode == 1 and r.stdout.splitlines() == ["content: sub/f1"], r.stdout
    assert r.stderr == "1 difference(s)\n", r.stderr


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, env=fusefs_env(), timeout=60, check=False
    )


def test_source_errors_are_one_line(tmp_path: Path, serve: Serve) -> None:
    backing = tmp_path / "backing"
    make_files(backing, [10])
    r = run(fusefs("verify", str(backing), *serve.args(), "--source", "a/b"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("fusefs: error: unusable source name 'a/b'"), r.stderr
    # restore into a new DIR without --source: the source of a mount of DIR, which has no
    # replica here (serve --subtree-per-source): an error, and DIR is not left behind
    dest = tmp_path / "elsewhere"
    r = run(fusefs("restore", str(dest), *serve.args()))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "empty replica for source" in r.stderr and "--source" in r.stderr, r.stderr
    assert not dest.exists()


# -- two mounts on one host, one server ----------------------------------------------------------


class Mount(MountProcess):
    """``fusefs mount -f BACKING MNT --target ...`` with the default source name."""

    def __init__(self, tmp: Path, name: str, serve: Serve) -> None:
        self.backing = tmp / f"backing-{name}"
        self.backing.mkdir()
        self.mountpoint = tmp / f"mnt-{name}"
        self.mountpoint.mkdir()
        self.log = tmp / f"mount-{name}.log"
        cmd = fusefs(
            "mount", "-f", str(self.backing), str(self.mountpoint), *serve.args(),
            "--replica-log-dir", str(tmp / f"replog-{name}"),
        )  # fmt: skip
        self._start(cmd, fusefs_env())


@needs_fuse
@pytest.mark.mount
def test_two_mounts_of_one_host_keep_their_own_replicas_and_connections(
    tmp_path: Path, serve: Serve
) -> None:
    """Formerly both claimed the host name: the server dropped the older connection each time
    (forever), and both shared (and repaired away) one replica subtree."""
    mounts: list[Mount] = []
    try:
        for name in ("one", "two"):
            mounts.append(Mount(tmp_path, name, serve))
        for i, m in enumerate(mounts):
            make_files(m.mountpoint / "data", [200_000 + i, 1000 * i, 3])
            (m.mountpoint / f"only-{i}").write_text(f"mount {i}")
        names = [default_source_name(str(m.backing)) for m in mounts]
        assert names[0] != names[1]

        def converged() -> bool:
            return all(
                same_tree(m.backing, serve.replica / n) for m, n in zip(mounts, names, strict=True)
            )

        try:
            wait_until_sync(converged, 60, "both replicas to converge")
        except AssertionError:
            raise AssertionError(
                "\n".join(
                    diff_snapshots(snapshot(m.backing), snapshot(serve.replica / n))
                    for m, n in zip(mounts, names, strict=True)
                    if (serve.replica / n).exists()
                )
                + "\n--- serve log\n"
                + serve.log.read_text()[-4000:]
            ) from None
        assert sorted(os.listdir(serve.replica)) == sorted(names)
        time.sleep(2)  # churn would show by now: the back-off starts at 0.2 s
        (mounts[0].mountpoint / "later").write_text("still connected")
        wait_until_sync(converged, 30, "a later change to arrive")
        log = serve.log.read_text()
        assert "reconnected" not in log, log[-4000:]
        assert log.count("authenticated") == 2, log[-4000:]
        for m, n in zip(mounts, names, strict=True):
            r = run(fusefs("status", str(m.mountpoint)))
            assert f"source         {n}\n" in r.stdout, r.stdout + r.stderr
            assert "connected      yes" in r.stdout, r.stdout + r.stderr
        # verify BACKING without --source finds the mount's replica
        for m in mounts:
            r = run(fusefs("verify", str(m.backing), *serve.args()))
            assert r.returncode == 0 and r.stdout == "identical\n", r.stdout + r.stderr
    finally:
        for m in mounts:
            m.close()


def test_max_lag_and_sync_timeout_parse_and_bad_values_are_refused(tmp_path: Path) -> None:
    """--max-lag parses K/M/G sizes into the sink's bound; a bad size is a usage error."""
    from fusefs.cli import build_parser
    from fusefs.replica.cli import close_sink, make_sink

    key = tmp_path / "key"
    key.write_bytes(KEY)
    backing = tmp_path / "b"
    backing.mkdir()
    parser = build_parser()
    base = ["mount", str(backing), str(tmp_path / "m"), "--target", "127.0.0.1:9"]
    base += ["--key-file", str(key), "--replica-log-dir", str(tmp_path / "log")]
    for text, value in (("512M", 512 << 20), ("2g", 2 << 30), ("0", 0), ("1000", 1000)):
        args = parser.parse_args([*base, "--max-lag", text])
        assert args.max_lag == value
    sink = make_sink(parser.parse_args([*base, "--max-lag", "3M"]), str(backing))
    try:
        assert sink is not None and sink.status()["max_lag_bytes"] == 3 << 20  # type: ignore[attr-defined]
    finally:
        close_sink(sink, str(tmp_path / "m"))
    for bad in ("12Q", "-1M", "", "inf", "1e400"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--max-lag", bad])
    assert parser.parse_args([*base, "--sync-timeout", "2.5"]).sync_timeout == 2.5
    assert parser.parse_args(base).sync_timeout is None
    for bad in ("0", "-3", "soon", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--sync-timeout", bad])
