"""``ironclaw mcp`` driven by the MCP SDK's own client, over stdio and streamable HTTP.

The server runs as a subprocess (as Claude Desktop/Code start it) on real sandboxes;
the client lists tools, creates a sandbox, runs commands, moves files, reads the
resources and destroys it; failures must come back as tool errors with clear text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from apiserver import serve as _serve_gen
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SRC = str(Path(__file__).resolve().parents[1] / "src")
EXPECTED_TOOLS = {
    "sandbox_create",
    "sandbox_exec",
    "sandbox_write_file",
    "sandbox_read_file",
    "sandbox_destroy",
    "sandbox_list",
    "agent_run",
}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IRONCLAW_API_")}
    env["IRONCLAW_HOME"] = str(home)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


async def _call(session: ClientSession, name: str, args: dict[str, Any]) -> Any:
    result = await session.call_tool(name, args)
    assert not result.is_error, result.content
    return result.structured_content.get("result", result.structured_content)


async def _error(session: ClientSession, name: str, args: dict[str, Any]) -> str:
    result = await session.call_tool(name, args)
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


async def _live(home: Path) -> list[str]:
    settings = Settings.from_env({"IRONCLAW_HOME": str(home)})
    async with SandboxManager(settings, reconcile_on_open=False) as mgr:
        return [r.id for r in await mgr.sandboxes()]


async def _exercise(session: ClientSession) -> str:
    """The common walk: tools, create, exec, files, resources, errors. Returns the id."""
    await session.initialize()
    tools = {t.name for t in (await session.list_tools()).tools}
    assert tools >= EXPECTED_TOOLS, tools

    sb = await _call(session, "sandbox_create", {"memory_mib": 128})
    sid = sb["id"]
    assert sb["state"] == "running" and sb["memory_mib"] == 128

    res = await _call(
        session, "sandbox_exec", {"sandbox_id": sid, "command": "echo hello; echo oops >&2; exit 3"}
    )
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (3, "hello\n", "oops\n")
    assert res["truncated"] is False
    res = await _call(
        session, "sandbox_exec", {"sandbox_id": sid, "command": ["cat"], "stdin": "fed"}
    )
    assert res["stdout"] == "fed" and res["exit_code"] == 0
    # Bounded output: 100 000 bytes printed, 1000 kept, the cut flagged and counted.
    res = await _call(
        session,
        "sandbox_exec",
        {"sandbox_id": sid, "command": "head -c 100000 /dev/zero | tr '\\0' x", "max_output": 1000},
    )
    assert res["truncated"] is True and len(res["stdout"]) == 1000
    assert res["stdout_bytes"] == 100_000

    w = await _call(
        session,
        "sandbox_write_file",
        {"sandbox_id": sid, "path": "notes/a.txt", "content": "héllo\n"},
    )
    assert w["size"] == len("héllo\n".encode())
    r = await _call(session, "sandbox_read_file", {"sandbox_id": sid, "path": "notes/a.txt"})
    assert r["content"] == "héllo\n" and r["truncated"] is False
    blob = bytes(range(256))
    await _call(
        session,
        "sandbox_write_file",
        {
            "sandbox_id": sid,
            "path": "b.bin",
            "content": base64.b64encode(blob).decode(),
            "encoding": "base64",
        },
    )
    r = await _call(
        session, "sandbox_read_file", {"sandbox_id": sid, "path": "b.bin", "encoding": "base64"}
    )
    assert base64.b64decode(r["content"]) == blob
    # The file is really in the sandbox: a command sees it.
    res = await _call(session, "sandbox_exec", {"sandbox_id": sid, "command": "wc -c < b.bin"})
    assert res["stdout"].strip() == "256"

    # Errors are tool errors that say what to do.
    text = await _error(session, "sandbox_read_file", {"sandbox_id": sid, "path": "b.bin"})
    assert "not UTF-8" in text and "base64" in text
    text = await _error(session, "sandbox_exec", {"sandbox_id": "nope", "command": "true"})
    assert "SandboxNotFound" in text and "sandbox_create" in text
    text = await _error(session, "sandbox_read_file", {"sandbox_id": sid, "path": "missing.txt"})
    assert "missing.txt" in text
    text = await _error(
        session, "sandbox_create", {"spec": {"mounts": [{"source": "/etc", "target": "/mnt"}]}}
    )
    assert "mounts" in text
    text = await _error(
        session,
        "sandbox_write_file",
        {"sandbox_id": sid, "path": "x", "content": "@@", "encoding": "base64"},
    )
    assert "base64" in text

    listed = await session.list_resources()
    uris = {str(r.uri) for r in listed.resources}
    assert {"ironclaw://sandboxes", f"ironclaw://sandboxes/{sid}"} <= uris, uris
    doc = await session.read_resource("ironclaw://sandboxes")
    assert [s["id"] for s in json.loads(doc.contents[0].text)] == [sid]  # type: ignore[union-attr]
    one = await session.read_resource(f"ironclaw://sandboxes/{sid}")
    assert json.loads(one.contents[0].text)["state"] == "running"  # type: ignore[union-attr]
    return str(sid)


async def test_stdio_lifecycle_and_errors(ironclaw_home: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ironclaw.cli", "mcp"], env=_env(ironclaw_home)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        sid = await _exercise(session)
        done = await _call(session, "sandbox_destroy", {"sandbox_id": sid})
        assert done == {"id": sid, "destroyed": True}
        assert sid not in await _live(ironclaw_home)
        text = await _error(session, "sandbox_destroy", {"sandbox_id": sid})
        assert "SandboxNotFound" in text
        # One left running: the server removes it when the client goes away.
        left = (await _call(session, "sandbox_create", {}))["id"]
        assert left in await _live(ironclaw_home)
    assert left not in await _live(ironclaw_home)


async def test_stdio_agent_run_refuses_red_calls(ironclaw_home: Path) -> None:
    script = [
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "echo hi > g.txt"}}]},
        {"tool_calls": [{"name": "shell__run", "arguments": {"command": "rm g.txt"}}]},
        {"content": "finished"},
    ]
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "ironclaw.cli", "mcp"], env=_env(ironclaw_home)
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        seen: list[tuple[float, str | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            seen.append((done, message))

        args = {"task": "make and remove a file", "script": script, "keep": True}
        result = await session.call_tool("agent_run", args, progress_callback=on_progress)
        assert not result.is_error, result.content
        out = result.structured_content
        # Progress notifications followed the task, in order, one per trace event.
        assert [n for n, _ in seen] == list(range(1, len(seen) + 1)), seen
        messages = [m for _, m in seen]
        assert messages[0] == "task.start" and messages[-1] == "task.end completed"
        assert any(m and m.startswith("tool.decision refused") for m in messages), messages
        assert out["status"] == "completed" and out["answer"] == "finished"
        assert [(d["color"], d["approved"]) for d in out["decisions"]] == [
            ("GREEN", True),
            ("RED", False),
        ]
        # The refused deletion did not happen: the file is still there.
        r = await _call(session, "sandbox_read_file", {"sandbox_id": out["id"], "path": "g.txt"})
        assert r["content"] == "hi\n"
        text = await _error(session, "agent_run", {"task": "x", "script": script, "approve": "all"})
        assert "approve" in text


@asynccontextmanager
async def _http_server(
    home: Path, *extra: str, stop: int = signal.SIGTERM
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "mcp", "--transport", "http", "--port", "0", *extra,
        env=_env(home), stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+/mcp)", line)
        assert m, line
        yield m.group(1), proc
    finally:
        if proc.returncode is None:
            proc.send_signal(stop)
            await asyncio.wait_for(proc.wait(), 60)


async def test_streamable_http_lifecycle_and_cleanup(ironclaw_home: Path) -> None:
    async with _http_server(ironclaw_home) as (url, proc):
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as s:
            sid = await _exercise(s)
        # A second session sees the same server state; destroy there.
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            assert [b["id"] for b in await _call(s, "sandbox_list", {})] == [sid]
            left = (await _call(s, "sandbox_create", {}))["id"]
            await _call(s, "sandbox_destroy", {"sandbox_id": sid})
        assert await _live(ironclaw_home) == [left]
    # SIGTERM stopped the server, and with it the sandbox it had left.
    assert proc.returncode == 0
    assert await _live(ironclaw_home) == []


async def test_http_keep_leaves_sandboxes(ironclaw_home: Path) -> None:
    async with (
        _http_server(ironclaw_home, "--keep", stop=signal.SIGINT) as (url, _proc),
        streamable_http_client(url) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        sid = (await _call(s, "sandbox_create", {}))["id"]
    assert await _live(ironclaw_home) == [sid]  # the conftest's gc removes it


async def test_http_refuses_foreign_hosts(ironclaw_home: Path) -> None:
    # Not on a public address: the transport has no authentication of its own.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ironclaw.cli", "mcp", "--transport", "http", "--host", "0.0.0.0",
        env=_env(ironclaw_home), stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"loopback only" in err
    # On loopback, a request naming another Host (DNS rebinding) is refused.
    async with _http_server(ironclaw_home) as (url, _proc), httpx.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        headers = {"Host": "evil.example", "Accept": "application/json, text/event-stream"}
        resp = await http.post(url, json=body, headers=headers)
        assert resp.status_code in (403, 421), resp.text


async def test_stdio_over_the_api_service(ironclaw_home: Path, settings: Settings) -> None:
    """``--api URL``: the same tools through ``ironclaw serve`` and its token."""
    with contextlib.closing(_serve_gen(settings)) as gen:
        server = next(gen)
        env = _env(ironclaw_home) | {
            "IRONCLAW_API_URL": server.url,
            "IRONCLAW_API_TOKEN": server.token("read", "write"),
        }
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "ironclaw.cli", "mcp"], env=env
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            sid = await _exercise(session)
            script = [
                {"tool_calls": [{"name": "shell__run", "arguments": {"command": "rm -f x"}}]},
                {"content": "ok"},
            ]
            out = await _call(session, "agent_run", {"task": "remove", "script": script})
            assert out["status"] == "completed" and out["answer"] == "ok"
            assert [(d["color"], d["approved"]) for d in out["decisions"]] == [("RED", False)]
            left = (await _call(session, "sandbox_create", {}))["id"]
            await _call(session, "sandbox_destroy", {"sandbox_id": sid})
            assert sid not in await _live(ironclaw_home)
        # The MCP server removed what it left, through the API, when the client went away.
        assert left not in await _live(ironclaw_home)
