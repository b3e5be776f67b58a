"""Real tools through the mount: cp -a, rsync -aHAX, tar, git, find, du, mv, an editor's save.

Each test copies a sample tree (files of many sizes, nested directories, symlinks, hard links,
fifos, xattrs, ACLs, odd modes, chosen mtimes) into the mount and out again with a real tool, then
compares with ``diff -r`` and with a metadata snapshot (types, modes, owners, nlink, hard-link
groups, symlink targets, contents, user.* xattrs, mtimes).  The tests run under three variants:
our session on its default data path (kernel passthrough here), our session forced to splice,
and pyfuse3's session.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import variants

# The variants every test runs under: fixtures overriding the shared ones of conftest.py.
VARIANTS = variants.VARIANTS
variant = variants.variant
session = variants.session
mnt_handle = variants.mnt_handle

MiB = 1 << 20


def run(cmd: Sequence[str], cwd: Path | None = None, **kw: Any) -> str:
    """Run a tool; fail the test with its output unless it exits 0.  Returns stdout."""
    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    env.update(kw.pop("env", {}))
    p = subprocess.run(
        list(cmd), cwd=cwd, capture_output=True, text=True, env=env, timeout=120, **kw
    )
    if p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p.stdout


# -- the sample tree -----------------------------------------------------------------------------


def _data(n: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 128  # 4 KiB of seeded bytes
    return (block * (n // len(block) + 1))[:n]


def make_sample(root: Path) -> Path:
    """A tree with every kind of object and metadata the tools are expected to carry over."""
    root.mkdir()
    sizes = [0, 1, 100, 4095, 4096, 4097, 65535, 65536, 131073, MiB + 7, 5 * MiB + 3]
    for i, n in enumerate(sizes):
        (root / f"file{i:02d}_{n}").write_bytes(_data(n, i))
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("deep\n")
    (root / "a" / "b" / "mid.bin").write_bytes(_data(300_000, 99))
    (root / "empty_dir").mkdir()
    (root / "name with spaces & ünïcödé").write_text("odd name\n")
    # a sparse file
    with open(root / "sparse", "wb") as f:
        f.seek(3 * MiB)
        f.write(b"end of sparse")
    # symlinks: relative, to a directory, dangling, absolute
    os.symlink("file01_1", root / "link_rel")
    os.symlink("a/b", root / "link_dir")
    os.symlink("does/not/exist", root / "link_dangling")
    os.symlink("/etc/hostname", root / "link_abs")
    # hard links: a group inside one directory and one across directories
    os.link(root / "file03_4095", root / "hard_same_dir")
    os.link(root / "file06_65535", root / "a" / "b" / "c" / "hard_elsewhere")
    os.link(root / "file06_65535", root / "a" / "hard_third")
    # fifos (named *.fifo so diff can leave them out)
    os.mkfifo(root / "pipe.fifo", 0o640)
    os.mkfifo(root / "a" / "b" / "inner.fifo")
    # xattrs
    os.setxattr(root / "file02_100", "user.comment", b"hello xattr")
    os.setxattr(root / "file02_100", "user.binary", bytes(range(256)))
    os.setxattr(root / "a", "user.on_dir", b"dir attr")
    os.setxattr(root / "file00_0", "user.empty", b"")
    # a POSIX ACL (rsync -A, tar --acls)
    run(["setfacl", "-m", "u:1234:rw-,g:4321:r--", str(root / "file04_4096")])
    run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "a" / "b")])
    # odd modes and owners
    os.chmod(root / "file05_4097", 0o4755)
    os.chmod(root / "file07_65536", 0o2711)
    os.chmod(root / "file08_131073", 0o000)
    os.chmod(root / "file01_1", 0o444)
    os.chmod(root / "empty_dir", 0o1777)
    os.chmod(root / "a" / "b" / "c", 0o700)
    os.chown(root / "file09_1048583", 1234, 4321)
    os.lchown(root / "link_rel", 2345, 5432)
    os.chown(root / "a" / "b" / "c" / "d", 3456, 6543)
    # chosen mtimes (directories last, as creating entries changes them)
    t = 1_500_000_000_123_456_789
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(t + i * 10**9 + 7, t + i * 3 * 10**9 + 11), follow_symlinks=False)
    for d in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()),
                    key=lambda p: -len(p.parts)):  # fmt: skip
        os.utime(d, ns=(t, t + 10**9 * len(d.parts)))
    return root


def snapshot(root: Path, *, times: bool = True) -> dict[str, dict[str, Any]]:
    """What the tools must preserve, per relative path (inode numbers and atimes excepted)."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            info: dict[str, Any] = {
                "type": stat.filemode(st.st_mode)[0],
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "nlink": st.st_nlink,
            }
            if times:
                info["mtime_ns"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                with open(path, "rb") as f:
                    info["sha1"] = hashlib.sha1(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
            if not stat.S_ISLNK(st.st_mode):
                info["xattrs"] = {
                    n: os.getxattr(path, n)
                    for n in sorted(os.listxattr(path))
                    if n.startswith(("user.", "system.posix_acl"))
                }
            out[rel] = info
    for names in groups.values():
        for n in names:
            out[n]["links"] = sorted(names)
    return out


def assert_same(a: Path, b: Path, *, times: bool = True) -> None:
    """``diff -r`` finds no difference, and neither does the metadata snapshot."""
    p = subprocess.run(
        ["diff", "-r", "--no-dereference", "-x", "*.fifo", str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"diff -r {a} {b}:\n{p.stdout}{p.stderr}"
    sa, sb = snapshot(a, times=times), snapshot(b, times=times)
    if sa != sb:
        lines = [
            f"  {n}:\n    {a}: {sa.get(n)}\n    {b}: {sb.get(n)}"
            for n in sorted(set(sa) | set(sb))
            if sa.get(n) != sb.get(n)
        ]
        pytest.fail(f"metadata differs between {a} and {b}:\n" + "\n".join(lines[:20]))


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    return make_sample(tmp_path / "sample")


# -- the tests -----------------------------------------------------------------------------------


def test_cp_a_in_and_out(mnt: Path, sample: Path, tmp_path: Path, backing: Path) -> None:
    run(["cp", "-a", str(sample), str(mnt / "copy")])
    assert_same(sample, mnt / "copy")
    assert_same(sample, backing / "copy")
    run(["cp", "-a", str(mnt / "copy"), str(tmp_path / "out")])
    assert_same(sample, tmp_path / "out")
    # and a copy within the mount (source and destination both served by the daemon)
    run(["cp", "-a", str(mnt / "copy"), str(mnt / "copy2")])
    assert_same(sample, mnt / "copy2")


def test_rsync_ahax_in_and_out(mnt: Path, sample: Path, tmp_path: Path) -> None:
    rsync = ["rsync", "-aHAX"]
    run([*rsync, f"{sample}/", f"{mnt / 'r'}/"])
    run([*rsync, f"{mnt / 'r'}/", f"{tmp_path / 'out'}/"])
    check = ["rsync", "-aHAXc", "--dry-run", "--itemize-changes"]
    for src, dst in ((sample, mnt / "r"), (mnt / "r", sample), (mnt / "r", tmp_path / "out"),
                     (tmp_path / "out", mnt / "r")):  # fmt: skip
        changes = run([*check, f"{src}/", f"{dst}/"])
        assert changes == "", f"rsync {src} -> {dst} would change:\n{changes}"
    assert_same(sample, mnt / "r")
    assert_same(sample, tmp_path / "out")
    # an incremental run after changes through the mount carries exactly those changes
    (mnt / "r" / "file02_100").write_bytes(b"changed")
    os.unlink(mnt / "r" / "file10_5242883")
    (mnt / "r" / "new").write_text("new\n")
    itemized = run(
        [*rsync, "--delete", "--itemize-changes", f"{mnt / 'r'}/", f"{tmp_path / 'out'}/"]
    )
    changed = sorted(line.split(None, 1)[1] for line in itemized.splitlines() if line.strip())
    changed = [name for name in changed if name != "./"]
    assert changed == ["file02_100", "file10_5242883", "new"], itemized
    assert run([*check, "--delete", f"{mnt / 'r'}/", f"{tmp_path / 'out'}/"]) == ""


def test_tar_through_the_mount(mnt: Path, sample: Path, tmp_path: Path) -> None:
    tar = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
    (mnt / "t").mkdir()
    pack = subprocess.Popen([*tar, "-C", str(sample), "-cf", "-", "."], stdout=subprocess.PIPE)
    run([*tar, "-C", str(mnt / "t"), "-xpf", "-"], stdin=pack.stdout)
    assert pack.wait(timeout=60) == 0
    assert_same(sample, mnt / "t")
    (tmp_path / "out").mkdir()
    pack = subprocess.Popen([*tar, "-C", str(mnt / "t"), "-cf", "-", "."], stdout=subprocess.PIPE)
    run([*tar, "-C", str(tmp_path / "out"), "-xpf", "-"], stdin=pack.stdout)
    assert pack.wait(timeout=60) == 0
    assert_same(sample, tmp_path / "out")
    # an archive written into the mount and listed from it
    run([*tar, "-C", str(sample), "-cf", str(mnt / "sample.tar"), "."])
    listing = run(["tar", "-tvf", str(mnt / "sample.tar")])
    assert "./a/b/c/d/deep.txt" in listing
    assert len([line for line in listing.splitlines() if " link to " in line]) == 3, listing


def test_git(mnt: Path, tmp_path: Path) -> None:
    repo = mnt / "repo"
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "T",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "T",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def git(*args: str) -> str:
        return run(["git", *args], cwd=repo, env=env)

    repo.mkdir()
    git("init", "-q", "-b", "main")
    (repo / "README").write_text("hello\n")
    (repo / "src").mkdir()
    for i in range(30):
        (repo / "src" / f"m{i}.py").write_text(f"x = {i}\n" * (i + 1))
    (repo / "big.bin").write_bytes(_data(2 * MiB, 5))
    os.symlink("README", repo / "link")
    os.chmod(repo / "src" / "m1.py", 0o755)
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    (repo / "README").write_text("hello again\n")
    os.rename(repo / "src" / "m2.py", repo / "src" / "renamed.py")
    git("add", "-A")
    git("commit", "-q", "-m", "second")
    assert git("status", "--porcelain") == ""
    assert git("log", "--format=%s").split() == ["second", "first"]
    assert git("show", "HEAD:README") == "hello again\n"
    assert git("ls-files", "-s", "src/m1.py").startswith("100755")
    assert "R" in git("show", "--name-status", "--format=", "HEAD")
    git("gc", "-q", "--prune=now")  # packs and repacks: renames, mmap, fsync
    assert git("fsck", "--full", "--strict") == ""
    assert git("status", "--porcelain") == ""
    # a clone out of the mount and back in
    run(["git", "clone", "-q", str(repo), str(tmp_path / "clone")], env=env)
    assert (tmp_path / "clone" / "big.bin").read_bytes() == _data(2 * MiB, 5)
    run(["git", "clone", "-q", str(tmp_path / "clone"), str(mnt / "clone")], env=env)
    assert run(["git", "fsck", "--full"], cwd=mnt / "clone", env=env) == ""
    assert run(["git", "log", "--format=%s"], cwd=mnt / "clone", env=env).split() == [
        "second",
        "first",
    ]


def test_find_and_du_match_backing(mnt: Path, sample: Path, backing: Path) -> None:
    run(["cp", "-a", str(sample), str(mnt / "s")])
    fmt = "%y %m %n %s %U %G %T@ %p -> %l\n"

    def find(root: Path) -> list[str]:
        return sorted(run(["find", ".", "-printf", fmt], cwd=root).splitlines())

    assert find(mnt) == find(backing)
    assert sorted(run(["find", ".", "-type", "f", "-size", "+1M"], cwd=mnt).split()) == [
        "./s/file09_1048583",
        "./s/file10_5242883",
        "./s/sparse",
    ]
    assert run(["find", ".", "-samefile", "s/file06_65535"], cwd=mnt).split() != []
    for args in (["-s", "--apparent-size", "-B1"], ["-s", "-B1"], ["-a", "--apparent-size", "-B1"]):
        on_mount = run(["du", *args, "."], cwd=mnt)
        on_backing = run(["du", *args, "."], cwd=backing)
        assert on_mount == on_backing, f"du {' '.join(args)}"


def test_mv_across_directories(mnt: Path, backing: Path) -> None:
    (mnt / "src" / "tree" / "sub").mkdir(parents=True)
    (mnt / "dst").mkdir()
    (mnt / "src" / "file").write_bytes(_data(100_000, 1))
    (mnt / "src" / "tree" / "sub" / "leaf").write_text("leaf\n")
    ino_file = os.stat(mnt / "src" / "file").st_ino
    ino_tree = os.stat(mnt / "src" / "tree").st_ino
    run(["mv", str(mnt / "src" / "file"), str(mnt / "dst" / "")])
    run(["mv", str(mnt / "src" / "tree"), str(mnt / "dst" / "moved")])
    assert sorted(os.listdir(mnt / "src")) == []
    assert (mnt / "dst" / "file").read_bytes() == _data(100_000, 1)
    assert (mnt / "dst" / "moved" / "sub" / "leaf").read_text() == "leaf\n"
    # a rename, not a copy: the same inodes
    assert os.stat(mnt / "dst" / "file").st_ino == ino_file
    assert os.stat(mnt / "dst" / "moved").st_ino == ino_tree
    # mv over an existing file, and mv -T of a directory over an empty one
    (mnt / "dst" / "other").write_text("other\n")
    run(["mv", str(mnt / "dst" / "other"), str(mnt / "dst" / "file")])
    assert (mnt / "dst" / "file").read_text() == "other\n"
    (mnt / "empty").mkdir()
    run(["mv", "-T", str(mnt / "dst" / "moved"), str(mnt / "empty")])
    assert (mnt / "empty" / "sub" / "leaf").read_text() == "leaf\n"
    assert sorted(p.name for p in backing.rglob("*")) == sorted(p.name for p in mnt.rglob("*"))


def test_editor_style_save(mnt: Path) -> None:
    path = mnt / "doc.txt"
    path.write_text("original\n")
    os.chmod(path, 0o640)
    reader = os.open(path, os.O_RDONLY)  # someone still has the old version open
    try:
        for version in range(1, 4):
            text = f"version {version}\n" * (1000 * version)
            tmp = mnt / f".doc.txt.{version}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, text.encode())
                os.fchmod(fd, 0o640)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            assert path.read_text() == text
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert os.pread(reader, 100, 0) == b"original\n"
    finally:
        os.close(reader)
    assert sorted(os.listdir(mnt)) == ["doc.txt"]
    # sed -i saves the same way (temp file, rename)
    run(["sed", "-i", "s/version 3/edited/", str(path)])
    assert path.read_text() == "edited\n" * 3000
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(mnt)) == ["doc.txt"]
