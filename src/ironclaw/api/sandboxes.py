"""Routes: sandboxes (create, list, get, delete), plain exec, and files.

Files stream both ways: an upload is written to the sandbox chunk by chunk as it
arrives, a download is sent chunk by chunk as the guest reads it, through a small
bounded queue, so the server's memory stays flat whatever the file size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, Field

from ironclaw.api.service import Read, ServiceDep, Write
from ironclaw.errors import BodyTooLarge, ConfigError, IronclawError
from ironclaw.host.controls import matches
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.proto import methods
from ironclaw.resources.store import SandboxRecord
from ironclaw.spec import parse_spec

__all__ = ["UPLOAD_SUFFIX", "router"]

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
UPLOAD_SUFFIX = "/files/content"
State = Literal["creating", "pooled", "running", "paused", "stopping", "dead", "failed", "lost"]
SandboxId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class SandboxCreate(BaseModel):
    spec: dict[str, Any] = Field(default_factory=dict, description="A sandbox spec (see SPEC.md)")
    id: SandboxId | None = None


class SandboxOut(BaseModel):
    id: str
    backend: str
    state: str
    reason: str | None = None
    created_at: float
    owner: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict)


class ExecRequest(BaseModel):
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] | None = None
    cwd: str | None = None
    timeout: float | None = Field(default=None, gt=0, le=86400)
    stdin: str | None = Field(default=None, description="UTF-8 text fed to stdin")
    stdin_b64: str | None = Field(default=None, description="stdin bytes, base64")
    keep_background: bool = False


class ExecOut(BaseModel):
    id: str
    exit_code: int
    signal: int | None
    status: str
    timed_out: bool
    stdout: str
    stderr: str
    stdout_b64: str
    stderr_b64: str
    duration_ms: float


class WriteOut(BaseModel):
    path: str
    size: int


def _out(record: SandboxRecord, owner: str | None) -> SandboxOut:
    """The record's own fields, read by name, and the token that owns it."""
    out = SandboxOut.model_validate(record, from_attributes=True)
    return out.model_copy(update={"owner": owner})


@router.post("", status_code=201, response_model=SandboxOut)
async def create_sandbox(body: SandboxCreate, who: Write, service: ServiceDep) -> SandboxOut:
    """Create and start a sandbox owned by the calling token."""
    spec = parse_spec(body.spec)
    sid = validate_sandbox_id(body.id) if body.id else new_sandbox_id()
    if body.id and any(r.id == sid for r in await service.manager.sandboxes()):
        raise ConfigError(f"a sandbox named {sid!r} already exists; pick another id")
    await service.claim(who, sid, spec)
    try:
        record = await service.create(spec, sid)
    except BaseException:
        await service.store.drop_owner(sid)
        raise
    service.metrics.created.inc()
    return _out(record, who.token_id)


@router.get("", response_model=list[SandboxOut])
async def list_sandboxes(
    who: Read,
    service: ServiceDep,
    state: Annotated[State | None, Query()] = None,
    label: Annotated[
        list[str] | None, Query(description="KEY=VALUE; repeat to require several")
    ] = None,
) -> list[SandboxOut]:
    """The caller's sandboxes (every one for admin), with every label given, in ``state``."""
    wanted: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label filter {item[:80]!r} must be KEY=VALUE")
        wanted[key] = value
    return [_out(r, o) for r, o in await service.listing(who) if matches(r, wanted, state)]


@router.get("/{sandbox_id}", response_model=SandboxOut)
async def get_sandbox(sandbox_id: str, who: Read, service: ServiceDep) -> SandboxOut:
    record = await service.visible(who, sandbox_id)
    owner = (await service.store.owners()).get(record.id, (None, 0))[0]
    return _out(record, owner)


@router.delete("/{sandbox_id}", status_code=204)
async def delete_sandbox(sandbox_id: str, who: Write, service: ServiceDep) -> Response:
    """Destroy the sandbox and everything made for it."""
    await service.visible(who, sandbox_id)
    await service.manager.destroy(sandbox_id)
    await service.store.drop_owner(sandbox_id)
    service.forget(sandbox_id)
    service.metrics.destroyed.inc()
    return Response(status_code=204)


@router.post("/{sandbox_id}/ping")
async def ping(sandbox_id: str, who: Read, service: ServiceDep) -> dict[str, Any]:
    """Ask the sandbox's agent to answer (its uid, pid, version): the channel works."""
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    return methods.to_json(await (await service.manager.guest(sandbox_id)).ping())


@router.post("/{sandbox_id}/exec", response_model=ExecOut)
async def exec_plain(
    sandbox_id: str, body: ExecRequest, who: Write, service: ServiceDep
) -> ExecOut:
    """Run a short command and return its output whole (streaming: the WebSocket form)."""
    await service.visible(who, sandbox_id)
    stdin: bytes | None = None
    if body.stdin_b64 is not None:
        try:
            stdin = base64.b64decode(body.stdin_b64, validate=True)
        except ValueError:
            raise ConfigError("stdin_b64 is not valid base64") from None
    elif body.stdin is not None:
        stdin = body.stdin.encode()
    await service.peer(sandbox_id)
    result = await service.manager.exec(
        sandbox_id,
        body.argv,
        env=body.env,
        cwd=body.cwd,
        timeout=body.timeout,
        stdin=stdin,
        keep_background=body.keep_background,
    )
    service.metrics.execs.labels("plain").inc()
    return ExecOut(
        id=sandbox_id,
        exit_code=result.exit_code,
        signal=result.signal,
        status=result.status,
        timed_out=result.timed_out,
        stdout=result.stdout.decode(errors="replace"),
        stderr=result.stderr.decode(errors="replace"),
        stdout_b64=base64.b64encode(result.stdout).decode(),
        stderr_b64=base64.b64encode(result.stderr).decode(),
        duration_ms=result.duration_ms,
    )


# -- files -----------------------------------------------------------------------------


def _check_path(path: str) -> str:
    """Refuse what no filesystem takes, before the guest is asked (422, not a failed call)."""
    if "\x00" in path:
        raise ValueError("a path cannot contain NUL")
    if len(path.encode()) > 4095:
        raise ValueError("a path is at most 4095 bytes")
    if any(len(part.encode()) > 255 for part in path.split("/")):
        raise ValueError("a path component is at most 255 bytes")
    return path


PathQ = Annotated[
    str,
    Query(min_length=1, max_length=4095, description="Relative to /workspace"),
    AfterValidator(_check_path),
]


@router.put("/{sandbox_id}/files/content", response_model=WriteOut)
async def upload(
    sandbox_id: str,
    path: PathQ,
    request: Request,
    who: Write,
    service: ServiceDep,
    mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
) -> WriteOut:
    """Write the request body to ``path``, streamed (any size up to the server's limit)."""
    await service.visible(who, sandbox_id)
    limit = service.max_upload
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"upload of {declared} bytes exceeds this server's {limit} bytes")
    await service.peer(sandbox_id)

    async def chunks() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge(f"upload exceeds this server's {limit} bytes")
            if chunk:
                service.metrics.bytes_up.inc(len(chunk))
                yield chunk

    try:
        size = await service.manager.write_file(sandbox_id, path, chunks(), mode=mode)
    except BodyTooLarge:
        with contextlib.suppress(IronclawError):
            await (await service.manager.guest(sandbox_id)).remove(path)
        raise
    return WriteOut(path=path, size=size)


@router.get(
    "/{sandbox_id}/files/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def download(
    sandbox_id: str, path: PathQ, who: Read, service: ServiceDep
) -> StreamingResponse:
    """Stream the file at ``path``; a problem response (before any byte is sent) when it
    does not exist or cannot be read."""
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    info = await (await service.manager.guest(sandbox_id)).stat(path)
    if info.type == "dir":
        raise ConfigError(f"{path} is a directory; list it with GET .../files?path={path}")
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)

    async def produce() -> None:
        try:
            # Streamed with backpressure (the queue), so memory stays flat; the size is
            # bounded like an upload.
            await service.manager.read_file(
                sandbox_id, path, sink=queue.put, limit=service.max_upload
            )
        finally:
            await queue.put(None)

    async def stop(producer: asyncio.Future[None]) -> None:
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(BaseException):
                await producer

    # The first chunk (or the end) is awaited before the response starts: a file that
    # cannot be read (mode 000, vanished, refused) is a problem response, not a body cut
    # short after a 200.
    producer = asyncio.ensure_future(produce())
    try:
        first = await queue.get()
        if first is None:
            await producer  # re-raises the failed read
    except BaseException:
        await stop(producer)
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            chunk = first
            while chunk is not None:
                service.metrics.bytes_down.inc(len(chunk))
                yield chunk
                chunk = await queue.get()
            await producer  # re-raises a later failed read: the response is cut short
        finally:
            await stop(producer)

    headers = {"X-File-Size": str(info.size)}
    return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)


@router.get("/{sandbox_id}/files")
async def list_files(
    sandbox_id: str, who: Read, service: ServiceDep, path: PathQ = "."
) -> list[dict[str, Any]]:
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    entries = await (await service.manager.guest(sandbox_id)).list(path)
    return [methods.to_json(e) for e in entries]


@router.get("/{sandbox_id}/files/stat")
async def stat_file(sandbox_id: str, path: PathQ, who: Read, service: ServiceDep) -> dict[str, Any]:
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    return methods.to_json(await (await service.manager.guest(sandbox_id)).stat(path))


@router.delete("/{sandbox_id}/files", status_code=204)
async def remove_file(
    sandbox_id: str, path: PathQ, who: Write, service: ServiceDep, recursive: bool = False
) -> Response:
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    await (await service.manager.guest(sandbox_id)).remove(path, recursive=recursive)
    return Response(status_code=204)


@router.post("/{sandbox_id}/files/mkdir", status_code=204)
async def mkdir(sandbox_id: str, path: PathQ, who: Write, service: ServiceDep) -> Response:
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    await (await service.manager.guest(sandbox_id)).mkdir(path)
    return Response(status_code=204)
