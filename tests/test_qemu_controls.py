"""Pause/resume (QMP stop/cont) and a workspace snapshot restored, in real QEMU VMs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import image_cache_settings
from ironclaw.backends.qemu.qmp import QmpClient
from ironclaw.errors import SandboxError
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture
def vm_image(ironclaw_home: Path, image: ImageArtifacts) -> ImageArtifacts:
    cache = image_cache_settings().state_dir
    state = ironclaw_home / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "images").symlink_to(cache / "images")
    with_probe = cache / "qemu-accel.json"
    if with_probe.exists():
        shutil.copyfile(with_probe, state / "qemu-accel.json")
    return image


SPEC = {"backend": "qemu", "limits": {"memory_mib": 384, "workspace_mib": 64}}


async def vm_status(qmp_path: str) -> str:
    qmp = await QmpClient.connect(Path(qmp_path))
    try:
        status = await qmp.execute("query-status")
    finally:
        await qmp.close()
    return str(status["status"])


async def test_qemu_pause_resume_and_snapshot_restore(
    manager: SandboxManager, vm_image: ImageArtifacts
) -> None:
    rec = await manager.create({**SPEC, "labels": {"kind": "vm"}}, ready_timeout=240)
    assert [r.id for r in await manager.select(labels={"kind": "vm"})] == [rec.id]
    await manager.write_file(rec.id, "notes/a.txt", b"in the vm")
    await manager.exec(rec.id, ["sh", "-c", "ln -s notes/a.txt link"])

    await manager.pause(rec.id)
    assert await vm_status(rec.info["qmp"]) == "paused"
    assert (await manager.get(rec.id)).state == "paused"
    with pytest.raises(SandboxError, match="paused"):
        await manager.exec(rec.id, ["true"])
    await manager.resume(rec.id)
    assert await vm_status(rec.info["qmp"]) == "running"
    assert await manager.read_file(rec.id, "notes/a.txt") == b"in the vm"

    snap = await manager.snapshot(rec.id, "vm-ws")
    assert snap.backend == "qemu"
    copy = await manager.restore(snap, ready_timeout=240)
    assert copy.backend == "qemu"
    r = await manager.exec(copy.id, ["sh", "-c", "cat notes/a.txt; readlink link"])
    assert r.stdout == b"in the vmnotes/a.txt\n", r.stderr
