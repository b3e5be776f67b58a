"""The FUSE kernel ABI (protocol 7.41, checked against libfuse's include/fuse_kernel.h 7.45).

Constants and precompiled :class:`struct.Struct` layouts only: every struct of the wire protocol
as one little-endian ``Struct`` so that decoding and encoding are single C calls.  Field order in
each format follows the C struct exactly; the size constants are asserted against the C sizes in
the tests.  Times are packed signed ('q') although the C fields say ``uint64_t``: the kernel
treats them as ``time64_t`` and a signed format lets pre-1970 times round-trip.
"""

from __future__ import annotations

import enum
from struct import Struct
from typing import Final

# --- Versions ---------------------------------------------------------------------------------

FUSE_KERNEL_VERSION: Final = 7
#: The newest minor this codec speaks (FUSE_PASSTHROUGH arrived in 7.40, ALLOW_IDMAP in 7.41).
FUSE_KERNEL_MINOR_VERSION: Final = 41
#: The oldest minor the request layouts here are valid for (umask in create/mknod arrived in 7.12).
FUSE_MIN_KERNEL_MINOR_VERSION: Final = 12
FUSE_ROOT_ID: Final = 1
FUSE_MIN_READ_BUFFER: Final = 8192
#: Kernel's built-in page limit per request (FUSE_MAX_MAX_PAGES, without the sysctl raised).
FUSE_MAX_MAX_PAGES: Final = 256
#: Pages per request when FUSE_MAX_PAGES is not negotiated.
FUSE_DEFAULT_MAX_PAGES_PER_REQ: Final = 32
#: Kernel's FILESYSTEM_MAX_STACK_DEPTH: passthrough's max_stack_depth must be 1..2.
FILESYSTEM_MAX_STACK_DEPTH: Final = 2
PAGE_SIZE: Final = 4096


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096


#: Requests the kernel expects no reply to (replying is an error: the unique is not pending).
NO_REPLY_OPCODES: Final = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET})


class NotifyCode(enum.IntEnum):
    """``enum fuse_notify_code``: the ``error`` field of an unsolicited (unique 0) message."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


FUSE_NOTIFY_POLL: Final = 1
FUSE_NOTIFY_INVAL_INODE: Final = 2
FUSE_NOTIFY_INVAL_ENTRY: Final = 3
FUSE_NOTIFY_STORE: Final = 4
FUSE_NOTIFY_RETRIEVE: Final = 5
FUSE_NOTIFY_DELETE: Final = 6
FUSE_NOTIFY_RESEND: Final = 7

# --- INIT flags (64-bit: bits 32.. travel in init_in/out.flags2) ------------------------------

FUSE_ASYNC_READ: Final = 1 << 0
FUSE_POSIX_LOCKS: Final = 1 << 1
FUSE_FILE_OPS: Final = 1 << 2
FUSE_ATOMIC_O_TRUNC: Final = 1 << 3
FUSE_EXPORT_SUPPORT: Final = 1 << 4
FUSE_BIG_WRITES: Final = 1 << 5
FUSE_DONT_MASK: Final = 1 << 6
FUSE_SPLICE_WRITE: Final = 1 << 7
FUSE_SPLICE_MOVE: Final = 1 << 8
FUSE_SPLICE_READ: Final = 1 << 9
FUSE_FLOCK_LOCKS: Final = 1 << 10
FUSE_HAS_IOCTL_DIR: Final = 1 << 11
FUSE_AUTO_INVAL_DATA: Final = 1 << 12
FUSE_DO_READDIRPLUS: Final = 1 << 13
FUSE_READDIRPLUS_AUTO: Final = 1 << 14
FUSE_ASYNC_DIO: Final = 1 << 15
FUSE_WRITEBACK_CACHE: Final = 1 << 16
FUSE_NO_OPEN_SUPPORT: Final = 1 << 17
FUSE_PARALLEL_DIROPS: Final = 1 << 18
FUSE_HANDLE_KILLPRIV: Final = 1 << 19
FUSE_POSIX_ACL: Final = 1 << 20
FUSE_ABORT_ERROR: Final = 1 << 21
FUSE_MAX_PAGES: Final = 1 << 22
FUSE_CACHE_SYMLINKS: Final = 1 << 23
FUSE_NO_OPENDIR_SUPPORT: Final = 1 << 24
FUSE_EXPLICIT_INVAL_DATA: Final = 1 << 25
FUSE_MAP_ALIGNMENT: Final = 1 << 26
FUSE_SUBMOUNTS: Final = 1 << 27
FUSE_HANDLE_KILLPRIV_V2: Final = 1 << 28
FUSE_SETXATTR_EXT: Final = 1 << 29
FUSE_INIT_EXT: Final = 1 << 30
FUSE_INIT_RESERVED: Final = 1 << 31
FUSE_SECURITY_CTX: Final = 1 << 32
FUSE_HAS_INODE_DAX: Final = 1 << 33
FUSE_CREATE_SUPP_GROUP: Final = 1 << 34
FUSE_HAS_EXPIRE_ONLY: Final = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP: Final = 1 << 36
FUSE_PASSTHROUGH: Final = 1 << 37
FUSE_NO_EXPORT_SUPPORT: Final = 1 << 38
FUSE_HAS_RESEND: Final = 1 << 39
FUSE_ALLOW_IDMAP: Final = 1 << 40
FUSE_OVER_IO_URING: Final = 1 << 41
FUSE_REQUEST_TIMEOUT: Final = 1 << 42

# --- Per-request flag words ------------------------------------------------------------------

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_STREAM: Final = 1 << 4
FOPEN_NOFLUSH: Final = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6
FOPEN_PASSTHROUGH: Final = 1 << 7

FUSE_RELEASE_FLUSH: Final = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK: Final = 1 << 1
FUSE_GETATTR_FH: Final = 1 << 0
FUSE_LK_FLOCK: Final = 1 << 0
FUSE_WRITE_CACHE: Final = 1 << 0
FUSE_WRITE_LOCKOWNER: Final = 1 << 1
FUSE_WRITE_KILL_SUIDGID: Final = 1 << 2
FUSE_READ_LOCKOWNER: Final = 1 << 1
FUSE_FSYNC_FDATASYNC: Final = 1 << 0
FUSE_OPEN_KILL_SUIDGID: Final = 1 << 0
FUSE_SETXATTR_ACL_KILL_SGID: Final = 1 << 0
FUSE_EXPIRE_ONLY: Final = 1 << 0
FUSE_ATTR_SUBMOUNT: Final = 1 << 0
FUSE_ATTR_DAX: Final = 1 << 1
FUSE_POLL_SCHEDULE_NOTIFY: Final = 1 << 0
FUSE_IOCTL_COMPAT: Final = 1 << 0
FUSE_IOCTL_UNRESTRICTED: Final = 1 << 1
FUSE_IOCTL_RETRY: Final = 1 << 2
FUSE_IOCTL_32BIT: Final = 1 << 3
FUSE_IOCTL_DIR: Final = 1 << 4
FUSE_IOCTL_COMPAT_X32: Final = 1 << 5
#: High bit of in_header.unique on a request the kernel resends (FUSE_HAS_RESEND).
FUSE_UNIQUE_RESEND: Final = 1 << 63

# --- /dev/fuse ioctls ------------------------------------------------------------------------

FUSE_DEV_IOC_MAGIC: Final = 229
FUSE_DEV_IOC_CLONE: Final = 0x8004E500  # _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_BACKING_OPEN: Final = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE: Final = 0x4004E502  # _IOW(229, 2, uint32_t)
FUSE_DEV_IOC_SYNC_INIT: Final = 0xE503  # _IO(229, 3)

# --- Struct layouts --------------------------------------------------------------------------

# Fragments reused in composite structs (no leading '<': they are concatenated).
_ATTR = "QQQqqqIIIIIIIIII"  # fuse_attr
_ENTRY_OUT = "QQQQII" + _ATTR  # fuse_entry_out
_FILE_LOCK = "QQII"  # fuse_file_lock
_OUT_HEADER = "IiQ"  # fuse_out_header

IN_HEADER: Final = Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER: Final = Struct("<" + _OUT_HEADER)  # len error unique
ATTR: Final = Struct("<" + _ATTR)
ENTRY_OUT: Final = Struct("<" + _ENTRY_OUT)
ATTR_OUT: Final = Struct("<QII" + _ATTR)  # attr_valid attr_valid_nsec dummy attr
KSTATFS: Final = Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize
FILE_LOCK: Final = Struct("<" + _FILE_LOCK)
FORGET_IN: Final = Struct("<Q")
FORGET_ONE: Final = Struct("<QQ")  # nodeid nlookup
BATCH_FORGET_IN: Final = Struct("<II")  # count dummy
GETATTR_IN: Final = Struct("<IIQ")  # getattr_flags dummy fh
MKNOD_IN: Final = Struct("<IIII")  # mode rdev umask padding
MKDIR_IN: Final = Struct("<II")  # mode umask
RENAME_IN: Final = Struct("<Q")  # newdir
RENAME2_IN: Final = Struct("<QII")  # newdir flags padding
LINK_IN: Final = Struct("<Q")  # oldnodeid
# valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid
# unused5
SETATTR_IN: Final = Struct("<IIQQQqqqIIIIIIII")
OPEN_IN: Final = Struct("<II")  # flags open_flags
CREATE_IN: Final = Struct("<IIII")  # flags mode umask open_flags
OPEN_OUT: Final = Struct("<QIi")  # fh open_flags backing_id
RELEASE_IN: Final = Struct("<QIIQ")  # fh flags release_flags lock_owner
FLUSH_IN: Final = Struct("<QIIQ")  # fh unused padding lock_owner
READ_IN: Final = Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN: Final = Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT: Final = Struct("<II")  # size padding
STATFS_OUT: Final = KSTATFS
FSYNC_IN: Final = Struct("<QII")  # fh fsync_flags padding
SETXATTR_IN_COMPAT: Final = Struct("<II")  # size flags (without FUSE_SETXATTR_EXT)
SETXATTR_IN: Final = Struct("<IIII")  # size flags setxattr_flags padding
GETXATTR_IN: Final = Struct("<II")  # size padding
GETXATTR_OUT: Final = Struct("<II")  # size padding
LK_IN: Final = Struct("<QQ" + _FILE_LOCK + "II")  # fh owner lk lk_flags padding
LK_OUT: Final = FILE_LOCK
ACCESS_IN: Final = Struct("<II")  # mask padding
INIT_IN: Final = Struct("<IIIII44x")  # major minor max_readahead flags flags2 unused[11]
INIT_IN_COMPAT: Final = Struct("<IIII")  # before INIT_EXT (kernels < 5.17)
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 max_stack_depth request_timeout unused[11]
INIT_OUT: Final = Struct("<IIIIHHIIHHIIH22x")
INTERRUPT_IN: Final = Struct("<Q")
BMAP_IN: Final = Struct("<QII")  # block blocksize padding
BMAP_OUT: Final = Struct("<Q")
IOCTL_IN: Final = Struct("<QIIQII")  # fh flags cmd arg in_size out_size
IOCTL_OUT: Final = Struct("<iIII")  # result flags in_iovs out_iovs
POLL_IN: Final = Struct("<QQII")  # fh kh flags events
POLL_OUT: Final = Struct("<II")  # revents padding
FALLOCATE_IN: Final = Struct("<QQQII")  # fh offset length mode padding
DIRENT: Final = Struct("<QQII")  # ino off namelen type (name follows)
DIRENTPLUS: Final = Struct("<" + _ENTRY_OUT + "QQII")  # entry_out + dirent
NOTIFY_INVAL_INODE_OUT: Final = Struct("<Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT: Final = Struct("<QII")  # parent namelen flags
NOTIFY_DELETE_OUT: Final = Struct("<QQII")  # parent child namelen padding
NOTIFY_STORE_OUT: Final = Struct("<QQII")  # nodeid offset size padding
NOTIFY_RETRIEVE_OUT: Final = Struct("<QQQII")  # notify_unique nodeid offset size padding
NOTIFY_RETRIEVE_IN: Final = Struct("<QQIIQQ")  # dummy1 offset size dummy2 dummy3 dummy4
BACKING_MAP: Final = Struct("<iIQ")  # fd flags padding
BACKING_ID: Final = Struct("<I")  # FUSE_DEV_IOC_BACKING_CLOSE argument
LSEEK_IN: Final = Struct("<QqII")  # fh offset whence padding
LSEEK_OUT: Final = Struct("<q")
COPY_FILE_RANGE_IN: Final = Struct("<QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
COPY_FILE_RANGE_OUT: Final = Struct("<Q")  # bytes_copied (FUSE_COPY_FILE_RANGE_64 only)
SYNCFS_IN: Final = Struct("<Q")
STATX_IN: Final = Struct("<IIQII")  # getattr_flags reserved fh sx_flags sx_mask
EXT_HEADER: Final = Struct("<II")  # size type

# Replies as one struct: out header + body, so each reply is a single pack() call.
OUT_ENTRY: Final = Struct("<" + _OUT_HEADER + _ENTRY_OUT)
OUT_ATTR: Final = Struct("<" + _OUT_HEADER + "QII" + _ATTR)
OUT_OPEN: Final = Struct("<" + _OUT_HEADER + "QIi")
OUT_CREATE: Final = Struct("<" + _OUT_HEADER + _ENTRY_OUT + "QIi")
OUT_WRITE: Final = Struct("<" + _OUT_HEADER + "II")
OUT_STATFS: Final = Struct("<" + _OUT_HEADER + "QQQQQIIII24x")
OUT_XATTR_SIZE: Final = Struct("<" + _OUT_HEADER + "II")
OUT_LK: Final = Struct("<" + _OUT_HEADER + _FILE_LOCK)
OUT_LSEEK: Final = Struct("<" + _OUT_HEADER + "q")
OUT_BMAP: Final = Struct("<" + _OUT_HEADER + "Q")
OUT_POLL: Final = Struct("<" + _OUT_HEADER + "II")
OUT_COPY_FILE_RANGE_64: Final = Struct("<" + _OUT_HEADER + "Q")

# --- Sizes (the C sizeof of each struct) -----------------------------------------------------

IN_HEADER_SIZE: Final = 40
OUT_HEADER_SIZE: Final = 16
ATTR_SIZE: Final = 88
ENTRY_OUT_SIZE: Final = 128
ATTR_OUT_SIZE: Final = 104
KSTATFS_SIZE: Final = 80
FILE_LOCK_SIZE: Final = 24
FORGET_IN_SIZE: Final = 8
FORGET_ONE_SIZE: Final = 16
BATCH_FORGET_IN_SIZE: Final = 8
GETATTR_IN_SIZE: Final = 16
MKNOD_IN_SIZE: Final = 16
MKDIR_IN_SIZE: Final = 8
RENAME_IN_SIZE: Final = 8
RENAME2_IN_SIZE: Final = 16
LINK_IN_SIZE: Final = 8
SETATTR_IN_SIZE: Final = 88
OPEN_IN_SIZE: Final = 8
CREATE_IN_SIZE: Final = 16
OPEN_OUT_SIZE: Final = 16
RELEASE_IN_SIZE: Final = 24
FLUSH_IN_SIZE: Final = 24
READ_IN_SIZE: Final = 40
WRITE_IN_SIZE: Final = 40
WRITE_OUT_SIZE: Final = 8
FSYNC_IN_SIZE: Final = 16
SETXATTR_IN_COMPAT_SIZE: Final = 8
SETXATTR_IN_SIZE: Final = 16
GETXATTR_IN_SIZE: Final = 8
GETXATTR_OUT_SIZE: Final = 8
LK_IN_SIZE: Final = 48
LK_OUT_SIZE: Final = 24
ACCESS_IN_SIZE: Final = 8
INIT_IN_SIZE: Final = 64
INIT_IN_COMPAT_SIZE: Final = 16
INIT_OUT_SIZE: Final = 64
#: init_out size for kernels before 7.23 (they reject a longer reply).
INIT_OUT_COMPAT_22_SIZE: Final = 24
INTERRUPT_IN_SIZE: Final = 8
BMAP_IN_SIZE: Final = 16
BMAP_OUT_SIZE: Final = 8
IOCTL_IN_SIZE: Final = 32
IOCTL_OUT_SIZE: Final = 16
POLL_IN_SIZE: Final = 24
POLL_OUT_SIZE: Final = 8
FALLOCATE_IN_SIZE: Final = 32
DIRENT_SIZE: Final = 24  # FUSE_NAME_OFFSET
DIRENTPLUS_SIZE: Final = 152  # FUSE_NAME_OFFSET_DIRENTPLUS
NOTIFY_INVAL_INODE_OUT_SIZE: Final = 24
NOTIFY_INVAL_ENTRY_OUT_SIZE: Final = 16
NOTIFY_DELETE_OUT_SIZE: Final = 24
NOTIFY_STORE_OUT_SIZE: Final = 24
NOTIFY_RETRIEVE_OUT_SIZE: Final = 32
NOTIFY_RETRIEVE_IN_SIZE: Final = 40
BACKING_MAP_SIZE: Final = 16
LSEEK_IN_SIZE: Final = 24
LSEEK_OUT_SIZE: Final = 8
COPY_FILE_RANGE_IN_SIZE: Final = 56
COPY_FILE_RANGE_OUT_SIZE: Final = 8
SYNCFS_IN_SIZE: Final = 8
STATX_IN_SIZE: Final = 24
FUSE_DIRENT_ALIGN: Final = 8
#: Maximum length of a name in a notification, as the kernel enforces (FUSE_NAME_MAX = PATH_MAX-1).
FUSE_NAME_MAX: Final = 4095


def dirent_align(n: int) -> int:
    """FUSE_DIRENT_ALIGN: round a record length up to 8 bytes."""
    return (n + 7) & ~7


def dirent_type(mode: int) -> int:
    """The d_type (DT_*) of a st_mode, as fuse_dirent.type wants it."""
    return (mode >> 12) & 0o17


def pack_backing_map(fd: int, flags: int = 0) -> bytes:
    """The ``struct fuse_backing_map`` argument of ioctl FUSE_DEV_IOC_BACKING_OPEN."""
    return BACKING_MAP.pack(fd, flags, 0)


def pack_backing_id(backing_id: int) -> bytes:
    """The ``uint32_t`` argument of ioctl FUSE_DEV_IOC_BACKING_CLOSE."""
    return BACKING_ID.pack(backing_id)
