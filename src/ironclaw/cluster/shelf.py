"""Snapshots with the API token that owns each, on one host or over a cluster.

:class:`SnapshotShelf` is one host's: the service's own manager on a single host, and
each node actor's under ``serve --cluster`` (so it lives here, where both reach it).
The owner is a small ``api-owner`` file beside the snapshot's manifest; a snapshot
made by the CLI or the SDK has none (only ``admin`` sees it through the API).

:class:`ClusterShelf` is the head's view over the nodes' shelves. A snapshot lives on
the node that made it (its files are that node's): get, remove, restore and fork go to
that node, so restored sandboxes are placed there; a listing merges every live node's.
A name is taken if any live node has it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Protocol

from ironclaw.config import safe_join
from ironclaw.errors import ConfigError, Conflict, SandboxLost
from ironclaw.host.snapshots import Snapshot, SnapshotCorrupt, SnapshotNotFound, restore_spec
from ironclaw.resources.audit import acting_via
from ironclaw.resources.store import SandboxRecord

if TYPE_CHECKING:
    from ironclaw.cluster.cluster import Cluster
    from ironclaw.host.manager import SandboxManager

__all__ = ["OWNER_FILE", "ClusterShelf", "Shelf", "SnapshotShelf"]

OWNER_FILE = "api-owner"


def _taken(name: str) -> Conflict:
    return Conflict(f"a snapshot named {name!r} exists; remove it or pick another name")


class Shelf(Protocol):
    """What the snapshot routes need, wherever the snapshots are."""

    async def find(self, name: str, owner: str | None = None) -> Snapshot: ...
    async def listing(self, owner: str | None = None) -> list[Snapshot]: ...
    async def create(self, sandbox_id: str, name: str, owner: str | None) -> Snapshot: ...
    async def remove(self, name: str) -> None: ...
    async def check(self, snap: Snapshot) -> None: ...
    async def restore(
        self, snap: Snapshot, overrides: dict[str, Any], sandbox_id: str
    ) -> SandboxRecord: ...


class SnapshotShelf:
    """One host's snapshots, each with its owner (see the module's docstring)."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    def _owner(self, name: str) -> str | None:
        try:
            path = safe_join(self.manager.snapshots().path(name), OWNER_FILE)
            return path.read_text().strip()
        except (OSError, ConfigError):
            return None

    async def find(self, name: str, owner: str | None = None) -> Snapshot:
        """The snapshot; with ``owner``, only if that token made it (else not found)."""
        if owner is not None and await asyncio.to_thread(self._owner, name) != owner:
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        return await asyncio.to_thread(self.manager.snapshots().get, name)

    async def listing(self, owner: str | None = None) -> list[Snapshot]:
        def mine() -> list[Snapshot]:
            snaps = self.manager.snapshots().all()
            return [s for s in snaps if owner is None or self._owner(s.name) == owner]

        return await asyncio.to_thread(mine)

    async def create(self, sandbox_id: str, name: str, owner: str | None) -> Snapshot:
        """Save the sandbox as ``name``, owned by ``owner``; :class:`Conflict` if taken."""
        store = self.manager.snapshots()
        if await asyncio.to_thread(store.path(name).exists):
            raise _taken(name)
        try:
            snap = await self.manager.snapshot(sandbox_id, name)
        except ConfigError:
            if await asyncio.to_thread(store.path(name).exists):
                raise _taken(name) from None  # another request won the race
            raise
        if owner is not None:
            path = safe_join(store.path(snap.name), OWNER_FILE)
            await asyncio.to_thread(path.write_text, owner)
        return snap

    async def remove(self, name: str) -> None:
        await asyncio.to_thread(self.manager.snapshots().remove, name)

    async def check(self, snap: Snapshot) -> None:
        """Check a workspace snapshot's hash and members now (a VM's is checked as it
        is loaded); :class:`~ironclaw.host.snapshots.SnapshotCorrupt` if it fails."""
        if snap.kind == "workspace":
            store = self.manager.snapshots()
            await asyncio.to_thread(store.verified_archive, snap, max_bytes=1 << 62)

    async def restore(
        self, snap: Snapshot | str, overrides: dict[str, Any], sandbox_id: str
    ) -> SandboxRecord:
        return await self.manager.restore(snap, spec=overrides, sandbox_id=sandbox_id)


class ClusterShelf:
    """Every live node's snapshots, each reached on its own node."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.where: dict[str, str] = {}  # snapshot name -> node, as last found

    def _live(self) -> list[tuple[str, Any]]:
        nodes = self.cluster.nodes.values()
        return [(n.name, n.actor) for n in nodes if n.lost_reason is None]

    async def _each(self, method: str, *args: Any) -> list[tuple[str, Any]]:
        """``method`` on every live node: (node, result) of those that answered with no
        error (a snapshot not there, or a node lost meanwhile, is left out)."""

        async def one(name: str, actor: Any) -> tuple[str, Any] | None:
            with contextlib.suppress(SnapshotNotFound, SandboxLost):
                return name, await self.cluster.on(name, getattr(actor, method).remote(*args))
            return None

        found = await asyncio.gather(*(one(n, a) for n, a in self._live()))
        return [f for f in found if f is not None]

    async def _node_of(self, name: str, owner: str | None = None) -> tuple[str, Snapshot]:
        found = await self._each("snapshot_find", name, owner)
        if not found:
            raise SnapshotNotFound(f"no snapshot named {name!r} on any live node")
        node, snap = found[0]
        self.where[name] = node
        return node, snap

    async def find(self, name: str, owner: str | None = None) -> Snapshot:
        return (await self._node_of(name, owner))[1]

    async def listing(self, owner: str | None = None) -> list[Snapshot]:
        merged = [s for _, snaps in await self._each("snapshot_list", owner) for s in snaps]
        return sorted(merged, key=lambda s: s.name)

    async def create(self, sandbox_id: str, name: str, owner: str | None) -> Snapshot:
        """On the sandbox's node; a name any live node has is taken."""
        try:
            taken = bool(await self._each("snapshot_find", name, None))
        except SnapshotCorrupt:
            taken = True  # a broken one still holds the name
        if taken:
            raise _taken(name)
        node, actor = self.cluster.route(sandbox_id)
        call = actor.snapshot_create.remote(sandbox_id, name, owner, acting_via())
        snap: Snapshot = await self.cluster.on(node, call)
        self.where[name] = node
        return snap

    async def _on_its_node(self, name: str, method: str, *args: Any) -> Any:
        node, _ = await self._node_of(name)
        return await self.cluster.on(
            node, getattr(self.cluster.nodes[node].actor, method).remote(*args)
        )

    async def remove(self, name: str) -> None:
        await self._on_its_node(name, "snapshot_remove", name)

    async def check(self, snap: Snapshot) -> None:
        await self._on_its_node(snap.name, "snapshot_check", snap.name)

    async def restore(
        self, snap: Snapshot | str, overrides: dict[str, Any], sandbox_id: str
    ) -> SandboxRecord:
        """A new sandbox on the snapshot's node (it must have room there)."""
        name = snap if isinstance(snap, str) else snap.name
        node = self.where.get(name)
        if isinstance(snap, str) or node is None:  # (a route found it a moment ago)
            node, snap = await self._node_of(name)
        found = snap
        memory = restore_spec(found.spec, overrides).limits.memory_mib
        args = (name, overrides, sandbox_id, acting_via())
        return await self.cluster.make_on(node, sandbox_id, memory, "restore", *args)
