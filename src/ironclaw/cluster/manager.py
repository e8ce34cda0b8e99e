"""The service's manager when ``ironclaw serve --cluster`` runs it over many hosts.

A :class:`SandboxManager` whose sandboxes live on the cluster's nodes: lifecycle, exec
and files go to the owning node through :class:`~ironclaw.cluster.cluster.Cluster`; the
head's own registry keeps only what the service itself owns (tokens, owners), and the
placements sit beside it (``cluster-placements.sqlite3`` in the state directory). The
service's routes are unchanged: they see the same manager methods.

A sandbox's raw channel stays on its node: :meth:`ClusterManager.peer` and
:meth:`~ClusterManager.guest` hand out stand-ins over the node actor
(:mod:`ironclaw.cluster.channel`) that make calls and serve the guest's calls (agent
tasks), and :meth:`ClusterManager.open_exec` runs an interactive exec there.

The controls (deadline, pause, resume, live egress) go to the owning node as well, and
snapshots stay on the node that made them (:class:`~ironclaw.cluster.shelf.ClusterShelf`,
``snapshot_shelf``): a restore or fork runs there.
"""

from __future__ import annotations

import shutil
from typing import Any, Unpack, cast

from ironclaw.cluster.channel import NodeGuest, NodePeer, RemoteExec
from ironclaw.cluster.cluster import Cluster
from ironclaw.cluster.links import ExecSession
from ironclaw.cluster.shelf import ClusterShelf
from ironclaw.config import Settings, safe_join
from ironclaw.host.controls import RestoreOptions
from ironclaw.host.guest import ExecResult, GuestClient
from ironclaw.host.manager import SandboxManager
from ironclaw.host.reconcile import GcReport
from ironclaw.host.snapshots import Snapshot
from ironclaw.ids import new_sandbox_id
from ironclaw.policy.network import NetworkChange, NetworkPolicy
from ironclaw.resources.audit import acting_via
from ironclaw.resources.store import SandboxRecord
from ironclaw.rpc import Peer
from ironclaw.spec import SandboxSpec

__all__ = ["ClusterManager"]


class ClusterManager(SandboxManager):
    """Sandboxes on a Ray cluster behind the single-host manager's methods."""

    def __init__(self, settings: Settings | None = None, *, address: str = "auto") -> None:
        super().__init__(settings, reconcile_on_open=False)
        placements = safe_join(self.settings.state_dir, "cluster-placements.sqlite3")
        self.cluster = Cluster(address, registry_path=placements)
        self.snapshot_shelf = ClusterShelf(self.cluster)

    async def open(self) -> None:
        self.settings.ensure()
        await self.store.open()
        await self.cluster.open()

    async def aclose(self, *, destroy_owned: bool = False) -> None:
        await self.cluster.aclose()
        await self.store.aclose()

    async def create(
        self, spec: SandboxSpec | dict[str, Any] | None = None, **options: Any
    ) -> SandboxRecord:
        """On the node placement picks (one-shot, pool and restore options are the
        node's own business: its manager's defaults apply)."""
        return await self.cluster.create(spec, sandbox_id=options.get("sandbox_id"))

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """From the owning node; a lost sandbox's record says why it is lost."""
        return await self.cluster.get(sandbox_id)

    async def reconcile(self, *, dry_run: bool = False, scan: bool = True) -> GcReport:
        """Each node reconciles itself when its actor starts; the head has nothing."""
        return GcReport(dry_run=dry_run)

    async def sandboxes(self) -> list[SandboxRecord]:
        """Every live node's, and the lost ones."""
        return await self.cluster.sandboxes()

    async def destroy(self, sandbox_id: str) -> None:
        """On the owning node; a lost one is only forgotten. An agent task's trace in
        the service's run directory goes too (its state copy stays)."""
        await self.cluster.destroy(sandbox_id)
        shutil.rmtree(self.settings.sandbox_runtime_dir(sandbox_id), ignore_errors=True)

    async def peer(self, sandbox_id: str) -> Peer:
        self.cluster.placement(sandbox_id)  # lost or unknown: say so now
        return cast(Peer, NodePeer(self.cluster, sandbox_id))

    async def guest(self, sandbox_id: str) -> GuestClient:
        """The typed client, over the owning node's relay (replies decoded here too)."""
        self.cluster.placement(sandbox_id)
        return NodeGuest(self.cluster, sandbox_id)

    async def open_exec(
        self, sandbox_id: str, params: dict[str, Any], *, stdin: bool
    ) -> ExecSession:
        """An interactive exec on the sandbox's node (the WebSocket exec's backend)."""
        return await RemoteExec.open(self.cluster, sandbox_id, params, stdin=stdin)

    async def exec(self, sandbox_id: str, argv: list[str], **options: Any) -> ExecResult:
        """On the owning node, whose manager checks the command and names the limits
        that stopped it. (Files need no override: :class:`NodeGuest` routes them.)"""
        return await self.cluster.exec(sandbox_id, argv, **options)

    # -- controls and snapshots, on the sandbox's (or the snapshot's) node ---------------

    async def set_timeout(self, sandbox_id: str, seconds: float | None) -> float | None:
        deadline = await self.cluster.ask(sandbox_id, "set_timeout", seconds, acting_via())
        return None if deadline is None else float(deadline)

    async def pause(self, sandbox_id: str) -> None:
        await self.cluster.ask(sandbox_id, "pause", acting_via())

    async def resume(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        await self.cluster.ask(sandbox_id, "resume", timeout, acting_via())

    async def update_network(
        self, sandbox_id: str, **change: Unpack[NetworkChange]
    ) -> NetworkPolicy:
        doc = await self.cluster.ask(sandbox_id, "update_network", dict(change), acting_via())
        return NetworkPolicy.model_validate(doc)

    async def snapshot(self, sandbox_id: str, name: str) -> Snapshot:
        """On the sandbox's node, where the snapshot stays (owned by no API token)."""
        return await self.snapshot_shelf.create(sandbox_id, name, None)

    async def restore(self, snap: Snapshot | str, **opts: Unpack[RestoreOptions]) -> SandboxRecord:
        """A new sandbox on the snapshot's node (its own manager's ready deadline)."""
        spec = opts.get("spec")
        if isinstance(spec, SandboxSpec):
            overrides = spec.model_dump(mode="json", exclude_unset=True)
        else:
            overrides = dict(spec or {})
        sid = opts.get("sandbox_id") or new_sandbox_id()
        return await self.snapshot_shelf.restore(snap, overrides, sid)
