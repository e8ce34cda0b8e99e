"""User snapshots of a running Firecracker sandbox through its snapshot API.

The same contract as QEMU's (:mod:`ironclaw.backends.qemu.usersnap`), on Firecracker's
own mechanism: :func:`save` pauses the VM, has Firecracker write its state and memory,
copies the workspace disk, resumes, and seals the files (their sha256, also returned for
the snapshot's manifest); what a restore must match (VM size, workspace disk) is
recorded. :func:`restore` refuses a snapshot whose seal differs from the manifest or
whose files differ from the seal (before Firecracker sees it), loads it into a new jail
and sends ``identity.reset`` before the sandbox is handed out
(:func:`~ironclaw.backends.firecracker.restore.restore_fresh`).

Tested against the documented stand-in for Firecracker (tests/test_firecracker_fake.py);
no Firecracker binary runs on the development host.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironclaw.backends.restored import SnapshotCorrupt
from ironclaw.config import safe_join
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.backends.base import LaunchContext
    from ironclaw.backends.firecracker.backend import FirecrackerBackend, FirecrackerInfo

__all__ = ["check_compatible", "restore", "save"]


async def save(
    backend: FirecrackerBackend, info: FirecrackerInfo, dest: Path
) -> tuple[dict[str, str], dict[str, Any]]:
    """Snapshot ``info``'s VM into ``dest``: the files' sha256 and what it was."""
    from ironclaw.backends.firecracker.restore import seal

    snap = await backend.snapshot(info, dest)
    sums = await asyncio.to_thread(seal, snap)
    names = {"state": snap.state.name, "memory": snap.memory.name, "workspace": snap.workspace.name}
    files = {names[k]: v for k, v in sums.items()}
    meta = {
        "vmm": "firecracker",
        "vcpus": info.vcpus,
        "mem_mib": info.mem_mib,
        "workspace": "workspace" in sums,
        "network": info.tap is not None,
    }
    return files, meta


def check_compatible(vm: Mapping[str, Any], *, vcpus: int, mem_mib: int, network: bool) -> None:
    """Refuse, with what to change, a snapshot this spec cannot load."""
    if vm.get("vmm") != "firecracker":
        raise ConfigError("this snapshot was not made by Firecracker; restore it on its backend")
    if (vm.get("vcpus"), vm.get("mem_mib")) != (vcpus, mem_mib):
        raise ConfigError(
            f"the snapshot is of a VM with {vm.get('vcpus')} vCPUs and {vm.get('mem_mib')} MiB; "
            f"this spec gives {vcpus} and {mem_mib}: keep the snapshot's memory and cpus limits"
        )
    if bool(vm.get("network")) != network:
        raise ConfigError("restore the snapshot with a network exactly when its VM had one")


async def restore(
    backend: FirecrackerBackend, ctx: LaunchContext, directory: Path, files: Mapping[str, str]
) -> FirecrackerInfo:
    """A new sandbox from the snapshot in ``directory``, its identity its own."""
    from ironclaw.backends.firecracker.backend import SnapshotFiles
    from ironclaw.backends.firecracker.restore import SEAL_FILE, restore_fresh

    snap = SnapshotFiles(directory, "Full")
    try:
        sealed = json.loads(safe_join(directory, SEAL_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotCorrupt(f"snapshot {directory} has no readable seal: {exc}") from None
    names = {"state": snap.state.name, "memory": snap.memory.name, "workspace": snap.workspace.name}
    if {names.get(k, k): v for k, v in sealed.items()} != dict(files):
        raise SnapshotCorrupt(f"snapshot {directory}: its seal does not match its manifest")
    return await restore_fresh(backend, ctx, snap)
