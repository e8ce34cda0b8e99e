"""Firecracker snapshots on the host: where the files lie, and taking one from a live VM.

Kept apart from :mod:`.backend` (which launches and stops VMs) so :mod:`.restore` and
:mod:`.usersnap` name a snapshot's files without the launch machinery.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from ironclaw.backends.firecracker.api import (
    SnapshotType,
    snapshot_create_request,
    vm_state_request,
)
from ironclaw.backends.firecracker.client import FirecrackerApi
from ironclaw.backends.firecracker.jailer import LaunchPaths
from ironclaw.config import safe_join

__all__ = ["SNAP_MEM", "SNAP_STATE", "SnapshotFiles", "take_snapshot"]

#: File names of a snapshot, in its directory and (jailed) in the chroot root.
SNAP_STATE = "vm.state"
SNAP_MEM = "vm.mem"
SNAP_WORKSPACE = "workspace.ext4"


@dataclass(frozen=True)
class SnapshotFiles:
    """A snapshot on the host: VM state, guest memory, and the workspace disk beside them."""

    directory: Path
    kind: SnapshotType

    @property
    def state(self) -> Path:
        return safe_join(self.directory, SNAP_STATE)

    @property
    def memory(self) -> Path:
        return safe_join(self.directory, SNAP_MEM)

    @property
    def workspace(self) -> Path:
        return safe_join(self.directory, SNAP_WORKSPACE)


async def take_snapshot(
    api: FirecrackerApi,
    plan: LaunchPaths,
    dest: Path,
    kind: SnapshotType,
    *,
    workspace: Path,
    resume: bool,
) -> SnapshotFiles:
    """Pause, write state and memory, move them (and copy ``workspace``) into ``dest``."""
    snap = SnapshotFiles(dest, kind)
    state_vm, mem_vm = "/" + SNAP_STATE, "/" + SNAP_MEM
    await api.request(vm_state_request("Paused"))
    try:
        await api.request(
            snapshot_create_request(
                plan.vm_path(state_vm, plan.host(state_vm)),
                plan.vm_path(mem_vm, plan.host(mem_vm)),
                kind,
            )
        )
        await asyncio.to_thread(shutil.move, plan.host(state_vm), snap.state)
        await asyncio.to_thread(shutil.move, plan.host(mem_vm), snap.memory)
        if workspace.exists():
            await asyncio.to_thread(shutil.copyfile, workspace, snap.workspace)
    finally:
        if resume:
            await api.request(vm_state_request("Resumed"))
    return snap
