"""Shared fixtures: an isolated IronClaw home per test, and a real sandbox manager."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ironclaw.config import Settings

# One cgroup root and uid range per test session, so runs never touch each other.
SESSION_TAG = secrets.token_hex(3)
CGROUP_ROOT = f"ironclaw-test-{SESSION_TAG}"


def _remove_cgroup_root(name: str) -> None:
    base = Path("/sys/fs/cgroup")
    for ctrl in base.iterdir():
        root = ctrl / name
        if root.is_dir():
            for sub in sorted(root.rglob("*"), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()


@pytest.fixture(scope="session", autouse=True)
def _cgroup_session_root() -> Iterator[None]:
    yield
    _remove_cgroup_root(CGROUP_ROOT)


@pytest.fixture
def ironclaw_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private IRONCLAW_HOME (0700, root-owned) for one test."""
    home = tmp_path_factory.mktemp("ichome")
    os.chmod(home, 0o700)
    old = os.environ.get("IRONCLAW_HOME")
    os.environ["IRONCLAW_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("IRONCLAW_HOME", None)
        else:
            os.environ["IRONCLAW_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def settings(ironclaw_home: Path) -> Settings:
    return Settings.from_env()


@pytest.fixture
async def manager(settings: Settings) -> AsyncIterator[object]:
    from ironclaw.host.manager import SandboxManager

    mgr = SandboxManager(settings, cgroup_root=CGROUP_ROOT)
    await mgr.open()
    try:
        yield mgr
    finally:
        for record in await mgr.store.all():
            with contextlib.suppress(Exception):
                await mgr.destroy(record.id)
        await mgr.aclose()


def host_uids_below(pid: int) -> set[int]:
    """Real uids (as the host kernel sees them) of every process below ``pid``."""
    from ironclaw.host.procs import descendants, host_uid

    return {host_uid(p) for p in descendants(pid)} - {-1}
