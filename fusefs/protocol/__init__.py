"""Sans-IO codec of the FUSE kernel protocol: bytes in, events out; values in, bytes out.

Nothing here does I/O or imports from the rest of fusefs, so every byte layout is tested without
a mount.  Modules: :mod:`.abi` (constants and struct layouts), :mod:`.requests` (decoding),
:mod:`.replies` (encoding), :mod:`.init` (INIT negotiation), :mod:`.errors`.
"""

from .abi import Opcode
from .errors import ProtocolError
from .init import InitConfig, Negotiated, negotiate
from .replies import Attr, DirentBuffer, EntryOut, InitReply
from .requests import InHeader, Request, decode_header, decode_request, decode_write_prefix

__all__ = [
    "Attr",
    "DirentBuffer",
    "EntryOut",
    "InHeader",
    "InitConfig",
    "InitReply",
    "Negotiated",
    "Opcode",
    "ProtocolError",
    "Request",
    "decode_header",
    "decode_request",
    "decode_write_prefix",
    "negotiate",
]
