"""VM snapshots through the manager, in real QEMU VMs (TCG): memory, devices and disk.

One source VM for the module (this one test): a file and a running background process
before the snapshot are both in each of two forks (the process still counting from
where it was: memory state), the forks are different machines with their own disks; a
tampered memory file and snapshots from another image, QEMU or VM size are refused;
the CLI killed with SIGKILL mid-snapshot leaves, after ``gc``, no half snapshot and the
source VM running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.errors import ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.host.snapshots import MANIFEST, SnapshotCorrupt
from ironclaw.images import ImageArtifacts
from ironclaw.resources.audit import read_events
from test_qemu_backend import vm_image, vm_snapshots  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(1800)]

SPEC = {"backend": "qemu", "limits": {"memory_mib": 384, "workspace_mib": 64}}
COUNTER = (
    "sh -c 'n=0; while :; do n=$((n+1)); echo $n > /tmp/tick; sleep 0.2; done' "
    ">/dev/null 2>&1 & echo $! > /tmp/bg.pid"
)


async def sh(manager: SandboxManager, sid: str, script: str) -> str:
    r = await asyncio.wait_for(manager.exec(sid, ["sh", "-c", script]), 240)
    assert r.exit_code == 0, (script, r.stderr)
    return r.stdout.decode().strip()


async def ticking(manager: SandboxManager, sid: str) -> tuple[int, int]:
    """The background counter's pid and value, after checking it still counts."""
    pid = int(await sh(manager, sid, "cat /tmp/bg.pid"))
    first = int(await sh(manager, sid, f"kill -0 {pid} && cat /tmp/tick"))
    for _ in range(100):
        now = int(await sh(manager, sid, "sleep 0.5; cat /tmp/tick"))
        if now > first:
            return pid, now
    raise AssertionError(f"the counter of {sid} stopped at {first}")


def copy_with_manifest(root: Path, name: str, new: str, **vm: object) -> None:
    """Another snapshot with the same files and a different recorded machine."""
    src, dst = root / name, root / new
    dst.mkdir(mode=0o700)
    for f in src.iterdir():
        if f.name != MANIFEST:
            os.link(f, dst / f.name)
    doc = json.loads((src / MANIFEST).read_text())
    doc.update(name=new, vm={**doc["vm"], **vm})
    (dst / MANIFEST).write_text(json.dumps(doc))


async def test_vm_snapshot_forks_tamper_and_crash(
    manager: SandboxManager,
    vm_image: ImageArtifacts,  # noqa: F811
    ironclaw_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Booted, not restored from the image's snapshot: its /workspace is then a disk,
    # which the snapshot must carry beside memory (a restored VM's is a tmpfs, in memory).
    monkeypatch.setenv("IRONCLAW_QEMU_RESTORE", "0")
    src = await manager.create({**SPEC, "labels": {"role": "source"}}, ready_timeout=300)
    await manager.write_file(src.id, "notes/a.txt", b"written before the snapshot")
    r = await manager.exec(src.id, ["sh", "-c", COUNTER], keep_background=True, timeout=60)
    assert r.exit_code == 0, r.stderr
    bg_pid, before = await ticking(manager, src.id)

    snap = await manager.snapshot(src.id, "vm-1")
    assert snap.kind == "vm" and snap.backend == "qemu"
    assert set(snap.files) == {"memory.state", "workspace.ext4"}
    assert snap.vm["image"] == vm_image.digest and snap.vm["qemu"].startswith("QEMU")
    assert snap.spec["labels"] == {"role": "source"}  # the spec it came from
    listed = manager.snapshots().all()
    assert [s.name for s in listed] == ["vm-1"] and listed[0].sha256 == snap.sha256
    # The source runs on after the snapshot, its counter too.
    assert await sh(manager, src.id, "cat /workspace/notes/a.txt") == "written before the snapshot"
    assert (await ticking(manager, src.id))[0] == bg_pid

    # Two forks, each a VM of its own; the recorded spec is used, labels overridden.
    forks = [
        await manager.restore(snap, spec={"labels": {"fork": str(i)}}, ready_timeout=300)
        for i in (1, 2)
    ]
    ids = {}
    for fork in forks:
        assert fork.backend == "qemu" and fork.spec["limits"]["workspace_mib"] == 64
        assert fork.spec["labels"]["fork"] in ("1", "2")
        text = await sh(manager, fork.id, "cat /workspace/notes/a.txt")
        assert text == "written before the snapshot"
        pid, value = await ticking(manager, fork.id)
        assert pid == bg_pid  # the same process, restored with the memory
        assert value > before  # it went on counting from the snapshot, not from 0
        ids[fork.id] = await sh(
            manager, fork.id,
            "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1",
        )  # fmt: skip
        assert ids[fork.id].splitlines()[0] == fork.id
    assert len(set(ids.values())) == 2, ids
    a, b = forks
    await sh(manager, a.id, "echo only-in-a > /workspace/mine")  # own disk copies
    for other in (b.id, src.id):
        assert await sh(manager, other, "test -e /workspace/mine || echo absent") == "absent"

    # Audit: who did what, when, for the source and a fork.
    events = [e["event"] for e in read_events(manager.settings, src.id)]
    assert events[:2] == ["sandbox.create", "sandbox.snapshot"], events
    restored = read_events(manager.settings, a.id)
    assert [e["event"] for e in restored] == ["sandbox.create", "sandbox.restore"]
    assert restored[1]["snapshot"] == "vm-1" and restored[1]["who"]["uid"] == os.getuid()

    # Refused before anything is made: another image, another QEMU, another VM size.
    root = manager.snapshots().root
    copy_with_manifest(root, "vm-1", "vm-other-image", image="0" * 64)
    copy_with_manifest(root, "vm-1", "vm-other-qemu", qemu="QEMU emulator version 1.0")
    count = len(await manager.store.all())
    with pytest.raises(ConfigError, match="image"):
        await manager.restore("vm-other-image")
    with pytest.raises(ConfigError, match="QEMU"):
        await manager.restore("vm-other-qemu")
    with pytest.raises(ConfigError, match="memory"):
        await manager.restore(snap, spec={"limits": {"memory_mib": 512}})
    with pytest.raises(ConfigError, match="backend"):
        await manager.restore(snap, spec={"backend": "namespace"})
    # A tampered memory file is refused, and the half-made sandbox is gone.
    memory = root / "vm-1" / "memory.state"
    with open(memory, "r+b") as f:
        f.seek(memory.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorrupt, match="corrupt"):
        await manager.restore(snap, ready_timeout=300)
    assert len(await manager.store.all()) == count

    # kill -9 of the CLI mid-snapshot, then gc: no half snapshot, the source runs again.
    for fork in forks:
        await manager.destroy(fork.id)
    env = {**os.environ, "IRONCLAW_HOME": str(ironclaw_home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "snapshot", "create", src.id, "crashed", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(300):
        while not any(p.stat().st_size > (1 << 20) for p in root.glob(".tmp-*/memory.state")):
            assert proc.returncode is None, "the CLI finished before it could be killed"
            await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert "crashed" not in [s.name for s in manager.snapshots().all()]
    report = await manager.reconcile()
    assert any("snapshot temporary" in o for o in report.orphans), report
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert (await manager.get(src.id)).state == "running"
    assert (await ticking(manager, src.id))[0] == bg_pid  # running again, not left paused

    await manager.destroy(src.id)
    assert read_events(manager.settings, src.id)[-1]["event"] == "sandbox.destroy"
