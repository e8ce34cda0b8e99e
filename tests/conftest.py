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
# Host uids of this session's sandboxes: a range of its own, so that a reconcile run by a
# test can never touch the sandboxes of another session or of a real installation.
UID_BASE = 1_000_000_000 + secrets.randbelow(50_000) * 20_000
os.environ["IRONCLAW_UID_BASE"] = str(UID_BASE)
os.environ["IRONCLAW_CGROUP_ROOT"] = CGROUP_ROOT
# And an address pool of its own (10.200-10.239, clear of the default 10.250/16 and of the
# 10.249/16 that test peer hosts use).
NET_POOL = f"10.{200 + secrets.randbelow(40)}.0.0/16"
os.environ["IRONCLAW_NET_POOL"] = NET_POOL


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
        _gc(home)
        if old is None:
            os.environ.pop("IRONCLAW_HOME", None)
        else:
            os.environ["IRONCLAW_HOME"] = old
        shutil.rmtree(home, ignore_errors=True)


def _gc(home: Path) -> None:
    """Remove whatever a failed test left running before its registry is deleted."""
    import asyncio

    from ironclaw.host.manager import SandboxManager

    async def run() -> None:
        mgr = SandboxManager(
            Settings.from_env({"IRONCLAW_HOME": str(home)}),
            cgroup_root=CGROUP_ROOT,
            uid_base=UID_BASE,
            reconcile_on_open=False,
        )
        await mgr.open()
        try:
            for record in await mgr.store.all():
                with contextlib.suppress(Exception):
                    await mgr.destroy(record.id)
            await mgr.reconcile()
        finally:
            await mgr.aclose()

    if (home / "state" / "registry.sqlite3").exists():
        with contextlib.suppress(Exception):
            asyncio.run(run())


@pytest.fixture
def settings(ironclaw_home: Path) -> Settings:
    return Settings.from_env()


@pytest.fixture
async def manager(settings: Settings) -> AsyncIterator[object]:
    from ironclaw.host.manager import SandboxManager

    mgr = SandboxManager(settings, cgroup_root=CGROUP_ROOT, uid_base=UID_BASE)
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
    from ironclaw.resources.procs import descendants, host_uid

    return {host_uid(p) for p in descendants(pid)} - {-1}


def image_cache_settings() -> Settings:
    """Where VM tests keep their image: built once per machine, shared across runs."""
    base = Path(
        os.environ.get("IRONCLAW_TEST_IMAGE_CACHE")
        or Path.home() / ".cache" / "ironclaw-test-images"
    )
    return Settings(runtime_dir=base / "run", state_dir=base / "state")


@pytest.fixture(scope="session")
def image() -> object:
    """The VM test image: a cache hit after the first build on this machine (~1 min)."""
    import asyncio

    from ironclaw import images

    for tool in ("debootstrap", "mkfs.ext4", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (see docs/IMAGES.md)")
    return asyncio.run(asyncio.wait_for(images.build_image(image_cache_settings()), 600))
