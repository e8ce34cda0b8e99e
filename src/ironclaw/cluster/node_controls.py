"""The node actor's controls: a sandbox's deadline, pause and resume, live egress, and
the node's snapshots (made, found, listed, removed, restored here: their files are
this node's).

Mixed into :class:`~ironclaw.cluster.node.NodeAgent`. Each change runs under the
head's :func:`~ironclaw.resources.audit.acting_as` (``via``), so the sandbox's audit
log on this node names the API token that asked, as on one host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ironclaw.cluster.shelf import SnapshotShelf
from ironclaw.host.manager import SandboxManager
from ironclaw.host.snapshots import Snapshot
from ironclaw.resources.audit import acting_as
from ironclaw.resources.store import SandboxRecord

__all__ = ["NodeControls"]


@contextlib.contextmanager
def _as(via: str | None) -> Iterator[None]:
    if via is None:
        yield
        return
    with acting_as(via):
        yield


class NodeControls:
    """Controls and snapshots of the node's sandboxes (see the module's docstring)."""

    manager: SandboxManager

    def _shelf(self) -> SnapshotShelf:
        return SnapshotShelf(self.manager)

    async def set_timeout(
        self, sandbox_id: str, seconds: float | None, via: str | None
    ) -> float | None:
        with _as(via):
            return await self.manager.set_timeout(sandbox_id, seconds)

    async def pause(self, sandbox_id: str, via: str | None) -> None:
        with _as(via):
            await self.manager.pause(sandbox_id)

    async def resume(self, sandbox_id: str, timeout: float | None, via: str | None) -> None:
        with _as(via):
            await self.manager.resume(sandbox_id, timeout=timeout)

    async def update_network(
        self, sandbox_id: str, change: dict[str, Any], via: str | None
    ) -> dict[str, Any]:
        """The new policy as JSON (the head validates it back into a NetworkPolicy)."""
        with _as(via):
            policy = await self.manager.update_network(sandbox_id, **change)
        return policy.model_dump(mode="json")

    async def snapshot_find(self, name: str, owner: str | None) -> Snapshot:
        return await self._shelf().find(name, owner)

    async def snapshot_list(self, owner: str | None) -> list[Snapshot]:
        return await self._shelf().listing(owner)

    async def snapshot_create(
        self, sandbox_id: str, name: str, owner: str | None, via: str | None
    ) -> Snapshot:
        with _as(via):
            return await self._shelf().create(sandbox_id, name, owner)

    async def snapshot_remove(self, name: str) -> None:
        await self._shelf().remove(name)

    async def snapshot_check(self, name: str) -> None:
        await self._shelf().check(await self._shelf().find(name))

    async def restore(
        self, name: str, overrides: dict[str, Any], sandbox_id: str, via: str | None
    ) -> SandboxRecord:
        with _as(via):
            return await self._shelf().restore(name, overrides, sandbox_id)
