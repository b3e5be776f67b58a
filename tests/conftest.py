"""Shared fixtures.  Mounted tests use ``mnt`` (or ``mount_factory``); see tests/mounting.py.

- ``backing``: an empty backing directory (tmp_path/backing); fill it before using ``mnt``
  (or write through the mount).
- ``session``: "fusefs" or "pyfuse3"; every test using ``mnt``/``mount_factory`` runs under
  both unless it picks: ``@pytest.mark.parametrize("session", ["pyfuse3"], indirect=True)``.
- ``mnt``: the mount point (a Path) of a running mirror of ``backing``; its :class:`Mount` is
  ``mnt_handle``.  Teardown unmounts and fails the test unless the daemon exits 0.
- ``test_user``: the name of a non-root user (``fusefs-test``, created if missing) that can run
  this interpreter with fusefs importable and open /dev/fuse (made 0666 while the tests run,
  as on a desktop); for unprivileged (fusermount3) tests.  Needs root.
- ``subreaper``: this process adopts orphans (a daemonized fusefs), so
  ``tests.mounting.wait_pid(pid)`` reads the daemon's exit status.
- ``mount_factory(backing=None, mountpoint=None, *, options=(), session=None, user=None,
  args=(), start=True)``: more mounts, or custom ``-o`` options; all torn down at the end.

Tests using these fixtures are marked ``mount`` automatically (``-m 'not mount'`` skips them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# Make ``tests.mounting`` and this checkout's ``fusefs`` importable however pytest is started.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.mounting import (  # noqa: E402
    SESSIONS,
    TEST_USER,
    Mount,
    MountFactory,
    ensure_test_user,
    fuse_device_usable_by_all,
    python_usable_by,
    set_child_subreaper,
)

MOUNT_FIXTURES = frozenset({"mnt", "mnt_handle", "mount_factory"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MOUNT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mount)


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    path = tmp_path / "backing"
    path.mkdir()
    return path


@pytest.fixture(params=SESSIONS)
def session(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def mount_factory(tmp_path: Path, backing: Path, session: str) -> Iterator[MountFactory]:
    mounts: list[Mount] = []

    def make(
        backing_dir: Path | None = None,
        mountpoint: Path | None = None,
        *,
        options: Sequence[str] = (),
        session_name: str | None = None,
        user: str | None = None,
        args: Sequence[str] = (),
        start: bool = True,
        expect_clean_exit: bool = True,
    ) -> Mount:
        if mountpoint is None:
            mountpoint = tmp_path / f"mnt{len(mounts) or ''}"
            mountpoint.mkdir(exist_ok=True)
        mount = Mount(
            backing=backing_dir if backing_dir is not None else backing,
            mountpoint=mountpoint,
            session=session_name or session,
            options=tuple(options),
            user=user,
            args=tuple(args),
            expect_clean_exit=expect_clean_exit,
            log_path=tmp_path / f"fusefs-{mountpoint.name}.log",
        )
        mounts.append(mount)
        if start:
            mount.start()
        return mount

    yield make
    problems = []
    for mount in reversed(mounts):
        found = mount.close(check=False)
        if found and mount.expect_clean_exit:
            problems.append(f"{mount.mountpoint}: {'; '.join(found)}\n{mount.log()}")
    if problems:
        pytest.fail("unclean stop of fusefs:\n" + "\n".join(problems))


@pytest.fixture
def mnt_handle(mount_factory: MountFactory) -> Mount:
    return mount_factory()


@pytest.fixture
def mnt(mnt_handle: Mount) -> Path:
    return mnt_handle.mountpoint


@pytest.fixture(scope="session")
def test_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create and switch to an unprivileged test user")
    ensure_test_user(TEST_USER)
    with python_usable_by(TEST_USER), fuse_device_usable_by_all():
        yield TEST_USER


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Adopt orphaned descendants (a daemonized fusefs) so ``wait_pid`` gets their status."""
    set_child_subreaper(True)
    try:
        yield
    finally:
        set_child_subreaper(False)
