"""What the session did, counted: the proof that the data path is zero-copy.

Every byte of file data that leaves or enters the daemon is counted on exactly one path:
``spliced`` (moved by splice(2) without entering user space), ``copied`` (went through a Python
buffer), or never seen at all because the kernel served it from the backing file (passthrough;
we count the opens that were handed over).  Falling back from a faster path is counted too, so a
silent degradation shows up in ``fusefs stats``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counters:
    """Plain integers updated on the request path; no locking needed (one trio thread)."""

    read_requests_spliced: int = 0
    read_bytes_spliced: int = 0
    read_requests_copied: int = 0
    read_bytes_copied: int = 0
    write_requests_spliced: int = 0
    write_bytes_spliced: int = 0
    write_requests_copied: int = 0
    write_bytes_copied: int = 0
    passthrough_opens: int = 0
    passthrough_open_failures: int = 0
    #: Opens answered FOPEN_DIRECT_IO (the mirror's write-only opens: no page-cache copy).
    direct_io_opens: int = 0
    splice_fallbacks: int = 0
    errors: int = 0
    interrupts: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    data_mode: str = "copy"
    data_mode_reason: str = ""
    #: Pages per request agreed at INIT: 254 or 256 in splice modes, by the pipe size.
    max_pages: int = 0

    @property
    def bytes_spliced(self) -> int:
        return self.read_bytes_spliced + self.write_bytes_spliced

    @property
    def bytes_copied(self) -> int:
        return self.read_bytes_copied + self.write_bytes_copied

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view, with the totals people ask for first."""
        out: dict[str, Any] = {
            "data_mode": self.data_mode,
            "data_mode_reason": self.data_mode_reason,
            "bytes_spliced": self.bytes_spliced,
            "bytes_copied": self.bytes_copied,
            "passthrough_opens": self.passthrough_opens,
            "max_pages": self.max_pages,
        }
        for name in (
            "read_requests_spliced",
            "read_bytes_spliced",
            "read_requests_copied",
            "read_bytes_copied",
            "write_requests_spliced",
            "write_bytes_spliced",
            "write_requests_copied",
            "write_bytes_copied",
            "passthrough_open_failures",
            "direct_io_opens",
            "splice_fallbacks",
            "errors",
            "interrupts",
        ):
            out[name] = getattr(self, name)
        out["requests"] = dict(sorted(self.requests.items()))
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.snapshot(), indent=1).encode()
