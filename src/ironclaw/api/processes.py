"""Routes: detached commands (start, list, get/wait, kill, stdin) of one sandbox.

A command is named by its pid or its tag (``{target}``: digits are a pid). The guest
keeps every command and the last ``ring_bytes`` of its output, so any client may come
back later: ``GET .../processes`` lists them, and the WebSocket at
``.../processes/{target}/attach`` (:mod:`ironclaw.api.proc_ws`) replays that output and
follows it live.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field, create_model

from ironclaw.api.service import Read, ServiceDep, Write
from ironclaw.api.streams import resolve
from ironclaw.errors import ConfigError
from ironclaw.host import processes
from ironclaw.host.processes import ProcessHandle
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import MAX_RING
from ironclaw.proto.records import Record

__all__ = ["ProcessOut", "ProcessStart", "router"]

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/processes", tags=["processes"])
Target = Annotated[str, Path(min_length=1, max_length=128, description="A pid or a tag.")]
Tag = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
MAX_WAIT = 300.0


class ProcessStart(BaseModel):
    argv: list[str] = Field(min_length=1, max_length=4096)
    tag: Tag | None = Field(default=None, description="A name to find it by later.")
    env: dict[str, str] | None = None
    cwd: str | None = Field(default=None, max_length=4095)
    ring_bytes: int = Field(
        default=2**20, ge=4096, le=MAX_RING, description="Output kept for a later attach."
    )


def _model_of(record: type[Record], name: str, doc: str) -> type[BaseModel]:
    """``record``'s fields as a pydantic model, for the OpenAPI schema and the response
    check (the record is standard library only: the guest imports it). A tuple field is
    a list here, as :func:`~ironclaw.proto.records.to_json` writes it."""
    hints = get_type_hints(record)
    fields: dict[str, Any] = {}
    for field in record._fields:
        hint = hints[field]
        if get_origin(hint) is tuple:
            hint = list[get_args(hint)[0]]  # type: ignore[misc]  # an item type read at run time
        fields[field] = (hint, ...)
    return create_model(name, __doc__=doc, **fields)


ProcessOut = _model_of(
    m.ProcInfo,
    "ProcessOut",
    "One command; ``exit_code`` is null while it runs (128+N when killed by signal N).",
)
ProcessList = create_model(
    "ProcessList",
    processes=(list[ProcessOut], ...),  # type: ignore[valid-type]  # a model made at import
)


class KillRequest(BaseModel):
    signal: int = Field(default=9, ge=1, le=64, description="Sent to its process group.")
    wait: float = Field(default=5.0, ge=0, le=60, description="Seconds to wait for it to end.")


class StdinRequest(BaseModel):
    data: str = Field(default="", description="UTF-8 text written to stdin")
    data_b64: str | None = Field(default=None, description="bytes written to stdin, base64")
    close: bool = Field(default=False, description="Close stdin afterwards (EOF).")


def out(info: m.ProcInfo) -> BaseModel:
    return ProcessOut.model_validate(m.to_json(info))


async def _handle(service: ServiceDep, sandbox_id: str, target: str) -> ProcessHandle:
    guest = await service.manager.guest(sandbox_id)
    return ProcessHandle(guest, await resolve(guest, target))


@router.post("", status_code=201, response_model=ProcessOut)
async def start(sandbox_id: str, body: ProcessStart, who: Write, service: ServiceDep) -> BaseModel:
    """Start a command detached: it runs on after this request (and after the client)."""
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    guest = await service.manager.guest(sandbox_id)
    handle = await processes.start_process(
        guest, body.argv, tag=body.tag, env=body.env, cwd=body.cwd, ring_bytes=body.ring_bytes
    )
    return out(handle.info)


@router.get("", response_model=ProcessList)
async def list_(sandbox_id: str, who: Read, service: ServiceDep) -> BaseModel:
    """The sandbox's detached commands, running and recently ended."""
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    infos = await processes.list_processes(await service.manager.guest(sandbox_id))
    return ProcessList(processes=[out(i) for i in infos])


@router.get("/{target}", response_model=ProcessOut)
async def get(
    sandbox_id: str,
    target: Target,
    who: Read,
    service: ServiceDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT, description="Wait up to this long for it to end.")
    ] = 0.0,
) -> BaseModel:
    """One command; with ``wait``, as it is once it ended or the wait ran out."""
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    handle = await _handle(service, sandbox_id, target)
    return out(await handle.wait(timeout=wait) if wait else handle.info)


@router.post("/{target}/kill", response_model=ProcessOut)
async def kill(
    sandbox_id: str,
    target: Target,
    who: Write,
    service: ServiceDep,
    body: KillRequest | None = None,
) -> BaseModel:
    """Signal the command's process group (its children too); SIGKILL unless told."""
    body = body or KillRequest()
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    handle = await _handle(service, sandbox_id, target)
    await handle.kill(body.signal)
    return out(await handle.wait(timeout=body.wait))


@router.post("/{target}/stdin", response_model=ProcessOut)
async def stdin(
    sandbox_id: str, target: Target, body: StdinRequest, who: Write, service: ServiceDep
) -> BaseModel:
    """Write to the command's stdin (bounded by the request size), then close it if asked."""
    data = body.data.encode()
    if body.data_b64 is not None:
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except ValueError:
            raise ConfigError("data_b64 is not valid base64") from None
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    handle = await _handle(service, sandbox_id, target)
    await handle.send_stdin(data, close=body.close)
    return out(handle.info)
