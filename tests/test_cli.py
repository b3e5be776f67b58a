"""The ``fusefs`` command line: help, errors as one line, daemon and foreground mounts, stats."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fusefs.cli import build_parser, format_stats, main, normalize_argv
from tests.mounting import (
    Mount,
    MountFactory,
    fusefs_command,
    fusefs_env,
    is_mounted,
    run_as,
    user_tmpdir,
    wait_pid,
)


def run_fusefs(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fusefs_command(*args),
        env=fusefs_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str = "") -> str:
    """Exit status != 0, one ``fusefs: error:`` line on stderr, no traceback anywhere."""
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("fusefs: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a mount could change in a tree: names, types, modes, sizes, times, contents."""
    result: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            path = Path(dirpath, name)
            st = path.lstat()
            key = str(path.relative_to(root))
            entry: tuple[Any, ...] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid)
            if path.is_symlink():
                entry += (os.readlink(path),)
            elif path.is_file():
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            result[key] = entry
    return result


def fill(backing: Path) -> None:
    (backing / "hello.txt").write_text("hello\n")
    (backing / "sub").mkdir()
    (backing / "sub" / "data.bin").write_bytes(os.urandom(10000))
    (backing / "link").symlink_to("hello.txt")


# -- no mount needed ---------------------------------------------------------------------------


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["mount", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "-o OPTS",
        "--foreground",
        "--session",
        "--log-file",
        "--debug",
        "--verbose",
        "--quiet",
        "allow_other",
        "default_permissions",
        "nonempty",
        "attr_timeout",
        "entry_timeout",
        "writeback_cache",
        "data=",
        "max_pages",
        "read_ahead_kb",
        "max_background",
        "fsname",
        "subtype",
        "x-systemd",
    ):
        assert word in text, word
    with pytest.raises(SystemExit):
        parser.parse_args(["stats", "--help"])
    text = capsys.readouterr().out
    assert "--json" in text and "MOUNTPOINT" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for word in ("mount", "stats", "serve", "restore", "verify", "status"):
        assert word in text, word
    for sub in ("serve", "restore", "verify", "status"):
        with pytest.raises(SystemExit):
            parser.parse_args([sub, "--help"])
        assert "--key-file" in capsys.readouterr().out or sub == "status"


def test_mount_word_is_optional() -> None:
    assert normalize_argv(["/src", "/mnt", "-o", "rw"]) == ["mount", "/src", "/mnt", "-o", "rw"]
    assert normalize_argv(["-f", "/src", "/mnt"]) == ["mount", "-f", "/src", "/mnt"]
    assert normalize_argv(["mount", "/src", "/mnt"]) == ["mount", "/src", "/mnt"]
    assert normalize_argv(["stats", "/mnt"]) == ["stats", "/mnt"]
    assert normalize_argv(["--help"]) == ["--help"]
    assert normalize_argv([]) == []


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    proc = run_fusefs("mount", str(tmp_path))
    assert proc.returncode == 2
    assert_one_line_error(proc, "MOUNTPOINT")
    proc = run_fusefs("mount", str(tmp_path), str(tmp_path), "--session", "nope")
    assert_one_line_error(proc, "--session")


def test_main_returns_status_for_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount", str(tmp_path / "missing"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fusefs: error: backing directory") and err.count("\n") == 1


def test_format_stats() -> None:
    text = format_stats({"requests": {"READ": 3, "LOOKUP": 12}, "bytes_spliced": 1048576})
    assert text.splitlines() == [
        "requests.READ    3",
        "requests.LOOKUP  12",
        "bytes_spliced    1,048,576",
    ]


# -- bad input: one line, exit != 0, nothing changed -------------------------------------------


@pytest.fixture(params=["foreground", "daemon"])
def mode_args(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    if request.param == "foreground":
        return ["-f"]
    return ["--log-file", str(tmp_path / "daemon.log")]


def test_missing_backing(tmp_path: Path, mode_args: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    proc = run_fusefs("mount", *mode_args, str(tmp_path / "nope"), str(tmp_path / "mnt"))
    assert_one_line_error(proc, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_backing_is_a_file(tmp_path: Path, mode_args: list[str]) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "mnt").mkdir()
    proc = run_fusefs("mount", *mode_args, str(tmp_path / "file"), str(tmp_path / "mnt"))
    assert_one_line_error(proc, "not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_missing_mountpoint(backing: Path, tmp_path: Path, mode_args: list[str]) -> None:
    fill(backing)
    before = snapshot(backing)
    proc = run_fusefs("mount", *mode_args, str(backing), str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist")
    assert snapshot(backing) == before


def test_mountpoint_is_a_file(backing: Path, tmp_path: Path, mode_args: list[str]) -> None:
    (tmp_path / "file").write_text("x")
    proc = run_fusefs("mount", *mode_args, str(backing), str(tmp_path / "file"))
    assert_one_line_error(proc, "not a directory")


def test_nonempty_mountpoint(backing: Path, tmp_path: Path, mode_args: list[str]) -> None:
    fill(backing)
    before = snapshot(backing)
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "precious").write_text("keep")
    proc = run_fusefs("mount", *mode_args, str(backing), str(tmp_path / "mnt"))
    assert_one_line_error(proc, "not empty")
    assert "nonempty" in proc.stderr
    assert snapshot(backing) == before
    assert (tmp_path / "mnt" / "precious").read_text() == "keep"
    assert not is_mounted(tmp_path / "mnt")


def test_unknown_option(backing: Path, tmp_path: Path, mode_args: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    proc = run_fusefs("mount", *mode_args, str(backing), str(tmp_path / "mnt"), "-o", "ro,bogus=1")
    assert_one_line_error(proc, "unknown mount option 'bogus'")
    assert not is_mounted(tmp_path / "mnt")


def test_mountpoint_already_mounted(
    mnt_handle: Mount, backing: Path, tmp_path: Path, mode_args: list[str]
) -> None:
    fill(backing)
    before = snapshot(backing)
    proc = run_fusefs(
        "mount", *mode_args, "-o", "nonempty", str(backing), str(mnt_handle.mountpoint)
    )
    assert_one_line_error(proc, "already a mount point")
    assert snapshot(backing) == before
    assert mnt_handle.proc is not None and mnt_handle.proc.poll() is None  # still serving


def test_unreadable_backing_as_user(test_user: str, mode_args: list[str]) -> None:
    base = user_tmpdir(test_user)
    try:
        backing = base / "backing"
        backing.mkdir(mode=0o700)  # owned by root: the user can neither list nor enter it
        (backing / "secret").write_text("s")
        mnt = base / "mnt"
        mnt.mkdir()
        shutil.chown(mnt, test_user)
        log_args = ["--log-file", str(base / "log")] if mode_args != ["-f"] else ["-f"]
        proc = run_as(test_user, fusefs_command("mount", *log_args, str(backing), str(mnt)))
        assert_one_line_error(proc, "backing directory")
        assert "ermission denied" in proc.stderr
        assert not is_mounted(mnt)
        assert (backing / "secret").read_text() == "s"
    finally:
        shutil.rmtree(base)


# -- real mounts -------------------------------------------------------------------------------


def test_nonempty_option_allows_it(
    mount_factory: MountFactory, backing: Path, tmp_path: Path
) -> None:
    fill(backing)
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    (mountpoint / "hidden").write_text("underneath")
    mount = mount_factory(mountpoint=mountpoint, options=["nonempty"])
    assert sorted(os.listdir(mountpoint)) == ["hello.txt", "link", "sub"]
    assert mount.unmount() == 0
    assert (mountpoint / "hidden").read_text() == "underneath"


@pytest.mark.mount
@pytest.mark.usefixtures("subreaper")
def test_daemon_mode(backing: Path, tmp_path: Path, session: str) -> None:
    fill(backing)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "daemon.log"
    before = snapshot(backing)
    proc = run_fusefs(
        "mount", str(backing), str(mountpoint), "--session", session, "--log-file", str(log)
    )
    daemon = None
    try:
        assert proc.returncode == 0, proc.stderr + (log.read_text() if log.exists() else "")
        assert proc.stderr == ""
        match = re.search(r"daemon pid (\d+)", proc.stdout)
        assert match, proc.stdout
        daemon = int(match.group(1))
        assert str(log) in proc.stdout
        # ready when the command returns: no waiting
        assert is_mounted(mountpoint)
        assert (mountpoint / "hello.txt").read_text() == "hello\n"
        assert os.readlink(mountpoint / "link") == "hello.txt"
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True, timeout=10)
        assert wait_pid(daemon, 10) == 0, log.read_text()
        daemon = None
        assert not is_mounted(mountpoint)
        assert snapshot(backing) == before
        assert "Traceback" not in log.read_text()
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False, timeout=10)
        if daemon is not None:
            with_kill(daemon)


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        wait_pid(pid, 5)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_daemon_reports_mount_failure(test_user: str) -> None:
    """An error only the daemon meets (fusermount3 refusing allow_other) is still one line."""
    if any(
        line.strip() == "user_allow_other"
        for line in Path("/etc/fuse.conf").read_text().splitlines()
    ):
        pytest.skip("/etc/fuse.conf has user_allow_other")
    base = user_tmpdir(test_user)
    try:
        (base / "backing").mkdir()
        (base / "mnt").mkdir()
        for path in (base / "backing", base / "mnt"):
            shutil.chown(path, test_user)
        cmd = fusefs_command(
            "mount",
            "-o",
            "allow_other",
            "--log-file",
            str(base / "log"),
            str(base / "backing"),
            str(base / "mnt"),
        )
        proc = run_as(test_user, cmd)
        assert_one_line_error(proc, "user_allow_other")
        assert not is_mounted(base / "mnt")
    finally:
        shutil.rmtree(base)


def test_foreground_mount_and_stats(mnt_handle: Mount, backing: Path, session: str) -> None:
    fill(backing)
    assert (mnt_handle.mountpoint / "sub" / "data.bin").stat().st_size == 10000
    proc = run_fusefs("stats", str(mnt_handle.mountpoint))
    if session == "pyfuse3":
        assert_one_line_error(proc, "keep none")
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip(), "no counters printed"
        proc = run_fusefs("stats", "--json", str(mnt_handle.mountpoint))
        assert proc.returncode == 0, proc.stderr
        assert isinstance(json.loads(proc.stdout), dict)
    assert mnt_handle.unmount() == 0
    assert not mnt_handle.mounted


def test_stats_of_a_plain_directory(tmp_path: Path) -> None:
    assert_one_line_error(run_fusefs("stats", str(tmp_path)), "not a mount point")
    assert_one_line_error(run_fusefs("stats", str(tmp_path / "nope")), "does not exist")


@pytest.mark.parametrize(
    ("release", "want"),
    [
        ("6.18.44-fc-v657", True),
        ("6.18.3", True),
        ("6.18.2-arch1-1", False),
        ("6.19.0-rc1", True),
        ("7.0", True),
        ("6.6.120", True),
        ("6.6.119-1-lts", False),
        ("6.12.40-generic", False),
        ("6.8.0-91-generic", False),
        ("5.15.0-91-generic", False),
        ("unknown", False),
    ],
)
def test_direct_writes_only_where_readers_stay_coherent(release: str, want: bool) -> None:
    """A direct write leaves readers' cached pages stale unless the kernel drops them before
    and after the WRITE (6.19, backported to 6.18.3 and 6.6.120): no direct writes before."""
    from fusefs.cli import coherent_direct_writes, kernel_version

    assert coherent_direct_writes(kernel_version(release)) is want
