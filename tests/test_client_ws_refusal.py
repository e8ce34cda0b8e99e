"""A server that refuses a stream closes it at once, and that close can reach the client
before the client has sent its opening message. The client must still report the
server's reason (the ``error`` frame it sent), not a dropped connection.

The order is forced, not left to chance: the client's connection is handed over only
once the server's close has arrived, so the opening send always meets a closed socket.
The server is a real WebSocket server over TCP on loopback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from ironclaw.client import ApiClient
from ironclaw.client import procs as client_procs
from ironclaw.errors import SandboxNotFound, ScopeError


def _refusing(status: int, error: str) -> Any:
    async def handler(ws: ServerConnection) -> None:
        doc = {"type": "error", "status": status, "detail": "refused", "error": error}
        await ws.send(json.dumps(doc))
        await ws.close(code=4000 + status)

    return handler


@contextlib.asynccontextmanager
async def _closed_first(url: str) -> AsyncIterator[ClientConnection]:
    """A client connection handed over only after the server closed it."""
    async with connect(url) as ws:
        await ws.wait_closed()
        yield ws


class _LateClient(ApiClient):
    def _ws(self, sandbox_id: str) -> Any:
        return _closed_first(f"{self.base.replace('http', 'ws', 1)}/exec/ws")


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [(404, "SandboxNotFound", SandboxNotFound), (403, "ScopeError", ScopeError)],
)
async def test_exec_stream_refused_before_its_opening_message_says_why(
    status: int, error: str, expected: type[Exception]
) -> None:
    async with serve(_refusing(status, error), "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with _LateClient(f"http://127.0.0.1:{port}", "icw_x") as api:
            with pytest.raises(expected, match="refused"):
                await api.exec_stream("sb-1", ["true"])


async def test_terminal_refused_before_its_opening_message_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve(_refusing(404, "SandboxNotFound"), "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/pty"

        async def late(api: ApiClient, path: str) -> ClientConnection:
            ws = await connect(url)
            await ws.wait_closed()
            return ws

        monkeypatch.setattr(client_procs, "_ws", late)
        async with ApiClient(f"http://127.0.0.1:{port}", "icw_x") as api:
            with pytest.raises(SandboxNotFound, match="refused"):
                await client_procs.RemotePty(api, "sb-1").create()
