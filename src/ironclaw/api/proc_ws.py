"""WebSockets of detached commands: attach (replay, then follow) and interactive PTYs.

``/v1/sandboxes/{id}/processes/{target}/attach?replay=true`` joins a running or ended
command by pid or tag; ``/v1/sandboxes/{id}/pty`` starts a shell (or the ``argv`` of
the first frame) on a pseudo-terminal. Both speak the same frames after that:

* server → client: first a text frame ``{"type": "started", ...}`` with the command's
  pid, tag, argv, pty and running; then binary frames: its output (for a PTY, the
  terminal's bytes); last, a text frame ``{"type": "exit", ...}``, the same fields
  with ``exit_code`` and ``signal``; then a close with 1000.
* client → server: binary frames are stdin (keys), at most 64 KiB each; text frames
  are control: ``{"type": "resize", "cols", "rows"}`` (PTY), ``{"type": "eof"}``
  (close stdin), ``{"type": "signal", "signal": N}``.

PTY first frame (text): ``{"cols": 80, "rows": 24, "argv": [...], "env", "cwd", "tag",
"keep": false}``. When the client goes away, an attached command runs on; a PTY session
is killed (as a hung-up terminal) unless ``keep`` was asked, and can then be attached
by its pid or tag.

Errors are a text frame ``{"type": "error", ...problem details}`` and a close code of
4000 + the HTTP status (4401, 4403, 4404, 4413 for an oversized frame, ...). Auth is the
bearer header on the upgrade, as for ``exec/ws``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal as _signal
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ironclaw.api.streams import (
    ReadAhead,
    Slot,
    as_ironclaw,
    check_frame,
    control,
    fail,
    open_ws,
    resolve,
)
from ironclaw.errors import ConfigError, IronclawError
from ironclaw.host import processes
from ironclaw.host.processes import ProcessHandle
from ironclaw.proto import methods as m

__all__ = ["router"]

router = APIRouter(tags=["processes"])
QUEUE = 16  # stdin frames buffered before the socket is no longer read (backpressure)
READ_AHEAD = 4 * 2**20  # output held for a client that lags, then skipped


def _doc(kind: str, handle: ProcessHandle) -> dict[str, Any]:
    return {"type": kind, **m.to_json(handle.info)}


async def _session(ws: WebSocket, handle: ProcessHandle, *, replay: bool) -> bool:
    """Relay until the command ends (True) or the client leaves (False)."""
    send_lock = asyncio.Lock()
    keys: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
    feeder: asyncio.Future[None] | None = None

    async def stdin_chunks() -> AsyncIterator[bytes]:
        while (chunk := await keys.get()) is not None:
            yield chunk

    gone = False

    async def pump() -> None:
        nonlocal gone
        # Read on while the client lags (the channel is the sandbox's, shared by every
        # call); past READ_AHEAD bytes it skips output, as the guest's ring does.
        ahead = ReadAhead(handle.output(replay=replay), size=len, budget=READ_AHEAD)
        try:
            async for chunk in ahead:
                try:
                    async with send_lock:
                        await ws.send_bytes(chunk)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    gone = True  # the client vanished mid-send
                    return
        finally:
            await ahead.aclose()

    async def receive() -> None:
        nonlocal feeder
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                if feeder is None:
                    feeder = asyncio.ensure_future(handle.stdin_from(stdin_chunks()))
                await keys.put(check_frame(msg["bytes"]))
                continue
            doc = control(msg.get("text"))
            kind = doc.get("type")
            if kind == "eof":
                if feeder is not None:
                    await keys.put(None)
                    await feeder
                    feeder = None
                await handle.close_stdin()
            elif kind == "resize":
                cols, rows = doc.get("cols"), doc.get("rows")
                if not (isinstance(cols, int) and isinstance(rows, int)):
                    raise ConfigError("resize needs integer 'cols' and 'rows'")
                await handle.resize(cols, rows)
            elif kind == "signal":
                sig = doc.get("signal", _signal.SIGTERM)
                if not isinstance(sig, int) or not 1 <= sig <= 64:
                    raise ConfigError("'signal' must be a number from 1 to 64")
                await handle.kill(sig)
            else:
                raise ConfigError(f"unknown control frame {str(kind)[:40]!r}: resize, eof, signal")

    await ws.send_text(json.dumps(_doc("started", handle)))
    output = asyncio.ensure_future(pump())
    receiver = asyncio.ensure_future(receive())
    waiter: asyncio.Future[Any] | None = None
    try:
        await asyncio.wait({output, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            receiver.result()  # a refused frame raises here
            return False  # the client left
        output.result()
        if gone:
            return False
        # Its output ended; it may still run (stdout closed): wait, unless the client leaves.
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.wait({waiter, receiver}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            receiver.result()
            return False
        waiter.result()
        async with send_lock:
            await ws.send_text(json.dumps(_doc("exit", handle)))
        await ws.close(code=1000)
        return True
    finally:
        rest = [t for t in (output, receiver, feeder, waiter) if t is not None]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


async def _guarded(ws: WebSocket, held: list[Slot], body: Any) -> None:
    """Run a session; its refusal becomes an error frame, and its slot is given back."""
    try:
        await body
    except WebSocketDisconnect:
        pass
    except (IronclawError, ValueError) as exc:
        await fail(ws, as_ironclaw(exc))
    finally:
        for slot in held:
            slot.release()


@router.websocket("/v1/sandboxes/{sandbox_id}/processes/{target}/attach")
async def attach(ws: WebSocket, sandbox_id: str, target: str, replay: bool = True) -> None:
    held: list[Slot] = []

    async def run() -> None:
        service, _, slot = await open_ws(ws, sandbox_id, "write")
        held.append(slot)
        guest = await service.manager.guest(sandbox_id)
        handle = ProcessHandle(guest, await resolve(guest, target))
        await _session(ws, handle, replay=replay)

    await _guarded(ws, held, run())


def _pty_request(doc: dict[str, Any]) -> dict[str, Any]:
    argv = doc.get("argv") or ["/bin/sh"]
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ConfigError("'argv' must be a list of strings")
    cols, rows = doc.get("cols", 80), doc.get("rows", 24)
    if not all(isinstance(n, int) and 1 <= n <= 1000 for n in (cols, rows)):
        raise ConfigError("'cols' and 'rows' must be numbers from 1 to 1000")
    env = doc.get("env")
    if env is not None and not (
        isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
    ):
        raise ConfigError("'env' must map names to strings")
    for key in ("cwd", "tag"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            raise ConfigError(f"'{key}' must be a string")
    return {"argv": argv, "pty": (cols, rows), "env": env, "cwd": doc.get("cwd"),
            "tag": doc.get("tag"), "keep": bool(doc.get("keep", False))}  # fmt: skip


@router.websocket("/v1/sandboxes/{sandbox_id}/pty")
async def pty(ws: WebSocket, sandbox_id: str) -> None:
    held: list[Slot] = []

    async def run() -> None:
        service, _, slot = await open_ws(ws, sandbox_id, "write")
        held.append(slot)
        req = _pty_request(control(await ws.receive_text()))
        guest = await service.manager.guest(sandbox_id)
        handle = await processes.start_process(
            guest, req["argv"], tag=req["tag"], env=req["env"], cwd=req["cwd"], pty=req["pty"]
        )
        ended = False
        try:
            ended = await _session(ws, handle, replay=True)
        finally:
            if not ended and not req["keep"]:
                with contextlib.suppress(IronclawError):
                    await asyncio.shield(handle.kill(_signal.SIGKILL))

    await _guarded(ws, held, run())
