"""File watches whose file names are chosen by whatever runs in the sandbox.

A name may hold a newline (which would end a line of the guest's event stream or an SSE
field), escape sequences, or bytes that are not UTF-8 (Linux allows any but NUL and
``/``). The watch must report each one exactly (as Python's ``surrogateescape`` spells
it), keep following a directory whose name is not UTF-8, and never let a name break
the framing of the Server-Sent Events a client reads. A real sandbox behind a real
``ironclaw serve``, read as raw SSE lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from apiserver import Server, serve
from ironclaw.client import Sandbox
from ironclaw.config import Settings

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

NAMES: list[bytes] = [
    b"nl\nevent: end\ndata: {}",  # would close the stream early if put in SSE as is
    b"esc\x1b]0;owned\x07\x1b[2J",
    b"bad\xff\xfe",
    b"dir\xff",  # a directory: its contents must be followed too
    b"dir\xff/inner\x80",
    b"zz-last",
]
MAKE = (
    "import os\n"
    "for n in [{}]:\n"
    "    if n == b'dir\\xff': os.mkdir(b'w/' + n)\n"
    "    else: os.close(os.open(b'w/' + n, os.O_CREAT | os.O_WRONLY))\n"
)


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    yield from serve(settings)


async def test_hostile_file_names_are_reported_exactly_and_keep_the_sse_framing(
    server: Server,
) -> None:
    token = server.token("read", "write")
    async with Sandbox.create(sandbox_id="watch-hostile", api_url=server.url, token=token) as sb:
        await sb.files.mkdir("w")
        frames: list[tuple[str, dict[str, object]]] = []
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            url = f"/v1/sandboxes/{sb.id}/watch"
            async with http.stream("GET", url, params={"path": "w"}) as resp:
                assert resp.status_code == 200
                lines = resp.aiter_lines()
                assert await anext(lines) == ": watching"  # the watch is in place
                script = MAKE.format(", ".join(repr(n) for n in NAMES))
                r = await sb.exec(["python3", "-c", script])
                assert r.exit_code == 0, r.stderr

                async def read() -> None:
                    event = ""
                    async for line in lines:
                        if line.startswith("event: "):
                            event = line[len("event: ") :]
                        elif line.startswith("data: "):
                            doc = json.loads(line[len("data: ") :])
                            frames.append((event, doc))
                            if event != "watch" or str(doc["path"]).endswith("zz-last"):
                                return
                        else:
                            assert line in ("", ": watching"), repr(line)

                await asyncio.wait_for(read(), 60)
        kinds = {event for event, _ in frames}
        assert kinds == {"watch"}, frames  # no forged "end" from a name's newline
        created = [d["path"] for _, d in frames if d["type"] == "created"]
        want = ["/workspace/w/" + n.decode(errors="surrogateescape") for n in NAMES]
        assert created == want, created
