"""Firecracker user snapshots as the manager drives them (save, check, planned restore),
unit-level: no Firecracker binary on this host, so the documented stand-in from
test_firecracker_fake serves the API and runs the real guest agent, which is not a VM's
init child and so refuses ``identity.reset`` - a restore must then fail, never hand out
a VM with the snapshot's identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw.backends.restored import SnapshotCorrupt
from ironclaw.config import Settings
from ironclaw.errors import ConfigError, IronclawError
from ironclaw.host.vm_snapshots import supports_vm_snapshots
from ironclaw.images import ImageArtifacts
from ironclaw.spec import parse_spec
from test_firecracker_backend import (  # noqa: F401  (fixtures)
    artifacts,
    assert_all_requests_valid,
    backend_for,
    fake_bins,
    make_ctx,
    pytestmark,
)


async def test_save_check_and_planned_restore(
    settings: Settings,
    artifacts: ImageArtifacts,  # noqa: F811
    fake_bins: tuple[Path, Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    chroot_base = tmp_path / "jail"
    backend = backend_for(fake_bins, artifacts, chroot_base=chroot_base)
    assert supports_vm_snapshots(backend)
    ctx = make_ctx(settings, "fc-src", 2)
    await backend.prepare(ctx)
    info = await backend.start(ctx)
    dest = tmp_path / "snap"
    try:
        files, vm = await backend.save_snapshot(info, dest)
    finally:
        await backend.stop(info, timeout=3)
    assert set(files) == {"vm.state", "vm.mem", "workspace.ext4"}
    assert vm["vmm"] == "firecracker" and vm["mem_mib"] == info.mem_mib and not vm["network"]

    # What the spec cannot load is refused before anything starts.
    spec = ctx.spec
    await backend.check_snapshot(vm, spec, settings)
    bigger = parse_spec({**spec.model_dump(mode="json"), "limits": {"memory_mib": 512}})
    with pytest.raises(ConfigError, match="memory"):
        await backend.check_snapshot(vm, bigger, settings)

    # A manifest that does not match the snapshot's seal: refused before any load.
    loads = len([e for e in assert_all_requests_valid(fake_bins[2]) if "load" in e["path"]])
    backend.plan_restore("fc-bad", dest, {**files, "vm.mem": "0" * 64}, vm)
    with pytest.raises(SnapshotCorrupt, match="manifest"):
        await backend.start(make_ctx(settings, "fc-bad", 3))
    after = [e for e in assert_all_requests_valid(fake_bins[2]) if "load" in e["path"]]
    assert len(after) == loads, "a refused snapshot reached Firecracker"

    # The planned restore loads it through the snapshot API, then insists on a fresh
    # identity: the stand-in's agent refuses it, so the VM is stopped, not handed out.
    backend.plan_restore("fc-new", dest, files, vm)
    with pytest.raises(IronclawError, match=r"identity\.reset"):
        await backend.start(make_ctx(settings, "fc-new", 4))
    assert any(e["path"] == "/snapshot/load" for e in assert_all_requests_valid(fake_bins[2]))
    assert not (chroot_base / "firecracker" / "fc-new").exists()
    # A plan is used once: the next start of that id boots.
    backend.plan_restore("fc-x", dest, files, vm)
    backend.plan_restore("fc-x", None, {}, {})
    assert "fc-x" not in backend._planned
