"""INIT negotiation: version rules, flag selection, limits, and the reply's exact bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusefs.protocol import abi
from fusefs.protocol import requests as rq
from fusefs.protocol.errors import ProtocolError
from fusefs.protocol.init import SUPPORTED_FLAGS, InitConfig, Negotiated, negotiate

UNIQUE = 2

#: Flags this codebase does not implement: never granted, whatever is offered or asked.
NEVER = (
    abi.FUSE_HAS_INODE_DAX | abi.FUSE_SECURITY_CTX | abi.FUSE_CREATE_SUPP_GROUP
    | abi.FUSE_OVER_IO_URING | abi.FUSE_REQUEST_TIMEOUT | abi.FUSE_ALLOW_IDMAP
    | abi.FUSE_HAS_RESEND | abi.FUSE_MAP_ALIGNMENT | abi.FUSE_SUBMOUNTS | abi.FUSE_INIT_RESERVED
    | abi.FUSE_FILE_OPS
)  # fmt: skip

# What a 6.x kernel offers (roughly: everything it knows up to 7.41).
KERNEL_741 = (1 << 41) - 1 & ~abi.FUSE_INIT_RESERVED & ~abi.FUSE_FILE_OPS


def init_request(major: int, minor: int, flags: int, max_readahead: int = 131072) -> rq.Init:
    """Decode a hand-packed INIT as the kernel of that version sends it."""
    if major == 7 and minor >= 36:
        body = struct.pack("<IIIII44x", major, minor, max_readahead, flags & 0xFFFFFFFF,
                           flags >> 32)  # fmt: skip
    else:
        body = struct.pack("<IIII", major, minor, max_readahead, flags & 0xFFFFFFFF)
    hdr = struct.pack("<IIQQIIIHH", 40 + len(body), abi.Opcode.INIT, UNIQUE, 0, 0, 0, 0, 0, 0)
    r = rq.decode_request(hdr + body)
    assert isinstance(r, rq.Init)
    return r


def parse_reply(reply: bytes) -> dict[str, int]:
    length, error, unique = struct.unpack_from("<IiQ", reply)
    assert (length, error, unique) == (len(reply), 0, UNIQUE)
    names = [
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
        "max_stack_depth",
        "request_timeout",
    ]
    if len(reply) == 16 + 24:
        vals = struct.unpack_from("<IIIIHHI", reply, 16)
        return dict(zip(names, vals, strict=False))
    assert len(reply) == 16 + 64
    return dict(zip(names, struct.unpack_from("<IIIIHHIIHHIIH22x", reply, 16), strict=True))


def test_modern_kernel_with_passthrough() -> None:
    reply, neg = negotiate(init_request(7, 45, KERNEL_741), InitConfig(want_passthrough=True))
    out = parse_reply(reply)
    assert neg.established and (neg.major, neg.minor) == (7, 41)
    assert (out["major"], out["minor"]) == (7, 41)
    assert neg.passthrough and neg.max_stack_depth == 1 and out["max_stack_depth"] == 1
    assert out["flags2"] << 32 | out["flags"] == neg.flags
    assert neg.flags & abi.FUSE_INIT_EXT and out["flags2"] == abi.FUSE_PASSTHROUGH >> 32
    assert neg.max_pages == 255 and neg.max_write == 255 * 4096
    assert (out["max_pages"], out["max_write"]) == (255, 255 * 4096)
    assert out["time_gran"] == 1 and neg.time_gran == 1
    assert out["max_readahead"] == 131072 == neg.max_readahead
    assert (out["max_background"], out["congestion_threshold"]) == (64, 48)
    assert out["request_timeout"] == 0 and out["map_alignment"] == 0
    # Defaults: parallel, async, readdirplus, splice; kernel-side locks and umask.
    for flag in (abi.FUSE_ASYNC_READ, abi.FUSE_PARALLEL_DIROPS, abi.FUSE_DO_READDIRPLUS,
                 abi.FUSE_READDIRPLUS_AUTO, abi.FUSE_SPLICE_READ, abi.FUSE_SPLICE_WRITE,
                 abi.FUSE_SPLICE_MOVE, abi.FUSE_MAX_PAGES, abi.FUSE_ATOMIC_O_TRUNC,
                 abi.FUSE_BIG_WRITES, abi.FUSE_AUTO_INVAL_DATA):  # fmt: skip
        assert neg.has(flag), hex(flag)
    assert not (neg.posix_locks or neg.flock_locks or neg.dont_mask or neg.writeback_cache)
    assert not (neg.export_support or neg.setxattr_ext or neg.handle_killpriv)
    assert not neg.handle_killpriv_v2 and neg.async_read
    assert neg.readdirplus and neg.readdirplus_auto and neg.parallel_dirops
    assert neg.splice_read and neg.splice_write and neg.splice_move and neg.atomic_o_trunc
    assert neg.expire_only


def test_passthrough_not_wanted_by_default() -> None:
    _, neg = negotiate(init_request(7, 41, KERNEL_741))
    assert not neg.passthrough and neg.max_stack_depth == 0


def test_passthrough_wins_over_writeback_cache() -> None:
    """The kernel ignores PASSTHROUGH next to WRITEBACK_CACHE; we must not send both."""
    cfg = InitConfig(want_passthrough=True, want_writeback_cache=True, max_stack_depth=5)
    _reply, neg = negotiate(init_request(7, 41, KERNEL_741), cfg)
    assert neg.passthrough and not neg.writeback_cache
    assert neg.max_stack_depth == abi.FILESYSTEM_MAX_STACK_DEPTH
    _, neg = negotiate(init_request(7, 41, KERNEL_741), InitConfig(want_writeback_cache=True))
    assert neg.writeback_cache and not neg.passthrough


def test_old_kernel_7_31() -> None:
    offered = (1 << 30) - 1 & ~abi.FUSE_FILE_OPS  # 7.31 knows bits up to SETXATTR_EXT-ish
    reply, neg = negotiate(init_request(7, 31, offered), InitConfig(want_passthrough=True))
    out = parse_reply(reply)
    assert neg.minor == 31 == out["minor"]
    assert neg.flags >> 32 == 0 and out["flags2"] == 0
    assert not neg.has(abi.FUSE_INIT_EXT) and not neg.passthrough
    assert neg.max_pages == 255 and out["max_pages"] == 255  # MAX_PAGES exists since 7.28
    assert out["max_stack_depth"] == 0


def test_no_init_ext_means_no_flags2() -> None:
    """flags2 bits without INIT_EXT are noise: neither read nor answered."""
    offered = KERNEL_741 & ~abi.FUSE_INIT_EXT
    init = rq.Init(UNIQUE, abi.Opcode.INIT, 0, 0, 0, 0, 7, 41, 65536, offered)
    reply, neg = negotiate(init, InitConfig(want_passthrough=True))
    out = parse_reply(reply)
    assert neg.flags >> 32 == 0 and out["flags2"] == 0 and neg.kernel_flags >> 32 == 0
    assert not neg.passthrough and not neg.expire_only


def test_kernel_without_max_pages() -> None:
    offered = abi.FUSE_ASYNC_READ | abi.FUSE_BIG_WRITES
    reply, neg = negotiate(init_request(7, 26, offered))
    out = parse_reply(reply)
    assert neg.max_pages == abi.FUSE_DEFAULT_MAX_PAGES_PER_REQ
    assert neg.max_write == 32 * 4096 == out["max_write"]
    assert out["max_pages"] == 0
    assert neg.flags == offered


def test_pre_7_23_kernel_gets_compat_reply() -> None:
    reply, _neg = negotiate(init_request(7, 19, abi.FUSE_ASYNC_READ))
    assert len(reply) == 16 + 24
    out = parse_reply(reply)
    assert (out["major"], out["minor"], out["flags"]) == (7, 19, abi.FUSE_ASYNC_READ)


def test_future_major_gets_our_version_only() -> None:
    reply, neg = negotiate(init_request(8, 0, 0))
    assert not neg.established and (neg.major, neg.minor) == (7, abi.FUSE_KERNEL_MINOR_VERSION)
    out = parse_reply(reply)
    assert (out["major"], out["minor"]) == (7, 41)
    assert out["flags"] == out["flags2"] == out["max_write"] == 0


@pytest.mark.parametrize("major,minor", [(6, 99), (7, 11), (7, 0)])
def test_too_old_kernels_are_refused(major: int, minor: int) -> None:
    init = rq.Init(UNIQUE, abi.Opcode.INIT, 0, 0, 0, 0, major, minor, 0, 0)
    with pytest.raises(ProtocolError, match="too old"):
        negotiate(init)


def test_unimplemented_flags_never_granted() -> None:
    everything = InitConfig(**{
        f: True for f in InitConfig.__dataclass_fields__ if f.startswith("want_")
    })  # fmt: skip
    _, neg = negotiate(init_request(7, 45, (1 << 64) - 1), everything)
    assert neg.flags & NEVER == 0
    assert neg.flags & ~SUPPORTED_FLAGS == 0
    assert SUPPORTED_FLAGS & NEVER == 0


@pytest.mark.parametrize("wanted,granted", [(1000, 256), (0, 1), (-5, 1), (64, 64)])
def test_max_pages_clamped(wanted: int, granted: int) -> None:
    _, neg = negotiate(init_request(7, 41, KERNEL_741), InitConfig(max_pages=wanted))
    assert neg.max_pages == granted and neg.max_write == granted * 4096


def test_max_readahead_is_the_smaller() -> None:
    _, neg = negotiate(init_request(7, 41, KERNEL_741, max_readahead=1 << 20),
                       InitConfig(max_readahead=65536))  # fmt: skip
    assert neg.max_readahead == 65536
    _, neg = negotiate(init_request(7, 41, KERNEL_741, max_readahead=4096))
    assert neg.max_readahead == 4096


def test_congestion_threshold_not_above_max_background() -> None:
    cfg = InitConfig(max_background=10, congestion_threshold=100)
    _, neg = negotiate(init_request(7, 41, KERNEL_741), cfg)
    assert (neg.max_background, neg.congestion_threshold) == (10, 10)


@given(
    offered=st.integers(0, (1 << 64) - 1),
    minor=st.integers(12, 60),
    wishes=st.dictionaries(
        st.sampled_from([f for f in InitConfig.__dataclass_fields__ if f.startswith("want_")]),
        st.booleans(),
    ),
)
def test_granted_is_offered_and_wanted(offered: int, minor: int, wishes: dict[str, bool]) -> None:
    init = rq.Init(UNIQUE, abi.Opcode.INIT, 0, 0, 0, 0, 7, minor, 131072, offered)
    cfg = InitConfig(**wishes)
    reply, neg = negotiate(init, cfg)
    assert isinstance(neg, Negotiated) and neg.established
    assert neg.flags & ~offered == 0
    assert neg.flags & NEVER == 0
    assert neg.minor == min(minor, 41)
    if not offered & abi.FUSE_INIT_EXT:
        assert neg.flags >> 32 == 0
    assert not (neg.passthrough and neg.writeback_cache)
    for name, flag in [("want_posix_locks", abi.FUSE_POSIX_LOCKS),
                       ("want_dont_mask", abi.FUSE_DONT_MASK),
                       ("want_passthrough", abi.FUSE_PASSTHROUGH),
                       ("want_writeback_cache", abi.FUSE_WRITEBACK_CACHE)]:  # fmt: skip
        if not getattr(cfg, name):
            assert not neg.has(flag)
    out = parse_reply(reply)
    assert out["flags"] == neg.flags & 0xFFFFFFFF
    if len(reply) == 80:
        assert out["flags2"] == neg.flags >> 32
