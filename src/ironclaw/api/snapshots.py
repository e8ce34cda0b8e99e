"""Routes: snapshots of sandboxes (make, list, get, remove) and new sandboxes from
them (restore one, fork many).

A snapshot made here is owned by the token that made it (a small ``api-owner`` file
beside its manifest): other tokens do not see it, so one tenant cannot restore
another's workspace; ``admin`` sees every snapshot, those made by the CLI or SDK too.
Restore and fork need ``write`` (what create needs) and are charged to the caller's
quota like a create. A snapshot is checked before anything is made: a tampered one is
refused (409, with the manager's message) and no sandbox is created.

The snapshots are reached through a shelf (:mod:`ironclaw.cluster.shelf`): this host's
own, or under ``serve --cluster`` every node's, each snapshot on the node that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from ironclaw.api.auth import Principal
from ironclaw.api.controls import as_token, sandbox_out
from ironclaw.api.sandboxes import SandboxId, SandboxOut
from ironclaw.api.service import Read, Service, ServiceDep, Write
from ironclaw.cluster.shelf import Shelf, SnapshotShelf
from ironclaw.errors import ConfigError, Conflict, InvalidRequest, NotFound
from ironclaw.host.snapshots import Snapshot, SnapshotCorrupt, SnapshotNotFound, restore_spec
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.resources.store import SandboxRecord

__all__ = ["ForkBody", "RestoreBody", "SnapshotCreate", "SnapshotOut", "router"]

router = APIRouter(tags=["snapshots"])
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SnapshotName = Annotated[str, Path(pattern=NAME_PATTERN, description="The snapshot's name.")]


class SnapshotCreate(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="1-63 of a-z 0-9 . _ -")


class SnapshotOut(BaseModel):
    name: str
    kind: str = Field(description="workspace (an archive of /workspace) or vm")
    sha256: str
    size: int
    created: float = Field(description="Epoch seconds.")
    source: str = Field(description="The sandbox it was taken from.")
    backend: str
    spec: dict[str, Any] = Field(description="The spec a restore starts from.")


class RestoreBody(BaseModel):
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides on the snapshot's recorded spec (not backend or image).",
    )
    id: SandboxId | None = None


class ForkBody(BaseModel):
    count: int = Field(ge=1, le=64)
    spec: dict[str, Any] = Field(default_factory=dict)


def _out(snap: Snapshot) -> SnapshotOut:
    return SnapshotOut(
        name=snap.name, kind=snap.kind, sha256=snap.sha256, size=snap.size,
        created=snap.created_at, source=snap.source, backend=snap.backend, spec=snap.spec,
    )  # fmt: skip


def _shelf(service: Service) -> Shelf:
    """The cluster manager's shelf (every node's snapshots), else this host's."""
    shelf: Shelf | None = getattr(service.manager, "snapshot_shelf", None)
    return shelf if shelf is not None else SnapshotShelf(service.manager)


def _mine(who: Principal) -> str | None:
    """The owner to filter by: the caller's token, or none for admin."""
    return None if who.admin else who.token_id


async def _visible(service: Service, who: Principal, name: str) -> Snapshot:
    """The snapshot if ``who`` may use it; another token's is simply not found."""
    try:
        return await _shelf(service).find(name, _mine(who))
    except SnapshotNotFound:
        raise NotFound(f"no snapshot named {name!r}; GET /v1/snapshots lists yours") from None
    except SnapshotCorrupt as exc:
        raise Conflict(str(exc)) from None


@router.post(
    "/v1/sandboxes/{sandbox_id}/snapshots",
    status_code=201,
    response_model=SnapshotOut,
    tags=["snapshots"],
)
async def create_snapshot(
    sandbox_id: str, body: SnapshotCreate, who: Write, service: ServiceDep
) -> SnapshotOut:
    """Save the sandbox as ``name``: its /workspace (a VM: memory, devices and disks).
    409 if the name is taken."""
    await service.visible(who, sandbox_id)
    with as_token(who):
        snap = await _shelf(service).create(sandbox_id, body.name, who.token_id)
    return _out(snap)


@router.get("/v1/snapshots", response_model=list[SnapshotOut])
async def list_snapshots(who: Read, service: ServiceDep) -> list[SnapshotOut]:
    """The caller's snapshots (every one for admin), by name; under ``serve --cluster``
    every live node's."""
    return [_out(s) for s in await _shelf(service).listing(_mine(who))]


@router.get("/v1/snapshots/{name}", response_model=SnapshotOut)
async def get_snapshot(name: SnapshotName, who: Read, service: ServiceDep) -> SnapshotOut:
    return _out(await _visible(service, who, name))


@router.delete("/v1/snapshots/{name}", status_code=204)
async def remove_snapshot(name: SnapshotName, who: Write, service: ServiceDep) -> Response:
    await _visible(service, who, name)
    try:
        await _shelf(service).remove(name)
    except SnapshotNotFound:
        raise NotFound(f"no snapshot named {name!r}") from None  # removed meanwhile
    return Response(status_code=204)


async def _restore(
    service: Service, who: Principal, snap: Snapshot, overrides: dict[str, Any], sid: str
) -> SandboxRecord:
    """One new sandbox from ``snap``, charged to ``who`` (the owner row goes if it fails)."""
    try:
        final = restore_spec(snap.spec, overrides)
    except ConfigError as exc:
        raise InvalidRequest(str(exc)) from None
    await service.claim(who, sid, final)
    try:
        with as_token(who):
            return await _shelf(service).restore(snap, overrides, sid)
    except SnapshotCorrupt as exc:
        await service.store.drop_owner(sid)
        raise Conflict(str(exc)) from None
    except BaseException:
        await service.store.drop_owner(sid)
        raise


async def _checked(service: Service, who: Principal, name: str) -> Snapshot:
    """The snapshot, its hash checked now (before any sandbox or quota is taken)."""
    snap = await _visible(service, who, name)
    try:
        await _shelf(service).check(snap)
    except SnapshotCorrupt as exc:
        raise Conflict(str(exc)) from None
    return snap


@router.post("/v1/snapshots/{name}/restore", status_code=201, response_model=SandboxOut)
async def restore(
    name: SnapshotName, body: RestoreBody, who: Write, service: ServiceDep
) -> SandboxOut:
    """A new sandbox from the snapshot, with its recorded spec and ``spec`` on top
    (under ``serve --cluster``, on the node that holds the snapshot)."""
    snap = await _checked(service, who, name)
    sid = validate_sandbox_id(body.id) if body.id else new_sandbox_id()
    if body.id and any(r.id == sid for r in await service.manager.sandboxes()):
        raise Conflict(f"a sandbox named {sid!r} already exists; pick another id")
    record = await _restore(service, who, snap, body.spec, sid)
    service.metrics.created.inc()
    return await sandbox_out(service, record.id)


@router.post("/v1/snapshots/{name}/fork", status_code=201, response_model=list[SandboxOut])
async def fork(
    name: SnapshotName, body: ForkBody, who: Write, service: ServiceDep
) -> list[SandboxOut]:
    """``count`` new sandboxes, each with the snapshot's workspace. If one fails, those
    already made are removed: all or none (under ``serve --cluster``, all on the node
    that holds the snapshot)."""
    snap = await _checked(service, who, name)
    made: list[str] = []
    try:
        for _ in range(body.count):
            record = await _restore(service, who, snap, body.spec, new_sandbox_id())
            made.append(record.id)
            service.metrics.created.inc()
    except BaseException:
        for sid in made:
            with contextlib.suppress(Exception):
                await asyncio.shield(service.manager.destroy(sid))
            await service.store.drop_owner(sid)
        raise
    return [await sandbox_out(service, sid) for sid in made]
