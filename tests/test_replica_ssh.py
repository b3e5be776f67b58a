"""``--target ssh://host/path`` end to end, without an sshd: an ``ssh`` stand-in first on PATH
runs its command here (so the mount really spawns "ssh", which really runs
``fusefs serve --stdio PATH``).  Real FUSE mounts, ordinary tools writing through them; the
replica must equal BACKING, also after the ssh process is killed mid-copy; bad input gives a
one-line error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.replica.ssh import parse_ssh_target, ssh_argv
from tests.mounting import fusefs_env, is_mounted
from tests.test_replica_e2e import make_tree
from tests.test_replica_helpers import (
    MountProcess,
    diff_snapshots,
    same_tree,
    snapshot,
    wait_until_sync,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

CONVERGE = 60.0

SSH_SHIM = """#!/bin/sh
# stands in for ssh: skip the options and the destination, run the command here
echo "$*" >> "$0.calls"
while [ $# -gt 0 ]; do
  case "$1" in
    -p|-o|-l|-i|-F) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
shift
eval "exec $*"
"""


@pytest.fixture
def ssh_env(tmp_path: Path) -> dict[str, str]:
    """The environment with the ssh stand-in (and a ``fusefs`` for this checkout) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(SSH_SHIM)
    (bin_dir / "fusefs").write_text(f'#!/bin/sh\nexec {sys.executable} -m fusefs "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = fusefs_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("FUSEFS_SSH", None)
    env.pop("FUSEFS_SSH_REMOTE", None)
    return env


class SshMount(MountProcess):
    """``fusefs mount -f BACKING MNT --target ssh://localhost/REPLICA``; always unmounted."""

    def __init__(self, tmp: Path, backing: Path, replica: Path, env: dict[str, str]) -> None:
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.log = tmp / "mount.log"
        self.url = f"ssh://localhost{replica}"
        cmd = [
            sys.executable, "-m", "fusefs", "mount", "-f", str(backing), str(self.mountpoint),
            "--target", self.url, "--replica-log-dir", str(tmp / "replog"), "--source", "ssh",
        ]  # fmt: skip
        self._start(cmd, env)


def serve_pids(replica: Path) -> list[int]:
    """The ``fusefs serve --stdio REPLICA`` processes (what "ssh" became)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--stdio" in args and os.fsencode(replica) in args:
            out.append(int(d))
    return out


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusefs", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def converge(backing: Path, replica: Path, m: SshMount) -> None:
    try:
        wait_until_sync(lambda: same_tree(backing, replica), CONVERGE, "the replica to converge")
    except AssertionError:
        a, b = snapshot(backing), snapshot(replica)
        raise AssertionError(
            diff_snapshots(a, b) + "\n--- mount log\n" + m.log.read_text()[-4000:]
        ) from None


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    backing, replica = tmp_path / "backing", tmp_path / "replica"
    backing.mkdir()
    yield backing, replica
    for pid in serve_pids(replica):  # nothing left behind, whatever happened
        os.kill(pid, signal.SIGKILL)


def test_ssh_target_cp_verify_restore(
    tmp_path: Path, dirs: tuple[Path, Path], ssh_env: dict[str, str]
) -> None:
    backing, replica = dirs
    m = SshMount(tmp_path, backing, replica, ssh_env)
    try:
        src = tmp_path / "src"
        make_tree(src)
        subprocess.run(["cp", "-a", str(src), str(m.mountpoint / "copy")], check=True)
        os.rename(m.mountpoint / "copy" / "d0", m.mountpoint / "copy" / "renamed")
        os.truncate(m.mountpoint / "copy" / "renamed" / "sub1" / "f4", 1234)
        converge(backing, replica, m)
        calls = (tmp_path / "bin" / "ssh.calls").read_text()
        assert f"localhost fusefs serve --stdio {replica}" in calls, calls
        r = run_cli(ssh_env, "status", str(m.mountpoint))
        assert "connected      yes" in r.stdout and m.url in r.stdout, r.stdout + r.stderr
        r = run_cli(ssh_env, "verify", str(backing), "--target", m.url)
        assert r.returncode == 0 and "identical" in r.stdout, r.stdout + r.stderr
        (replica / "copy" / "empty").write_text("tampered")
        r = run_cli(ssh_env, "verify", str(backing), "--target", m.url)
        assert r.returncode == 1 and "copy/empty" in r.stdout, r.stdout + r.stderr
    finally:
        m.close()
    out = tmp_path / "restored"
    r = run_cli(ssh_env, "restore", str(out), "--target", f"ssh://localhost{replica}")
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == snapshot(replica), diff_snapshots(snapshot(out), snapshot(replica))


def test_ssh_killed_mid_copy_respawns_and_converges(
    tmp_path: Path, dirs: tuple[Path, Path], ssh_env: dict[str, str]
) -> None:
    backing, replica = dirs
    m = SshMount(tmp_path, backing, replica, ssh_env)
    try:
        src = tmp_path / "src"
        make_tree(src, files=120, size=400_000)
        done = threading.Event()

        def copy() -> None:
            subprocess.run(["cp", "-a", str(src), str(m.mountpoint / "copy")], check=True)
            done.set()

        wait_until_sync(lambda: bool(serve_pids(replica)), 15, "ssh to start")
        first = serve_pids(replica)
        t = threading.Thread(target=copy)
        t.start()
        time.sleep(0.3)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        # the client notices, backs off and spawns a new "ssh"
        wait_until_sync(
            lambda: bool(set(serve_pids(replica)) - set(first)), 30, "ssh to be re-spawned"
        )
        t.join(60)
        assert done.is_set()
        converge(backing, replica, m)
        calls = (tmp_path / "bin" / "ssh.calls").read_text().splitlines()
        assert len(calls) >= 2, calls
    finally:
        m.close()


def test_ssh_errors_are_one_line(tmp_path: Path, ssh_env: dict[str, str]) -> None:
    backing = tmp_path / "b"
    backing.mkdir()
    failing = tmp_path / "failing-ssh"
    failing.write_text(
        "#!/bin/sh\necho 'ssh: connect to host nowhere port 22: Connection refused' >&2\nexit 255\n"
    )
    failing.chmod(0o755)
    cases = [
        # (environment changes, target, what the one line says)
        ({"FUSEFS_SSH": str(failing)}, "ssh://nowhere/r", "ssh://nowhere/r: ssh: connect to"),
        ({"FUSEFS_SSH": str(tmp_path / "no-ssh")}, "ssh://h/r", "cannot run"),
        ({}, "ssh://localhost/proc/no/such/dir", "cannot use /proc/no/such/dir"),
        ({}, "ssh://localhost", "the replica directory is missing"),
        ({}, "ssh://-oProxyCommand=x/r", "no usable host"),
    ]
    for extra, target, expected in cases:
        env = {**ssh_env, **extra}
        for command in ("verify", "restore"):
            where = str(backing) if command == "verify" else str(tmp_path / f"out-{command}")
            r = run_cli(env, command, where, "--target", target)
            assert r.returncode == 1, (target, r.stdout, r.stderr)
            assert r.stderr.startswith("fusefs: error: ") and expected in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    # a mount refuses a malformed target before mounting, in one line
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_cli(ssh_env, "mount", str(backing), str(mnt), "--target", "ssh://host")
    assert r.returncode != 0 and "the replica directory is missing" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not is_mounted(mnt)


def test_ssh_target_down_at_mount_time_reports_and_catches_up(
    tmp_path: Path, dirs: tuple[Path, Path], ssh_env: dict[str, str]
) -> None:
    """ssh failing (host unreachable) does not stop the mount; status shows ssh's error; once
    ssh works again the replica catches up."""
    backing, replica = dirs
    gate = tmp_path / "unreachable"
    gate.write_text("")
    shim = tmp_path / "bin" / "ssh"
    shim.write_text(
        SSH_SHIM.replace(
            "# stands in",
            f"if [ -e {gate} ]; then echo 'ssh: connect to host localhost port 22: "
            "No route to host' >&2; exit 255; fi\n# stands in",
        )
    )
    m = SshMount(tmp_path, backing, replica, ssh_env)
    try:
        (m.mountpoint / "while-down").write_bytes(os.urandom(300_000))

        def reported() -> bool:
            r = run_cli(ssh_env, "status", str(m.mountpoint))
            return "connected      no" in r.stdout and "No route to host" in r.stdout

        wait_until_sync(reported, 20, "status to show the ssh error")
        gate.unlink()
        converge(backing, replica, m)
    finally:
        m.close()


def test_ssh_argv_quotes_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_ssh_target("ssh://me@example.org:2222/srv/my replica")
    monkeypatch.setenv("FUSEFS_SSH", "ssh -o BatchMode=yes")
    monkeypatch.setenv("FUSEFS_SSH_REMOTE", "/opt/venv/bin/fusefs")
    assert ssh_argv(spec) == [
        "ssh", "-o", "BatchMode=yes", "-p", "2222", "me@example.org",
        "/opt/venv/bin/fusefs serve --stdio '/srv/my replica'",
    ]  # fmt: skip
    assert parse_ssh_target("ssh://h/~/rep").path == "rep"
    for bad in ("ssh://", "ssh:///x", "ssh://h", "ssh://h/", "ssh://-x/r", "ssh://h:99999/r"):
        with pytest.raises(ValueError):
            parse_ssh_target(bad)
