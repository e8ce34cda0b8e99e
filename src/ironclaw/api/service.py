"""The state one API server shares between requests, and the FastAPI dependencies over it.

One :class:`Service` per app: the sandbox manager (one registry connection, one channel
per sandbox), the token store (the same registry), the agent tasks with their approval
queues, and the metrics. Routes reach it only through the dependencies below, so other
routers (a dashboard) mounted on the same app get the same objects.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from ironclaw.api.auth import Principal, verify_token
from ironclaw.config import Settings
from ironclaw.errors import QuotaExceeded, SandboxNotFound
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.store import SandboxRecord, Store
from ironclaw.rpc import Peer
from ironclaw.spec import SandboxSpec

if TYPE_CHECKING:
    from ironclaw.api.metrics import Metrics
    from ironclaw.api.tasks import TaskRegistry

__all__ = [
    "Admin",
    "Approve",
    "Read",
    "Service",
    "ServiceDep",
    "Write",
    "bearer",
    "get_service",
    "principal",
    "require",
]

MIB = 1024 * 1024


@dataclass
class Service:
    """Everything a request may need; built by :func:`ironclaw.api.app.create_app`."""

    settings: Settings
    manager: SandboxManager
    tasks: TaskRegistry
    metrics: Metrics
    max_body: int = 1 * MIB
    max_upload: int = 4096 * MIB
    #: Sandboxes starting at once; more wait their turn (a start is CPU-bound: fifty at
    #: once on two cores would each miss the guest's ready deadline).
    max_creating: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    _quota_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _peer_locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    _creating: asyncio.Semaphore | None = None

    async def create(self, spec: SandboxSpec, sandbox_id: str) -> SandboxRecord:
        """Create and start a sandbox, at most ``max_creating`` at a time."""
        if self._creating is None:
            self._creating = asyncio.Semaphore(self.max_creating)
        async with self._creating:
            return await self.manager.create(spec, sandbox_id=sandbox_id)

    @property
    def store(self) -> Store:
        return self.manager.store

    async def visible(self, who: Principal, sandbox_id: str) -> SandboxRecord:
        """The sandbox if ``who`` may see it; another token's sandbox is simply not found."""
        record = await self.manager.get(sandbox_id)
        if not who.admin:
            owner = (await self.store.owners()).get(sandbox_id)
            if owner is None or owner[0] != who.token_id:
                raise SandboxNotFound(
                    f"no sandbox named {sandbox_id!r}; GET /v1/sandboxes lists yours"
                )
        return record

    async def listing(self, who: Principal) -> list[tuple[SandboxRecord, str | None]]:
        owners = await self.store.owners()
        out = []
        for record in await self.manager.sandboxes():
            owner = owners.get(record.id, (None, 0))[0]
            if record.state == "pooled":
                continue
            if who.admin or owner == who.token_id:
                out.append((record, owner))
        return out

    async def claim(self, who: Principal, sandbox_id: str, spec: SandboxSpec) -> None:
        """Charge a new sandbox to ``who`` (before it is made), or :class:`QuotaExceeded`."""
        memory = spec.limits.memory_mib
        if who.max_sandboxes is None and who.max_memory_mib is None:
            await self.store.set_owner(sandbox_id, who.token_id, memory)
            return
        async with self._quota_lock:
            live = {r.id for r in await self.manager.sandboxes()}
            mine = [
                m
                for sid, (t, m) in (await self.store.owners()).items()
                if t == who.token_id and sid in live
            ]
            if who.max_sandboxes is not None and len(mine) + 1 > who.max_sandboxes:
                raise QuotaExceeded(
                    f"this token may own {who.max_sandboxes} sandbox(es) and owns {len(mine)}; "
                    "delete one first"
                )
            if who.max_memory_mib is not None and sum(mine) + memory > who.max_memory_mib:
                raise QuotaExceeded(
                    f"this token's memory quota is {who.max_memory_mib} MiB, "
                    f"{sum(mine)} MiB in use; asking {memory} MiB more exceeds it"
                )
            await self.store.set_owner(sandbox_id, who.token_id, memory)

    def forget(self, sandbox_id: str) -> None:
        """Drop per-sandbox state of a destroyed sandbox."""
        self._peer_locks.pop(sandbox_id, None)

    async def peer(self, sandbox_id: str) -> Peer:
        """The sandbox's channel, opened once even when requests race for it."""
        async with self._peer_locks[sandbox_id]:
            return await self.manager.peer(sandbox_id)


def get_service(conn: HTTPConnection) -> Service:
    service: Service = conn.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def bearer(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


async def principal(conn: HTTPConnection, service: ServiceDep) -> Principal:
    return await verify_token(service.store, bearer(conn))


def require(scope: str) -> object:
    """A dependency: the caller's principal, which must hold ``scope``."""

    async def dep(who: Annotated[Principal, Depends(principal)]) -> Principal:
        who.require(scope)
        return who

    return Depends(dep)


Read = Annotated[Principal, require("read")]
Write = Annotated[Principal, require("write")]
Approve = Annotated[Principal, require("approve")]
Admin = Annotated[Principal, require("admin")]
