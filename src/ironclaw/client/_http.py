"""The small pieces of the HTTP and WebSocket wire both remote clients read: path
segments, problem bodies, JSON frames and Server-Sent Events."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ironclaw.client._errors import from_problem
from ironclaw.errors import ApiError, IronclawError

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_PROBLEM_BYTES",
    "frame_doc",
    "problem",
    "problem_of",
    "read_body",
    "seg",
    "send_opening",
    "sse_events",
]

#: What is read of a streamed error's body: a problem document is a few hundred bytes.
MAX_PROBLEM_BYTES = 64 * 1024
#: The largest Server-Sent Event taken: a trace or watch event is kilobytes.
MAX_EVENT_BYTES = 16 * 2**20


def seg(value: str) -> str:
    """``value`` as one path segment (an id or tag never reaches another route)."""
    return quote(value, safe="")


def problem(status: int, content: bytes) -> IronclawError:
    """The exception an error response's body stands for (JSON or not)."""
    try:
        doc = json.loads(content)
    except (ValueError, RecursionError):
        doc = content.decode(errors="replace")
    return from_problem(status, doc)


async def read_body(resp: httpx.Response, limit: int, route: str) -> bytes:
    """The whole body, or ApiError once it passes ``limit`` bytes (the rest not read)."""
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                f"{route}: the server's answer is over {limit} bytes: not read "
                "(is the URL an IronClaw API?)"
            )
    return bytes(body)


async def problem_of(resp: httpx.Response) -> IronclawError:
    """:func:`problem` for a streamed response, reading at most :data:`MAX_PROBLEM_BYTES`
    of its body (a server that sends more is cut off, not held)."""
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) >= MAX_PROBLEM_BYTES:
            break
    return problem(resp.status_code, bytes(body[:MAX_PROBLEM_BYTES]))


async def send_opening(ws: ClientConnection, message: str) -> None:
    """Send a stream's opening message. A server that refuses the stream (unknown
    sandbox, scope) sends an ``error`` frame and closes at once, which can beat this
    send: the refusal is then read by the caller's next receive (the frame stays
    buffered), so the user sees the server's error, not a closed connection."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(message)


def frame_doc(msg: str) -> dict[str, Any]:
    """A WebSocket text frame as a dict; an ``error`` frame raised as its exception, and
    one that is no JSON object (or an error frame without a numeric status) as ApiError."""
    try:
        doc = json.loads(msg)
    except (ValueError, RecursionError):
        raise ApiError("a frame from the server is not JSON") from None
    if not isinstance(doc, dict):
        raise ApiError("a frame from the server is not a JSON object")
    if doc.get("type") == "error":
        status = doc.get("status", 500)
        raise from_problem(status if type(status) is int else 500, doc)
    return doc


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """Server-Sent Events as (name, decoded data), until an ``end`` event or the stream's end.

    Lines are split here rather than by httpx, which holds a line however long it grows:
    an event past :data:`MAX_EVENT_BYTES`, or data that is not JSON, is an ApiError.
    """
    name, data = "", bytearray()
    pending = bytearray()
    async for chunk in resp.aiter_bytes():
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            line = bytes(pending[start:end]).rstrip(b"\r")
            start = end + 1
            if line.startswith(b"event:"):
                name = line[6:].strip().decode(errors="replace")
            elif line.startswith(b"data:"):
                data += line[5:].strip()
            elif not line and data:
                if name == "end":
                    return
                try:
                    doc = json.loads(data)
                except (ValueError, RecursionError):
                    raise ApiError(f"event {name!r} from the server is not JSON") from None
                yield name, doc
                name, data = "", bytearray()
        del pending[:start]
        if len(pending) + len(data) > MAX_EVENT_BYTES:
            raise ApiError(f"an event from the server is over {MAX_EVENT_BYTES} bytes: not read")
