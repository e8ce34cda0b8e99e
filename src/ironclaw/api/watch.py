"""Route: file events under a workspace path, as Server-Sent Events.

``GET /v1/sandboxes/{id}/watch?path=src&recursive=true&max_queue=4096`` answers once
the guest's inotify watch is in place (so a change made after the response headers
arrive is reported) and then sends, in order, one ``event: watch`` per change with the
JSON of a :class:`~ironclaw.proto.proc_methods.WatchEvent` (``created``, ``modified``,
``deleted``, ``moved``, or ``overflow`` where a slow reader lost events: the guest
keeps ``max_queue`` of them, the server 4 MiB more), and ``event: end`` when the
watched path goes away.
A refusal before that is a problem response: 422 for a path outside the workspace,
404 for a missing one; a failure later is an ``event: error`` with problem details.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import posixpath
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ironclaw.api.problems import status_for
from ironclaw.api.service import Read, ServiceDep
from ironclaw.api.streams import ReadAhead, Slot, slots
from ironclaw.errors import ConfigError, InvalidRequest, IronclawError
from ironclaw.host import processes
from ironclaw.proto import methods as m
from ironclaw.proto.proc_methods import MAX_WATCH_QUEUE

__all__ = ["router"]

router = APIRouter(tags=["files"])
WORKSPACE = "/workspace"
READ_AHEAD = 4 * 2**20
_OVERFLOW = m.WatchEvent(type="overflow", path="")


def _inside(path: str) -> str:
    """Refuse what is outside the workspace by its name alone (a symlink that leads out
    is refused by the guest, which resolves it)."""
    if "\x00" in path or len(path.encode()) > 4095:
        raise InvalidRequest("a path is at most 4095 bytes, without NUL")
    full = posixpath.normpath(posixpath.join(WORKSPACE, path))
    if full != WORKSPACE and not full.startswith(WORKSPACE + "/"):
        raise InvalidRequest(f"{path} is outside the workspace {WORKSPACE}: watch a path inside it")
    return path


def _sse(event: str, doc: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(doc)}\n\n".encode()


@router.get(
    "/v1/sandboxes/{sandbox_id}/watch",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def watch(
    sandbox_id: str,
    request: Request,
    who: Read,
    service: ServiceDep,
    path: Annotated[str, Query(min_length=1, max_length=4095)] = ".",
    recursive: bool = True,
    max_queue: Annotated[int, Query(ge=1, le=MAX_WATCH_QUEUE)] = 4096,
) -> StreamingResponse:
    """Changes under ``path`` (relative to /workspace) as they happen, in order."""
    _inside(path)
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    guest = await service.manager.guest(sandbox_id)
    slot = slots(request).take(who, sandbox_id)
    events = processes.watch(guest, path, recursive=recursive, max_queue=max_queue)
    first = asyncio.ensure_future(anext(events))
    try:
        # The guest installs the watch before it answers any later call. Let the watch
        # request go out first (a few loop turns: its call is a task of a task); two
        # pings after it, a refusal (outside through a symlink, missing) has come back.
        for _ in range(8):
            await asyncio.sleep(0)
        for _ in range(3):
            await guest.ping()
            if first.done():
                break
        exc = first.exception() if first.done() and not first.cancelled() else None
        if type(exc) is ConfigError:
            raise InvalidRequest(str(exc)) from None
        if isinstance(exc, IronclawError):
            raise exc
    except BaseException:
        slot.release()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await events.aclose()  # type: ignore[attr-defined]
        raise
    body = _relay(first, events, slot)
    slots(request).release_with(body, slot)
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})  # fmt: skip


async def _chain(
    first: asyncio.Future[m.WatchEvent], events: AsyncIterator[m.WatchEvent]
) -> AsyncIterator[m.WatchEvent]:
    try:
        yield await first
    except StopAsyncIteration:
        return
    async for ev in events:
        yield ev


def _weight(ev: m.WatchEvent) -> int:
    return 64 + len(ev.path) + len(ev.dest or "")


async def _relay(
    first: asyncio.Future[m.WatchEvent], events: AsyncIterator[m.WatchEvent], slot: Slot
) -> AsyncIterator[bytes]:
    sent = 0
    # Read on while this client lags (the channel is the sandbox's, shared by every call);
    # past READ_AHEAD bytes of events they are dropped for an overflow, as the guest does.
    ahead = ReadAhead(_chain(first, events), size=_weight, budget=READ_AHEAD, gap=_OVERFLOW)
    try:
        yield b": watching\n\n"  # the headers and a first byte now, not at the first change
        try:
            async for ev in ahead:
                sent += 1
                yield _sse("watch", m.to_json(ev))
            yield _sse("end", {"events": sent})
        except IronclawError as exc:
            status, title = status_for(exc)
            yield _sse("error", {"status": status, "title": title, "detail": str(exc),
                                 "error": type(exc).__name__})  # fmt: skip
    finally:
        await ahead.aclose()
        slot.release()
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        with contextlib.suppress(Exception):
            await events.aclose()  # type: ignore[attr-defined]
