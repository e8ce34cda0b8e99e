"""The service's manager when ``ironclaw serve --cluster`` runs it over many hosts.

A :class:`SandboxManager` whose sandboxes live on the cluster's nodes: lifecycle, exec
and files go to the owning node through :class:`~ironclaw.cluster.cluster.Cluster`; the
head's own registry keeps only what the service itself owns (tokens, owners). The
service's routes are unchanged: they see the same manager methods.

A sandbox's raw channel stays on its node, so :meth:`ClusterManager.peer` hands out a
stand-in that can make plain calls (ping, files.*) through the node actor; byte streams
(the interactive WebSocket exec) and agent tasks need the channel itself and say so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from ironclaw.cluster.cluster import Cluster, OutputSink
from ironclaw.config import Settings
from ironclaw.errors import SandboxError
from ironclaw.host.guest import DEFAULT_READ_LIMIT, ExecResult, GuestClient
from ironclaw.host.manager import SandboxManager
from ironclaw.host.reconcile import GcReport
from ironclaw.resources.store import SandboxRecord
from ironclaw.rpc import Peer
from ironclaw.spec import SandboxSpec

__all__ = ["ClusterManager"]


class _NodeChannel:
    """What the service may do with a cluster sandbox's "peer": plain calls only."""

    closed = False

    def __init__(self, cluster: Cluster, sandbox_id: str) -> None:
        self._cluster = cluster
        self._sid = sandbox_id

    async def call(self, method: str, params: Any = None, *, timeout: float | None = None) -> Any:
        async with asyncio.timeout(timeout):
            return await self._cluster.call(self._sid, method, params)

    def __getattr__(self, name: str) -> Any:
        raise SandboxError(
            f"sandbox {self._sid} runs on cluster node {self._cluster.placement(self._sid)}: "
            "byte streams (interactive exec) and agent tasks are not routed over the "
            "cluster yet; use POST /v1/sandboxes/{id}/exec, or a single-host server"
        )


class ClusterManager(SandboxManager):
    """Sandboxes on a Ray cluster behind the single-host manager's methods."""

    def __init__(self, settings: Settings | None = None, *, address: str = "auto") -> None:
        super().__init__(settings, reconcile_on_open=False)
        self.cluster = Cluster(address)

    async def open(self) -> None:
        self.settings.ensure()
        await self.store.open()
        await self.cluster.open()

    async def aclose(self, *, destroy_owned: bool = False) -> None:
        await self.cluster.aclose()
        await self.store.aclose()

    async def create(
        self,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        one_shot: bool = False,
        ready_timeout: float = 20.0,
        use_pool: bool = True,
        restoring: bool = False,
    ) -> SandboxRecord:
        return await self.cluster.create(spec, sandbox_id=sandbox_id)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self.cluster.get(sandbox_id)

    async def sandboxes(self) -> list[SandboxRecord]:
        return await self.cluster.sandboxes()

    async def destroy(self, sandbox_id: str) -> None:
        await self.cluster.destroy(sandbox_id)

    async def reconcile(self, *, dry_run: bool = False, scan: bool = True) -> GcReport:
        """Each node reconciles itself when its actor starts; the head has nothing."""
        return GcReport(dry_run=dry_run)

    async def peer(self, sandbox_id: str) -> Peer:
        self.cluster.placement(sandbox_id)  # lost or unknown: say so now
        return cast(Peer, _NodeChannel(self.cluster, sandbox_id))

    async def guest(self, sandbox_id: str) -> GuestClient:
        """The typed client, over the owning node's relay (replies decoded here too)."""
        return GuestClient(await self.peer(sandbox_id), sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        **options: Any,
    ) -> ExecResult:
        return await self.cluster.exec(
            sandbox_id, argv, on_stdout=on_stdout, on_stderr=on_stderr, **options
        )

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        return await self.cluster.write_file(sandbox_id, path, data, mode=mode)

    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        sink: OutputSink | None = None,
        *,
        limit: int | None = DEFAULT_READ_LIMIT,
    ) -> bytes:
        return await self.cluster.read_file(sandbox_id, path, sink, limit=limit)
