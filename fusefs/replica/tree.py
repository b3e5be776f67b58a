"""Listing and checksumming a directory tree without ever following a symlink.

Used on both ends: the server lists and checksums the replica, the client its backing
directory, and the two listings are compared with :func:`differences`.  Everything is relative
to a directory fd; names are opened with ``O_NOFOLLOW`` one component at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fusefs.replica.wire import MAX_NAME, MAX_XATTR_VALUE, Entry

__all__ = [
    "DEFAULT_BLOCK",
    "Difference",
    "block_size_for",
    "checksum_fd",
    "differences",
    "entry_of",
    "walk",
]

#: Smallest checksum block; larger files use larger blocks (see :func:`block_size_for`).
DEFAULT_BLOCK = 1 << 20
#: At most this many digests per file (keeps a CHECKSUM_REPLY well under a frame).
MAX_BLOCKS = 16384
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_OPEN = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def block_size_for(size: int) -> int:
    """A power-of-two block size >= 1 MiB giving at most :data:`MAX_BLOCKS` blocks."""
    bs = DEFAULT_BLOCK
    while size > bs * MAX_BLOCKS:
        bs *= 2
    return bs


def _xattrs(dir_fd: int, name: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
    """Extended attributes of ``name`` in ``dir_fd`` (``None``: ``dir_fd`` itself), sorted."""
    fd = dir_fd if name is None else os.open(name, _PATH_OPEN, dir_fd=dir_fd)
    try:
        proc = f"/proc/self/fd/{fd}"
        try:
            names = os.listxattr(proc)
        except OSError:
            return ()
        out = []
        for n in sorted(names):
            bn = os.fsencode(n)
            if len(bn) > MAX_NAME:
                continue
            try:
                value = os.getxattr(proc, n)
            except OSError:
                continue
            if len(value) <= MAX_XATTR_VALUE:
                out.append((bn, value))
        return tuple(out)
    finally:
        if name is not None:
            os.close(fd)


def entry_of(path: bytes, st: os.stat_result, dir_fd: int, name: bytes | None) -> Entry:
    """The listing entry of one object (``name`` in ``dir_fd``, or ``dir_fd`` itself)."""
    target = b""
    size = st.st_size
    if stat.S_ISLNK(st.st_mode) and name is not None:
        target = os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISDIR(st.st_mode):
        size = 0  # directory sizes are the backing filesystem's business
    return Entry(
        path=path,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        mtime_ns=st.st_mtime_ns,
        rdev=st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
        target=target,
        xattrs=_xattrs(dir_fd, name),
    )


def walk(root_fd: int, skip: frozenset[bytes] = frozenset()) -> Iterator[Entry]:
    """Every object under ``root_fd`` (which must be readable), parents before children.

    The root itself comes first, as ``b"."``.  Names in ``skip`` (top level only) are left
    out.  Objects that vanish during the walk are skipped.  Every name of a multiply linked
    non-directory but the first gets that first name as its ``link``: the order is sorted by
    name, so two equal trees give equal listings.
    """
    dfd = os.open(".", _DIR_OPEN, dir_fd=root_fd)
    try:
        yield entry_of(b".", os.stat(dfd), dfd, None)
        yield from _walk_dir(dfd, b"", skip, {})
    finally:
        os.close(dfd)


def _walk_dir(
    dfd: int, prefix: bytes, skip: frozenset[bytes], first: dict[tuple[int, int], bytes]
) -> Iterator[Entry]:
    try:
        names = sorted(os.fsencode(n) for n in os.listdir(dfd))
    except OSError:
        return
    for name in names:
        if not prefix and name in skip:
            continue
        path = prefix + name
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            entry = entry_of(path, st, dfd, name)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in first:
                entry = dataclasses.replace(entry, link=first[key])
            else:
                first[key] = path
        yield entry
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, _DIR_OPEN, dir_fd=dfd)
            except OSError:
                continue
            try:
                yield from _walk_dir(sub, path + b"/", skip, first)
            finally:
                os.close(sub)


def checksum_fd(
    fd: int, block_size: int, report: Callable[[int], None] | None = None
) -> tuple[int, tuple[bytes, ...]]:
    """(size, SHA-256 of each ``block_size`` block) of the open regular file ``fd``;
    ``report(bytes read so far)`` after every MiB moves a progress line (``fusefs verify``)."""
    size = os.fstat(fd).st_size
    digests: list[bytes] = []
    off = 0
    chunk = min(block_size, 1 << 20)
    while off < size or (off == 0 and not digests):
        h = hashlib.sha256()
        end = min(off + block_size, size)
        pos = off
        while pos < end:
            buf = os.pread(fd, min(chunk, end - pos), pos)
            if not buf:
                break
            h.update(buf)
            pos += len(buf)
            if report is not None:
                report(pos)
        digests.append(h.digest())
        off += block_size
        if size == 0:
            break
    return size, tuple(digests)


@dataclass(frozen=True, slots=True)
class Difference:
    """How one path differs between a source listing and a replica listing."""

    path: bytes
    #: "missing" (not in the replica), "extra" (only in the replica), "type", "content"
    #: (size or mtime of a regular file, or a symlink target / device number), "link" (a
    #: hard link on one side, a file of its own or another link on the other), "meta"
    #: (mode, owner or xattrs)
    kind: str
    source: Entry | None
    replica: Entry | None


def _meta(e: Entry) -> tuple[object, ...]:
    return (stat.S_IMODE(e.mode), e.uid, e.gid, e.xattrs)


def differences(
    source: dict[bytes, Entry], replica: dict[bytes, Entry], *, owners: bool = True
) -> list[Difference]:
    """What differs, in an order that can be applied: removals deepest first, then the rest
    parents first.  Regular files compare by size and mtime (content checks come later);
    directory sizes and mtimes are ignored.  ``owners=False`` ignores uid/gid."""
    out: list[Difference] = []
    extra = [p for p in replica if p not in source]
    for p in sorted(extra, key=lambda p: (p.count(b"/"), p), reverse=True):
        out.append(Difference(p, "extra", None, replica[p]))
    for p, s in source.items():
        r = replica.get(p)
        if r is None:
            out.append(Difference(p, "missing", s, None))
            continue
        if stat.S_IFMT(s.mode) != stat.S_IFMT(r.mode):
            out.append(Difference(p, "type", s, r))
            continue
        if s.link != r.link:
            out.append(Difference(p, "link", s, r))
            continue
        if stat.S_ISREG(s.mode):
            if s.size != r.size or s.mtime_ns != r.mtime_ns:
                out.append(Difference(p, "content", s, r))
                continue
        elif (s.target, s.rdev) != (r.target, r.rdev):
            out.append(Difference(p, "content", s, r))
            continue
        ms, mr = _meta(s), _meta(r)
        if not owners:
            ms, mr = (ms[0], ms[3]), (mr[0], mr[3])
        if stat.S_ISLNK(s.mode):
            ms, mr = ms[1:], mr[1:]  # a symlink's mode means nothing
        if ms != mr:
            out.append(Difference(p, "meta", s, r))
    return out
