"""The HTTP API's long-lived routes against a client that does not play along.

A WebSocket client that attaches to a command flooding its output and then stops
reading must not make the server buffer that output without bound, nor freeze the
sandbox for everyone else; a client opening stream after stream meets the caps;
oversized tags, argv and frames are refused with problem details. A real server with
real namespace sandboxes; the hostile client is the ``websockets`` library used raw.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from apiserver import Server, serve
from ironclaw.client import Sandbox
from ironclaw.config import Settings

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
MiB = 2**20


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_client_that_stops_reading_a_flood_costs_bounded_memory_and_blocks_no_one(
    server: Server,
) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(sandbox_id="ws-slow", api_url=server.url, token=token) as sb:
        await sb.commands.start(["cat", "/dev/zero"], tag="flood")
        rss_before, _ = server.rss_kib()
        # A raw client: it upgrades, then never reads a byte (no library reads for it).
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/sandboxes/{sb.id}/processes/flood/attach HTTP/1.1\r\n"
            f"Host: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        assert head.startswith(b"HTTP/1.1 101"), head
        try:
            # The sandbox serves others meanwhile: the flood's stream must not stall
            # the channel that every call to it shares.
            for _ in range(20):
                r = await asyncio.wait_for(sb.exec(["echo", "still here"]), 60)
                assert r.stdout == b"still here\n"
                listed = await asyncio.wait_for(sb.commands.list(), 60)
                assert [p.tag for p in listed] == ["flood"]
                rss, _ = server.rss_kib()
                assert (rss - rss_before) * 1024 < 256 * MiB, (rss_before, rss)
                await asyncio.sleep(0.1)
            assert listed[0].output_bytes > 64 * MiB  # far more than any buffer held
        finally:
            writer.close()
        rss, _ = server.rss_kib()
        assert (rss - rss_before) * 1024 < 256 * MiB, (rss_before, rss)


async def test_streams_are_capped_per_token_and_oversized_requests_refused(
    server: Server,
) -> None:
    token = server.token("read", "write")
    ws_url = server.url.replace("http://", "ws://")
    async with Sandbox.create(sandbox_id="ws-caps", api_url=server.url, token=token) as sb:
        await sb.commands.start(["sleep", "600"], tag="s")
        url = f"{ws_url}/v1/sandboxes/{sb.id}/processes/s/attach"
        opened = []
        try:
            for _ in range(16):
                ws = await connect(url, additional_headers=_auth(token))
                opened.append(ws)
                assert json.loads(await ws.recv())["type"] == "started"
            extra = await connect(url, additional_headers=_auth(token))
            doc = json.loads(await extra.recv())
            assert doc["type"] == "error" and doc["error"] == "QuotaExceeded", doc
            await extra.close()
        finally:
            for ws in opened:
                await ws.close()
        # One binary frame over 64 KiB: refused with 4413, the command untouched.
        async with connect(url, additional_headers=_auth(token), max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "started"
            await ws.send(b"x" * (64 * 1024 + 1))
            doc = json.loads(await ws.recv())
            assert doc["type"] == "error" and doc["status"] == 413, doc
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4413
        async with httpx.AsyncClient(base_url=server.url, headers=_auth(token), timeout=60) as http:
            base = f"/v1/sandboxes/{sb.id}/processes"
            for body in (
                {"argv": ["true"], "tag": "t" * 129},
                {"argv": ["true"], "tag": "a\x00b"},
                {"argv": ["x"] * 4097},
                {"argv": []},
            ):
                r = await http.post(base, json=body)
                assert r.status_code == 422, (body if len(str(body)) < 200 else "big", r.text)
            r = await http.get(f"{base}/{'t' * 129}")
            assert r.status_code == 422, r.text
        assert [p.tag for p in await sb.commands.list()] == ["s"]


async def test_a_watch_client_that_stops_reading_blocks_no_one(server: Server) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(sandbox_id="watch-slow", api_url=server.url, token=token) as sb:
        await sb.files.mkdir("w")
        rss_before, _ = server.rss_kib()
        async with (
            httpx.AsyncClient(base_url=server.url, headers=_auth(token), timeout=60) as http,
            http.stream("GET", f"/v1/sandboxes/{sb.id}/watch", params={"path": "w"}) as resp,
        ):
            lines = resp.aiter_lines()
            assert await anext(lines) == ": watching"
            # Events with long names, far more than any buffer on the way; nobody reads.
            burst = (
                "import os\n"
                "for i in range(20000):\n"
                "    p = 'w/' + str(i) + 'n' * 200\n"
                "    os.close(os.open(p, os.O_CREAT)); os.unlink(p)\n"
            )
            for _ in range(3):
                r = await asyncio.wait_for(sb.exec(["python3", "-c", burst]), 120)
                assert r.exit_code == 0, r.stderr
                assert (await asyncio.wait_for(sb.exec(["echo", "ok"]), 60)).stdout == b"ok\n"
                rss, _ = server.rss_kib()
                assert (rss - rss_before) * 1024 < 256 * MiB, (rss_before, rss)
            # The reader comes back: the stream is intact, with an overflow marker where
            # the guest dropped what nobody read.
            kinds = set()
            async for line in lines:
                if line.startswith("data: "):
                    kinds.add(json.loads(line[len("data: ") :])["type"])
                    if "overflow" in kinds and "created" in kinds:
                        break
            assert {"created", "overflow"} <= kinds
