"""Real FUSE mounts for tests: start ``python -m fusefs mount -f``, wait, always tear down.

A :class:`Mount` runs the daemon as a subprocess (output to a log file under the test's
tmp_path), waits until the mount point shows in /proc/self/mountinfo and answers a stat(), and
fails the test with the daemon's log if it exits early or takes too long.  :meth:`Mount.close`
always leaves no mount and no process behind, escalating with timeouts:

1. ``fusermount3 -u`` (5 s) and wait for the daemon to exit,
2. ``fusermount3 -uz`` (lazy),
3. write 1 to ``/sys/fs/fuse/connections/N/abort`` (mounting fusectl if needed) and SIGKILL.

The fixtures using it live in ``conftest.py``: ``backing``, ``session``, ``mnt``, ``mount_factory``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import pwd
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fusefs.session.mount import FUSE_CONNECTIONS, FUSE_DEVICE, connection_dir, find_mount

#: The sessions every mounted test runs under.
SESSIONS = ("fusefs", "pyfuse3")
REPO = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 10.0
UNMOUNT_TIMEOUT = 5.0


#: ``mount_factory(backing=None, mountpoint=None, *, options=(), session_name=None, user=None,
#: args=(), start=True, expect_clean_exit=True) -> Mount`` (the fixture in conftest.py).
MountFactory = Callable[..., "Mount"]


def is_mounted(path: os.PathLike[str] | str) -> bool:
    """Whether something is mounted on ``path`` (from mountinfo: never blocks on a hung mount)."""
    return find_mount(os.fspath(path)) is not None


def fusefs_env() -> dict[str, str]:
    """The environment for a fusefs subprocess: this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def fusefs_command(*args: str) -> list[str]:
    """``python -m fusefs ARGS`` with this interpreter."""
    return [sys.executable, "-m", "fusefs", *args]


def _stat_with_timeout(path: Path, timeout: float) -> BaseException | None:
    """stat() in a thread: a hung mount must not hang the test.  None if it answered."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(os.stat, path)
    try:
        future.result(timeout=timeout)
        return None
    except concurrent.futures.TimeoutError as e:
        return e
    except OSError as e:
        return e
    finally:
        pool.shutdown(wait=False)


def _stat_as(user: str, path: Path, timeout: float) -> BaseException | None:
    try:
        result = run_as(user, ["stat", "--", str(path)], timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return e
    return None if result.returncode == 0 else OSError(result.stderr.strip())


def _run_quietly(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None


@dataclass
class Mount:
    """One fusefs daemon serving a mirror of ``backing`` on ``mountpoint``."""

    backing: Path
    mountpoint: Path
    session: str = "fusefs"
    options: Sequence[str] = ()
    log_path: Path | None = None
    #: Run the daemon as this user (``runuser -u USER --``); it mounts through fusermount3.
    user: str | None = None
    #: Extra command-line arguments for ``fusefs mount``.
    args: Sequence[str] = ()
    #: Teardown fails the test unless the daemon exits 0 after a clean ``fusermount3 -u``.
    expect_clean_exit: bool = True
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: The daemon's exit status once it has exited.
    returncode: int | None = None
    #: The FUSE connection number (/sys/fs/fuse/connections/N) while mounted.
    connection: int | None = None
    _log_file: object = field(default=None, repr=False)

    # -- starting ------------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = fusefs_command(
            "mount",
            "-f",
            "-v",
            str(self.backing),
            str(self.mountpoint),
            "--session",
            self.session,
            *(arg for opt in self.options for arg in ("-o", opt)),
            *self.args,
        )
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return cmd

    def start(self, timeout: float = MOUNT_TIMEOUT) -> Mount:
        """Start the daemon and wait until the mount answers; fail the test with its log if not."""
        if self.log_path is None:
            self.log_path = self.mountpoint.parent / f"fusefs-{self.mountpoint.name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self._log_file = log
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=fusefs_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mountpoint):
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                self._fail(f"fusefs exited with status {rc} before mounting")
            if time.monotonic() > deadline:
                self._fail(f"{self.mountpoint} was not mounted within {timeout:.0f} s")
            time.sleep(0.02)
        info = find_mount(os.fspath(self.mountpoint))
        self.connection = info.minor if info is not None else None
        remaining = max(deadline - time.monotonic(), 1.0)
        if self.user is None:
            problem = _stat_with_timeout(self.mountpoint, remaining)
        else:  # without allow_other, only the mounting user may look (root included)
            problem = _stat_as(self.user, self.mountpoint, remaining)
        if problem is not None:
            self._fail(f"the mount does not answer stat(): {problem!r}")
        return self

    def _fail(self, message: str) -> None:
        self.close(check=False)
        pytest.fail(f"{message}\n--- command: {' '.join(self.command())}\n{self.log()}")

    # -- inspecting ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def mounted(self) -> bool:
        return is_mounted(self.mountpoint)

    def log(self) -> str:
        """The daemon's output so far."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace")
        return f"--- fusefs log {self.log_path}:\n{text[-20000:]}"

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the daemon (the fusefs process itself, not runuser)."""
        assert self.proc is not None
        pid = self.proc.pid
        if self.user is not None:  # runuser forks: signal its child, the daemon
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            pid = int(children[0]) if children else pid
        os.kill(pid, signum)

    def wait(self, timeout: float = UNMOUNT_TIMEOUT) -> int | None:
        """Wait for the daemon to exit; its status, or None if it is still running."""
        if self.proc is None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    # -- stopping ------------------------------------------------------------------------------

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT) -> int | None:
        """``fusermount3 -u`` and wait for the daemon; its exit status (None: still running)."""
        if self.mounted:
            _run_quietly(["fusermount3", "-u", str(self.mountpoint)], timeout)
        return self.wait(timeout)

    def abort(self) -> bool:
        """Abort the FUSE connection (what to do with a hung mount)."""
        if self.connection is None:
            return False
        directory = Path(FUSE_CONNECTIONS) / str(self.connection)
        if not directory.is_dir():
            found = connection_dir(os.fspath(self.mountpoint))  # mounts fusectl if needed
            directory = Path(found) if found else directory
        try:
            (directory / "abort").write_text("1\n")
            return True
        except OSError:
            return False

    def close(self, check: bool | None = None) -> list[str]:
        """Leave no mount and no daemon behind.  Returns what went wrong with a clean stop.

        With ``check`` (default: ``expect_clean_exit``), fail the test on any problem.
        """
        problems: list[str] = []
        if (self.proc is not None and self.proc.poll() is None) or self.mounted:
            rc = self.unmount(UNMOUNT_TIMEOUT)
            if self.mounted:
                problems.append("fusermount3 -u did not unmount")
                _run_quietly(["fusermount3", "-uz", str(self.mountpoint)], UNMOUNT_TIMEOUT)
                rc = self.wait(UNMOUNT_TIMEOUT)
            if rc is None or self.mounted:
                problems.append("the daemon did not exit after unmounting")
                self.abort()
                if self.mounted:
                    _run_quietly(["umount", "-l", str(self.mountpoint)], UNMOUNT_TIMEOUT)
                self._kill()
        if self.proc is not None:
            self.returncode = self.proc.poll() if self.returncode is None else self.returncode
            if self.returncode not in (0, None):
                problems.append(f"the daemon exited with status {self.returncode}")
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        if problems and (self.expect_clean_exit if check is None else check):
            pytest.fail("unclean stop of fusefs: " + "; ".join(problems) + "\n" + self.log())
        return problems

    def _kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.returncode = self.proc.wait(timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:  # stuck in the kernel: abort the connection again
            self.abort()
            self.returncode = self.proc.wait(timeout=UNMOUNT_TIMEOUT)

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=False if exc[0] is not None else None)


# -- daemons that are not our children -------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper(on: bool) -> None:
    """Become (or stop being) the reaper of orphaned descendants, e.g. a double-forked daemon,
    so that :func:`wait_pid` can read its exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def wait_pid(pid: int, timeout: float) -> int | None:
    """Exit status of our child (or reaped orphan) ``pid``; None if still running at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


# -- an unprivileged user ----------------------------------------------------------------------

#: The non-root user unprivileged tests run fusefs as (created with useradd when missing).
TEST_USER = "fusefs-test"


def ensure_test_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """The user ``name``, created (no home, no login) if missing.  Needs root."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


def run_as(user: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` as ``user`` (``runuser -u``), with fusefs importable."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("timeout", 30)
    return subprocess.run(
        ["runuser", "-u", user, "--", *cmd],
        env=fusefs_env(),
        stdin=subprocess.DEVNULL,
        text=True,
        check=False,
        **kwargs,
    )


def _python_paths() -> list[Path]:
    paths = [Path(os.path.realpath(sys.executable)), REPO]
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.append(Path(sysconfig.get_paths()[key]))
    return paths


@contextlib.contextmanager
def python_usable_by(user: str) -> Iterator[None]:
    """Let ``user`` run this interpreter and import fusefs (e.g. a pyenv under /root, mode 700).

    Grants search (o+x) on the directories above the interpreter, its libraries and this
    checkout that lack it, for the duration only, and restores their modes afterwards.
    """
    probe = [sys.executable, "-c", "import fusefs.cli, fusefs.mirror, pyfuse3, trio"]
    changed: dict[Path, int] = {}
    try:
        if run_as(user, probe).returncode != 0:
            for path in _python_paths():
                for directory in [*reversed(path.parents), path]:
                    if not directory.is_dir() or directory in changed:
                        continue
                    mode = directory.stat().st_mode
                    if not mode & stat.S_IXOTH:
                        changed[directory] = stat.S_IMODE(mode)
                        directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            result = run_as(user, probe)
            if result.returncode != 0:
                pytest.fail(
                    f"user {user} cannot run {sys.executable} with fusefs: {result.stderr.strip()}"
                )
        yield
    finally:
        for directory, mode in changed.items():
            directory.chmod(mode)


@contextlib.contextmanager
def fuse_device_usable_by_all() -> Iterator[None]:
    """Make /dev/fuse mode 0666 (as udev does on a desktop) for the duration, then restore.

    fusermount3 opens /dev/fuse with the caller's privileges; containers often leave it 0600.
    """
    device = Path(FUSE_DEVICE)
    mode = stat.S_IMODE(device.stat().st_mode)
    wanted = mode | 0o666
    if mode != wanted:
        device.chmod(wanted)
    try:
        yield
    finally:
        if mode != wanted:
            device.chmod(mode)


def user_tmpdir(user: str, prefix: str = "fusefs-user-") -> Path:
    """A fresh directory under /tmp owned by ``user`` (tmp_path is not reachable by others)."""
    entry = pwd.getpwnam(user)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path
