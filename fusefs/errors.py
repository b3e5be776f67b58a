"""Every error fusefs reports to a user, as a flat list of typed exceptions.

``str()`` of any :class:`FusefsError` is a complete one-line message a user can act on; the CLI
prints it as ``fusefs: error: <message>`` and exits 1, without a traceback.  Raise the most
specific class; append new classes here (keep this module flat, with no imports of fusefs).
"""

from __future__ import annotations


class FusefsError(Exception):
    """Base of every error fusefs expects; ``str()`` is a one-line message for the user."""


# -- options -----------------------------------------------------------------------------------


class OptionError(FusefsError):
    """A ``-o`` mount option is unknown, malformed or out of range."""


# -- the backing directory ---------------------------------------------------------------------


class BackingError(FusefsError):
    """The backing directory cannot be mirrored."""


class BackingMissingError(BackingError):
    """The backing directory does not exist."""


class BackingNotDirectoryError(BackingError):
    """The backing path exists but is not a directory."""


class BackingUnreadableError(BackingError):
    """The backing directory cannot be listed or entered by this user."""


# -- mounting ----------------------------------------------------------------------------------


class MountError(FusefsError):
    """Mounting failed."""


class MountpointMissingError(MountError):
    """The mount point does not exist."""


class MountpointNotDirectoryError(MountError):
    """The mount point exists but is not a directory."""


class MountpointNotEmptyError(MountError):
    """The mount point has entries and ``-o nonempty`` was not given."""


class AlreadyMountedError(MountError):
    """Something is already mounted on the mount point."""


class FuseDeviceError(MountError):
    """/dev/fuse is missing or cannot be opened."""


class FusermountError(MountError):
    """The unprivileged helper ``fusermount3`` is missing or refused to mount."""


class UnmountError(FusefsError):
    """Unmounting failed."""


# -- inspecting a mount ------------------------------------------------------------------------


class NotAFusefsMountError(FusefsError):
    """The path is not the root of a running fusefs mount."""


class SessionUnavailableError(FusefsError):
    """The requested FUSE session implementation cannot be loaded."""
