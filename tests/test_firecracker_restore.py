"""Firecracker restores: sealed snapshots, tampering refused before the load, and no
restored VM handed out without its fresh identity (no Firecracker binary on this host:
the documented stand-in from test_firecracker_fake serves the API and runs the real
guest agent, which is not a VM's init child and so must refuse ``identity.reset``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ironclaw.backends.firecracker.backend import SnapshotFiles
from ironclaw.backends.firecracker.restore import SEAL_FILE, restore_fresh, seal, verify
from ironclaw.backends.restored import SnapshotCorrupt
from ironclaw.config import Settings
from ironclaw.errors import IronclawError
from ironclaw.images import ImageArtifacts
from test_firecracker_backend import (  # noqa: F401  (fixtures)
    artifacts,
    assert_all_requests_valid,
    backend_for,
    fake_bins,
    make_ctx,
    pytestmark,
)


def _snap(tmp_path: Path, workspace: bool = True) -> SnapshotFiles:
    snap = SnapshotFiles(tmp_path / "snap", "Full")
    snap.directory.mkdir()
    snap.state.write_bytes(b"state" * 1000)
    snap.memory.write_bytes(b"\0" * 3_000_000 + b"ram")
    if workspace:
        snap.workspace.write_bytes(b"ws" * 1000)
    return snap


def test_a_sealed_snapshot_verifies_and_any_changed_file_is_refused(tmp_path: Path) -> None:
    snap = _snap(tmp_path)
    sums = seal(snap)
    assert set(sums) == {"state", "memory", "workspace"}
    verify(snap)
    with snap.memory.open("r+b") as f:
        f.seek(1_500_000)
        f.write(b"\1")
    with pytest.raises(SnapshotCorrupt, match=r"vm\.mem is corrupt"):
        verify(snap)


def test_an_unsealed_or_changed_file_set_is_refused(tmp_path: Path) -> None:
    snap = _snap(tmp_path, workspace=False)
    with pytest.raises(SnapshotCorrupt, match="seal it"):
        verify(snap)
    seal(snap)
    snap.workspace.write_bytes(b"added later")
    with pytest.raises(SnapshotCorrupt, match="do not match"):
        verify(snap)
    sums = json.loads((snap.directory / SEAL_FILE).read_text())
    assert set(sums) == {"state", "memory"}


async def test_restore_fresh_refuses_tampering_and_never_hands_out_an_old_identity(
    settings: Settings,
    artifacts: ImageArtifacts,  # noqa: F811
    fake_bins: tuple[Path, Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    chroot_base = tmp_path / "jail"
    backend = backend_for(fake_bins, artifacts, chroot_base=chroot_base)
    ctx = make_ctx(settings, "fc-src", 2)
    await backend.prepare(ctx)
    info = await backend.start(ctx)
    try:
        snap = await backend.snapshot(info, tmp_path / "snap")
    finally:
        await backend.stop(info, timeout=3)
    seal(snap)
    good = snap.state.read_bytes()
    snap.state.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    loads = len([e for e in assert_all_requests_valid(fake_bins[2]) if "load" in e["path"]])
    with pytest.raises(SnapshotCorrupt, match="corrupt"):
        await restore_fresh(backend, make_ctx(settings, "fc-bad", 3), snap)
    after = [e for e in assert_all_requests_valid(fake_bins[2]) if "load" in e["path"]]
    assert len(after) == loads, "a tampered snapshot reached Firecracker"
    assert not (chroot_base / "firecracker" / "fc-bad").exists()

    snap.state.write_bytes(good)
    # (Refused by the agent, or unknown to an older one on the path: either way not taken.)
    with pytest.raises(IronclawError, match=r"identity\.reset"):
        await restore_fresh(backend, make_ctx(settings, "fc-new", 4), snap, timeout=15)
    assert any(e["path"] == "/snapshot/load" for e in assert_all_requests_valid(fake_bins[2]))
    # The restored VM that could not take its identity was stopped, its jail removed.
    assert not (chroot_base / "firecracker" / "fc-new").exists()
