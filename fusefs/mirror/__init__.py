"""The mirror filesystem: POSIX operations applied to a backing directory (see mirrorfs)."""

from fusefs.mirror.changes import Change, ChangeSink, ListSink, NullSink
from fusefs.mirror.mirrorfs import MirrorFS

__all__ = ["Change", "ChangeSink", "ListSink", "MirrorFS", "NullSink"]
