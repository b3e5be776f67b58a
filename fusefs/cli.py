"""The ``fusefs`` command: mount a mirror of a directory, read a mount's counters.

``fusefs mount BACKING MOUNTPOINT [-o opts]`` (also ``fusefs BACKING MOUNTPOINT -o opts``, the
form ``mount.fuse3`` runs for an fstab line of type ``fuse.fusefs``) daemonizes once the mount is
ready, unless ``-f``.  ``fusefs stats MOUNTPOINT`` prints the counters of a running mount.

Errors are one line on stderr (``fusefs: error: ...``) and exit status 1; tracebacks only with
``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import select
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from fusefs.errors import (
    BackingMissingError,
    BackingNotDirectoryError,
    BackingUnreadableError,
    FusefsError,
    NotAFusefsMountError,
    SessionUnavailableError,
)
from fusefs.options import DATA_MODES, SESSIONS, MountOptions, parse_options
from fusefs.replica import cli as replica_cli

__all__ = ["STATS_XATTR", "build_parser", "check_backing", "main", "read_stats"]

log = logging.getLogger("fusefs")

PROG = "fusefs"
SUBCOMMANDS = ("mount", "stats", "serve", "restore", "verify", "status")
#: The xattr on a mount's root holding the session's counters as JSON.
STATS_XATTR = "user.fusefs.stats"
#: How long a backgrounding ``fusefs mount`` waits for the daemon to report the mount ready.
READY_TIMEOUT = 60.0
LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

OPTIONS_HELP = f"""\
mount options (-o, comma-separated, repeatable; unknown options are an error):
  allow_other            let other users access the mount (non-root: needs
                         user_allow_other in /etc/fuse.conf)
  default_permissions    let the kernel check permissions from the mode bits
  ro                     read-only mount (rw: the default)
  noexec                 forbid executing files from the mount
  fsname=NAME            the source shown in /proc/mounts (default: BACKING)
  subtype=NAME           the type shows as fuse.NAME (default: fusefs)
  nonempty               allow mounting over a non-empty directory
  attr_timeout=SECONDS   how long the kernel caches attributes (default 1.0)
  entry_timeout=SECONDS  how long the kernel caches name lookups (default 1.0)
  writeback_cache        let the kernel buffer writes (FUSE writeback cache)
  data=MODE              how file data moves: {"|".join(DATA_MODES)} (default auto:
                         kernel passthrough where possible, else splice)
  max_pages=N            largest request in 4 KiB pages, 1..256 (default 256; splice
                         and auto cap it to what one pipe holds: 254 under the usual
                         1 MiB fs.pipe-max-size, 256 with 2 MiB pipes)
  read_ahead_kb=N        read-ahead of the mount in KiB (default 1016: one whole
                         READ of 254 pages per window, not 254 + a 2-page straggler)
  max_background=N       background requests the kernel keeps in flight
  idle_spin_us=N         poll the device N us before sleeping when idle (default 50;
                         0 never spins): fast replies to one-request-at-a-time callers
  session={"|".join(SESSIONS)}  which FUSE session serves the mount (as --session)
  ignored (as added by mount(8)/fstab): rw, defaults, dev, nodev, suid, nosuid,
  exec, auto, noauto, user, nouser, users, _netdev, nofail, x-* (x-systemd.*),
  comment=*
  (a FUSE mount is always nosuid,nodev)
"""


# -- argument parsing --------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other fusefs error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="fusefs: a zero-copy FUSE mirror of a directory (splice and kernel "
        "passthrough).",
        epilog=f"'{PROG} BACKING MOUNTPOINT -o OPTS' (no subcommand) means '{PROG} mount ...', "
        "as mount.fuse3 runs it for an fstab line of type fuse.fusefs.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    mount = commands.add_parser(
        "mount",
        help="mount a mirror of BACKING on MOUNTPOINT",
        description="Mount a mirror of the directory BACKING on MOUNTPOINT.  Without -f, "
        "fusefs returns once the mount is ready and keeps serving it in the background until "
        "it is unmounted (fusermount3 -u MOUNTPOINT, or umount as root).",
        epilog=OPTIONS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("backing", metavar="BACKING", help="the directory to mirror")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    mount.add_argument(
        "-o",
        dest="options",
        metavar="OPTS",
        action="append",
        default=[],
        help="mount options, comma-separated (repeatable); listed below",
    )
    mount.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (log to stderr) instead of daemonizing",
    )
    mount.add_argument(
        "--session",
        choices=SESSIONS,
        default=None,
        help="the FUSE session: fusefs (ours: splice, passthrough, counters) or pyfuse3 "
        "(libfuse's, copying); default: the session= option, else fusefs",
    )
    mount.add_argument(
        "--log-file",
        metavar="FILE",
        default=None,
        help="append the log to FILE (default without -f: /tmp/fusefs-<MOUNTPOINT "
        "basename>-<pid>.log; with -f: stderr)",
    )
    mount.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log informational messages (in the foreground only warnings are logged otherwise)",
    )
    mount.add_argument(
        "--debug",
        action="store_true",
        help="log every request and show tracebacks of unexpected errors",
    )
    mount.add_argument(
        "-q", "--quiet", action="store_true", help="print nothing when the mount is ready"
    )
    replica_cli.add_mount_arguments(mount)
    mount.set_defaults(func=cmd_mount)

    stats = commands.add_parser(
        "stats",
        help="print the counters of a running fusefs mount",
        description=f"Print the counters a fusefs session keeps (requests, bytes spliced, "
        f"copied and passed through, ...), read from the {STATS_XATTR} attribute of the mount "
        "root.  Mounts served by --session pyfuse3 keep no counters.",
    )
    stats.add_argument("mountpoint", metavar="MOUNTPOINT", help="where fusefs is mounted")
    stats.add_argument("--json", action="store_true", help="print the raw JSON")
    stats.set_defaults(func=cmd_stats)
    replica_cli.add_subcommands(commands)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fusefs")
    except Exception:
        return "unknown"


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Insert the ``mount`` subcommand when it is left out (``fusefs SRC MNT -o ...``)."""
    args = list(argv)
    if args and args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help", "--version"):
        args.insert(0, "mount")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fusefs`` console script; returns the exit status."""
    args = build_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    debug = bool(getattr(args, "debug", False))
    try:
        status: int = args.func(args)
        return status
    except FusefsError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fusefs stats | head`: the reader left; not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug:
            log.exception("unexpected error")
        return _fail(_describe_unexpected(e, debug))


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 1


def _describe_unexpected(e: BaseException, debug: bool) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    hint = "" if debug else " (run with --debug for a traceback)"
    return f"unexpected {type(e).__name__}: {text}{hint}"


# -- fusefs mount ------------------------------------------------------------------------------


def check_backing(backing: str) -> str:
    """Check that ``backing`` is a directory this user can list; return its absolute path."""
    try:
        st = os.stat(backing)
    except FileNotFoundError:
        raise BackingMissingError(f"backing directory {backing} does not exist") from None
    except OSError as e:
        raise BackingUnreadableError(
            f"cannot access backing directory {backing}: {e.strerror}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise BackingNotDirectoryError(f"backing path {backing} is not a directory")
    try:
        with os.scandir(backing) as entries:
            next(iter(entries), None)
    except OSError as e:
        raise BackingUnreadableError(
            f"cannot read backing directory {backing}: {e.strerror}"
        ) from None
    if not os.access(backing, os.R_OK | os.X_OK):
        raise BackingUnreadableError(f"cannot read backing directory {backing}: permission denied")
    return os.path.abspath(backing)


def cmd_mount(args: argparse.Namespace) -> int:
    opts = parse_options(args.options)
    backing = check_backing(args.backing)
    mountpoint = os.path.abspath(args.mountpoint)
    opts = replace(opts, fsname=opts.fsname or backing)
    session = args.session or opts.session
    if session != opts.session:
        opts = replace(opts, session=session)

    from fusefs.session.mount import check_mountpoint

    check_mountpoint(mountpoint, nonempty=opts.nonempty)  # fail early, before backgrounding
    # The daemon chdirs to /: make replication paths absolute, and check the key now.
    args.mountpoint = mountpoint
    for name in ("key_file", "replica_log_dir"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    replica_cli.check_mount_arguments(args)
    if args.foreground:
        _setup_logging(args.log_file, debug=args.debug, verbose=args.verbose, foreground=True)
        serve(
            backing,
            mountpoint,
            opts,
            ready=_log_ready(backing, mountpoint),
            debug=args.debug,
            replication=args,
        )
        return 0
    return _mount_in_background(args, backing, mountpoint, opts)


#: GIL switch interval with a replication thread beside the FUSE loop: 0.2 ms instead of 5
#: made async replication of a 1 GiB cp durable 5.5% sooner (median of 24 alternating
#: rounds against a mount beside it, both orders; faster in 16 of 24, so: modest).
GIL_SWITCH_S = 0.0002


def serve(
    backing: str,
    mountpoint: str,
    opts: MountOptions,
    *,
    ready: Callable[[], None] | None = None,
    debug: bool = False,
    replication: argparse.Namespace | None = None,
) -> None:
    """Mount a mirror of ``backing`` on ``mountpoint`` and serve it until unmounted.

    ``replication`` carries the --target arguments; the replication sink starts here, in the
    serving process (after any fork), and stops once the session has ended.
    """
    sink = replica_cli.make_sink(replication, backing) if replication is not None else None
    if sink is not None:
        # The replication sender runs in a thread of this process and shares the GIL with the
        # FUSE loop, which otherwise may wait up to CPython's 5 ms switch interval for it
        # after each syscall: a writer blocked on every WRITE waits along.
        sys.setswitchinterval(GIL_SWITCH_S)
    try:
        ops = make_filesystem(backing, opts, changes=sink)
        if opts.session == "pyfuse3":
            from fusefs.session.pyfuse3_backend import run_pyfuse3

            run_pyfuse3(ops, mountpoint, opts, ready, debug)
            return
        try:
            from fusefs.session.session import run_session
        except ImportError as e:
            raise SessionUnavailableError(
                f"the fusefs session cannot be loaded ({e}); use --session pyfuse3"
            ) from None
        run_session(ops, mountpoint, opts, ready, debug)
    finally:
        replica_cli.close_sink(sink, mountpoint if sink is not None else None)


def kernel_version(release: str | None = None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a kernel release string (default: the running kernel's)."""
    m = re.match(
        r"(\d+)\.(\d+)(?:\.(\d+))?", release if release is not None else os.uname().release
    )
    if m is None:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


#: Stable series that got the direct-write page-cache fixes, and their first fixed release.
_DIRECT_WRITE_FIX_BACKPORTS = {(6, 18): 3, (6, 6): 120}


def coherent_direct_writes(version: tuple[int, int, int] | None) -> bool:
    """Whether a direct write on this kernel leaves no stale page cache behind for readers
    that have the file open.  6.6 dropped the range before the WRITE (80e4f25262f9), but a
    read racing the WRITE could cache the old bytes again; 6.19 also drops it after
    (b359af8275a9, with 1ce120dcefc0), backported to 6.18.3 and 6.6.120.  Elsewhere the
    mirror keeps the page cache (a version number cannot show other backports)."""
    if version is None:
        return False
    if version >= (6, 19, 0):
        return True
    first_fixed = _DIRECT_WRITE_FIX_BACKPORTS.get(version[:2])
    return first_fixed is not None and version[2] >= first_fixed


def make_filesystem(backing: str, opts: MountOptions, changes: Any = None) -> Any:
    """The mirror filesystem of ``backing`` configured by ``opts``."""
    try:
        from fusefs.mirror import MirrorFS
    except ImportError as e:
        raise SessionUnavailableError(f"the mirror filesystem cannot be loaded ({e})") from None
    return MirrorFS(
        backing,
        attr_timeout=opts.attr_timeout,
        entry_timeout=opts.entry_timeout,
        writeback=opts.writeback_cache,
        direct_writes=opts.session == "fusefs" and coherent_direct_writes(kernel_version()),
        changes=changes,
    )


def _log_ready(backing: str, mountpoint: str) -> Callable[[], None]:
    def ready() -> None:
        log.info("mounted %s on %s; serving (pid %d)", backing, mountpoint, os.getpid())

    return ready


def _setup_logging(log_file: str | None, *, debug: bool, verbose: bool, foreground: bool) -> None:
    if debug:
        level = logging.DEBUG
    elif verbose or not foreground or log_file:
        level = logging.INFO
    else:
        level = logging.WARNING
    handler: logging.Handler
    if log_file and foreground:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def default_log_file(mountpoint: str) -> str:
    name = os.path.basename(os.path.normpath(mountpoint)) or "root"
    return f"/tmp/fusefs-{name}-{os.getpid()}.log"


def _mount_in_background(
    args: argparse.Namespace, backing: str, mountpoint: str, opts: MountOptions
) -> int:
    """Double-fork a daemon that mounts and serves; return once it reports the mount ready."""
    log_path = os.path.abspath(args.log_file or default_log_file(mountpoint))
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise FusefsError(f"cannot open log file {log_path}: {e.strerror}") from None
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child: a new session, then fork again so the daemon is no session leader
        status = 1
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() == 0:
                status = _daemon(args, backing, mountpoint, opts, log_fd, write_end)
            else:
                status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    os.close(log_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        report = _wait_for_report(pipe)
    daemon_pid = report.get("pid", "?")
    if "mounted" in report:
        if not args.quiet:
            print(
                f"{PROG}: mounted {backing} on {mountpoint} (daemon pid {daemon_pid}, "
                f"log {log_path})",
                flush=True,
            )
        return 0
    if "error" in report:
        return _fail(report["error"])
    if "timeout" in report:
        return _fail(
            f"the daemon (pid {daemon_pid}) did not report the mount ready within "
            f"{READY_TIMEOUT:.0f} s; see {log_path}"
        )
    return _fail(f"the daemon exited before the mount was ready; see {log_path}")


def _wait_for_report(pipe: Any) -> dict[str, str]:
    """Read ``key value`` lines from the daemon until ``mounted``/``error``, EOF or timeout."""
    report: dict[str, str] = {}
    deadline = time.monotonic() + READY_TIMEOUT
    buffer = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            report["timeout"] = ""
            return report
        readable, _, _ = select.select([pipe], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(pipe.fileno(), 4096)
        if not chunk:
            return report
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            key, _, value = line.decode(errors="replace").partition(" ")
            report[key] = value
            if key in ("mounted", "error"):
                return report


def _daemon(
    args: argparse.Namespace,
    backing: str,
    mountpoint: str,
    opts: MountOptions,
    log_fd: int,
    report_fd: int,
) -> int:
    """The daemon: stdio to the log, serve, report readiness (or the error) on ``report_fd``."""
    reported = False

    def report(line: str) -> None:
        nonlocal reported
        if reported:
            return
        try:
            os.write(report_fd, (line + "\n").encode())
            if not line.startswith("pid "):
                reported = True
                os.close(report_fd)
        except OSError:
            reported = True

    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    _setup_logging(None, debug=args.debug, verbose=True, foreground=False)
    report(f"pid {os.getpid()}")
    log_ready = _log_ready(backing, mountpoint)

    def ready() -> None:
        log_ready()
        report("mounted")

    try:
        serve(backing, mountpoint, opts, ready=ready, debug=args.debug, replication=args)
    except FusefsError as e:
        log.error("%s", e)
        report(f"error {e}")
        return 1
    except BaseException as e:
        if args.debug:
            log.exception("unexpected error")
        message = _describe_unexpected(e, args.debug)
        log.error("%s", message)
        report(f"error {message}")
        return 1
    if not reported:  # unmounted before it was ever ready
        report("error the mount ended before it was ready; see the log")
    log.info("exiting")
    return 0


# -- fusefs stats ------------------------------------------------------------------------------


def read_stats(mountpoint: str) -> dict[str, Any]:
    """The counters of the fusefs mount on ``mountpoint`` (from its stats xattr)."""
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except FileNotFoundError:
        raise NotAFusefsMountError(f"{mountpoint} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            from fusefs.session.mount import find_mount

            info = find_mount(os.path.realpath(mountpoint))
            if info is None:
                raise NotAFusefsMountError(f"{mountpoint} is not a mount point") from None
            raise NotAFusefsMountError(
                f"{mountpoint} is not a fusefs mount with counters (type {info.fstype}; "
                "mounts served by --session pyfuse3 keep none)"
            ) from None
        if e.errno == errno.ENOTCONN:
            raise NotAFusefsMountError(
                f"{mountpoint} is a dead FUSE mount; clear it with: fusermount3 -uz {mountpoint}"
            ) from None
        raise NotAFusefsMountError(
            f"cannot read {STATS_XATTR} of {mountpoint}: {e.strerror}"
        ) from None
    try:
        stats = json.loads(raw)
    except ValueError:
        raise NotAFusefsMountError(f"{mountpoint}: {STATS_XATTR} is not JSON") from None
    if not isinstance(stats, dict):
        raise NotAFusefsMountError(f"{mountpoint}: {STATS_XATTR} is not a JSON object")
    return stats


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def format_stats(stats: dict[str, Any]) -> str:
    """Counters as aligned ``name  value`` lines (nested objects flattened as a.b.c)."""
    rows = list(_flatten(stats))
    if not rows:
        return "(no counters)"
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, value in rows:
        if isinstance(value, bool) or not isinstance(value, int | float):
            text = json.dumps(value) if not isinstance(value, str) else value
        elif isinstance(value, float):
            text = f"{value:,.3f}"
        else:
            text = f"{value:,}"
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = read_stats(args.mountpoint)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
