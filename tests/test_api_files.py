"""100 MiB through the API both ways, with the server's memory flat (streamed end to end)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from apiserver import Server, serve, start_server
from ironclaw.client import ApiClient
from ironclaw.config import Settings
from ironclaw.errors import BodyTooLarge

pytestmark = pytest.mark.root

MIB = 1024 * 1024
SIZE = 100 * MIB


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


async def _pattern(total: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    block = bytes(range(256)) * 1024  # 256 KiB, not all zeros
    sent = 0
    while sent < total:
        chunk = block[: min(len(block), total - sent)]
        digest.update(chunk)
        sent += len(chunk)
        yield chunk


async def test_100_mib_up_and_down_with_the_server_memory_flat(server: Server) -> None:
    token = server.token("read", "write")
    async with ApiClient(server.url, token) as api:
        sid = (await api.create({"limits": {"workspace_mib": 256}}))["id"]
        # Warm up the code paths once, so the baseline includes what they load.
        await api.write_file(sid, "warm.bin", b"w" * MIB)
        await api.read_file(sid, "warm.bin")
        rss0, hwm0 = server.rss_kib()

        sent = hashlib.sha256()
        assert await api.write_file(sid, "big.bin", _pattern(SIZE, sent)) == SIZE
        rss_up, hwm_up = server.rss_kib()
        assert (await api.stat(sid, "big.bin"))["size"] == SIZE

        got = hashlib.sha256()
        size = 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)
            got.update(chunk)

        assert await api.read_file(sid, "big.bin", sink) == b""  # streamed, nothing kept
        rss_down, hwm_down = server.rss_kib()
        assert size == SIZE and got.hexdigest() == sent.hexdigest()

        growth = (hwm_down - hwm0) / 1024
        print(
            f"server RSS: before {rss0 / 1024:.1f} MiB (peak {hwm0 / 1024:.1f}), after upload "
            f"{rss_up / 1024:.1f} (peak {hwm_up / 1024:.1f}), after download "
            f"{rss_down / 1024:.1f} (peak {hwm_down / 1024:.1f}); peak growth {growth:.1f} MiB "
            f"for {SIZE // MIB} MiB each way"
        )
        # A buffered 100 MiB body would raise the peak by at least 100 MiB.
        assert growth < 32, f"server peak RSS grew {growth:.1f} MiB"
        # A client that walks away mid-download leaves the sandbox's channel usable.
        async with api.http.stream(
            "GET", f"/v1/sandboxes/{sid}/files/content", params={"path": "big.bin"}
        ) as resp:
            async for _chunk in resp.aiter_bytes():
                break
        async with asyncio.timeout(60):
            assert (await api.exec(sid, ["echo", "still"])).stdout == b"still\n"
            assert (await api.stat(sid, "big.bin"))["size"] == SIZE
        await api.delete(sid)


async def test_uploads_over_the_limit_are_refused_and_leave_nothing(settings: Settings) -> None:
    srv = start_server(settings, "--max-upload", "1")
    try:
        token = srv.token("read", "write")
        async with ApiClient(srv.url, token) as api:
            sid = (await api.create())["id"]
            assert await api.write_file(sid, "ok.bin", b"o" * MIB) == MIB
            # A declared length over the limit is refused before a byte is read ...
            host, port = srv.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"PUT /v1/sandboxes/{sid}/files/content?path=x HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {token}\r\nContent-Length: {5 << 30}\r\n\r\n".encode()
            )
            await writer.drain()
            status = await reader.readline()
            writer.close()
            assert status.split()[1] == b"413"
            # ... and a chunked one is cut off at the limit, its partial file removed.
            with pytest.raises(BodyTooLarge):
                await api.write_file(sid, "big.bin", _pattern(3 * MIB, hashlib.sha256()))
            assert [e["name"] for e in await api.list_files(sid)] == ["ok.bin"]
            await api.delete(sid)
    finally:
        srv.stop()


def test_an_unreadable_file_is_a_problem_response_not_a_truncated_200(server: Server) -> None:
    """Found by schemathesis: a file the sandbox cannot read (mode 000) used to start a 200
    and then break its chunked body; now the read is tried before any byte is sent."""
    token = server.token("read", "write")
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    ) as c:
        sid = c.post("/v1/sandboxes", json={}).json()["id"]
        try:
            put = c.put(f"/v1/sandboxes/{sid}/files/content?path=locked&mode=0", content=b"hi")
            assert put.status_code == 200, put.text
            got = c.get(f"/v1/sandboxes/{sid}/files/content?path=locked")
            assert got.status_code == 403, got.text
            assert got.headers["content-type"] == "application/problem+json"
            assert "Permission denied" in got.json()["detail"]
            c.put(f"/v1/sandboxes/{sid}/files/content?path=empty", content=b"")
            empty = c.get(f"/v1/sandboxes/{sid}/files/content?path=empty")
            assert (empty.status_code, empty.content) == (200, b"")
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
