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
from ironclaw.errors import IronclawError

__all__ = ["frame_doc", "problem", "seg", "send_opening", "sse_events"]


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


async def send_opening(ws: ClientConnection, message: str) -> None:
    """Send a stream's opening message. A server that refuses the stream (unknown
    sandbox, scope) sends an ``error`` frame and closes at once, which can beat this
    send: the refusal is then read by the caller's next receive (the frame stays
    buffered), so the user sees the server's error, not a closed connection."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(message)


def frame_doc(msg: str) -> dict[str, Any]:
    """A WebSocket text frame as a dict; an ``error`` frame raised as its exception."""
    doc = json.loads(msg)
    if doc.get("type") == "error":
        raise from_problem(int(doc.get("status", 500)), doc)
    return dict(doc)


async def sse_events(resp: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """Server-Sent Events as (name, decoded data), until an ``end`` event or the stream's end."""
    name, data = "", ""
    async for line in resp.aiter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            if name == "end":
                return
            yield name, json.loads(data)
            name, data = "", ""
