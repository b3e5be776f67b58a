"""``--target ssh://[user@]host[:port]/path``: ``fusefs serve --stdio PATH`` run over ssh.

The client starts ``ssh [-p PORT] [user@]host fusefs serve --stdio PATH`` and speaks the
ordinary wire protocol (docs/protocol.md) over the process's stdin and stdout, so the link is
encrypted and authenticated by ssh.  The HMAC handshake still runs, with a fixed key
(:data:`STDIO_KEY`): ``serve --stdio`` without ``--key-file`` expects it, and whoever can run
a command on the host through ssh can write the replica anyway.  Data still leaves with
``sendfile`` (into the pipe) and the server still ``splice``s it into the replica; ssh itself
copies, which is fine on a link that needs encryption.

``FUSEFS_SSH`` overrides the ssh command (split like a shell would, e.g.
``FUSEFS_SSH="ssh -o BatchMode=yes"``), ``FUSEFS_SSH_REMOTE`` the command that starts fusefs on
the remote host (default ``fusefs``).  Each connection is a fresh ssh process, so the client's
reconnect with back-off re-spawns ssh; a failure shows ssh's last line of stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from fusefs.replica.client import CONNECT_TIMEOUT, run_wire_target
from fusefs.replica.target import Target, TargetError, TargetFactory
from fusefs.replica.transport import FdTransport

__all__ = [
    "STDIO_KEY",
    "SshSpec",
    "is_ssh_target",
    "open_ssh_target",
    "parse_ssh_target",
    "ssh_argv",
]

#: The key of ``fusefs serve --stdio`` without ``--key-file`` (ssh authenticates the peer).
STDIO_KEY = b"fusefs-replica over ssh: authenticated by ssh"
#: Keep this much of ssh's stderr for error messages.
_STDERR_KEEP = 4096


@dataclass(frozen=True)
class SshSpec:
    """A parsed ``ssh://`` target."""

    url: str
    destination: str  # [user@]host, as ssh takes it
    port: int | None
    path: str  # on the remote host; relative paths are relative to the login directory


def is_ssh_target(text: str) -> bool:
    return text.startswith("ssh://")


def parse_ssh_target(text: str) -> SshSpec:
    """``ssh://[user@]host[:port]/path`` (``/~/path``: relative to the remote home);
    ValueError with a one-line reason if malformed."""
    form = "expected ssh://[user@]host[:port]/path"
    try:
        u = urllib.parse.urlsplit(text)
        port = u.port
    except ValueError as e:
        raise ValueError(f"{form}, got {text!r} ({e})") from None
    if u.scheme != "ssh" or u.query or u.fragment:
        raise ValueError(f"{form}, got {text!r}")
    host = u.hostname or ""
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise ValueError(f"{form}: no usable host in {text!r}")
    user = urllib.parse.unquote(u.username) if u.username else ""
    if user.startswith("-") or any(c.isspace() or c == "@" for c in user):
        raise ValueError(f"{form}: unusable user name in {text!r}")
    path = urllib.parse.unquote(u.path)
    if path.startswith("/~/"):
        path = path[3:]
    if path in ("", "/") or "\x00" in path:
        raise ValueError(f"{form}: the replica directory is missing in {text!r}")
    destination = f"{user}@{host}" if user else host  # an IPv6 literal goes bare
    return SshSpec(text, destination, port, path)


def ssh_argv(spec: SshSpec) -> list[str]:
    """The command that starts ``fusefs serve --stdio`` on the remote host."""
    ssh = shlex.split(os.environ.get("FUSEFS_SSH") or "ssh")
    remote = shlex.split(os.environ.get("FUSEFS_SSH_REMOTE") or "fusefs")
    if not ssh or not remote:
        raise ValueError("FUSEFS_SSH and FUSEFS_SSH_REMOTE must not be empty")
    port = ["-p", str(spec.port)] if spec.port else []
    command = " ".join(shlex.quote(a) for a in [*remote, "serve", "--stdio", spec.path])
    return [*ssh, *port, spec.destination, command]


def open_ssh_target(
    spec: SshSpec, source: bytes, *, key: bytes = STDIO_KEY, timeout: float = CONNECT_TIMEOUT
) -> TargetFactory:
    """A factory of connections to ``fusefs serve --stdio`` run through ssh."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Target]:
        argv = ssh_argv(spec)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            raise TargetError(f"{spec.url}: cannot run {argv[0]}: {e.strerror or e}") from None
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr = bytearray()
        transport = FdTransport(proc.stdout.fileno(), proc.stdin.fileno())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_collect, proc.stderr.fileno(), stderr)
                try:
                    async with run_wire_target(transport, key, source, spec.url, timeout) as target:
                        yield target
                except TargetError as e:
                    raise TargetError(await _explain(spec, proc, stderr, e)) from None
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaves = group.exceptions
            if len(leaves) == 1 and isinstance(leaves[0], TargetError):
                raise leaves[0] from None
            raise
        finally:
            transport.close()
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the server sees EOF and exits
            with trio.CancelScope(shield=True):
                await _reap(proc)
            proc.stdout.close()
            proc.stderr.close()

    return factory


async def _collect(fd: int, into: bytearray) -> None:
    """Keep the tail of ssh's stderr (it explains failures) until EOF."""
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        except OSError:
            return
        if not data:
            return
        into += data
        del into[:-_STDERR_KEEP]


async def _explain(
    spec: SshSpec, proc: subprocess.Popen[bytes], stderr: bytearray, e: TargetError
) -> str:
    """The error to report: ssh's (or the remote fusefs's) last words when it died."""
    with trio.move_on_after(3):
        while proc.poll() is None:
            await trio.sleep(0.05)
        await trio.sleep(0.05)  # let the stderr collector read the rest
    lines = [
        line.strip()
        for line in bytes(stderr).decode("utf-8", "replace").splitlines()
        if line.strip()
    ]
    if lines:
        return f"{spec.url}: {lines[-1]}"
    if proc.returncode is not None and proc.returncode != 0:
        return f"{spec.url}: ssh exited with status {proc.returncode}"
    text = str(e)
    return text if text.startswith(spec.url) else f"{spec.url}: {text}"


async def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait a little for the process to exit after EOF, then kill it."""
    with trio.move_on_after(2):
        while proc.poll() is None:
            await trio.sleep(0.02)
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        await trio.to_thread.run_sync(proc.wait)
