"""Command-line pieces of replication, for fusefs/cli.py to wire in.

- :func:`add_subcommands` adds ``serve``, ``restore``, ``verify`` and ``status``;
- :func:`add_mount_arguments` adds ``--target``, ``--key-file``, ``--replicate``,
  ``--replica-log-dir`` and ``--source`` to ``fusefs mount``;
- :func:`make_sink` turns those into the mirror's change sink (call it in the process that
  serves the mount, i.e. after daemonizing: it starts a thread), and :func:`close_sink` at exit.

Until then ``python -m fusefs.replica.cli COMMAND ...`` runs the subcommands.  Errors are one
line (``fusefs: error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from fusefs.errors import FusefsError
from fusefs.mirror.changes import Change, ChangeSink
from fusefs.replica import wire as w
from fusefs.replica.client import (
    DEFAULT_MAX_LAG,
    ReplicationSink,
    describe_error,
    leaves,
    open_wire_target,
    parse_hostport,
)
from fusefs.replica.progress import Progress
from fusefs.replica.progress import wanted as progress_wanted
from fusefs.replica.server import DEFAULT_MAX_CONNECTIONS, serve
from fusefs.replica.ssh import (
    STDIO_KEY,
    SshSpec,
    is_ssh_target,
    open_ssh_target,
    parse_ssh_target,
)
from fusefs.replica.target import Target, TargetClosed, TargetError, TargetFactory
from fusefs.replica.tree import checksum_fd, differences, walk

__all__ = [
    "FanoutSink",
    "KeyFileError",
    "ReplicaUsageError",
    "add_mount_arguments",
    "add_subcommands",
    "check_mount_arguments",
    "close_sink",
    "default_source_name",
    "main",
    "make_sink",
    "read_key",
]

log = logging.getLogger("fusefs")
T = TypeVar("T")


class KeyFileError(FusefsError):
    """The shared key file is missing, unreadable or empty."""


class ReplicaUsageError(FusefsError):
    """A replication argument is malformed."""


class StatusUnavailableError(FusefsError):
    """No replication status is known for a mount point."""


# -- helpers -----------------------------------------------------------------------------------


def read_key(path: str) -> bytes:
    """The shared key (the file's bytes, surrounding whitespace removed)."""
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise KeyFileError(f"key file {path} holds fewer than 16 bytes; use a longer secret")
    return key


def _size(text: str) -> int:
    """``--max-lag``: bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in "KMGT":
        scale = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        n = int(float(t) * scale)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G, 0)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G, 0)")
    return n


def _seconds(text: str) -> float:
    """``--sync-timeout``: a positive number of seconds."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return v


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as e:
        raise ReplicaUsageError(str(e)) from None


def default_source_name(backing: str) -> str:
    """``<host>-<12 hex digits of SHA-256 of realpath(backing)>``: the default ``--source``.

    The host name alone made two mounts of one host claim the same name on a shared server:
    each connection cancelled the other's, and with ``--subtree-per-source`` they shared (and
    repaired away) one replica.  ``fusefs verify BACKING`` derives the same name as the mount.
    """
    digest = hashlib.sha256(os.fsencode(os.path.realpath(backing))).hexdigest()[:12]
    host = (os.uname().nodename or "fusefs").replace("/", "_")
    room = w.MAX_SOURCE - len(digest) - 1
    host = host.encode()[:room].decode(errors="ignore") or "fusefs"
    return f"{host}-{digest}"


def _source_name(text: str | None, backing: str) -> bytes:
    """``--source`` checked (one path component, at most 64 bytes), or the default for
    ``backing`` (see :func:`default_source_name`)."""
    name = os.fsencode(text if text else default_source_name(backing))
    if not name or len(name) > w.MAX_SOURCE or b"/" in name or name in (b".", b".."):
        raise ReplicaUsageError(
            f"unusable source name {os.fsdecode(name)!r} "
            f"(at most {w.MAX_SOURCE} bytes, no '/', not '.' or '..')"
        )
    return name


def _state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/fusefs/replica"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "fusefs", "replica")


def _run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/fusefs"
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", "fusefs")


def _registry_path(mountpoint: str) -> str:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(_run_dir(), f"replica-{digest}.json")


def default_log_dir(backing: str, target: str) -> str:
    """Where a mount of ``backing`` keeps its log for ``target`` (outside BACKING)."""
    digest = hashlib.sha256(f"{os.path.realpath(backing)}\0{target}".encode()).hexdigest()[:16]
    base = os.path.basename(os.path.normpath(backing)) or "root"
    return os.path.join(_state_dir(), f"{base}-{digest}")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )


# -- mount integration -------------------------------------------------------------------------


def add_mount_arguments(parser: argparse.ArgumentParser) -> None:
    """``--target``, ``--key-file``, ``--replicate``, ``--replica-log-dir``, ``--source``."""
    g = parser.add_argument_group("replication (see docs/replication.md)")
    g.add_argument(
        "--target",
        metavar="HOST:PORT|ssh://[USER@]HOST/PATH",
        action="append",
        default=[],
        help="replicate every change to 'fusefs serve' at HOST:PORT, or over ssh into PATH "
        "on HOST ('fusefs serve --stdio PATH' through ssh; $FUSEFS_SSH overrides the ssh "
        "command, $FUSEFS_SSH_REMOTE the remote fusefs command) (repeatable)",
    )
    g.add_argument("--key-file", metavar="FILE", help="the shared secret for HOST:PORT targets")
    g.add_argument(
        "--replicate",
        choices=("async", "sync"),
        default="async",
        help="async: changes are logged durably and shipped in the background (default); "
        "sync: fsync and close also wait until the target holds the data durably",
    )
    g.add_argument(
        "--replica-log-dir",
        metavar="DIR",
        help=f"where the log of unacknowledged changes lives (default: under {_state_dir()}; "
        "one subdirectory per target)",
    )
    g.add_argument(
        "--sync-timeout",
        metavar="SECONDS",
        type=_seconds,
        help="sync mode: fail fsync and close with EIO when the targets have not confirmed "
        "within SECONDS (the change still reaches them later); default: wait as long as it "
        "takes",
    )
    g.add_argument(
        "--max-lag",
        metavar="SIZE",
        type=_size,
        default=DEFAULT_MAX_LAG,
        help="async mode: while a target is connected, hold the mount's writes back once "
        "this much written data is not yet on it (K, M, G suffixes; 0: never; "
        f"default {DEFAULT_MAX_LAG >> 30}G)",
    )
    g.add_argument(
        "--source",
        metavar="NAME",
        help="this mount's name on the target, its directory there with 'serve "
        "--subtree-per-source' (default: HOST-HASH, the host name and a hash of BACKING's "
        "real path; formerly the host name alone: pass that to keep using an older replica)",
    )


class FanoutSink:
    """Reports every change to several sinks (one per target), in order."""

    def __init__(self, sinks: Sequence[ReplicationSink]) -> None:
        self.sinks = list(sinks)
        self.barrier_waits = any(s.barrier_waits for s in self.sinks)
        self.quick_record = all(getattr(s, "quick_record", False) for s in self.sinks)

    async def record(self, change: Change) -> None:
        for s in self.sinks:
            await s.record(change)

    async def barrier(self) -> None:
        for s in self.sinks:
            await s.barrier()

    def close(self, drain_timeout: float = 5.0) -> None:
        for s in self.sinks:
            s.close(drain_timeout)


def check_mount_arguments(args: argparse.Namespace) -> None:
    """Validate ``--target`` and ``--key-file`` before the mount daemonizes (one-line errors):
    every target parses, and TCP targets have a readable key."""
    targets: list[str] = list(getattr(args, "target", None) or [])
    for text in targets:
        _parse_target(text)
    if any(not is_ssh_target(t) for t in targets):
        if not getattr(args, "key_file", None):
            raise ReplicaUsageError(
                "--target HOST:PORT needs --key-file (the secret shared with the target)"
            )
        read_key(args.key_file)
    if targets and getattr(args, "source", None):
        _source_name(args.source, ".")


def _parse_target(text: str) -> tuple[str, int] | SshSpec:
    if is_ssh_target(text):
        try:
            return parse_ssh_target(text)
        except ValueError as e:
            raise ReplicaUsageError(str(e)) from None
    return _hostport(text)


def _open_target(text: str, key_file: str | None, source: bytes) -> tuple[str, TargetFactory]:
    """(name, factory) for one ``--target``: ``HOST:PORT`` or ``ssh://[user@]host/path``."""
    spec = _parse_target(text)
    if isinstance(spec, SshSpec):
        return spec.url, open_ssh_target(spec, source)
    if not key_file:
        raise ReplicaUsageError(
            "--target HOST:PORT needs --key-file (the secret shared with the target)"
        )
    host, port = spec
    return f"{host}:{port}", open_wire_target(host, port, read_key(key_file), source)


def make_sink(args: argparse.Namespace, backing: str) -> ChangeSink | None:
    """The change sink for ``fusefs mount`` (None without ``--target``); starts replicating.

    Call it in the serving process (after any fork), pass it as ``MirrorFS(changes=...)``,
    and call :func:`close_sink` once the session ended.
    """
    targets: list[str] = list(getattr(args, "target", None) or [])
    if not targets:
        return None
    check_mount_arguments(args)
    source = _source_name(getattr(args, "source", None), backing)
    log.info("replicating %s as source %r", backing, os.fsdecode(source))
    mode = getattr(args, "replicate", "async") or "async"
    sinks = []
    for text in targets:
        name, factory = _open_target(text, getattr(args, "key_file", None), source)
        if args.replica_log_dir:
            log_dir = os.path.join(args.replica_log_dir, name.replace(":", "_").replace("/", "_"))
        else:
            log_dir = default_log_dir(backing, name)
        sink = ReplicationSink(
            backing,
            log_dir,
            factory,
            name=name,
            mode=mode,
            max_lag_bytes=getattr(args, "max_lag", DEFAULT_MAX_LAG),
            sync_timeout=getattr(args, "sync_timeout", None),
        )
        sink.start()
        sinks.append(sink)
    mountpoint = getattr(args, "mountpoint", None)
    if mountpoint:
        _register(mountpoint, backing, [s.log.dir for s in sinks], os.fsdecode(source))
    return sinks[0] if len(sinks) == 1 else FanoutSink(sinks)


def close_sink(sink: ChangeSink | None, mountpoint: str | None = None) -> None:
    """Stop replicating (after the session ended); the log keeps what is not yet acked."""
    if isinstance(sink, ReplicationSink | FanoutSink):
        sink.close()
    if mountpoint:
        with contextlib.suppress(OSError):
            os.unlink(_registry_path(mountpoint))


def _register(mountpoint: str, backing: str, log_dirs: list[str], source: str) -> None:
    path = _registry_path(mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "mountpoint": os.path.realpath(mountpoint),
                    "backing": backing,
                    "log_dirs": log_dirs,
                    "source": source,
                    "pid": os.getpid(),
                },
                f,
            )
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot write %s (fusefs status will not find this mount): %s", path, e)


# -- subcommands -------------------------------------------------------------------------------


def add_subcommands(subparsers: Any) -> None:
    """Add ``serve``, ``restore``, ``verify`` and ``status`` to the ``fusefs`` parser."""
    p = subparsers.add_parser(
        "serve",
        help="receive replication into REPLICA_DIR",
        description="Receive live replication from 'fusefs mount --target' and apply it to "
        "REPLICA_DIR.  Peers authenticate with the shared key (never sent over the wire).",
    )
    p.add_argument("replica_dir", metavar="REPLICA_DIR")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:7411")
    p.add_argument(
        "--key-file",
        metavar="FILE",
        help="the shared secret (required unless --stdio, which ssh:// targets run)",
    )
    p.add_argument(
        "--stdio",
        action="store_true",
        help="serve one connection on stdin/stdout (what --target ssh://HOST/PATH runs)",
    )
    p.add_argument("--max-connections", metavar="N", type=int, default=DEFAULT_MAX_CONNECTIONS)
    p.add_argument(
        "--subtree-per-source",
        action="store_true",
        help="keep each source (mount) in REPLICA_DIR/<source name>",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "restore",
        help="copy a replica back into DIR",
        description="Copy the replica held by the target into DIR (empty or new).",
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--target", metavar="HOST:PORT|ssh://[USER@]HOST/PATH", required=True)
    p.add_argument("--key-file", metavar="FILE", help="the shared secret (HOST:PORT targets)")
    p.add_argument(
        "--source",
        metavar="NAME",
        help="the source name of the mount whose replica to restore (default: the name a "
        "mount of DIR on this host uses, i.e. for restoring BACKING in place; 'fusefs status "
        "MOUNTPOINT' shows a mount's name)",
    )
    _add_progress_arguments(p)
    p.set_defaults(func=cmd_restore)

    p = subparsers.add_parser(
        "verify",
        help="compare BACKING with its replica (exit 0 only when identical)",
        description="Compare BACKING with the replica held by the target: types, modes, "
        "owners, extended attributes, symlink targets, file sizes, modification times and "
        "contents (SHA-256).  Lists every difference; exit status 0 only when there is none.",
    )
    p.add_argument("backing", metavar="BACKING")
    p.add_argument("--target", metavar="HOST:PORT|ssh://[USER@]HOST/PATH", required=True)
    p.add_argument("--key-file", metavar="FILE", help="the shared secret (HOST:PORT targets)")
    p.add_argument(
        "--source",
        metavar="NAME",
        help="the mount's source name (default: the one a mount of BACKING on this host uses)",
    )
    _add_progress_arguments(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser(
        "status",
        help="replication state of a mount",
        description="Show whether a mount's replication is connected, what is pending and "
        "the last error.",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)


def _add_progress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress line on stderr (default: only when stderr is a terminal)",
    )


def _progress(args: argparse.Namespace, label: str) -> Progress:
    return Progress(label, enabled=progress_wanted(getattr(args, "progress", None), sys.stderr))


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    if args.key_file:
        key = read_key(args.key_file)
    elif args.stdio:
        key = STDIO_KEY  # ssh authenticated the peer
    else:
        raise ReplicaUsageError("serve needs --key-file (or --stdio, run through ssh)")
    host, port = _hostport(args.listen)
    if args.max_connections < 1:
        raise ReplicaUsageError("--max-connections must be at least 1")
    try:
        os.makedirs(args.replica_dir, exist_ok=True)
        if not os.path.isdir(args.replica_dir):
            raise ReplicaUsageError(f"{args.replica_dir} is not a directory")
    except OSError as e:
        raise ReplicaUsageError(f"cannot use {args.replica_dir}: {e.strerror}") from None
    try:
        trio.run(
            lambda: serve(
                args.replica_dir,
                key,
                (host, port),
                stdio=args.stdio,
                max_connections=args.max_connections,
                subtree_per_source=args.subtree_per_source,
            )
        )
    except OSError as e:
        if args.stdio:
            raise ReplicaUsageError(f"serve --stdio: {e.strerror or e}") from None
        raise ReplicaUsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        return 0
    return 0


def _source_of(args: argparse.Namespace) -> bytes:
    """verify's/restore's source name: ``--source``, else the one a mount of BACKING (verify)
    or DIR (restore: BACKING rebuilt in place) on this host uses."""
    local = getattr(args, "backing", None) or args.dir
    return _source_name(args.source, local)


def _connect(args: argparse.Namespace) -> TargetFactory:
    return _open_target(args.target, args.key_file, _source_of(args))[1]


def cmd_verify(args: argparse.Namespace) -> int:
    backing = args.backing
    if not os.path.isdir(backing):
        raise ReplicaUsageError(f"{backing} is not a directory")
    factory = _connect(args)
    for attempt in range(VERIFY_TRIES):
        try:
            with _progress(args, "verify") as progress:
                problems = _run(lambda: _verify(backing, factory, progress))
            break
        except TargetClosed as e:  # read-only and idempotent: ask again
            if attempt == VERIFY_TRIES - 1:
                raise
            print(f"fusefs: {e}; verifying again", file=sys.stderr)
            time.sleep(0.5 * 2**attempt)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} difference(s)", file=sys.stderr)
        return 1
    print("identical")
    return 0


#: verify connects as the mount's source; a mount reconnecting meanwhile takes the source back
#: and the server drops verify's connection, so verify tries this many times
VERIFY_TRIES = 4


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(fn)``; failures become one :class:`FusefsError` (a group of one is unwrapped,
    so e.g. a usage error raised inside a task group keeps its own message)."""
    try:
        return trio.run(fn)
    except FusefsError:
        raise
    except BaseExceptionGroup as e:
        found = leaves(e)
        if len(found) == 1 and isinstance(found[0], FusefsError):
            raise found[0] from None
        if e.subgroup(TargetClosed) is not None:
            raise TargetClosed(describe_error(e)) from None
        raise TargetError(describe_error(e)) from None


async def _verify(backing: str, factory: TargetFactory, progress: Progress) -> list[str]:
    fd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress.ticker)
            out = await _compare(fd, factory, progress)
            nursery.cancel_scope.cancel()
        return out
    finally:
        os.close(fd)


async def _compare(fd: int, factory: TargetFactory, progress: Progress) -> list[str]:
    progress.phase("listing")

    def listing() -> dict[bytes, w.Entry]:
        ours = {}
        for e in walk(fd):
            ours[e.path] = e
            progress.advance(files=1)
        return ours

    ours = await trio.to_thread.run_sync(listing)
    async with factory() as target:
        theirs = await target.list_tree()
        owners = os.geteuid() == 0
        out = []
        for d in differences(ours, theirs, owners=owners):
            out.append(f"{d.kind}: {os.fsdecode(d.path)}")
        # same size and mtime is not enough here: compare every regular file's contents
        todo = []
        for path, s in ours.items():
            r = theirs.get(path)
            if r is None or not stat.S_ISREG(s.mode) or not stat.S_ISREG(r.mode):
                continue
            if s.size == r.size:  # else already listed
                todo.append((path, s.size))
        progress.phase("comparing", len(todo), sum(size for _, size in todo))
        for path, size in todo:
            if not await _same_content(fd, target, path, size, progress):
                line = f"content: {os.fsdecode(path)}"
                if line not in out:
                    out.append(line)
            progress.advance(files=1, nbytes=size)
        return out


async def _same_content(
    dir_fd: int, target: Target, path: bytes, size: int, progress: Progress
) -> bool:
    bs = max(size, 1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    theirs: list[tuple[bool, int, tuple[bytes, ...]]] = []

    async def remote() -> None:
        theirs.append(await target.checksum(path, bs))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remote)  # the server hashes its copy while we hash ours
            _, ours = await trio.to_thread.run_sync(checksum_fd, fd, bs, progress.partial)
    finally:
        os.close(fd)
    found, _, digests = theirs[0]
    return found and digests == ours


def cmd_restore(args: argparse.Namespace) -> int:
    dest = args.dir
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ReplicaUsageError(f"{dest} must be an empty directory or not exist yet")
    created = not os.path.exists(dest)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise ReplicaUsageError(f"cannot create {dest}: {e.strerror}") from None
    try:
        source = _source_of(args)
        factory = _connect(args)
        with _progress(args, "restore") as progress:
            n = _run(lambda: _restore(dest, factory, progress, source))
    except BaseException:
        if created:  # leave nothing behind when nothing was restored
            with contextlib.suppress(OSError):
                os.rmdir(dest)
        raise
    print(f"restored {n} object(s) into {dest}")
    return 0


async def _restore(dest: str, factory: TargetFactory, progress: Progress, source: bytes) -> int:
    from fusefs.mirror import changes as ch
    from fusefs.replica.apply import ReplicaDir

    receiving = -1  # the fd of the file being received: the ticker shows its size

    def poll() -> None:
        if receiving >= 0:
            with contextlib.suppress(OSError):
                progress.partial(os.fstat(receiving).st_size)

    count = 0
    with ReplicaDir(dest) as out:
        async with factory() as target, trio.open_nursery() as nursery:
            nursery.start_soon(progress.ticker, poll)
            progress.phase("listing")
            entries = await target.list_tree()
            if len(entries) <= 1:
                # with serve --subtree-per-source an unknown source name is an empty replica
                raise ReplicaUsageError(
                    f"the target holds an empty replica for source {os.fsdecode(source)!r}: "
                    "nothing to restore (pass the mount's --source; 'fusefs status "
                    "MOUNTPOINT' shows it)"
                )
            files = [e for e in entries.values() if stat.S_ISREG(e.mode) and not e.link]
            progress.phase("restoring", len(files), sum(e.size for e in files))
            for path, e in entries.items():  # parents first
                perm = stat.S_IMODE(e.mode)
                if path != b".":
                    if e.link:  # a hard link to a name restored before it
                        out.apply(ch.Link(path, e.link))
                        count += 1
                        continue
                    if stat.S_ISDIR(e.mode):
                        out.apply(ch.Mkdir(path, perm, e.uid, e.gid))
                    elif stat.S_ISREG(e.mode):
                        out.apply(ch.Create(path, perm, e.uid, e.gid))
                        fd = out.open_for_write(path)
                        assert fd is not None
                        receiving = fd
                        off = 0
                        try:
                            while off < e.size:
                                n = await target.read_range(
                                    path, off, min(w.MAX_DATA, e.size - off), fd
                                )
                                if n == 0:
                                    break
                                off += n
                        finally:
                            receiving = -1
                            os.close(fd)
                        progress.advance(files=1, nbytes=off)
                    elif stat.S_ISLNK(e.mode):
                        out.apply(ch.Symlink(path, e.target, e.uid, e.gid))
                    else:
                        out.apply(ch.Mknod(path, e.mode, e.rdev, e.uid, e.gid))
                for name, value in e.xattrs:
                    out.apply(ch.SetXattr(path, name, value))
                count += 1
            # modes and times last (a read-only directory must still receive its children)
            for path, e in reversed(list(entries.items())):
                out.apply(
                    ch.SetAttr(
                        path,
                        mode=None if stat.S_ISLNK(e.mode) else stat.S_IMODE(e.mode),
                        uid=e.uid if os.geteuid() == 0 else None,
                        gid=e.gid if os.geteuid() == 0 else None,
                        mtime_ns=e.mtime_ns,
                    )
                )
            nursery.cancel_scope.cancel()
    return count


def read_status(mountpoint: str) -> list[dict[str, Any]]:
    """The replication status of each target of the mount on ``mountpoint``."""
    path = _registry_path(mountpoint)
    try:
        with open(path) as f:
            reg = json.load(f)
    except FileNotFoundError:
        raise StatusUnavailableError(
            f"{mountpoint} is not a fusefs mount with a replication target"
        ) from None
    except (OSError, ValueError) as e:
        raise StatusUnavailableError(f"cannot read {path}: {e}") from None
    out = []
    for d in reg.get("log_dirs", []):
        try:
            with open(os.path.join(d, "status.json")) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            state = {"log_dir": d, "last_error": f"no status: {e}"}
        if "source" in reg:
            state.setdefault("source", reg["source"])
        out.append(state)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    states = read_status(args.mountpoint)
    if args.json:
        print(json.dumps(states, indent=2, sort_keys=True))
        return 0
    now = time.time()
    for s in states:
        age = now - float(s.get("updated", now))
        print(f"target {s.get('target', '?')} ({s.get('mode', '?')})")
        print(f"  source         {s.get('source', '?')}")
        print(f"  connected      {'yes' if s.get('connected') else 'no'}")
        print(f"  ops pending    {s.get('ops_pending', '?')}")
        print(f"  bytes pending  {s.get('bytes_pending', '?')}")
        print(f"  lag            {s.get('lag_seconds', '?')} s")
        print(f"  last error     {s.get('last_error') or '-'}")
        if age > 5:
            print(f"  (status is {age:.0f} s old: is the mount still running?)")
    return 0


# -- standalone entry point (until fusefs/cli.py wires these in) --------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusefs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except FusefsError as e:
        print(f"fusefs: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
