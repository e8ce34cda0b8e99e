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
"""

from __future__ import annotations

import shutil
from typing import Any, cast

from ironclaw.cluster.channel import NodeGuest, NodePeer, RemoteExec
from ironclaw.cluster.cluster import Cluster
from ironclaw.cluster.links import ExecSession
from ironclaw.config import Settings, safe_join
from ironclaw.host.guest import ExecResult, GuestClient
from ironclaw.host.manager import SandboxManager
from ironclaw.host.reconcile import GcReport
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
