"""Fuzzing the decoder: whatever the bytes, it returns a request or raises ProtocolError."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusefs.protocol import requests as rq
from fusefs.protocol.abi import Opcode
from fusefs.protocol.errors import ProtocolError

OPCODES = [int(op) for op in Opcode] + [0, 7, 19, 54, 999, 2**32 - 1]


def _decode_or_protocol_error(buf: bytes | bytearray | memoryview, ext: bool) -> None:
    try:
        r = rq.decode_request(buf, setxattr_ext=ext)
    except ProtocolError:
        return
    assert isinstance(r, rq.REQUEST_TYPES)
    assert r.unique == struct.unpack_from("<Q", buf, 8)[0]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes(buf: bytes, ext: bool) -> None:
    _decode_or_protocol_error(buf, ext)
    with contextlib.suppress(ProtocolError):
        rq.decode_header(buf)
    with contextlib.suppress(ProtocolError):
        rq.decode_write_prefix(buf)


@settings(max_examples=1500)
@given(
    opcode=st.sampled_from(OPCODES),
    body=st.one_of(
        st.binary(max_size=200),
        # Bodies built from plausible pieces: small counts/sizes, names with NULs in odd places.
        st.lists(
            st.one_of(
                st.sampled_from([b"\0", b"name\0", b"a\0b\0", b"\0\0\0\0"]),
                st.integers(0, 300).map(lambda n: struct.pack("<I", n)),
                st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n)),
            ),
            max_size=20,
        ).map(b"".join),
    ),
    extlen=st.sampled_from([0, 0, 0, 1, 2, 1000]),
    len_delta=st.sampled_from([0, 0, 0, 0, -1, 1, 40]),
    ext=st.booleans(),
    view=st.sampled_from(["bytes", "bytearray", "memoryview"]),
)
def test_well_framed_random_bodies(
    opcode: int, body: bytes, extlen: int, len_delta: int, ext: bool, view: str
) -> None:
    length = max(0, 40 + len(body) + len_delta)
    buf: bytes | bytearray | memoryview = (
        struct.pack("<IIQQIIIHH", length, opcode, 1, 1, 0, 0, 0, extlen, 0) + body
    )
    if view == "bytearray":
        buf = bytearray(buf)
    elif view == "memoryview":
        buf = memoryview(buf)
    _decode_or_protocol_error(buf, ext)
