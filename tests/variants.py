"""The variants the POSIX and tools suites run under, as fixtures those modules import.

Our session with its default data path (kernel passthrough on this kernel), our session forced
to splice (the daemon sees every READ and WRITE), and pyfuse3's session.  Importing
``variant``, ``session`` and ``mnt_handle`` into a test module overrides the shared fixtures
of tests/conftest.py for that module.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.mounting import Mount

VARIANTS = {
    "fusefs": ("fusefs", ()),
    "fusefs-splice": ("fusefs", ("data=splice",)),
    "pyfuse3": ("pyfuse3", ()),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def session(variant: str) -> str:
    """Overrides the shared fixture: the session of this module's variant."""
    return VARIANTS[variant][0]


@pytest.fixture
def mnt_handle(mount_factory: Any, variant: str) -> Mount:
    """Overrides the shared fixture: the mount of this module's variant."""
    mount: Mount = mount_factory(options=VARIANTS[variant][1])
    return mount
