"""Streaming exec over a WebSocket: output as it comes, stdin as the client sends it.

Protocol (``/v1/sandboxes/{id}/exec/ws``, ``Authorization: Bearer`` on the upgrade):

* client → server, first: a text frame ``{"argv": [...], "env", "cwd", "timeout",
  "stdin": true}`` (``stdin`` false closes the command's stdin at once);
* client → server, then: binary frames are stdin bytes; the text frame ``{"type":
  "eof"}`` closes stdin;
* server → client: binary frames whose first byte is 1 (stdout) or 2 (stderr) followed by
  the bytes; last, a text frame ``{"type": "exit", "exit_code", "signal", "timed_out",
  "duration_ms"}``; then the server closes with 1000.

Errors are a text frame ``{"type": "error", ...problem details}`` and a close code of
4000 + the HTTP status (4401, 4403, 4404, ...).

The manager's ``exec`` takes stdin as one buffer; a live stdin needs the stream open
while the command runs, so this module drives the guest's ``exec`` call itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ironclaw.api.auth import verify_token
from ironclaw.api.problems import status_for
from ironclaw.api.service import Service, bearer
from ironclaw.errors import ConfigError, IronclawError, SandboxError

__all__ = ["router"]

router = APIRouter(tags=["exec"])
STDOUT, STDERR = 1, 2


async def _fail(ws: WebSocket, exc: BaseException) -> None:
    status, title = status_for(exc)
    doc = {
        "type": "error",
        "status": status,
        "title": title,
        "detail": str(exc),
        "error": type(exc).__name__,
    }
    with contextlib.suppress(Exception):
        await ws.send_text(json.dumps(doc))
        await ws.close(code=4000 + status)


def _request(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError("the first frame must be a JSON object with 'argv'")
    argv = doc.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError("'argv' must be a non-empty list of strings")
    env = doc.get("env")
    if env is not None and not (
        isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
    ):
        raise ConfigError("'env' must map names to strings")
    timeout = doc.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise ConfigError("'timeout' must be a positive number of seconds")
    cwd = doc.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError("'cwd' must be a string")
    return {
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "timeout": timeout,
        "stdin": bool(doc.get("stdin", True)),
        "keep_background": bool(doc.get("keep_background", False)),
    }


@router.websocket("/v1/sandboxes/{sandbox_id}/exec/ws")
async def exec_ws(ws: WebSocket, sandbox_id: str) -> None:
    service: Service = ws.app.state.service
    await ws.accept()
    try:
        who = await verify_token(service.store, bearer(ws))
        who.require("write")
        await service.visible(who, sandbox_id)
        req = _request(json.loads(await ws.receive_text()))
        peer = await service.peer(sandbox_id)
    except (IronclawError, ValueError) as exc:
        await _fail(ws, exc if isinstance(exc, IronclawError) else ConfigError(str(exc)))
        return
    except WebSocketDisconnect:
        return
    service.metrics.execs.labels("websocket").inc()
    out_id, err_id = peer.new_stream_id(), peer.new_stream_id()
    in_id = peer.new_stream_id() if req["stdin"] else None
    send_lock = asyncio.Lock()

    gone = asyncio.Event()  # the client went away: the command is cancelled (killed)
    streams = [(peer.open_stream(out_id), STDOUT), (peer.open_stream(err_id), STDERR)]

    async def pump(stream: AsyncIterator[bytes], tag: int) -> None:
        async for chunk in stream:
            if gone.is_set():
                continue  # keep draining so the guest is never blocked on a dead client
            try:
                async with send_lock:
                    await ws.send_bytes(bytes([tag]) + chunk)
            except Exception:  # the client vanished mid-send
                gone.set()

    async def receive() -> None:
        """Stdin frames while stdin is open; after that, only watch for a disconnect."""
        open_ = in_id is not None
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    gone.set()
                    return
                if not open_ or in_id is None:
                    continue
                if msg.get("bytes"):
                    await peer.send_bytes(in_id, msg["bytes"])
                elif msg.get("text") and json.loads(msg["text"]).get("type") == "eof":
                    open_ = False
                    await peer.end_stream(in_id)
        finally:
            if open_ and in_id is not None:
                with contextlib.suppress(IronclawError):
                    await peer.end_stream(in_id)

    pumps = [asyncio.ensure_future(pump(st, tag)) for st, tag in streams]
    receiver = asyncio.ensure_future(receive())
    params = {
        "argv": req["argv"],
        "env": req["env"],
        "cwd": req["cwd"],
        "timeout": req["timeout"],
        "stdout_stream": out_id,
        "stderr_stream": err_id,
        "stdin_stream": in_id,
        "keep_background": req["keep_background"],
    }
    call = asyncio.ensure_future(peer.call("exec", params))
    watch = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            return  # the client is gone; ``finally`` cancels the call, which kills it
        result = call.result()
        await asyncio.gather(*pumps)
        if gone.is_set():
            return
        doc = {
            "type": "exit",
            "exit_code": result.get("exit_code"),
            "signal": result.get("signal"),
            "timed_out": bool(result.get("timed_out")),
            "duration_ms": result.get("duration_ms"),
        }
        async with send_lock:
            await ws.send_text(json.dumps(doc))
        await ws.close(code=1000)
    except IronclawError as exc:
        await _fail(ws, exc if not peer.closed else SandboxError(f"sandbox {sandbox_id} went away"))
    except WebSocketDisconnect:
        pass
    finally:
        rest = [call, watch, receiver, *pumps]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
