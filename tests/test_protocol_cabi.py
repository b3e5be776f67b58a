"""Byte-for-byte check of every abi Struct against the C compiler's view of the kernel header.

Each field gets a distinct value on both sides: C assigns them to the struct and dumps its bytes,
Python packs them with the Struct; sizes and bytes must agree, which pins down field order,
widths and padding.  Needs gcc.  The header defaults to /usr/include/linux/fuse.h; point
FUSEFS_FUSE_KERNEL_H at a newer one (libfuse's include/fuse_kernel.h) to check 7.40+ fields too.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fusefs.protocol import abi

HEADER = os.environ.get("FUSEFS_FUSE_KERNEL_H", "/usr/include/linux/fuse.h")

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not Path(HEADER).exists(), reason="needs gcc and fuse.h"
)

_ATTR = [
    "ino",
    "size",
    "blocks",
    "atime",
    "mtime",
    "ctime",
    "atimensec",
    "mtimensec",
    "ctimensec",
    "mode",
    "nlink",
    "uid",
    "gid",
    "rdev",
    "blksize",
    "flags",
]


def _prefixed(prefix: str, names: list[str]) -> list[str]:
    return [f"{prefix}.{n}" for n in names]


_ENTRY = [
    "nodeid",
    "generation",
    "entry_valid",
    "attr_valid",
    "entry_valid_nsec",
    "attr_valid_nsec",
    *_prefixed("attr", _ATTR),
]

# (C struct, abi Struct, C field per Struct value; None = not in this header version: packs 0)
SPECS: list[tuple[str, struct.Struct, list[str | None], str]] = [
    (
        "fuse_in_header",
        abi.IN_HEADER,
        ["len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen", "padding"],
        "",
    ),
    ("fuse_out_header", abi.OUT_HEADER, ["len", "error", "unique"], ""),
    ("fuse_attr", abi.ATTR, list(_ATTR), ""),
    ("fuse_entry_out", abi.ENTRY_OUT, list(_ENTRY), ""),
    (
        "fuse_attr_out",
        abi.ATTR_OUT,
        ["attr_valid", "attr_valid_nsec", "dummy", *_prefixed("attr", _ATTR)],
        "",
    ),
    (
        "fuse_kstatfs",
        abi.KSTATFS,
        ["blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize", "padding"],
        "",
    ),
    ("fuse_file_lock", abi.FILE_LOCK, ["start", "end", "type", "pid"], ""),
    ("fuse_forget_in", abi.FORGET_IN, ["nlookup"], ""),
    ("fuse_forget_one", abi.FORGET_ONE, ["nodeid", "nlookup"], ""),
    ("fuse_batch_forget_in", abi.BATCH_FORGET_IN, ["count", "dummy"], ""),
    ("fuse_getattr_in", abi.GETATTR_IN, ["getattr_flags", "dummy", "fh"], ""),
    ("fuse_mknod_in", abi.MKNOD_IN, ["mode", "rdev", "umask", "padding"], ""),
    ("fuse_mkdir_in", abi.MKDIR_IN, ["mode", "umask"], ""),
    ("fuse_rename_in", abi.RENAME_IN, ["newdir"], ""),
    ("fuse_rename2_in", abi.RENAME2_IN, ["newdir", "flags", "padding"], ""),
    ("fuse_link_in", abi.LINK_IN, ["oldnodeid"], ""),
    (
        "fuse_setattr_in",
        abi.SETATTR_IN,
        [
            "valid",
            "padding",
            "fh",
            "size",
            "lock_owner",
            "atime",
            "mtime",
            "ctime",
            "atimensec",
            "mtimensec",
            "ctimensec",
            "mode",
            "unused4",
            "uid",
            "gid",
            "unused5",
        ],
        "",
    ),
    ("fuse_open_in", abi.OPEN_IN, ["flags", "open_flags"], ""),
    ("fuse_create_in", abi.CREATE_IN, ["flags", "mode", "umask", "open_flags"], ""),
    ("fuse_open_out", abi.OPEN_OUT, ["fh", "open_flags", "OPEN_OUT_ID"], ""),
    ("fuse_release_in", abi.RELEASE_IN, ["fh", "flags", "release_flags", "lock_owner"], ""),
    ("fuse_flush_in", abi.FLUSH_IN, ["fh", "unused", "padding", "lock_owner"], ""),
    (
        "fuse_read_in",
        abi.READ_IN,
        ["fh", "offset", "size", "read_flags", "lock_owner", "flags", "padding"],
        "",
    ),
    (
        "fuse_write_in",
        abi.WRITE_IN,
        ["fh", "offset", "size", "write_flags", "lock_owner", "flags", "padding"],
        "",
    ),
    ("fuse_write_out", abi.WRITE_OUT, ["size", "padding"], ""),
    ("fuse_fsync_in", abi.FSYNC_IN, ["fh", "fsync_flags", "padding"], ""),
    ("fuse_setxattr_in", abi.SETXATTR_IN, ["size", "flags", "setxattr_flags", "padding"], ""),
    ("fuse_getxattr_in", abi.GETXATTR_IN, ["size", "padding"], ""),
    ("fuse_getxattr_out", abi.GETXATTR_OUT, ["size", "padding"], ""),
    (
        "fuse_lk_in",
        abi.LK_IN,
        ["fh", "owner", "lk.start", "lk.end", "lk.type", "lk.pid", "lk_flags", "padding"],
        "",
    ),
    ("fuse_lk_out", abi.LK_OUT, ["lk.start", "lk.end", "lk.type", "lk.pid"], ""),
    ("fuse_access_in", abi.ACCESS_IN, ["mask", "padding"], ""),
    ("fuse_init_in", abi.INIT_IN, ["major", "minor", "max_readahead", "flags", "flags2"], ""),
    (
        "fuse_init_out",
        abi.INIT_OUT,
        [
            "major",
            "minor",
            "max_readahead",
            "flags",
            "max_background",
            "congestion_threshold",
            "max_write",
            "time_gran",
            "max_pages",
            "map_alignment",
            "flags2",
            "INIT_OUT_MSD",
            "INIT_OUT_TIMEOUT",
        ],
        "",
    ),
    ("fuse_interrupt_in", abi.INTERRUPT_IN, ["unique"], ""),
    ("fuse_bmap_in", abi.BMAP_IN, ["block", "blocksize", "padding"], ""),
    ("fuse_bmap_out", abi.BMAP_OUT, ["block"], ""),
    ("fuse_ioctl_in", abi.IOCTL_IN, ["fh", "flags", "cmd", "arg", "in_size", "out_size"], ""),
    ("fuse_ioctl_out", abi.IOCTL_OUT, ["result", "flags", "in_iovs", "out_iovs"], ""),
    ("fuse_poll_in", abi.POLL_IN, ["fh", "kh", "flags", "events"], ""),
    ("fuse_poll_out", abi.POLL_OUT, ["revents", "padding"], ""),
    ("fuse_fallocate_in", abi.FALLOCATE_IN, ["fh", "offset", "length", "mode", "padding"], ""),
    ("fuse_dirent", abi.DIRENT, ["ino", "off", "namelen", "type"], ""),
    (
        "fuse_direntplus",
        abi.DIRENTPLUS,
        [*_prefixed("entry_out", _ENTRY), *_prefixed("dirent", ["ino", "off", "namelen", "type"])],
        "",
    ),
    ("fuse_notify_inval_inode_out", abi.NOTIFY_INVAL_INODE_OUT, ["ino", "off", "len"], ""),
    ("fuse_notify_inval_entry_out", abi.NOTIFY_INVAL_ENTRY_OUT, ["parent", "namelen", "flags"], ""),
    (
        "fuse_notify_delete_out",
        abi.NOTIFY_DELETE_OUT,
        ["parent", "child", "namelen", "padding"],
        "",
    ),
    ("fuse_notify_store_out", abi.NOTIFY_STORE_OUT, ["nodeid", "offset", "size", "padding"], ""),
    (
        "fuse_notify_retrieve_out",
        abi.NOTIFY_RETRIEVE_OUT,
        ["notify_unique", "nodeid", "offset", "size", "padding"],
        "",
    ),
    (
        "fuse_notify_retrieve_in",
        abi.NOTIFY_RETRIEVE_IN,
        ["dummy1", "offset", "size", "dummy2", "dummy3", "dummy4"],
        "",
    ),
    ("fuse_lseek_in", abi.LSEEK_IN, ["fh", "offset", "whence", "padding"], ""),
    ("fuse_lseek_out", abi.LSEEK_OUT, ["offset"], ""),
    (
        "fuse_copy_file_range_in",
        abi.COPY_FILE_RANGE_IN,
        ["fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags"],
        "",
    ),
    ("fuse_syncfs_in", abi.SYNCFS_IN, ["padding"], ""),
    (
        "fuse_statx_in",
        abi.STATX_IN,
        ["getattr_flags", "reserved", "fh", "sx_flags", "sx_mask"],
        "FUSE_KERNEL_MINOR_VERSION >= 39",
    ),
    ("fuse_ext_header", abi.EXT_HEADER, ["size", "type"], ""),
    (
        "fuse_backing_map",
        abi.BACKING_MAP,
        ["fd", "flags", "padding"],
        "FUSE_KERNEL_MINOR_VERSION >= 40",
    ),
]

PRELUDE = """
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include HEADER
#if FUSE_KERNEL_MINOR_VERSION >= 40
#define OPEN_OUT_ID backing_id
#define INIT_OUT_MSD max_stack_depth
#else
#define OPEN_OUT_ID padding
#define INIT_OUT_MSD unused[0]
#endif
static void dump(const char *name, const void *p, size_t n) {
    const unsigned char *b = p;
    printf("%s %zu ", name, n);
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\\n");
}
int main(void) {
"""

_ITEM = re.compile(r"(\d*)([xbBhHiIqQ])")


def _items(fmt: str) -> list[str]:
    out: list[str] = []
    for count, code in _ITEM.findall(fmt.lstrip("<")):
        if code != "x":
            out.extend(code * int(count or 1))
    return out


def _value(i: int, code: str) -> int:
    width = struct.calcsize("<" + code)
    return int.from_bytes(bytes([i + 1]) * width, "little")


def _c_program() -> str:
    parts = [PRELUDE.replace("HEADER", f'"{HEADER}"')]
    for name, st, fields, cond in SPECS:
        codes = _items(st.format)
        assert len(codes) == len(fields), name
        body = [f"{{ struct {name} s; memset(&s, 0, sizeof s);"]
        for i, (field, code) in enumerate(zip(fields, codes, strict=True)):
            if field == "INIT_OUT_TIMEOUT":
                body.append(
                    "#if FUSE_KERNEL_MINOR_VERSION >= 43\n"
                    f"s.request_timeout = {_value(i, code)}ULL;\n#endif"
                )
            elif field is not None:
                body.append(f"s.{field} = {_value(i, code)}ULL;")
        body.append(f'dump("{name}", &s, sizeof s); }}')
        block = "\n".join(body)
        if cond:
            block = f"#if {cond}\n{block}\n#endif"
        parts.append(block)
    parts.append("return 0; }")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def c_layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, bytes]]:
    d = tmp_path_factory.mktemp("cabi")
    (d / "abi.c").write_text(_c_program())
    cc = subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-o", str(d / "abi"), str(d / "abi.c")],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout
    layouts = {}
    for line in out.splitlines():
        name, size, hexbytes = line.split()
        layouts[name] = (int(size), bytes.fromhex(hexbytes))
    return layouts


def _minor() -> int:
    text = Path(HEADER).read_text()
    m = re.search(r"#define FUSE_KERNEL_MINOR_VERSION (\d+)", text)
    assert m
    return int(m.group(1))


@pytest.mark.parametrize("name,st,fields", [(n, s, f) for n, s, f, _ in SPECS])
def test_struct_matches_c(
    c_layouts: dict[str, tuple[int, bytes]], name: str, st: struct.Struct, fields: list[str]
) -> None:
    if name not in c_layouts:
        pytest.skip(f"{name} not in {HEADER}")
    size, cbytes = c_layouts[name]
    assert st.size == size, f"{name}: Python {st.size} bytes, C {size}"
    values = []
    for i, (field, code) in enumerate(zip(fields, _items(st.format), strict=True)):
        absent = field is None or (field == "INIT_OUT_TIMEOUT" and _minor() < 43)
        values.append(0 if absent else _value(i, code))
    assert st.pack(*values) == cbytes, name
