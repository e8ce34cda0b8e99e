"""What the long-lived routes share: stream slots, WebSocket auth and errors, proc lookup.

A stream (an attach or PTY WebSocket, a watch event stream) holds a guest call and a
channel stream for as long as the client stays; :class:`StreamSlots` caps how many one
token and one sandbox may hold, so a client cannot pin the server's memory or the guest's
process table by opening more. WebSockets authenticate as ``exec/ws`` does: the bearer
header on the upgrade request (a browser client goes through a proxy that adds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import WebSocket
from starlette.requests import HTTPConnection

from ironclaw.api.auth import Principal, verify_token
from ironclaw.api.problems import status_for
from ironclaw.api.service import Service, bearer
from ironclaw.errors import (
    BodyTooLarge,
    ConfigError,
    InvalidRequest,
    IronclawError,
    NotFound,
    QuotaExceeded,
)
from ironclaw.host import processes
from ironclaw.host.guest import GuestClient
from ironclaw.proto import methods as m

__all__ = [
    "MAX_CONTROL",
    "MAX_FRAME",
    "ReadAhead",
    "Slot",
    "StreamSlots",
    "as_ironclaw",
    "check_frame",
    "control",
    "fail",
    "open_ws",
    "resolve",
    "slots",
]

T = TypeVar("T")

#: Largest stdin/terminal frame a client may send (bigger: close 4413).
MAX_FRAME = 64 * 1024
#: Largest JSON control frame (the first frame, resize, eof, signal).
MAX_CONTROL = 16 * 1024


@dataclass
class Slot:
    """One held stream; :meth:`release` is idempotent."""

    owner: StreamSlots
    token: str
    sandbox: str
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.owner.by_token[self.token] -= 1
            self.owner.by_sandbox[self.sandbox] -= 1


@dataclass
class StreamSlots:
    """Open streams per token and per sandbox, each capped."""

    per_token: int = 16
    per_sandbox: int = 32
    by_token: Counter[str] = field(default_factory=Counter)
    by_sandbox: Counter[str] = field(default_factory=Counter)

    def take(self, who: Principal, sandbox_id: str) -> Slot:
        if self.by_token[who.token_id] >= self.per_token:
            raise QuotaExceeded(
                f"this token has {self.per_token} streams open (attach, pty, watch): "
                "close one before opening another"
            )
        if self.by_sandbox[sandbox_id] >= self.per_sandbox:
            raise QuotaExceeded(
                f"sandbox {sandbox_id} has {self.per_sandbox} streams open: close one first"
            )
        self.by_token[who.token_id] += 1
        self.by_sandbox[sandbox_id] += 1
        return Slot(self, who.token_id, sandbox_id)

    def release_with(self, obj: object, slot: Slot) -> None:
        """Release ``slot`` when ``obj`` (a response's body iterator) is collected, in case
        the response is dropped before its body ever starts."""
        weakref.finalize(obj, slot.release)


def slots(conn: HTTPConnection) -> StreamSlots:
    found: StreamSlots = conn.app.state.streams
    return found


async def fail(ws: WebSocket, exc: BaseException) -> None:
    """An error frame (problem details) and a close code of 4000 + the HTTP status."""
    status, title = status_for(exc)
    doc = {"type": "error", "status": status, "title": title, "detail": str(exc),
           "error": type(exc).__name__}  # fmt: skip
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(doc))
        await ws.close(code=4000 + status)


async def open_ws(ws: WebSocket, sandbox_id: str, scope: str) -> tuple[Service, Principal, Slot]:
    """Accept, authenticate, check the sandbox is the caller's, and take a stream slot."""
    service: Service = ws.app.state.service
    await ws.accept()
    who = await verify_token(service.store, bearer(ws))
    who.require(scope)
    await service.visible(who, sandbox_id)
    await service.peer(sandbox_id)
    return service, who, slots(ws).take(who, sandbox_id)


def control(raw: str | None) -> dict[str, Any]:
    """A client's JSON control frame, bounded and an object."""
    if raw is None or len(raw) > MAX_CONTROL:
        raise BodyTooLarge(f"a control frame is at most {MAX_CONTROL} bytes of JSON text")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ConfigError("a text frame must be a JSON object") from None
    if not isinstance(doc, dict):
        raise ConfigError("a text frame must be a JSON object")
    return doc


def check_frame(data: bytes) -> bytes:
    if len(data) > MAX_FRAME:
        raise BodyTooLarge(f"a binary frame is at most {MAX_FRAME} bytes; send it in pieces")
    return data


async def resolve(guest: GuestClient, target: str) -> m.ProcInfo:
    """The command named by pid (digits) or tag, as the guest would pick it (a running
    one first, else the latest); :class:`NotFound` when there is none."""
    if "\x00" in target or len(target) > 128:
        raise InvalidRequest("a tag is 1 to 128 characters without NUL; a pid is digits")
    infos = await processes.list_processes(guest)
    if target.isdigit():
        found = next((i for i in infos if i.pid == int(target)), None)
        what = f"pid {target}"
    else:
        tagged = [i for i in infos if i.tag == target]
        found = next((i for i in reversed(tagged) if i.running), tagged[-1] if tagged else None)
        what = f"tag {target!r}"
    if found is None:
        raise NotFound(f"no command with {what} in this sandbox: GET its /processes lists them")
    return found


def as_ironclaw(exc: BaseException) -> IronclawError:
    return exc if isinstance(exc, IronclawError) else ConfigError(str(exc))


class ReadAhead(AsyncIterator[T]):
    """``items`` taken as fast as the guest sends them, whatever the client's pace.

    They arrive on the sandbox's channel, which every call to that sandbox shares, and a
    stream nobody reads stalls it: a client that stops reading would freeze the sandbox
    for everyone. So a task reads on from construction; while the client lags, what is
    past ``budget`` (summed ``size``) is dropped and ``gap`` (if any) marks where, as the
    guest does for a follower that falls behind. :meth:`aclose` stops it.
    """

    def __init__(
        self, items: AsyncIterator[T], *, size: Callable[[T], int], budget: int,
        gap: T | None = None,
    ) -> None:  # fmt: skip
        self._items, self._size, self._budget, self._gap = items, size, budget, gap
        self._kept: deque[tuple[T, int]] = deque()
        self._held = 0
        self._lost = False
        self._more = asyncio.Event()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for item in self._items:
            n = self._size(item)
            if self._held + n > self._budget:
                self._lost = True
            else:
                if self._lost and self._gap is not None:
                    self._kept.append((self._gap, 0))
                self._lost = False
                self._kept.append((item, n))
                self._held += n
            self._more.set()

    async def __anext__(self) -> T:
        while not self._kept:
            if self._task.done():
                self._task.result()
                if self._lost and self._gap is not None:
                    self._lost = False
                    return self._gap
                raise StopAsyncIteration
            self._more.clear()
            waiter = asyncio.ensure_future(self._more.wait())
            try:
                await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        item, n = self._kept.popleft()
        self._held -= n
        return item

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
