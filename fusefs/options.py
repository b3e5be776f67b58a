"""Mount options: ``-o opt,opt=val,...`` parsed into a frozen :class:`MountOptions`.

Everything here is a pure function of its arguments.  The same options drive both ways of
mounting: :meth:`MountOptions.kernel_mount_data` and :meth:`MountOptions.mount_flags` for
mount(2) as root, :meth:`MountOptions.fusermount_options` for ``fusermount3 -o`` otherwise.

Unknown options are an error (:class:`~fusefs.errors.OptionError`): fusefs never passes an option
it does not understand on to the kernel.  The generic options ``mount(8)`` and ``mount.fuse3``
add from an fstab line (``rw``, ``dev``, ``suid``, ``auto``, ``user``, ``_netdev``,
``x-systemd.*``, ...) are accepted and ignored; a FUSE mount is always ``nosuid,nodev``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, get_args

from fusefs.errors import OptionError

__all__ = [
    "DATA_MODES",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_RDONLY",
    "PAGE_SIZE",
    "SESSIONS",
    "DataMode",
    "MountOptions",
    "SessionName",
    "escape_option",
    "parse_options",
    "split_option_string",
]

DataMode = Literal["auto", "passthrough", "splice", "copy"]
SessionName = Literal["fusefs", "pyfuse3"]
DATA_MODES: tuple[str, ...] = get_args(DataMode)
SESSIONS: tuple[str, ...] = get_args(SessionName)

PAGE_SIZE = 4096
#: The kernel's ceiling for ``max_pages`` (FUSE_MAX_MAX_PAGES).
MAX_PAGES_LIMIT = 256

# mount(2) flags (linux/fs.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

# Options added by mount(8)/mount.fuse3/fstab that mean nothing to fusefs.
_IGNORED_FLAGS = frozenset(
    {
        "rw",  # (clears ro; handled below)
        "defaults",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",  # (clears noexec; handled below)
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "_netdev",
        "nofail",
    }
)
_IGNORED_PREFIXES = ("x-", "comment=")


@dataclass(frozen=True, slots=True)
class MountOptions:
    """What a mount looks like to the kernel and how fusefs serves it.  Defaults are safe."""

    #: Let users other than the mounting one see the files (non-root: needs user_allow_other).
    allow_other: bool = False
    #: Let the kernel check permissions from the mode bits instead of asking the filesystem.
    default_permissions: bool = False
    #: Read-only mount.
    ro: bool = False
    #: Forbid executing files from the mount.
    noexec: bool = False
    #: The "device" column of /proc/mounts; empty means the backing directory's path.
    fsname: str = ""
    #: The filesystem type shows as ``fuse.<subtype>``; empty gives plain ``fuse``.
    subtype: str = "fusefs"
    #: Allow mounting over a non-empty directory (hiding its contents).
    nonempty: bool = False
    #: Seconds the kernel may cache attributes.
    attr_timeout: float = 1.0
    #: Seconds the kernel may cache name lookups.
    entry_timeout: float = 1.0
    #: Let the kernel buffer writes in its page cache (FUSE_WRITEBACK_CACHE).
    writeback_cache: bool = False
    #: How READ data moves: passthrough (kernel reads the backing file), splice, copy, or auto.
    data: DataMode = "auto"
    #: Largest request/reply in pages.  Splicing modes cap it to what one pipe holds (254 with
    #: the usual 1 MiB pipe limit, 256 when the daemon may make 2 MiB pipes).
    max_pages: int = 256
    #: Read-ahead of the mount's backing device info, in KiB.  A multiple of the largest READ
    #: (254 pages with splice): 1024 KiB made every window one full READ plus a 1- or 2-page one.
    read_ahead_kb: int = 1016
    #: Maximum background requests in flight in the kernel; None keeps the kernel default.
    max_background: int | None = None
    #: Microseconds the reader polls the device before sleeping, when idle: a process issuing
    #: one request after another (rsync, find) then finds us awake (0: never spin).
    idle_spin_us: int = 50
    #: Which FUSE session serves the mount: ours (fusefs) or pyfuse3/libfuse's.
    session: SessionName = "fusefs"

    # -- derived values ------------------------------------------------------------------------

    @property
    def max_read(self) -> int:
        """Largest READ in bytes (``max_pages`` pages)."""
        return self.max_pages * PAGE_SIZE

    @property
    def fstype(self) -> str:
        """The type given to mount(2): ``fuse.<subtype>`` or ``fuse``."""
        return f"fuse.{self.subtype}" if self.subtype else "fuse"

    @property
    def source(self) -> str:
        """The source given to mount(2) (shown as the device in /proc/mounts)."""
        return self.fsname or "fusefs"

    def mount_flags(self) -> int:
        """The mount(2) flags: always nosuid,nodev; plus rdonly/noexec as asked."""
        flags = MS_NOSUID | MS_NODEV
        if self.ro:
            flags |= MS_RDONLY
        if self.noexec:
            flags |= MS_NOEXEC
        return flags

    def kernel_mount_data(self, fd: int, rootmode: int, uid: int, gid: int) -> str:
        """The data string for mount(2) of a FUSE filesystem served on ``fd``.

        ``rootmode`` is the file type bits of the root (``stat.S_IFDIR``), written in octal.
        """
        parts = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={uid}", f"group_id={gid}"]
        if self.allow_other:
            parts.append("allow_other")
        if self.default_permissions:
            parts.append("default_permissions")
        parts.append(f"max_read={self.max_read}")
        return ",".join(parts)

    def fusermount_options(self) -> str:
        """The ``-o`` argument for ``fusermount3`` (the unprivileged mount helper)."""
        parts = ["ro" if self.ro else "rw", "nosuid", "nodev"]
        if self.noexec:
            parts.append("noexec")
        parts.append("fsname=" + escape_option(self.source))
        if self.subtype:
            parts.append("subtype=" + escape_option(self.subtype))
        if self.allow_other:
            parts.append("allow_other")
        if self.default_permissions:
            parts.append("default_permissions")
        parts.append(f"max_read={self.max_read}")
        return ",".join(parts)

    def to_option_string(self) -> str:
        """The ``-o`` string that parses back to these options (non-default values only)."""
        default = MountOptions()
        parts: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if isinstance(value, bool):  # every flag defaults to off
                parts.append(f.name)
            else:
                parts.append(f"{f.name}={escape_option(str(value))}")
        return ",".join(parts)


def escape_option(value: str) -> str:
    """Escape ``\\`` and ``,`` so a value survives an option list (libfuse's convention)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def split_option_string(text: str) -> list[str]:
    """Split ``a,b=c,d`` at commas not escaped by a backslash; drop empty items."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item for item in (i.strip() for i in items) if item]


# -- parsing -----------------------------------------------------------------------------------

_FLAGS = ("allow_other", "default_permissions", "ro", "noexec", "nonempty", "writeback_cache")
_STRINGS = ("fsname", "subtype")
_FLOATS = ("attr_timeout", "entry_timeout")
#: name -> (minimum, maximum) for integer options.
_INTS: dict[str, tuple[int, int]] = {
    "max_pages": (1, MAX_PAGES_LIMIT),
    "read_ahead_kb": (0, 1 << 30),
    "max_background": (1, 65535),
    "idle_spin_us": (0, 100_000),
}
_CHOICES: dict[str, tuple[str, ...]] = {"data": DATA_MODES, "session": SESSIONS}

KNOWN_OPTIONS: tuple[str, ...] = (
    *_FLAGS,
    *(f"{name}=" for name in (*_STRINGS, *_FLOATS, *_INTS, *_CHOICES)),
)


def parse_options(values: Iterable[str], base: MountOptions | None = None) -> MountOptions:
    """Parse ``-o`` arguments (each a comma-separated list; later options win)."""
    changes: dict[str, Any] = {}
    for text in values:
        for item in split_option_string(text):
            _parse_one(item, changes)
    opts = replace(base or MountOptions(), **changes)
    if opts.allow_other and not opts.default_permissions:
        # The daemon applies every operation with its own rights (root, usually): with other
        # users on the mount, only the kernel's mode-bit checks keep them to their own rights.
        opts = replace(opts, default_permissions=True)
    return opts


def _parse_one(item: str, changes: dict[str, Any]) -> None:
    name, sep, value = item.partition("=")
    has_value = bool(sep)
    name = name.strip()
    value = value.strip()

    if name == "rw" and not has_value:
        changes["ro"] = False
        return
    if name == "exec" and not has_value:
        changes["noexec"] = False
        return
    if (name in _IGNORED_FLAGS and not has_value) or item.startswith(_IGNORED_PREFIXES):
        return

    if name in _FLAGS:
        if has_value:
            raise OptionError(f"mount option '{name}' takes no value (got '{item}')")
        changes[name] = True
    elif name in _STRINGS:
        if not has_value:
            raise OptionError(f"mount option '{name}' needs a value: {name}=...")
        if name == "subtype" and not all(c.isalnum() or c in "_-." for c in value):
            raise OptionError(f"subtype may only contain letters, digits, '_', '-', '.': {value!r}")
        changes[name] = value
    elif name in _FLOATS:
        changes[name] = _parse_float(name, value, has_value)
    elif name in _INTS:
        changes[name] = _parse_int(name, value, has_value)
    elif name in _CHOICES:
        choices = _CHOICES[name]
        if value not in choices:
            raise OptionError(
                f"mount option '{name}' must be one of {', '.join(choices)} (got '{value}')"
            )
        changes[name] = value
    else:
        raise OptionError(
            f"unknown mount option '{name}' (known: {', '.join(KNOWN_OPTIONS)}; "
            "see 'fusefs mount --help')"
        )


def _parse_float(name: str, value: str, has_value: bool) -> float:
    if not has_value or not value:
        raise OptionError(f"mount option '{name}' needs a number of seconds: {name}=1.5")
    try:
        number = float(value)
    except ValueError:
        raise OptionError(
            f"mount option '{name}' must be a number of seconds (got '{value}')"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise OptionError(f"mount option '{name}' must be >= 0 seconds (got '{value}')")
    return number


def _parse_int(name: str, value: str, has_value: bool) -> int:
    low, high = _INTS[name]
    if not has_value or not value:
        raise OptionError(f"mount option '{name}' needs a whole number: {name}={low}")
    try:
        number = int(value, 10)
    except ValueError:
        raise OptionError(f"mount option '{name}' must be a whole number (got '{value}')") from None
    if not low <= number <= high:
        raise OptionError(f"mount option '{name}' must be between {low} and {high} (got {number})")
    return number
