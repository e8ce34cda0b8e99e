"""Routes: what changes a running sandbox besides exec and files: its deadline, pause
and resume, and its egress policy (applied live: one firewall transaction).

Every change runs under :func:`~ironclaw.resources.audit.acting_as` the calling token,
so the sandbox's audit log names who asked. Each needs ``write``, the scope that
creates a sandbox: widening egress gives no more than a new sandbox with those rules.
Input is checked before anything changes. Under ``serve --cluster`` the manager sends
each change to the sandbox's node (docs/CLUSTER.md); the routes are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ironclaw.api.auth import Principal
from ironclaw.api.sandboxes import SandboxOut
from ironclaw.api.service import Service, ServiceDep, Write
from ironclaw.errors import ConfigError, Conflict, InvalidRequest
from ironclaw.resources.audit import acting_as

__all__ = ["NetworkOut", "NetworkPatch", "ResumeBody", "TimeoutBody", "TimeoutOut", "router"]

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["controls"])
MAX_TIMEOUT = 366 * 86400


class TimeoutBody(BaseModel):
    seconds: float | None = Field(
        gt=0, le=MAX_TIMEOUT, description="From now; null removes the deadline."
    )


class TimeoutOut(BaseModel):
    id: str
    deadline: float | None = Field(description="Epoch seconds, or null: no deadline.")


class ResumeBody(BaseModel):
    timeout: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT, description="A new deadline, seconds from now."
    )


class NetworkPatch(BaseModel):
    """Each list given replaces the current one, except ``deny``, whose rules are taken
    out of the allow list; a list left out is kept."""

    allow: list[str] | None = Field(default=None, description="ADDR[/PREFIX][:PORT][/PROTO]")
    allow_domains: list[str] | None = None
    deny: list[str] | None = None
    deny_domains: list[str] | None = None


class NetworkOut(BaseModel):
    allow: list[dict[str, Any]]
    allow_domains: list[str]
    deny_domains: list[str]


@contextlib.contextmanager
def as_token(who: Principal) -> Iterator[None]:
    """Audit what follows as done through the API by this token."""
    with acting_as(f"api:{who.name}"):
        yield


async def sandbox_out(service: Service, sandbox_id: str) -> SandboxOut:
    record = await service.manager.get(sandbox_id)
    owner = (await service.store.owners()).get(record.id, (None, 0))[0]
    return SandboxOut(
        id=record.id, backend=record.backend, state=record.state, reason=record.reason,
        created_at=record.created_at, owner=owner, spec=record.spec,
    )  # fmt: skip


@router.post("/timeout", response_model=TimeoutOut)
async def set_timeout(
    sandbox_id: str, body: TimeoutBody, who: Write, service: ServiceDep
) -> TimeoutOut:
    """End (or pause, per the spec's ``on_timeout``) the sandbox ``seconds`` from now."""
    await service.visible(who, sandbox_id)
    with as_token(who):
        deadline = await service.manager.set_timeout(sandbox_id, body.seconds)
    return TimeoutOut(id=sandbox_id, deadline=deadline)


@router.post("/pause", response_model=SandboxOut)
async def pause(sandbox_id: str, who: Write, service: ServiceDep) -> SandboxOut:
    """Freeze every process (memory and files kept, no CPU) until ``/resume``."""
    record = await service.visible(who, sandbox_id)
    if record.state == "paused":
        raise Conflict(f"sandbox {sandbox_id} is already paused; POST its /resume to continue")
    with as_token(who):
        await service.manager.pause(sandbox_id)
    return await sandbox_out(service, sandbox_id)


@router.post("/resume", response_model=SandboxOut)
async def resume(
    sandbox_id: str, who: Write, service: ServiceDep, body: ResumeBody | None = None
) -> SandboxOut:
    """Continue a paused sandbox; ``timeout`` sets a new deadline first (needed when it
    was paused by its own deadline)."""
    record = await service.visible(who, sandbox_id)
    if record.state != "paused":
        raise Conflict(f"sandbox {sandbox_id} is {record.state}, not paused: nothing to resume")
    with as_token(who):
        await service.manager.resume(sandbox_id, timeout=body.timeout if body else None)
    return await sandbox_out(service, sandbox_id)


@router.patch("/network", response_model=NetworkOut)
async def update_network(
    sandbox_id: str, body: NetworkPatch, who: Write, service: ServiceDep
) -> NetworkOut:
    """Change the sandbox's egress while it runs; returns the new policy. A rule that
    does not parse, or a change that leaves no egress, is refused (422) and nothing
    changes."""
    await service.visible(who, sandbox_id)
    with as_token(who):
        try:
            policy = await service.manager.update_network(
                sandbox_id, **body.model_dump(exclude_none=True)
            )
        except ConfigError as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(str(exc)) from None
    doc = policy.model_dump(mode="json")
    return NetworkOut(
        allow=list(doc["allow"]),
        allow_domains=list(doc["allow_domains"]),
        deny_domains=list(doc["deny_domains"]),
    )
