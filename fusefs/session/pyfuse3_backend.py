"""Serve a filesystem on pyfuse3's own session (libfuse underneath): the reference session.

The same :class:`pyfuse3.Operations` object runs here and under :mod:`fusefs.session.session`;
this one copies every READ/WRITE through Python, so ``data=``, ``max_pages`` and
``max_background`` do not apply (libfuse negotiates its own limits).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import pyfuse3
import trio

from fusefs.errors import MountError
from fusefs.options import MountOptions, escape_option
from fusefs.session.mount import check_mountpoint, find_mount, set_read_ahead, unmount_or_detach

__all__ = ["pyfuse3_init_options", "run_pyfuse3"]

log = logging.getLogger(__name__)


def pyfuse3_init_options(opts: MountOptions, *, debug: bool = False) -> set[str]:
    """The option set for :func:`pyfuse3.init` equivalent to ``opts``."""
    # No max_read: libfuse refuses to start when it differs from what init() negotiates.
    options = {f"fsname={escape_option(opts.source)}"}
    if opts.subtype:
        options.add(f"subtype={escape_option(opts.subtype)}")
    for flag in ("allow_other", "default_permissions", "ro", "noexec"):
        if getattr(opts, flag):
            options.add(flag)
    if debug:
        options.add("debug")
    return options


def run_pyfuse3(
    ops: pyfuse3.Operations,
    mountpoint: str,
    opts: MountOptions,
    ready: Callable[[], None] | None = None,
    debug: bool = False,
) -> None:
    """Mount ``ops`` on ``mountpoint`` and serve it until unmounted (or SIGINT/SIGTERM).

    ``ready()`` is called once the mount answers requests.  A signal unmounts cleanly (lazily if
    the mount is busy); an unmount from outside (``fusermount3 -u``) ends the loop.  Returns
    normally in both cases.
    """
    path = check_mountpoint(mountpoint, nonempty=opts.nonempty)
    for name, value, default in (
        ("data", opts.data, "auto"),
        ("max_background", opts.max_background, None),
    ):
        if value != default:
            log.info("pyfuse3 session: ignoring %s=%s", name, value)
    if opts.writeback_cache and not getattr(ops, "enable_writeback_cache", False):
        ops.enable_writeback_cache = True
    try:
        pyfuse3.init(ops, path, pyfuse3_init_options(opts, debug=debug))
    except Exception as e:  # libfuse reports failures as RuntimeError without detail
        raise MountError(f"pyfuse3 could not mount {mountpoint}: {e}") from None
    log.info("mounted %s on %s (pyfuse3 session)", opts.source, path)

    try:
        trio.run(_serve, path, opts, ready)
    finally:
        # The loop ends when the kernel connection goes away (unmounted); if it ended any other
        # way (an exception, a failed unmount), the mount is still there: take it down.
        pyfuse3.close(unmount=find_mount(path) is not None)
    log.info("unmounted %s; exiting", path)


async def _serve(path: str, opts: MountOptions, ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_unmount_on_signals, path)
        nursery.start_soon(_announce, path, opts, ready)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _announce(path: str, opts: MountOptions, ready: Callable[[], None] | None) -> None:
    # stat() of the mount root is answered by pyfuse3.main(), so it runs in a thread.
    await trio.to_thread.run_sync(set_read_ahead, path, opts.read_ahead_kb, abandon_on_cancel=True)
    if ready is not None:
        try:
            ready()
        except Exception as e:
            log.warning("could not report readiness: %s", e)


async def _unmount_on_signals(path: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s: unmounting %s", signal.Signals(signum).name, path)
            if not await trio.to_thread.run_sync(unmount_or_detach, path):
                pyfuse3.terminate()
