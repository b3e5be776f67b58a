"""INIT negotiation: the kernel's offer and our wishes in, the INIT reply and what was agreed out.

Pure: no state, no I/O.  The rules (libfuse's and the kernel's, fuse_kernel.h "Version
negotiation"):

* major 7 on both sides; minor is the smaller of the two.  A kernel offering a newer major gets a
  reply naming only our major/minor (it may retry with ours); an older one cannot be served.
* We set only flags the kernel offered, only flags we asked for, and never flags whose protocol
  this codebase does not implement (DAX, security contexts, supplementary groups, io_uring,
  request timeouts, idmapped mounts, resend).
* Bits 32.. go to ``flags2`` and are only read by the kernel if our reply sets FUSE_INIT_EXT.
* The kernel ignores FUSE_PASSTHROUGH together with FUSE_WRITEBACK_CACHE (and needs a
  ``max_stack_depth`` of 1..2): passthrough wins when both are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi
from .errors import ProtocolError
from .replies import InitReply, reply_init
from .requests import Init

__all__ = ["SUPPORTED_FLAGS", "InitConfig", "Negotiated", "negotiate"]

#: Every flag negotiate() can ever grant.
SUPPORTED_FLAGS = (
    abi.FUSE_ASYNC_READ
    | abi.FUSE_POSIX_LOCKS
    | abi.FUSE_ATOMIC_O_TRUNC
    | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_BIG_WRITES
    | abi.FUSE_DONT_MASK
    | abi.FUSE_SPLICE_WRITE
    | abi.FUSE_SPLICE_MOVE
    | abi.FUSE_SPLICE_READ
    | abi.FUSE_FLOCK_LOCKS
    | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_DO_READDIRPLUS
    | abi.FUSE_READDIRPLUS_AUTO
    | abi.FUSE_ASYNC_DIO
    | abi.FUSE_WRITEBACK_CACHE
    | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_HANDLE_KILLPRIV
    | abi.FUSE_POSIX_ACL
    | abi.FUSE_MAX_PAGES
    | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_EXPLICIT_INVAL_DATA
    | abi.FUSE_HANDLE_KILLPRIV_V2
    | abi.FUSE_SETXATTR_EXT
    | abi.FUSE_INIT_EXT
    | abi.FUSE_DIRECT_IO_ALLOW_MMAP
    | abi.FUSE_PASSTHROUGH
)


@dataclass(frozen=True, slots=True)
class InitConfig:
    """What the filesystem would like; each wish is granted only if the kernel offers it.

    Defaults suit a passthrough mirror: parallel, asynchronous, big requests; the kernel does
    locking and umask locally; no writeback cache (writes reach us, in order, as they happen).
    """

    want_async_read: bool = True
    want_parallel_dirops: bool = True
    want_readdirplus: bool = True
    want_readdirplus_auto: bool = True
    want_big_writes: bool = True
    want_writeback_cache: bool = False
    want_passthrough: bool = False
    want_splice: bool = True  # SPLICE_READ / SPLICE_WRITE / SPLICE_MOVE
    want_posix_locks: bool = False  # False: the kernel does POSIX locking locally
    want_flock_locks: bool = False  # False: the kernel does flock() locally
    want_atomic_o_trunc: bool = True  # O_TRUNC arrives in OPEN instead of a SETATTR first
    want_export_support: bool = False
    want_dont_mask: bool = False  # False: the kernel applies the umask before we see the mode
    want_handle_killpriv: bool = False
    want_handle_killpriv_v2: bool = False
    want_auto_inval_data: bool = True
    want_explicit_inval_data: bool = False
    want_async_dio: bool = True
    want_cache_symlinks: bool = False
    want_posix_acl: bool = False
    want_setxattr_ext: bool = False  # if granted, decode with setxattr_ext=True
    want_direct_io_allow_mmap: bool = False
    max_pages: int = 255  # 255 * 4 KiB + header fits a default 1 MiB pipe for spliced replies
    max_readahead: int = 1 << 20
    max_background: int = 64
    congestion_threshold: int = 48
    max_stack_depth: int = 1


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What both sides agreed to.  ``established`` is False only for the major-mismatch reply,
    after which the kernel may send another INIT."""

    established: bool
    major: int
    minor: int
    kernel_flags: int  # what the kernel offered
    flags: int  # what we granted (64-bit)
    max_readahead: int
    max_write: int
    max_pages: int
    max_background: int
    congestion_threshold: int
    max_stack_depth: int
    time_gran: int

    def has(self, flag: int) -> bool:
        """Whether ``flag`` was granted."""
        return bool(self.flags & flag)

    @property
    def passthrough(self) -> bool:
        return bool(self.flags & abi.FUSE_PASSTHROUGH)

    @property
    def writeback_cache(self) -> bool:
        return bool(self.flags & abi.FUSE_WRITEBACK_CACHE)

    @property
    def readdirplus(self) -> bool:
        return bool(self.flags & abi.FUSE_DO_READDIRPLUS)

    @property
    def readdirplus_auto(self) -> bool:
        return bool(self.flags & abi.FUSE_READDIRPLUS_AUTO)

    @property
    def setxattr_ext(self) -> bool:
        return bool(self.flags & abi.FUSE_SETXATTR_EXT)

    @property
    def posix_locks(self) -> bool:
        return bool(self.flags & abi.FUSE_POSIX_LOCKS)

    @property
    def flock_locks(self) -> bool:
        return bool(self.flags & abi.FUSE_FLOCK_LOCKS)

    @property
    def atomic_o_trunc(self) -> bool:
        return bool(self.flags & abi.FUSE_ATOMIC_O_TRUNC)

    @property
    def export_support(self) -> bool:
        return bool(self.flags & abi.FUSE_EXPORT_SUPPORT)

    @property
    def dont_mask(self) -> bool:
        return bool(self.flags & abi.FUSE_DONT_MASK)

    @property
    def parallel_dirops(self) -> bool:
        return bool(self.flags & abi.FUSE_PARALLEL_DIROPS)

    @property
    def splice_read(self) -> bool:
        return bool(self.flags & abi.FUSE_SPLICE_READ)

    @property
    def splice_write(self) -> bool:
        return bool(self.flags & abi.FUSE_SPLICE_WRITE)

    @property
    def splice_move(self) -> bool:
        return bool(self.flags & abi.FUSE_SPLICE_MOVE)

    @property
    def handle_killpriv(self) -> bool:
        return bool(self.flags & abi.FUSE_HANDLE_KILLPRIV)

    @property
    def handle_killpriv_v2(self) -> bool:
        """We clear suid/sgid ourselves when WRITE/SETATTR/OPEN carry a KILL_SUIDGID flag."""
        return bool(self.flags & abi.FUSE_HANDLE_KILLPRIV_V2)

    @property
    def async_read(self) -> bool:
        return bool(self.flags & abi.FUSE_ASYNC_READ)

    @property
    def expire_only(self) -> bool:
        """The kernel accepts FUSE_EXPIRE_ONLY in notify_inval_entry (a kernel capability)."""
        return bool(self.kernel_flags & abi.FUSE_HAS_EXPIRE_ONLY)


_WISHES = (
    ("want_async_read", abi.FUSE_ASYNC_READ),
    ("want_parallel_dirops", abi.FUSE_PARALLEL_DIROPS),
    ("want_readdirplus", abi.FUSE_DO_READDIRPLUS),
    ("want_big_writes", abi.FUSE_BIG_WRITES),
    ("want_writeback_cache", abi.FUSE_WRITEBACK_CACHE),
    ("want_passthrough", abi.FUSE_PASSTHROUGH),
    ("want_splice", abi.FUSE_SPLICE_READ | abi.FUSE_SPLICE_WRITE | abi.FUSE_SPLICE_MOVE),
    ("want_posix_locks", abi.FUSE_POSIX_LOCKS),
    ("want_flock_locks", abi.FUSE_FLOCK_LOCKS),
    ("want_atomic_o_trunc", abi.FUSE_ATOMIC_O_TRUNC),
    ("want_export_support", abi.FUSE_EXPORT_SUPPORT),
    ("want_dont_mask", abi.FUSE_DONT_MASK),
    ("want_handle_killpriv", abi.FUSE_HANDLE_KILLPRIV),
    ("want_handle_killpriv_v2", abi.FUSE_HANDLE_KILLPRIV_V2),
    ("want_auto_inval_data", abi.FUSE_AUTO_INVAL_DATA),
    ("want_explicit_inval_data", abi.FUSE_EXPLICIT_INVAL_DATA),
    ("want_async_dio", abi.FUSE_ASYNC_DIO),
    ("want_cache_symlinks", abi.FUSE_CACHE_SYMLINKS),
    ("want_posix_acl", abi.FUSE_POSIX_ACL),
    ("want_setxattr_ext", abi.FUSE_SETXATTR_EXT),
    ("want_direct_io_allow_mmap", abi.FUSE_DIRECT_IO_ALLOW_MMAP),
)


def negotiate(init: Init, wanted: InitConfig | None = None) -> tuple[bytes, Negotiated]:
    """Answer the kernel's INIT.  Returns the reply bytes and what was agreed.

    Raises :class:`ProtocolError` for a kernel older than 7.12 (whose request layouts this codec
    does not decode); the caller should then give up the mount.
    """
    if wanted is None:
        wanted = InitConfig()
    ours = abi.FUSE_KERNEL_VERSION
    if init.major > ours:
        reply = InitReply(ours, abi.FUSE_KERNEL_MINOR_VERSION)
        agreed = Negotiated(
            established=False, major=ours, minor=abi.FUSE_KERNEL_MINOR_VERSION,
            kernel_flags=0, flags=0, max_readahead=0, max_write=0, max_pages=0,
            max_background=0, congestion_threshold=0, max_stack_depth=0, time_gran=0,
        )  # fmt: skip
        return reply_init(init.unique, reply), agreed
    if init.major < ours or init.minor < abi.FUSE_MIN_KERNEL_MINOR_VERSION:
        raise ProtocolError(
            f"kernel FUSE protocol {init.major}.{init.minor} is too old "
            f"(need {ours}.{abi.FUSE_MIN_KERNEL_MINOR_VERSION} or newer)"
        )
    minor = min(init.minor, abi.FUSE_KERNEL_MINOR_VERSION)
    offered = init.flags
    if not offered & abi.FUSE_INIT_EXT:
        offered &= 0xFFFFFFFF  # flags2 is meaningless without INIT_EXT

    want = 0
    for attr, bits in _WISHES:
        if getattr(wanted, attr):
            want |= bits
    if want & abi.FUSE_DO_READDIRPLUS and wanted.want_readdirplus_auto:
        want |= abi.FUSE_READDIRPLUS_AUTO
    if want & abi.FUSE_PASSTHROUGH:
        want &= ~abi.FUSE_WRITEBACK_CACHE  # the kernel would silently drop passthrough
    want |= abi.FUSE_MAX_PAGES | abi.FUSE_INIT_EXT  # limits and flags2 we always want read
    flags = offered & want & SUPPORTED_FLAGS
    if not flags & abi.FUSE_INIT_EXT:
        flags &= 0xFFFFFFFF

    if flags & abi.FUSE_MAX_PAGES:
        max_pages = max(1, min(wanted.max_pages, abi.FUSE_MAX_MAX_PAGES))
    else:
        max_pages = abi.FUSE_DEFAULT_MAX_PAGES_PER_REQ
    max_stack_depth = 0
    if flags & abi.FUSE_PASSTHROUGH:
        max_stack_depth = max(1, min(wanted.max_stack_depth, abi.FILESYSTEM_MAX_STACK_DEPTH))
    max_background = max(0, min(wanted.max_background, 0xFFFF))
    congestion = max(0, min(wanted.congestion_threshold, max_background or 0xFFFF))

    agreed = Negotiated(
        established=True,
        major=ours,
        minor=minor,
        kernel_flags=offered,
        flags=flags,
        max_readahead=max(0, min(init.max_readahead, wanted.max_readahead)),
        max_write=max_pages * abi.PAGE_SIZE,
        max_pages=max_pages,
        max_background=max_background,
        congestion_threshold=congestion,
        max_stack_depth=max_stack_depth,
        time_gran=1,
    )
    reply = InitReply(
        major=ours,
        minor=minor,
        max_readahead=agreed.max_readahead,
        flags=flags,
        max_background=max_background,
        congestion_threshold=congestion,
        max_write=agreed.max_write,
        time_gran=1,
        max_pages=max_pages if flags & abi.FUSE_MAX_PAGES else 0,
        max_stack_depth=max_stack_depth,
    )
    return reply_init(init.unique, reply), agreed
