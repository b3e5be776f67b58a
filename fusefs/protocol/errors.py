"""The one exception the protocol codec raises."""

from __future__ import annotations


class ProtocolError(Exception):
    """Bytes that are not a valid FUSE message (truncated, oversized, malformed, wrong version).

    The codec raises nothing else on bad input, so the session can catch exactly this, reply
    EIO/EPROTO to the request if it has a unique, and keep serving.
    """
