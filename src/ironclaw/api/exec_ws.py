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
while the command runs, so this module runs an :class:`~ironclaw.cluster.links.ExecSession`:
over the sandbox's channel on one host (:class:`~ironclaw.cluster.links.ExecPipe`), or
on the owning node when the manager has ``open_exec`` (a cluster). Either way output is
a bounded queue of chunks and stdin goes one frame at a time, so a fast command waits
for a slow client rather than filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ironclaw.api.auth import verify_token
from ironclaw.api.problems import status_for
from ironclaw.api.service import Service, bearer
from ironclaw.cluster.links import ExecPipe, ExecSession
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


async def _session(service: Service, sandbox_id: str, req: dict[str, Any]) -> ExecSession:
    params = {k: req[k] for k in ("argv", "env", "cwd", "timeout", "keep_background")}
    open_exec = getattr(service.manager, "open_exec", None)
    if open_exec is not None:  # the sandbox's channel is on another host
        session: ExecSession = await open_exec(sandbox_id, params, stdin=req["stdin"])
        return session
    return ExecPipe(await service.peer(sandbox_id), params, stdin=req["stdin"])


@router.websocket("/v1/sandboxes/{sandbox_id}/exec/ws")
async def exec_ws(ws: WebSocket, sandbox_id: str) -> None:
    service: Service = ws.app.state.service
    await ws.accept()
    try:
        who = await verify_token(service.store, bearer(ws))
        who.require("write")
        await service.visible(who, sandbox_id)
        req = _request(json.loads(await ws.receive_text()))
        session = await _session(service, sandbox_id, req)
    except (IronclawError, ValueError) as exc:
        await _fail(ws, exc if isinstance(exc, IronclawError) else ConfigError(str(exc)))
        return
    except WebSocketDisconnect:
        return
    service.metrics.execs.labels("websocket").inc()
    send_lock = asyncio.Lock()
    tags = {"stdout": STDOUT, "stderr": STDERR}

    async def forward() -> dict[str, Any] | None:
        """Output to the client as it comes; the command's result at the end (None:
        the client went away)."""
        async for kind, item in session.items():
            if kind == "exit":
                assert isinstance(item, dict)
                return item
            try:
                async with send_lock:
                    await ws.send_bytes(bytes([tags[kind]]) + item)
            except Exception:  # the client vanished mid-send
                return None
        raise SandboxError(f"sandbox {sandbox_id}: the command ended without a result")

    async def receive() -> None:
        """Stdin frames while stdin is open; after that, only watch for a disconnect."""
        open_ = req["stdin"]
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if not open_:
                continue
            # stdin the command no longer reads is dropped, as a closed pipe would
            with contextlib.suppress(IronclawError):
                if msg.get("bytes"):
                    await session.send(msg["bytes"])
                elif msg.get("text") and json.loads(msg["text"]).get("type") == "eof":
                    open_ = False
                    await session.eof()

    output = asyncio.ensure_future(forward())
    receiver = asyncio.ensure_future(receive())
    try:
        await asyncio.wait({output, receiver}, return_when=asyncio.FIRST_COMPLETED)
        result = output.result() if output.done() else None
        if result is None:
            return  # the client is gone; ``finally`` ends the session, which kills it
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
        await _fail(ws, exc)
    except (WebSocketDisconnect, RuntimeError):  # the client vanished at the end
        pass
    finally:
        for t in (output, receiver):
            t.cancel()
        await asyncio.gather(output, receiver, return_exceptions=True)
        await session.aclose()
