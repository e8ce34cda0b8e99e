"""Crash safety: the CLI killed with SIGKILL mid-snapshot and mid-restore, then gc."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.host.manager import SandboxManager

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

BIG_MIB = 150


async def cli(home: Path, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "IRONCLAW_HOME": str(home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", *args, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def kill_when(proc: asyncio.subprocess.Process, ready: object) -> None:
    """SIGKILL the CLI as soon as ``ready()`` holds (it must still be running then)."""
    async with asyncio.timeout(120):
        while not ready():  # type: ignore[operator]
            assert proc.returncode is None, "the CLI finished before it could be killed"
            await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def big_sandbox(manager: SandboxManager) -> str:
    rec = await manager.create()
    r = await manager.exec(
        rec.id, ["sh", "-c", f"head -c {BIG_MIB}M /dev/zero > big && echo small > small"]
    )
    assert r.exit_code == 0, r.stderr
    return rec.id


async def test_kill_mid_snapshot_then_gc_leaves_no_half_snapshot(
    manager: SandboxManager, ironclaw_home: Path
) -> None:
    sid = await big_sandbox(manager)
    root = manager.snapshots().root
    proc = await cli(ironclaw_home, "snapshot", "create", sid, "crashed")

    def writing() -> bool:
        parts = list(root.glob(".tmp-*/workspace.tar")) if root.is_dir() else []
        return any(p.stat().st_size > (1 << 20) for p in parts)

    await kill_when(proc, writing)
    assert manager.snapshots().all() == []  # never listed, even before gc
    report = await manager.reconcile()
    assert any("snapshot temporary" in o for o in report.orphans), report
    assert list(root.iterdir()) == []
    # The sandbox it was taken from is untouched, and a new snapshot works.
    snap = await manager.snapshot(sid, "crashed")
    assert [s.name for s in manager.snapshots().all()] == [snap.name]


async def test_kill_mid_restore_then_gc_leaves_nothing(
    manager: SandboxManager, ironclaw_home: Path
) -> None:
    sid = await big_sandbox(manager)
    await manager.snapshot(sid, "big")
    await manager.destroy(sid)
    before_cgroups = set(manager.cgroups.list_owned())
    proc = await cli(ironclaw_home, "sandbox", "create", "--from", "big", "--id", "rst-1")

    def restoring() -> bool:
        return (manager.settings.runtime_dir / "sandboxes" / "rst-1" / "agent.sock").exists()

    await kill_when(proc, restoring)
    await asyncio.sleep(0.5)  # let a tar cut off mid-stream exit
    report = await manager.reconcile()
    assert not report.errors, report
    assert [r.id for r in await manager.store.all()] == []
    assert set(manager.cgroups.list_owned()) == before_cgroups
    assert not (manager.settings.runtime_dir / "sandboxes" / "rst-1").exists()
    assert [s.name for s in manager.snapshots().all()] == ["big"]  # the snapshot survives
