"""Unit tests of -o parsing and of the strings handed to mount(2) and fusermount3 (no mount)."""

from __future__ import annotations

import stat

import pytest

from fusefs.errors import FusefsError, OptionError
from fusefs.options import (
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MountOptions,
    escape_option,
    parse_options,
    split_option_string,
)
from fusefs.session.mount import parse_mountinfo


def test_defaults() -> None:
    opts = parse_options([])
    assert opts == MountOptions()
    assert opts.attr_timeout == 1.0 and opts.entry_timeout == 1.0
    assert opts.data == "auto"
    assert opts.max_pages == 256
    assert opts.max_read == 256 * 4096
    assert opts.read_ahead_kb == 1016
    assert opts.max_background is None
    assert opts.idle_spin_us == 50
    assert parse_options(["idle_spin_us=0"]).idle_spin_us == 0
    assert not (opts.allow_other or opts.default_permissions or opts.ro or opts.nonempty)
    assert not opts.writeback_cache
    assert opts.fstype == "fuse.fusefs"
    assert opts.session == "fusefs"


def test_every_option() -> None:
    opts = parse_options(
        [
            "allow_other,default_permissions,ro,noexec,nonempty,writeback_cache",
            "fsname=/srv/data,subtype=mirror,attr_timeout=2.5,entry_timeout=0",
            "data=splice,max_pages=64,read_ahead_kb=0,max_background=32,session=pyfuse3",
        ]
    )
    assert opts == MountOptions(
        allow_other=True,
        default_permissions=True,
        ro=True,
        noexec=True,
        nonempty=True,
        writeback_cache=True,
        fsname="/srv/data",
        subtype="mirror",
        attr_timeout=2.5,
        entry_timeout=0.0,
        data="splice",
        max_pages=64,
        read_ahead_kb=0,
        max_background=32,
        session="pyfuse3",
    )
    assert opts.fstype == "fuse.mirror"


def test_later_options_win() -> None:
    assert not parse_options(["ro", "rw"]).ro
    assert parse_options(["rw,ro"]).ro
    assert not parse_options(["noexec,exec"]).noexec
    assert parse_options(["data=copy", "data=passthrough"]).data == "passthrough"


@pytest.mark.parametrize(
    "ignored",
    [
        "rw",
        "defaults",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "_netdev",
        "nofail",
        "x-systemd.automount",
        "x-systemd.requires=network.target",
        "x-gvfs-hide",
        "comment=fusefs",
    ],
)
def test_mount_helper_options_are_ignored(ignored: str) -> None:
    assert parse_options([ignored]) == MountOptions()


def test_fstab_line_options() -> None:
    # what mount(8) + mount.fuse3 pass for "defaults,allow_other"
    assert parse_options(["rw,nosuid,nodev,allow_other"]) == MountOptions(
        allow_other=True, default_permissions=True
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("max_read=4096", "unknown mount option 'max_read'"),
        ("relatime", "unknown mount option 'relatime'"),
        ("allow_other=1", "takes no value"),
        ("fsname", "needs a value"),
        ("attr_timeout", "needs a number"),
        ("attr_timeout=soon", "must be a number"),
        ("attr_timeout=-1", ">= 0"),
        ("entry_timeout=nan", ">= 0"),
        ("max_pages=0", "between 1 and 256"),
        ("max_pages=257", "between 1 and 256"),
        ("max_pages=1.5", "whole number"),
        ("max_background=0", "between 1 and 65535"),
        ("idle_spin_us=100001", "between 0 and 100000"),
        ("read_ahead_kb=-1", "between 0"),
        ("data=mmap", "one of auto, passthrough, splice, copy"),
        ("session=libfuse", "one of fusefs, pyfuse3"),
        ("subtype=a/b", "subtype may only contain"),
        ("rw=1", "unknown mount option 'rw'"),
    ],
)
def test_bad_options(text: str, fragment: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_options([text])
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, FusefsError)


def test_split_and_escape() -> None:
    assert split_option_string("a,b=c,,d") == ["a", "b=c", "d"]
    assert split_option_string(r"fsname=a\,b,ro") == ["fsname=a,b", "ro"]
    assert split_option_string("fsname=" + escape_option("x\\y,z")) == ["fsname=x\\y,z"]
    assert parse_options([r"fsname=/srv/a\,b"]).fsname == "/srv/a,b"


def test_option_string_round_trip() -> None:
    opts = MountOptions(
        allow_other=True,
        default_permissions=True,
        ro=True,
        fsname="/a,b",
        attr_timeout=0.5,
        data="copy",
        max_pages=32,
    )
    assert parse_options([opts.to_option_string()]) == opts
    assert MountOptions().to_option_string() == ""


def test_mount_flags() -> None:
    assert MountOptions().mount_flags() == MS_NOSUID | MS_NODEV
    assert MountOptions(ro=True).mount_flags() == MS_NOSUID | MS_NODEV | MS_RDONLY
    assert MountOptions(noexec=True).mount_flags() & MS_NOEXEC


def test_kernel_mount_data() -> None:
    data = MountOptions().kernel_mount_data(5, stat.S_IFDIR, 1000, 100)
    assert data == "fd=5,rootmode=40000,user_id=1000,group_id=100,max_read=1048576"
    data = MountOptions(allow_other=True, default_permissions=True, max_pages=1).kernel_mount_data(
        3, stat.S_IFDIR, 0, 0
    )
    assert data == (
        "fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,max_read=4096"
    )
    # userspace-only options never reach the kernel
    data = MountOptions(fsname="x", nonempty=True, data="copy").kernel_mount_data(
        3, stat.S_IFDIR, 0, 0
    )
    assert "fsname" not in data and "nonempty" not in data and "data" not in data


def test_fusermount_options() -> None:
    assert MountOptions(fsname="/srv/data").fusermount_options() == (
        "rw,nosuid,nodev,fsname=/srv/data,subtype=fusefs,max_read=1048576"
    )
    text = MountOptions(
        ro=True, noexec=True, allow_other=True, default_permissions=True, fsname="a,b", subtype=""
    ).fusermount_options()
    assert text == (
        r"ro,nosuid,nodev,noexec,fsname=a\,b,allow_other,default_permissions,max_read=1048576"
    )
    assert MountOptions().source == "fusefs"
    assert MountOptions(subtype="").fstype == "fuse"


def test_parse_mountinfo() -> None:
    text = (
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "42 22 0:39 / /tmp/with\\040space rw,nosuid,nodev,relatime - fuse.fusefs "
        "/srv/back\\040ing rw,user_id=0,group_id=0\n"
    )
    root, fuse = parse_mountinfo(text)
    assert root.mountpoint == "/" and root.fstype == "ext4" and root.minor == 21
    assert fuse.mountpoint == "/tmp/with space"
    assert fuse.source == "/srv/back ing"
    assert (fuse.major, fuse.minor, fuse.fstype) == (0, 39, "fuse.fusefs")


def test_allow_other_implies_default_permissions() -> None:
    """Other users on a mount served with the daemon's rights would act as root otherwise."""
    assert parse_options(["allow_other"]).default_permissions
    assert not parse_options([]).default_permissions
    assert "default_permissions" in parse_options(["allow_other"]).fusermount_options()
