"""MirrorFS called directly (no mount): every operation against a temporary backing directory."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs import errors
from fusefs.mirror import ListSink, MirrorFS
from fusefs.mirror import changes as ch
from fusefs.ops import (
    ROOT_INODE,
    EntryAttributes,
    FUSEError,
    Payload,
    ReaddirToken,
    RequestContext,
    SetattrFields,
)

ROOT = os.geteuid() == 0
CTX = RequestContext(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid(), umask=0o022)


class Token(ReaddirToken):
    """Collects entries, accepting at most ``room`` per readdir call."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.entries: list[tuple[bytes, int, int]] = []

    def add(self, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.entries.append((name, attr.st_ino, next_id))
        return True


class BytesPayload(Payload):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def to_fd(self, fd: int, offset: int) -> int:
        return os.pwrite(fd, self.data, offset)

    async def to_bytes(self) -> bytes:
        return self.data


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    d = tmp_path / "backing"
    d.mkdir()
    return d


@pytest.fixture
def fs(backing: Path) -> Iterator[MirrorFS]:
    m = MirrorFS(backing)
    yield m
    m.close()


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def sfs(backing: Path, sink: ListSink) -> Iterator[MirrorFS]:
    m = MirrorFS(backing, changes=sink)
    yield m
    m.close()


def errno_of(exc: pytest.ExceptionInfo[FUSEError]) -> int:
    return exc.value.errno


async def create(fs: MirrorFS, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644):
    fi, attr = await fs.create(parent, name, stat.S_IFREG | mode, os.O_RDWR, CTX)
    if data:
        assert await fs.write(fi.fh, 0, data) == len(data)
    await fs.release(fi.fh)
    return attr


# -- construction ----------------------------------------------------------------------------


def test_backing_missing(tmp_path: Path) -> None:
    with pytest.raises(errors.BackingMissingError, match="does not exist"):
        MirrorFS(tmp_path / "nope")


def test_backing_not_a_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"")
    with pytest.raises(errors.BackingNotDirectoryError):
        MirrorFS(f)
    assert issubclass(errors.BackingNotDirectoryError, errors.FusefsError)


# -- lookup, attributes, lookup counts ------------------------------------------------------


async def test_lookup_reports_backing_inode(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"abc")
    attr = await fs.lookup(ROOT_INODE, b"f", CTX)
    st = os.stat(backing / "f")
    assert attr.st_ino == st.st_ino
    assert attr.st_size == 3
    assert attr.st_mode == st.st_mode
    assert attr.attr_timeout == 1.0 and attr.entry_timeout == 1.0
    again = await fs.getattr(attr.st_ino, CTX)
    assert again.st_mtime_ns == st.st_mtime_ns


async def test_negative_lookup_is_cached_entry(fs: MirrorFS) -> None:
    attr = await fs.lookup(ROOT_INODE, b"missing", CTX)
    assert attr.st_ino == 0


async def test_dot_lookups(fs: MirrorFS, backing: Path) -> None:
    (backing / "d").mkdir()
    d = (await fs.lookup(ROOT_INODE, b"d", CTX)).st_ino
    assert (await fs.lookup(d, b".", CTX)).st_ino == d
    assert (await fs.lookup(d, b"..", CTX)).st_ino == ROOT_INODE
    assert (await fs.lookup(ROOT_INODE, b"..", CTX)).st_ino == ROOT_INODE


async def test_forget_drops_inode_at_zero(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"")
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    await fs.lookup(ROOT_INODE, b"f", CTX)
    await fs.forget([(ino, 1)])
    await fs.getattr(ino, CTX)  # still known
    await fs.forget([(ino, 1)])
    with pytest.raises(FUSEError) as exc:
        await fs.getattr(ino, CTX)
    assert errno_of(exc) == errno.ESTALE
    await fs.forget([(ROOT_INODE, 5)])  # the root is never dropped
    await fs.getattr(ROOT_INODE, CTX)


async def test_hard_links_share_one_inode(fs: MirrorFS, backing: Path) -> None:
    (backing / "a").write_bytes(b"x")
    a = (await fs.lookup(ROOT_INODE, b"a", CTX)).st_ino
    attr = await fs.link(a, ROOT_INODE, b"b", CTX)
    assert attr.st_ino == a
    assert attr.st_nlink == 2
    assert (await fs.lookup(ROOT_INODE, b"b", CTX)).st_ino == a
    # three references now: forgetting two keeps it alive
    await fs.forget([(a, 2)])
    await fs.getattr(a, CTX)


async def test_errors_are_fuse_errors(fs: MirrorFS) -> None:
    for call in (
        fs.unlink(ROOT_INODE, b"nope", CTX),
        fs.rmdir(ROOT_INODE, b"nope", CTX),
        fs.rename(ROOT_INODE, b"nope", ROOT_INODE, b"x", 0, CTX),
    ):
        with pytest.raises(FUSEError) as exc:
            await call
        assert errno_of(exc) == errno.ENOENT
    with pytest.raises(FUSEError) as exc:
        await fs.getattr(12345678, CTX)
    assert errno_of(exc) == errno.ESTALE


# -- files ----------------------------------------------------------------------------------


async def test_create_write_read(fs: MirrorFS, backing: Path) -> None:
    fi, attr = await fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o640, os.O_RDWR, CTX)
    assert stat.S_IMODE(attr.st_mode) == 0o640
    assert await fs.write(fi.fh, 0, b"hello world") == 11
    assert await fs.read(fi.fh, 6, 100) == b"world"
    big = os.urandom(300_000)
    assert await fs.write(fi.fh, 11, big) == len(big)
    assert await fs.read(fi.fh, 11, len(big)) == big
    await fs.flush(fi.fh)
    await fs.fsync(fi.fh, True)
    await fs.fsync(fi.fh, False)
    await fs.release(fi.fh)
    assert (backing / "f").read_bytes() == b"hello world" + big
    assert attr.st_ino == os.stat(backing / "f").st_ino


async def test_create_applies_umask_and_exact_mode(fs: MirrorFS, backing: Path) -> None:
    ctx = RequestContext(uid=CTX.uid, gid=CTX.gid, pid=CTX.pid, umask=0o027)
    old = os.umask(0o077)  # the daemon's umask must not leak into the result
    try:
        fi, attr = await fs.create(ROOT_INODE, b"f", stat.S_IFREG | 0o666, os.O_WRONLY, ctx)
        await fs.release(fi.fh)
        d = await fs.mkdir(ROOT_INODE, b"d", stat.S_IFDIR | 0o777, ctx)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(backing / "f").st_mode) == 0o640
    assert stat.S_IMODE(attr.st_mode) == 0o640
    assert stat.S_IMODE(os.stat(backing / "d").st_mode) == 0o750
    assert stat.S_ISDIR(d.st_mode)


async def test_default_acl_decides_new_modes(fs: MirrorFS, backing: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("setfacl") is None:
        pytest.skip("setfacl not installed")
    (backing / "acl").mkdir()
    r = subprocess.run(["setfacl", "-d", "-m", "u::rwx,g::r-x,o::---", str(backing / "acl")])
    if r.returncode != 0:
        pytest.skip("backing fs has no ACLs")
    d = (await fs.lookup(ROOT_INODE, b"acl", CTX)).st_ino
    ctx = RequestContext(uid=CTX.uid, gid=CTX.gid, pid=CTX.pid, umask=0o077)
    fi, _ = await fs.create(d, b"f", 0o666, os.O_RDWR, ctx)  # umask not applied by kernel
    await fs.release(fi.fh)
    # the default ACL replaces the umask: group r, other none, as natively
    assert stat.S_IMODE(os.stat(backing / "acl" / "f").st_mode) == 0o640


async def test_create_exclusive(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"")
    with pytest.raises(FUSEError) as exc:
        await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR | os.O_EXCL, CTX)
    assert errno_of(exc) == errno.EEXIST


async def test_open_trunc_and_append(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"0123456789")
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    fi = await fs.open(ino, os.O_WRONLY | os.O_APPEND, CTX)
    await fs.write(fi.fh, 10, b"ab")  # the kernel sends appends with the EOF offset
    await fs.write(fi.fh, 0, b"AB")  # and mmap writeback with the page's: not appended
    await fs.release(fi.fh)
    assert (backing / "f").read_bytes() == b"AB23456789ab"
    fi = await fs.open(ino, os.O_RDWR | os.O_TRUNC | os.O_NOFOLLOW, CTX)
    assert (backing / "f").read_bytes() == b""
    await fs.release(fi.fh)


async def test_writeback_widens_write_only_opens(backing: Path) -> None:
    (backing / "f").write_bytes(b"data")
    fs = MirrorFS(backing, writeback=True)
    try:
        assert fs.enable_writeback_cache
        ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
        fi = await fs.open(ino, os.O_WRONLY | os.O_APPEND, CTX)
        assert await fs.read(fi.fh, 0, 4) == b"data"  # readable for the page cache
        await fs.write(fi.fh, 1, b"X")  # O_APPEND is the kernel's job now
        await fs.release(fi.fh)
        assert (backing / "f").read_bytes() == b"dXta"
    finally:
        fs.close()


@pytest.mark.parametrize("direct_writes", [False, True])
@pytest.mark.parametrize("writeback", [False, True])
async def test_only_write_only_opens_are_direct(
    backing: Path, direct_writes: bool, writeback: bool
) -> None:
    """Direct I/O only where no read or mmap could use the page cache: write-only opens,
    when asked for (our session), and never under the writeback cache, which is all cache."""
    (backing / "f").write_bytes(b"data")
    fs = MirrorFS(backing, direct_writes=direct_writes, writeback=writeback)
    try:
        ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
        got = {}
        for name, flags in (("ro", os.O_RDONLY), ("wo", os.O_WRONLY), ("rw", os.O_RDWR)):
            fi = await fs.open(ino, flags, CTX)
            got[name] = fi.direct_io
            await fs.release(fi.fh)
        fi, _ = await fs.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY | os.O_EXCL, CTX)
        got["create-wo"] = fi.direct_io
        await fs.release(fi.fh)
        want = direct_writes and not writeback
        assert got == {"ro": False, "wo": want, "rw": False, "create-wo": want}
    finally:
        fs.close()


async def test_open_symlink_refused(fs: MirrorFS, backing: Path) -> None:
    (backing / "s").symlink_to("target")
    ino = (await fs.lookup(ROOT_INODE, b"s", CTX)).st_ino
    with pytest.raises(FUSEError) as exc:
        await fs.open(ino, os.O_RDONLY, CTX)
    assert errno_of(exc) == errno.ELOOP


# -- setattr --------------------------------------------------------------------------------


async def test_setattr_mode_size_times(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"0123456789")
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    before = os.stat(backing / "f")
    attr = EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o4711
    attr.st_size = 4
    attr.st_mtime_ns = 1_000_000_000_123
    out = await fs.setattr(
        ino, attr, SetattrFields(update_mode=True, update_size=True, update_mtime=True), None, CTX
    )
    st = os.stat(backing / "f")
    assert stat.S_IMODE(st.st_mode) == 0o4711
    assert st.st_size == 4 == out.st_size
    assert st.st_mtime_ns == 1_000_000_000_123
    assert st.st_atime_ns == before.st_atime_ns  # omitted
    # size through an open handle: ftruncate
    fi = await fs.open(ino, os.O_RDWR, CTX)
    attr.st_size = 100
    await fs.setattr(ino, attr, SetattrFields(update_size=True), fi.fh, CTX)
    await fs.release(fi.fh)
    assert os.stat(backing / "f").st_size == 100


@pytest.mark.skipif(not ROOT, reason="chown needs root")
async def test_setattr_owner_and_symlink_times(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"")
    os.symlink("f", backing / "s")
    f = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    s = (await fs.lookup(ROOT_INODE, b"s", CTX)).st_ino
    attr = EntryAttributes()
    attr.st_uid, attr.st_gid = 1234, 5678
    attr.st_atime_ns = 7_000_000_000
    await fs.setattr(f, attr, SetattrFields(update_uid=True, update_gid=True), None, CTX)
    await fs.setattr(s, attr, SetattrFields(update_uid=True, update_atime=True), None, CTX)
    st = os.stat(backing / "f")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    lst = os.lstat(backing / "s")
    assert lst.st_uid == 1234 and lst.st_atime_ns == 7_000_000_000
    assert os.stat(backing / "f").st_atime_ns != 7_000_000_000  # not followed


# -- namespace ------------------------------------------------------------------------------


async def test_mkdir_symlink_mknod(fs: MirrorFS, backing: Path) -> None:
    d = await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)
    assert stat.S_ISDIR(d.st_mode) and d.st_ino == os.stat(backing / "d").st_ino
    s = await fs.symlink(d.st_ino, b"s", b"../somewhere", CTX)
    assert stat.S_ISLNK(s.st_mode)
    assert await fs.readlink(s.st_ino, CTX) == b"../somewhere"
    fifo = await fs.mknod(d.st_ino, b"fifo", stat.S_IFIFO | 0o600, 0, CTX)
    assert stat.S_ISFIFO(fifo.st_mode)
    sock = await fs.mknod(d.st_ino, b"sock", stat.S_IFSOCK | 0o600, 0, CTX)
    assert stat.S_ISSOCK(os.lstat(backing / "d" / "sock").st_mode) and stat.S_ISSOCK(sock.st_mode)
    if ROOT:
        dev = await fs.mknod(d.st_ino, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), CTX)
        assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    with pytest.raises(FUSEError) as exc:
        await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)
    assert errno_of(exc) == errno.EEXIST


@pytest.mark.skipif(not ROOT, reason="chown to the caller needs root")
async def test_new_objects_belong_to_the_caller(fs: MirrorFS, backing: Path) -> None:
    ctx = RequestContext(uid=4321, gid=8765, pid=os.getpid(), umask=0)
    fi, _ = await fs.create(ROOT_INODE, b"f", 0o6755, os.O_RDWR, ctx)
    await fs.release(fi.fh)
    d = await fs.mkdir(ROOT_INODE, b"d", 0o2775, ctx)
    s = await fs.symlink(ROOT_INODE, b"s", b"f", ctx)
    n = await fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o640, 0, ctx)
    for name, attr in ((b"f", None), (b"d", d), (b"s", s), (b"p", n)):
        st = os.lstat(backing / os.fsdecode(name))
        assert (st.st_uid, st.st_gid) == (4321, 8765), name
        if attr is not None:
            assert (attr.st_uid, attr.st_gid) == (4321, 8765)
    # chown must not have eaten the set-ID bits that were asked for
    assert stat.S_IMODE(os.stat(backing / "f").st_mode) == 0o6755
    # in a set-group-ID directory the group is inherited, not the caller's
    sub = await fs.mkdir(d.st_ino, b"sub", 0o755, RequestContext(uid=1, gid=2, pid=0, umask=0))
    st = os.stat(backing / "d" / "sub")
    assert (st.st_uid, st.st_gid) == (1, 8765)
    assert st.st_mode & stat.S_ISGID and sub.st_mode & stat.S_ISGID


async def test_unlink_rmdir(fs: MirrorFS, backing: Path) -> None:
    (backing / "d").mkdir()
    (backing / "d" / "f").write_bytes(b"")
    d = (await fs.lookup(ROOT_INODE, b"d", CTX)).st_ino
    with pytest.raises(FUSEError) as exc:
        await fs.rmdir(ROOT_INODE, b"d", CTX)
    assert errno_of(exc) == errno.ENOTEMPTY
    await fs.unlink(d, b"f", CTX)
    await fs.rmdir(ROOT_INODE, b"d", CTX)
    assert not (backing / "d").exists()


async def test_unlinked_open_file_still_works(fs: MirrorFS, backing: Path) -> None:
    fi, attr = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
    await fs.unlink(ROOT_INODE, b"f", CTX)
    await fs.write(fi.fh, 0, b"ghost")
    assert await fs.read(fi.fh, 0, 5) == b"ghost"
    assert (await fs.getattr(attr.st_ino, CTX)).st_nlink == 0
    await fs.release(fi.fh)
    await fs.forget([(attr.st_ino, 1)])


async def test_rename_flags(fs: MirrorFS, backing: Path) -> None:
    (backing / "a").write_bytes(b"A")
    (backing / "b").write_bytes(b"B")
    (backing / "d").mkdir()
    d = (await fs.lookup(ROOT_INODE, b"d", CTX)).st_ino
    with pytest.raises(FUSEError) as exc:
        await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 1, CTX)  # RENAME_NOREPLACE
    assert errno_of(exc) == errno.EEXIST
    await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 2, CTX)  # RENAME_EXCHANGE
    assert (backing / "a").read_bytes() == b"B" and (backing / "b").read_bytes() == b"A"
    await fs.rename(ROOT_INODE, b"a", d, b"c", 1, CTX)
    assert (backing / "d" / "c").read_bytes() == b"B"
    await fs.rename(ROOT_INODE, b"b", d, b"c", 0, CTX)  # plain rename replaces
    assert (backing / "d" / "c").read_bytes() == b"A" and not (backing / "b").exists()
    with pytest.raises(FUSEError) as exc:
        await fs.rename(ROOT_INODE, b"x", ROOT_INODE, b"y", 2, CTX)
    assert errno_of(exc) == errno.ENOENT


async def test_long_names_and_deep_paths(fs: MirrorFS, backing: Path) -> None:
    name = b"n" * 255
    attr = await create(fs, ROOT_INODE, name, b"x")
    assert attr.st_size == 0
    with pytest.raises(FUSEError) as exc:
        await fs.lookup(ROOT_INODE, b"n" * 256, CTX)
    assert errno_of(exc) == errno.ENAMETOOLONG
    parent = ROOT_INODE
    for _ in range(40):  # 40 * 256 bytes: far beyond PATH_MAX (4096)
        parent = (await fs.mkdir(parent, b"d" * 255, 0o755, CTX)).st_ino
    fi, _ = await fs.create(parent, name, 0o644, os.O_RDWR, CTX)
    await fs.write(fi.fh, 0, b"deep")
    await fs.release(fi.fh)
    fi = await fs.open((await fs.lookup(parent, name, CTX)).st_ino, os.O_RDONLY, CTX)
    assert await fs.read(fi.fh, 0, 10) == b"deep"
    await fs.release(fi.fh)
    tok = Token()
    dh = await fs.opendir(parent, CTX)
    await fs.readdir(dh, 0, tok)
    await fs.releasedir(dh)
    assert [e[0] for e in tok.entries] == [name]


# -- directories ----------------------------------------------------------------------------


async def test_readdir_lists_with_lookup_counts(fs: MirrorFS, backing: Path) -> None:
    names = {f"f{i}".encode() for i in range(10)}
    for n in names:
        (backing / os.fsdecode(n)).write_bytes(b"")
    dh = await fs.opendir(ROOT_INODE, CTX)
    tok = Token()
    await fs.readdir(dh, 0, tok)
    await fs.releasedir(dh)
    got = [e[0] for e in tok.entries]
    assert set(got) == names and len(got) == 10  # no . and ..
    # each entry holds exactly one lookup reference
    for name, ino, _ in tok.entries:
        assert ino == os.stat(backing / os.fsdecode(name)).st_ino
        await fs.forget([(ino, 1)])
        with pytest.raises(FUSEError):
            await fs.getattr(ino, CTX)


async def test_readdir_offsets_stable_under_changes(fs: MirrorFS, backing: Path) -> None:
    for i in range(50):
        (backing / f"f{i:02}").write_bytes(b"")
    dh = await fs.opendir(ROOT_INODE, CTX)
    seen: list[bytes] = []
    ids: list[int] = []
    offsets: list[int] = []
    off = 0
    step = 0
    while True:
        tok = Token(room=7)
        await fs.readdir(dh, off, tok)
        if not tok.entries:
            break
        seen += [e[0] for e in tok.entries]
        ids += [e[2] for e in tok.entries]
        off = tok.entries[-1][2]
        offsets.append(off)
        # churn between calls: remove some not yet listed, add new ones
        step += 1
        (backing / f"new{step}").write_bytes(b"")
        victim = backing / f"f{49 - step:02}"
        if victim.exists():
            victim.unlink()
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    listed = {n for n in seen if n.startswith(b"f")}
    survivors = {os.fsencode(p.name) for p in backing.iterdir() if p.name.startswith("f")}
    assert survivors <= listed, "an entry was skipped"
    # restarting from an earlier next_id repeats exactly the same tail
    tok1, tok2 = Token(), Token()
    await fs.readdir(dh, offsets[1], tok1)
    await fs.readdir(dh, offsets[1], tok2)
    assert [e[0] for e in tok1.entries] == [e[0] for e in tok2.entries]
    expected = [
        n
        for n, i in zip(seen, ids, strict=True)
        if i > offsets[1] and (backing / os.fsdecode(n)).exists()
    ]
    assert [e[0] for e in tok1.entries] == expected
    await fs.releasedir(dh)


async def test_readdir_full_buffer_takes_no_reference(fs: MirrorFS, backing: Path) -> None:
    (backing / "a").write_bytes(b"")
    (backing / "b").write_bytes(b"")
    dh = await fs.opendir(ROOT_INODE, CTX)
    tok = Token(room=1)  # the second entry does not fit
    await fs.readdir(dh, 0, tok)
    ((first, _, next_id),) = tok.entries
    second = b"b" if first == b"a" else b"a"
    with pytest.raises(FUSEError):
        await fs.getattr(os.stat(backing / os.fsdecode(second)).st_ino, CTX)
    tok = Token()
    await fs.readdir(dh, next_id, tok)
    assert [e[0] for e in tok.entries] == [second]
    await fs.fsyncdir(dh, False)
    await fs.releasedir(dh)


# -- xattrs, statfs, access -----------------------------------------------------------------


async def test_xattrs(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"")
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    with pytest.raises(FUSEError) as exc:
        await fs.getxattr(ino, b"user.x", CTX)
    assert errno_of(exc) == errno.ENODATA
    await fs.setxattr(ino, b"user.x", b"value", CTX)
    assert await fs.getxattr(ino, b"user.x", CTX) == b"value"
    assert b"user.x" in await fs.listxattr(ino, CTX)
    assert os.getxattr(backing / "f", "user.x") == b"value"
    await fs.removexattr(ino, b"user.x", CTX)
    with pytest.raises(FUSEError) as exc:
        await fs.removexattr(ino, b"user.x", CTX)
    assert errno_of(exc) == errno.ENODATA
    # XATTR_CREATE / XATTR_REPLACE, passed by keyword
    with pytest.raises(FUSEError) as exc:
        await fs.setxattr(ino, b"user.y", b"1", CTX, flags=os.XATTR_REPLACE)
    assert errno_of(exc) == errno.ENODATA
    await fs.setxattr(ino, b"user.y", b"1", CTX, flags=os.XATTR_CREATE)
    with pytest.raises(FUSEError) as exc:
        await fs.setxattr(ino, b"user.y", b"2", CTX, flags=os.XATTR_CREATE)
    assert errno_of(exc) == errno.EEXIST
    await fs.setxattr(ino, b"user.y", b"3", CTX, flags=os.XATTR_REPLACE)
    assert await fs.getxattr(ino, b"user.y", CTX) == b"3"


async def test_symlink_xattrs_act_on_the_link(fs: MirrorFS, backing: Path) -> None:
    (backing / "f").write_bytes(b"")
    os.symlink("f", backing / "s")
    s = (await fs.lookup(ROOT_INODE, b"s", CTX)).st_ino
    with pytest.raises(FUSEError) as exc:
        await fs.setxattr(s, b"user.x", b"v", CTX)
    assert errno_of(exc) == errno.EPERM  # as natively: no user.* on symlinks
    assert await fs.listxattr(s, CTX) == []
    if ROOT:
        await fs.setxattr(s, b"trusted.x", b"v", CTX)
        assert os.getxattr(backing / "s", "trusted.x", follow_symlinks=False) == b"v"
        assert "trusted.x" not in os.listxattr(backing / "f")


async def test_statfs_and_access(fs: MirrorFS, backing: Path) -> None:
    sv = await fs.statfs(CTX)
    native = os.statvfs(backing)
    assert sv.f_blocks == native.f_blocks and sv.f_namemax == native.f_namemax
    (backing / "f").write_bytes(b"")
    os.chmod(backing / "f", 0o640)
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    st = os.stat(backing / "f")
    owner = RequestContext(uid=st.st_uid, gid=st.st_gid + 1, pid=0)
    other = RequestContext(uid=st.st_uid + 1, gid=st.st_gid + 1, pid=0)
    assert await fs.access(ino, os.R_OK | os.W_OK, owner)
    assert not await fs.access(ino, os.X_OK, owner)
    assert not await fs.access(ino, os.R_OK, other)
    assert await fs.access(ino, os.F_OK, other)


# -- extensions -----------------------------------------------------------------------------


async def test_fallocate_lseek_punch_hole(fs: MirrorFS, backing: Path) -> None:
    fi, _ = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
    await fs.fallocate(fi.fh, 0, 0, 2 << 20)  # allocate, size grows
    assert os.stat(backing / "f").st_size == 2 << 20
    await fs.write(fi.fh, 0, b"x" * (2 << 20))
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    try:
        await fs.fallocate(fi.fh, punch, 0, 1 << 20)
    except FUSEError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            pytest.skip("backing fs cannot punch holes")
        raise
    assert await fs.read(fi.fh, 0, 16) == b"\0" * 16
    assert await fs.lseek(fi.fh, 0, os.SEEK_HOLE) == 0
    data = await fs.lseek(fi.fh, 0, os.SEEK_DATA)
    assert 0 < data <= 1 << 20
    with pytest.raises(FUSEError) as exc:
        await fs.lseek(fi.fh, 4 << 20, os.SEEK_DATA)
    assert errno_of(exc) == errno.ENXIO
    await fs.release(fi.fh)


async def test_copy_file_range_read_range_write_payload(fs: MirrorFS, backing: Path) -> None:
    (backing / "src").write_bytes(b"0123456789")
    src_ino = (await fs.lookup(ROOT_INODE, b"src", CTX)).st_ino
    src = await fs.open(src_ino, os.O_RDONLY, CTX)
    dst, _ = await fs.create(ROOT_INODE, b"dst", 0o644, os.O_RDWR, CTX)
    assert await fs.copy_file_range(src.fh, 2, dst.fh, 0, 5, 0) == 5
    assert (backing / "dst").read_bytes() == b"23456"
    rng = await fs.read_range(src.fh, 3, 4)
    assert rng.size == 4 and rng.offset == 3
    assert os.pread(rng.fd, rng.size, rng.offset) == b"3456"
    assert await fs.write_payload(dst.fh, 5, BytesPayload(b"!!")) == 2
    assert (backing / "dst").read_bytes() == b"23456!!"
    await fs.release(src.fh)
    await fs.release(dst.fh)
    with pytest.raises(FUSEError) as exc:
        await fs.read(dst.fh, 0, 1)
    assert errno_of(exc) == errno.EBADF


async def test_passthrough_fd_is_shared_per_inode(fs: MirrorFS, backing: Path) -> None:
    import fcntl

    (backing / "f").write_bytes(b"abc")
    ino = (await fs.lookup(ROOT_INODE, b"f", CTX)).st_ino
    ro = await fs.open(ino, os.O_RDONLY, CTX)
    fd = fs.passthrough_fd(ro.fh)
    assert fd is not None and fd != ro.fh
    # one backing file for every concurrent open (the kernel demands it), usable for writes
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    wo = await fs.open(ino, os.O_WRONLY, CTX)
    assert fs.passthrough_fd(wo.fh) == fd
    await fs.release(ro.fh)
    os.fstat(fd)  # still open for the remaining handle
    await fs.release(wo.fh)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the last handle
    ro = await fs.open(ino, os.O_RDONLY, CTX)
    assert fs.passthrough_fd(ro.fh) is not None
    await fs.release(ro.fh)
    # set-ID files: writes must be seen (to clear the bits), and every open agrees
    os.chmod(backing / "f", 0o4755)
    a = await fs.open(ino, os.O_RDWR, CTX)
    assert fs.passthrough_fd(a.fh) is None
    os.chmod(backing / "f", 0o755)
    b = await fs.open(ino, os.O_RDONLY, CTX)
    assert fs.passthrough_fd(b.fh) is None  # no mixing with the open without passthrough
    await fs.release(a.fh)
    await fs.release(b.fh)


@pytest.mark.skipif(not ROOT, reason="reopening by file handle needs CAP_DAC_READ_SEARCH")
async def test_inode_fds_are_parked_over_budget(backing: Path) -> None:
    fs = MirrorFS(backing, max_inode_fds=64)
    try:
        assert fs._budget.enabled
        (backing / "d").mkdir()
        for i in range(400):
            (backing / "d" / f"f{i}").write_bytes(b"%d" % i)
        os.symlink("f0", backing / "d" / "sym")
        d = (await fs.lookup(ROOT_INODE, b"d", CTX)).st_ino
        sym = (await fs.lookup(d, b"sym", CTX)).st_ino
        inos = [(await fs.lookup(d, b"f%d" % i, CTX)).st_ino for i in range(400)]
        assert len(fs._budget.open) <= 64
        # parked inodes come back transparently, for every kind of use
        assert (await fs.getattr(inos[0], CTX)).st_size == 1
        fi = await fs.open(inos[1], os.O_RDWR, CTX)
        assert await fs.read(fi.fh, 0, 10) == b"1"
        await fs.release(fi.fh)
        assert await fs.readlink(sym, CTX) == b"f0"
        await fs.setxattr(inos[2], b"user.k", b"v", CTX)
        assert await fs.getxattr(inos[2], b"user.k", CTX) == b"v"
        await fs.link(inos[3], ROOT_INODE, b"hard", CTX)
        await fs.rename(d, b"f4", ROOT_INODE, b"moved", 0, CTX)
        assert (backing / "moved").read_bytes() == b"4"
        tok = Token()
        dh = await fs.opendir(d, CTX)
        await fs.readdir(dh, 0, tok)
        await fs.releasedir(dh)
        assert len(tok.entries) == 400  # 399 files + sym
        for _ in range(3):  # reopening many parked inodes stays within budget too
            for ino in inos:
                await fs.getattr(ino, CTX)
        assert len(fs._budget.open) <= 64 + 1
        # a parked file deleted behind our back is stale, and a file reusing its number is new
        old = inos[10]
        ino = fs._inodes[old]
        if not ino.parked:
            ino.used = False
            fs._budget.limit = 0
            fs._budget.trim(None)
            fs._budget.limit = 64
        assert ino.parked
        os.unlink(backing / "d" / "f10")
        (backing / "d" / "new").write_bytes(b"")
        new = (await fs.lookup(d, b"new", CTX)).st_ino
        assert new != old  # even if ext4 handed the same inode number out again
        with pytest.raises(FUSEError) as exc:
            await fs.getattr(old, CTX)
        assert errno_of(exc) == errno.ESTALE
    finally:
        fs.close()


# -- change sink ----------------------------------------------------------------------------


async def test_sink_sees_every_change_in_order(sfs: MirrorFS, sink: ListSink) -> None:
    fs = sfs
    d = (await fs.mkdir(ROOT_INODE, b"d", 0o755, CTX)).st_ino
    fi, f = await fs.create(d, b"f", 0o644, os.O_RDWR | os.O_TRUNC, CTX)
    await fs.write(fi.fh, 0, b"hello")
    await fs.write_payload(fi.fh, 5, BytesPayload(b"!"))
    await fs.fallocate(fi.fh, 0, 0, 100)
    assert fs.passthrough_fd(fi.fh) is None  # writes must be seen: no passthrough at all
    await fs.release(fi.fh)
    attr = EntryAttributes()
    attr.st_size = 3
    attr.st_mode = 0o600
    await fs.setattr(f.st_ino, attr, SetattrFields(update_size=True, update_mode=True), None, CTX)
    await fs.setxattr(f.st_ino, b"user.k", b"v", CTX)
    await fs.removexattr(f.st_ino, b"user.k", CTX)
    await fs.link(f.st_ino, ROOT_INODE, b"hard", CTX)
    await fs.symlink(ROOT_INODE, b"sym", b"d/f", CTX)
    await fs.mknod(d, b"fifo", stat.S_IFIFO | 0o644, 0, CTX)
    await fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0, CTX)
    await fs.unlink(ROOT_INODE, b"hard", CTX)
    fi = await fs.open(f.st_ino, os.O_WRONLY, CTX)
    await fs.write(fi.fh, 0, b"x")  # the path follows the directory's rename
    await fs.release(fi.fh)
    await fs.unlink(d, b"fifo", CTX)
    await fs.rename(ROOT_INODE, b"sym", d, b"sym2", 1, CTX)
    await fs.unlink(d, b"f", CTX)
    await fs.unlink(d, b"sym2", CTX)
    await fs.rmdir(ROOT_INODE, b"e", CTX)
    uid, gid = CTX.uid, CTX.gid
    assert sink.changes == [
        ch.Mkdir(b"d", 0o755, uid, gid),
        ch.Create(b"d/f", 0o644, uid, gid),
        ch.Truncate(b"d/f", 0),
        ch.Write(b"d/f", 0, 5),
        ch.Write(b"d/f", 5, 1),
        ch.Fallocate(b"d/f", 0, 0, 100),
        ch.Truncate(b"d/f", 3),
        ch.SetAttr(b"d/f", mode=0o600),
        ch.SetXattr(b"d/f", b"user.k", b"v"),
        ch.RemoveXattr(b"d/f", b"user.k"),
        ch.Link(b"hard", b"d/f"),
        ch.Symlink(b"sym", b"d/f", uid, gid),
        ch.Mknod(b"d/fifo", stat.S_IFIFO | 0o644, 0, uid, gid),
        ch.Rename(b"d", b"e"),
        ch.Unlink(b"hard"),
        ch.Write(b"e/f", 0, 1),
        ch.Unlink(b"e/fifo"),
        ch.Rename(b"sym", b"e/sym2", 1),
        ch.Unlink(b"e/f"),
        ch.Unlink(b"e/sym2"),
        ch.Rmdir(b"e"),
    ]


async def test_sink_path_follows_hard_link_after_unlink(sfs: MirrorFS, sink: ListSink) -> None:
    fs = sfs
    fi, f = await fs.create(ROOT_INODE, b"a", 0o644, os.O_RDWR, CTX)
    await fs.link(f.st_ino, ROOT_INODE, b"b", CTX)
    await fs.unlink(ROOT_INODE, b"b", CTX)
    await fs.write(fi.fh, 0, b"1")
    await fs.unlink(ROOT_INODE, b"a", CTX)
    await fs.write(fi.fh, 0, b"2")  # no name left: nothing to report
    await fs.release(fi.fh)
    assert sink.changes[-3:] == [ch.Unlink(b"b"), ch.Write(b"a", 0, 1), ch.Unlink(b"a")]


async def test_sink_rename_exchange_swaps_paths(sfs: MirrorFS, sink: ListSink) -> None:
    fs = sfs
    await fs.mkdir(ROOT_INODE, b"x", 0o755, CTX)
    fi, _ = await fs.create(ROOT_INODE, b"y", 0o644, os.O_RDWR, CTX)
    await fs.rename(ROOT_INODE, b"x", ROOT_INODE, b"y", 2, CTX)
    await fs.write(fi.fh, 0, b"z")
    await fs.release(fi.fh)
    assert sink.changes[-2:] == [ch.Rename(b"x", b"y", 2), ch.Write(b"x", 0, 1)]


# -- what the session may run in its reader task ---------------------------------------------


class _SlowSink:
    """A sink whose record may suspend (it says nothing of quick_record)."""

    barrier_waits = False

    def __init__(self) -> None:
        self.changes: list[ch.Change] = []

    async def record(self, change: ch.Change) -> None:
        self.changes.append(change)


class _QuickSink(_SlowSink):
    quick_record = True


def test_big_writes_run_in_the_loop_only_with_a_sink_that_never_suspends(backing: Path) -> None:
    """write_payload is a quick method (the session splices big WRITEs in its reader task)
    without a sink or with one whose record never suspends; a sink that may suspend keeps
    every write in a task of its own, or one slow record would stall every request."""
    from fusefs.replica.cli import FanoutSink

    for changes, quick in [
        (None, True),
        (ch.NullSink(), True),
        (ListSink(), True),
        (_SlowSink(), False),
        (FanoutSink([_QuickSink(), _QuickSink()]), True),  # type: ignore[list-item]
        (FanoutSink([_QuickSink(), _SlowSink()]), False),  # type: ignore[list-item]
    ]:
        m = MirrorFS(backing, changes=changes)
        try:
            assert ("write_payload" in m.quick_methods) is quick, changes
        finally:
            m.close()
