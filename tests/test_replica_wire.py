"""The replication wire codec (fusefs.replica.wire): layouts, handshake, limits, fuzz."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusefs.mirror import changes as ch
from fusefs.replica import wire as w

KEY = b"k" * 32
CN = b"c" * 32
SN = b"s" * 32


def drain(conn: w.Connection) -> list[w.Event]:
    out: list[w.Event] = []
    while True:
        ev = conn.next_event()
        if ev is w.NEED_DATA:
            return out
        assert not isinstance(ev, w._NeedData)
        out.append(ev)


def pair(key_c: bytes = KEY, key_s: bytes = KEY) -> tuple[w.Connection, w.Connection]:
    """An authenticated client/server pair."""
    c = w.Connection(w.Role.CLIENT, key_c, b"src")
    s = w.Connection(w.Role.SERVER, key_s)
    s.receive_data(c.hello(CN))
    assert drain(s) == [w.Hello(b"src", CN)]
    c.receive_data(s.challenge(SN))
    assert drain(c) == [w.Challenge(SN)]
    s.receive_data(c.auth())
    [ev] = drain(s)
    assert isinstance(ev, w.Auth)
    c.receive_data(s.auth_ok())
    [ev] = drain(c)
    assert isinstance(ev, w.AuthOk)
    assert c.authenticated and s.authenticated
    return c, s


CHANGES: list[ch.Change] = [
    ch.Create(b"a/b", 0o644, 1, 2),
    ch.Mkdir(b"d", 0o755, 0, 0),
    ch.Mknod(b"fifo", 0o10644, 0, 0, 0),
    ch.Symlink(b"l", b"../x", 3, 4),
    ch.Link(b"h", b"a/b"),
    ch.Unlink(b"a/b"),
    ch.Rmdir(b"d"),
    ch.Rename(b"x", b"y", 2),
    ch.Write(b"f", 1 << 40, 4096),
    ch.Truncate(b"f", 0),
    ch.Fallocate(b"f", 3, 0, 100),
    ch.SetAttr(b"."),
    ch.SetAttr(b"f", mode=0o600, uid=5, gid=6, atime_ns=-1, mtime_ns=1_700_000_000_000_000_000),
    ch.SetAttr(b"f", mtime_ns=7),
    ch.SetXattr(b"f", b"user.x", b"\x00" * 100),
    ch.RemoveXattr(b"f", b"user.x"),
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: type(c).__name__)
def test_change_roundtrip(change: ch.Change) -> None:
    assert w.decode_change(w.encode_change(change)) == change


def test_handshake_and_ops() -> None:
    c, s = pair()
    s.receive_data(b"".join(c.send(w.Op(i, ch)) for i, ch in enumerate(CHANGES)))
    assert drain(s) == [w.Op(i, ch) for i, ch in enumerate(CHANGES)]
    c.receive_data(s.send(w.Ack(7, durable=True)) + s.send(w.Ack(8, failed=True)))
    assert drain(c) == [w.Ack(7, True, False), w.Ack(8, False, True)]


def test_wrong_key_is_refused_both_ways() -> None:
    with pytest.raises(w.WireError) as e:
        pair(key_c=b"wrong")
    assert e.value.code == w.E_AUTH
    # a server that does not know the key cannot fake AUTH_OK either
    c = w.Connection(w.Role.CLIENT, KEY, b"src")
    s = w.Connection(w.Role.SERVER, b"other")
    c.hello(CN)
    c.receive_data(w.encode_frame(w.Challenge(SN)))
    drain(c)
    c.auth()
    s._state, s._my_nonce, s._peer_nonce, s.source = "auth_ok", SN, CN, b"src"
    c.receive_data(s.auth_ok())
    with pytest.raises(w.WireError) as e:
        drain(c)
    assert e.value.code == w.E_AUTH


def test_key_never_on_the_wire() -> None:
    key = b"SECRET-KEY-0123456789"
    c = w.Connection(w.Role.CLIENT, key, b"src")
    s = w.Connection(w.Role.SERVER, key)
    sent = c.hello()
    s.receive_data(sent)
    drain(s)
    back = s.challenge()
    c.receive_data(back)
    drain(c)
    sent += c.auth()
    s.receive_data(sent[len(sent) - 37 :])
    drain(s)
    back += s.auth_ok()
    assert key not in sent and key not in back


def test_ops_before_auth_are_refused() -> None:
    s = w.Connection(w.Role.SERVER, KEY)
    s.receive_data(w.encode_frame(w.Op(1, ch.Unlink(b"x"))))
    with pytest.raises(w.WireError):
        drain(s)
    c = w.Connection(w.Role.CLIENT, KEY, b"src")
    with pytest.raises(w.WireError):
        c.send(w.Op(1, ch.Unlink(b"x")))


def test_bad_magic_and_version() -> None:
    s = w.Connection(w.Role.SERVER, KEY)
    s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(w.WireError):
        drain(s)
    s = w.Connection(w.Role.SERVER, KEY)
    s.receive_data(w.encode_frame(w.Hello(b"x", CN, version=99)))
    with pytest.raises(w.WireError) as e:
        drain(s)
    assert e.value.code == w.E_VERSION


def test_data_payload_chunks_and_splice_accounting() -> None:
    c, s = pair()
    head = c.send(w.Data(5, b"f", 10, 8))
    with pytest.raises(w.WireError):
        c.send(w.Op(6, ch.Unlink(b"f")))  # payload owed first
    c.payload_sent(8)
    s.receive_data(head + b"abc")
    assert drain(s) == [w.Data(5, b"f", 10, 8), w.DataChunk(b"abc")]
    assert s.payload_left == 5
    s.payload_received(5)  # as if spliced straight from the socket
    s.receive_data(c.send(w.Sync(5)))
    assert drain(s) == [w.DataEnd(5), w.Sync(5)]
    with pytest.raises(w.WireError):
        s.payload_received(1)


def test_data_payload_all_buffered() -> None:
    c, s = pair()
    frame = c.send(w.Data(1, b"f", 0, 3))
    c.payload_sent(3)
    s.receive_data(frame + b"xyz" + c.send(w.Data(2, b"g", 0, 0)))
    assert drain(s) == [
        w.Data(1, b"f", 0, 3),
        w.DataChunk(b"xyz"),
        w.DataEnd(1),
        w.Data(2, b"g", 0, 0),
        w.DataEnd(2),
    ]


def test_listing_and_checksum_roundtrip() -> None:
    c, s = pair()
    entries = (
        w.Entry(b".", 0o40755, 0, 0, 4096, 1),
        w.Entry(b"l", 0o120777, 0, 0, 3, -5, target=b"a/b"),
        w.Entry(b"f", 0o100644, 1, 2, 9, 2, xattrs=((b"user.a", b"1"), (b"user.b", b""))),
    )
    c.receive_data(
        s.send(w.ListReply(1, entries, False))
        + s.send(w.ListReply(1, (), True))
        + s.send(w.ChecksumReply(2, True, 9, (b"d" * 32, b"e" * 32)))
        + s.send(w.ChecksumReply(3, False))
        + s.send(w.Error(w.E_BUSY, "busy"))
    )
    assert drain(c) == [
        w.ListReply(1, entries, False),
        w.ListReply(1, (), True),
        w.ChecksumReply(2, True, 9, (b"d" * 32, b"e" * 32)),
        w.ChecksumReply(3, False, 0, ()),
        w.Error(w.E_BUSY, "busy"),
    ]
    assert c.closed


def test_limits() -> None:
    with pytest.raises(w.WireError):
        w.encode_change(ch.Unlink(b"x" * (w.MAX_PATH + 1)))
    with pytest.raises(w.WireError):
        w.encode_change(ch.SetXattr(b"f", b"n" * 256, b""))
    with pytest.raises(w.WireError):
        w.encode_frame(w.Data(1, b"f", 0, w.MAX_DATA + 1))
    _c, s = pair()
    # an oversized frame header is refused before its payload arrives
    s.receive_data(struct.pack(">IB", w.MAX_FRAME + 1, 5))
    with pytest.raises(w.WireError):
        drain(s)
    # pre-auth frames are small
    s = w.Connection(w.Role.SERVER, KEY)
    s.receive_data(struct.pack(">IB", w.MAX_PREAUTH_FRAME + 1, 1))
    with pytest.raises(w.WireError):
        drain(s)


def test_truncated_frames_wait_for_more() -> None:
    c, _s = pair()
    frame = c.send(w.Op(3, ch.Write(b"f", 0, 1)))
    for i in range(len(frame)):
        s2 = w.Connection(w.Role.SERVER, KEY)
        s2._state = "open"
        s2.receive_data(frame[:i])
        assert s2.next_event() is w.NEED_DATA


def test_bad_paths_in_frames() -> None:
    _c, s = pair()
    bad = struct.pack(">QB", 1, 6) + struct.pack(">H", 3) + b"a\x00b"
    s.receive_data(struct.pack(">IB", len(bad), 5) + bad)
    with pytest.raises(w.WireError):
        drain(s)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.booleans(), st.sampled_from(list(w.Role)))
def test_random_bytes_only_raise_wire_error(data: bytes, authed: bool, role: w.Role) -> None:
    conn = w.Connection(role, KEY)
    if authed:
        conn._state = "open"
    conn.receive_data(data)
    try:
        for _ in range(len(data) + 2):
            ev = conn.next_event()
            if ev is w.NEED_DATA:
                break
            assert_in_range(ev)
    except w.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_frames_only_raise_wire_error(data: st.DataObject) -> None:
    c, s = pair()
    stream = b"".join(c.send(w.Op(i, x)) for i, x in enumerate(CHANGES))
    stream = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    s.receive_data(bytes(stream))
    try:
        for _ in range(100):
            if s.next_event() is w.NEED_DATA:
                break
    except w.WireError:
        pass


# -- field ranges ------------------------------------------------------------------------------

U64 = (1 << 64) - 1


def raw_frame(t: int, payload: bytes) -> bytes:
    return struct.pack(">IB", len(payload), t) + payload


def p16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def raw_op(tag: int, body: bytes, seq: int = 1) -> bytes:
    return raw_frame(5, struct.pack(">QB", seq, tag) + body)


BAD_FRAMES = {
    "truncate-2**63": raw_op(10, p16(b"f") + struct.pack(">Q", 1 << 63)),
    "truncate-u64max": raw_op(10, p16(b"f") + struct.pack(">Q", U64)),
    "write-end-overflows": raw_op(9, p16(b"f") + struct.pack(">QQ", (1 << 63) - 1, 2)),
    "fallocate-end": raw_op(11, p16(b"f") + struct.pack(">IQQ", 0, 1 << 62, 1 << 62)),
    "fallocate-mode": raw_op(11, p16(b"f") + struct.pack(">IQQ", 0x80, 0, 1)),
    "fallocate-empty": raw_op(11, p16(b"f") + struct.pack(">IQQ", 0, 0, 0)),
    "create-mode": raw_op(1, p16(b"f") + struct.pack(">III", 0o100644, 0, 0)),
    "create-uid-minus-1": raw_op(1, p16(b"f") + struct.pack(">III", 0o644, 0xFFFFFFFF, 0)),
    "mkdir-gid-minus-1": raw_op(2, p16(b"d") + struct.pack(">III", 0o755, 0, 0xFFFFFFFF)),
    "mknod-mode-u32": raw_op(3, p16(b"n") + struct.pack(">IQII", 0xFFFFFFFF, 0, 0, 0)),
    "mknod-dir": raw_op(3, p16(b"n") + struct.pack(">IQII", 0o40755, 0, 0, 0)),
    "mknod-rdev": raw_op(3, p16(b"n") + struct.pack(">IQII", 0o20644, 1 << 32, 0, 0)),
    "symlink-uid": raw_op(4, p16(b"l") + p16(b"t") + struct.pack(">II", 0xFFFFFFFF, 0)),
    "rename-flags": raw_op(8, p16(b"a") + p16(b"b") + struct.pack(">I", 8)),
    "setattr-mode": raw_op(
        12, p16(b"f") + bytes([1]) + struct.pack(">IIIqq", 0o170000, 0, 0, 0, 0)
    ),
    "setattr-uid": raw_op(
        12, p16(b"f") + bytes([2]) + struct.pack(">IIIqq", 0, 0xFFFFFFFF, 0, 0, 0)
    ),
    "data-offset": raw_frame(6, struct.pack(">QQQ", 1, 1 << 63, 0) + p16(b"f")),
    "data-end": raw_frame(6, struct.pack(">QQQ", 1, (1 << 63) - 10, 11) + p16(b"f")),
    "read-offset": raw_frame(14, struct.pack(">IQQ", 1, U64, 1) + p16(b"f")),
    "checksum-bs-0": raw_frame(12, struct.pack(">IQ", 1, 0) + p16(b"f")),
    "checksum-bs-2**63": raw_frame(12, struct.pack(">IQ", 1, 1 << 63) + p16(b"f")),
}


@pytest.mark.parametrize("frame", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_out_of_range_fields_are_protocol_errors(frame: bytes) -> None:
    """Values no system call could take (OverflowError for ftruncate(2**63), a uid of -1 that
    chown reads as "unchanged") never leave the codec."""
    _c, s = pair()
    s.receive_data(frame)
    with pytest.raises(w.WireError) as e:
        drain(s)
    assert e.value.code == w.E_PROTOCOL


@pytest.mark.parametrize(
    "change",
    [
        ch.Truncate(b"f", 1 << 63),
        ch.Write(b"f", (1 << 63) - 1, 1),
        ch.Fallocate(b"f", 0, 0, 0),
        ch.Create(b"f", 0o100644, 0, 0),
        ch.Mknod(b"n", 0o40755, 0, 0, 0),
        ch.SetAttr(b"f", uid=0xFFFFFFFF),
        ch.Rename(b"a", b"b", 8),
    ],
    ids=lambda c: type(c).__name__,
)
def test_out_of_range_fields_are_not_encoded(change: ch.Change) -> None:
    with pytest.raises(w.WireError):
        w.encode_change(change)


def test_range_limits_are_inclusive() -> None:
    top = w.MAX_OFFSET
    for c in (
        ch.Truncate(b"f", top),
        ch.Write(b"f", top - 5, 5),
        ch.Fallocate(b"f", 0x7F, top - 1, 1),
        ch.Create(b"f", 0o7777, w.MAX_ID, w.MAX_ID),
        ch.Mknod(b"n", 0o27777, w.MAX_RDEV, 0, 0),
        ch.SetAttr(b"f", atime_ns=-(1 << 63), mtime_ns=(1 << 63) - 1),
    ):
        assert w.decode_change(w.encode_change(c)) == c
    _c, s = pair()
    s.receive_data(w.encode_frame(w.Data(1, b"f", top - 3, 3)))
    assert drain(s)[0] == w.Data(1, b"f", top - 3, 3)


def assert_in_range(ev: object) -> None:
    """Every number a decoded event carries is one the replica can act on (independent of
    the codec's own checks, on purpose)."""
    off = (1 << 63) - 1
    ids = (1 << 32) - 2

    def rng(o: int, n: int) -> None:
        assert o >= 0 and n >= 0 and o + n <= off, (o, n)

    match ev:
        case w.Op(_, c):
            match c:
                case ch.Create(_, m, u, g) | ch.Mkdir(_, m, u, g):
                    assert 0 <= m <= 0o7777 and 0 <= u <= ids and 0 <= g <= ids
                case ch.Mknod(_, m, rdev, u, g):
                    assert 0 <= m <= 0xFFFF and m & 0o170000 in (
                        0o010000,
                        0o140000,
                        0o020000,
                        0o060000,
                        0o100000,
                    )
                    assert 0 <= rdev < 1 << 32 and 0 <= u <= ids and 0 <= g <= ids
                case ch.Symlink(_, _, u, g):
                    assert 0 <= u <= ids and 0 <= g <= ids
                case ch.Rename(_, _, flags):
                    assert 0 <= flags <= 7
                case ch.Write(_, o, n):
                    rng(o, n)
                case ch.Truncate(_, n):
                    rng(n, 0)
                case ch.Fallocate(_, m, o, n):
                    assert 0 <= m <= 0x7F and n >= 1
                    rng(o, n)
                case ch.SetAttr(_, m, u, g, a, t):
                    assert m is None or 0 <= m <= 0o7777
                    assert u is None or 0 <= u <= ids
                    assert g is None or 0 <= g <= ids
                    for x in (a, t):
                        assert x is None or -(1 << 63) <= x < 1 << 63
        case w.Data(_, _, o, n) | w.Read(_, _, o, n):
            assert n <= w.MAX_DATA
            rng(o, n)
        case w.Checksum(_, _, bs):
            assert 1 <= bs <= off
        case w.ChecksumReply(_, _, size, digests):
            rng(size, 0)
            assert len(digests) <= 16384


#: numbers around every limit, and small ones
INTS = st.one_of(
    st.integers(0, 1 << 20),
    st.sampled_from(
        [
            0o7777,
            0o10000,
            0o170000,
            0xFFFF,
            0x7F,
            0x80,
            (1 << 31),
            (1 << 32) - 2,
            (1 << 32) - 1,
            (1 << 62),
            (1 << 63) - 1,
            1 << 63,
            U64,
        ]
    ),
    st.integers(0, U64),
)

#: (frame type, op tag or 0, layout of the numbers after the path(s))
LAYOUTS = [
    (5, 1, ">III"),
    (5, 2, ">III"),
    (5, 3, ">IQII"),
    (5, 4, ">II"),
    (5, 8, ">I"),
    (5, 9, ">QQ"),
    (5, 10, ">Q"),
    (5, 11, ">IQQ"),
    (5, 12, "setattr"),
    (6, 0, ">QQQ"),
    (14, 0, ">IQQ"),
    (12, 0, ">IQ"),
    (13, 0, "reply"),
]


@st.composite
def numeric_frames(draw: st.DrawFn) -> bytes:
    t, tag, layout = draw(st.sampled_from(LAYOUTS))
    path = p16(b"f")

    def nums(fmt: str) -> bytes:
        vals = []
        for code in fmt[1:]:
            v = draw(INTS)
            vals.append(v & (0xFFFFFFFF if code == "I" else U64))
        return struct.pack(fmt, *vals)

    if t == 5:
        seq = struct.pack(">QB", draw(INTS) & U64, tag)
        if tag == 12:
            mask = draw(st.integers(0, 31))
            body = path + bytes([mask]) + nums(">III") + nums(">QQ")
        elif tag in (4, 8):
            body = path + p16(b"g") + nums(layout)
        else:
            body = path + nums(layout)
        return raw_frame(5, seq + body)
    if t == 13:
        n = draw(st.integers(0, 3))
        head = struct.pack(">IB", 1, 1) + nums(">Q") + struct.pack(">I", n)
        return raw_frame(13, head + b"d" * 32 * n)
    return raw_frame(t, nums(layout) + path)


@settings(max_examples=1000, deadline=None)
@given(numeric_frames(), st.sampled_from(list(w.Role)))
def test_decoded_fields_are_always_in_range(frame: bytes, role: w.Role) -> None:
    conn = w.Connection(role, KEY)
    conn._state = "open"
    conn.receive_data(frame)
    try:
        evs = drain(conn)
    except w.WireError:
        return
    for ev in evs:
        assert_in_range(ev)
    assert not isinstance(evs[0], w.Op) or w.decode_change(w.encode_change(evs[0].change)) == (
        evs[0].change
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(numeric_frames(), min_size=1, max_size=6), st.data())
def test_mutated_numeric_frames_decode_in_range(frames: list[bytes], data: st.DataObject) -> None:
    stream = bytearray(b"".join(frames))
    for _ in range(data.draw(st.integers(0, 4))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    conn = w.Connection(w.Role.SERVER, KEY)
    conn._state = "open"
    conn.receive_data(bytes(stream))
    try:
        for _ in range(50):
            ev = conn.next_event()
            if ev is w.NEED_DATA:
                break
            assert_in_range(ev)
    except w.WireError:
        pass
