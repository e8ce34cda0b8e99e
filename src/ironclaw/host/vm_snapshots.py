"""VM snapshots through the manager: memory, devices and disks of a running VM sandbox.

A backend that can (``VmSnapshotting``: QEMU today) saves a sandbox into a snapshot
directory written like a workspace snapshot (a private temporary, renamed into place
once complete, with a manifest holding the sha256 of every file, see
:mod:`ironclaw.host.snapshots`), and restores new sandboxes from it: each a VM of its
own (own disk copy, uid, cgroups, network, identity), with the memory of the source, so
its processes keep running. What a snapshot cannot be loaded into (another image, QEMU
version, accelerator, VM size or network presence) is refused before anything is made;
a file whose content no longer matches its recorded hash is refused by the backend as
it loads it, and the half-made sandbox is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ironclaw.backends.restored import SnapshotCorrupt as LoadRefused
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.host.guest import GuestClient
from ironclaw.host.snapshots import Snapshot, SnapshotCorrupt, SnapshotStore, files_digest
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.resources.store import SandboxRecord
from ironclaw.spec import SandboxSpec

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager

__all__ = ["VmSnapshotting", "restore_vm", "snapshot_vm", "supports_vm_snapshots"]


@runtime_checkable
class VmSnapshotting(Protocol):
    """What a backend offers for VM snapshots (see ``backends/qemu/usersnap.py``)."""

    async def save_snapshot(
        self, info: Any, dest: Path
    ) -> tuple[dict[str, str], dict[str, Any]]: ...

    def plan_restore(
        self, sandbox_id: str, directory: Path | None, files: Mapping[str, str],
        vm: Mapping[str, Any],
    ) -> None: ...  # fmt: skip

    async def check_snapshot(
        self, vm: Mapping[str, Any], spec: SandboxSpec, settings: Settings
    ) -> None: ...


def supports_vm_snapshots(backend: object) -> bool:
    return isinstance(backend, VmSnapshotting)


async def snapshot_vm(mgr: SandboxManager, record: SandboxRecord, name: str) -> Snapshot:
    """Save ``record``'s VM as snapshot ``name``; the VM runs on afterwards."""
    backend = mgr.backend(record.backend)
    assert isinstance(backend, VmSnapshotting)
    store = SnapshotStore(mgr.settings)
    tmp = await asyncio.to_thread(store.new_temp, name)
    try:
        # The agent serves one host connection at a time: let go of this process's, so
        # the snapshot holds an agent waiting for the next one (each restore's first).
        peer = mgr._peers.pop(record.id, None)
        if peer is not None:
            await peer.aclose()
        info = backend.load_info(record.info)
        files, vm = await backend.save_snapshot(info, tmp)
        if record.state == "running":
            await _reconnect(mgr, record, info)
        snap = await asyncio.to_thread(
            store.stamp_files, tmp, files, name=name, source=record.id,
            backend=record.backend, spec=dict(record.spec), vm=vm,
        )  # fmt: skip
        return await asyncio.to_thread(store.commit, tmp, snap)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        raise


async def _reconnect(
    mgr: SandboxManager, record: SandboxRecord, info: Any, limit_s: float = 300.0
) -> None:
    """Connect to the resumed VM's agent and keep that connection as the manager's.

    The first request on a connection made while the agent changes host connections
    could be lost before host sessions (docs/IMAGES.md): each ping is bounded and retried
    on a new connection, and the one that answered is kept, so no hand-over follows.
    """
    backend = mgr.backend(record.backend)
    attempt = 1.0
    async with asyncio.timeout(limit_s):
        while True:
            conn = await backend.open_channel(info, timeout=30)
            peer = mgr._host_peer(record.id, conn)
            await peer.start()
            try:
                await GuestClient(peer, record.id).ping(timeout=attempt)
            except TimeoutError:
                await peer.aclose()
                attempt = min(8.0, attempt * 2)
                continue
            except BaseException:
                await peer.aclose()
                raise
            mgr._peers[record.id] = peer
            return


async def restore_vm(
    mgr: SandboxManager,
    snap: Snapshot,
    spec: SandboxSpec,
    *,
    sandbox_id: str | None,
    ready_timeout: float,
) -> SandboxRecord:
    """A new VM sandbox from ``snap`` with ``spec`` (the snapshot's, with overrides)."""
    backend = mgr.backend(snap.backend)
    if not isinstance(backend, VmSnapshotting):
        raise ConfigError(f"the {snap.backend} backend cannot restore VM snapshots here")
    if not snap.files or files_digest(snap.files) != snap.sha256:
        raise SnapshotCorrupt(
            f"snapshot {snap.name!r} is corrupted: its manifest does not match its content "
            "hash; remove it (`ironclaw snapshot rm`)"
        )
    await backend.check_snapshot(snap.vm, spec, mgr.settings)
    sid = validate_sandbox_id(sandbox_id) if sandbox_id is not None else new_sandbox_id()
    directory = SnapshotStore(mgr.settings).path(snap.name)
    backend.plan_restore(sid, directory, snap.files, snap.vm)
    try:
        record = await mgr.create(
            spec, sandbox_id=sid, use_pool=False, restoring=True, ready_timeout=ready_timeout
        )
    except LoadRefused as exc:
        raise SnapshotCorrupt(
            f"snapshot {snap.name!r} was refused: {exc}; remove it (`ironclaw snapshot rm`)"
        ) from None
    finally:
        backend.plan_restore(sid, None, {}, {})
    return await finish_restore(mgr, record, snap.name)


async def finish_restore(
    mgr: SandboxManager,
    record: SandboxRecord,
    snapshot: str,
    fill: Callable[[], Awaitable[None]] | None = None,
) -> SandboxRecord:
    """Run ``fill`` (whatever the snapshot still has to put in), then mark the sandbox
    restored; on any failure it is destroyed, never left half-restored."""
    try:
        if fill is not None:
            await fill()
        await mgr.store.update(record.id, info={"restoring": False, "snapshot": snapshot})
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(mgr.destroy(record.id))
        raise
    return await mgr.get(record.id)
