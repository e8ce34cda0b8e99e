"""The built-in MCP servers over real stdio, and the runtime they run from."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ironclaw.agent.agent_runtime import dependency_closure, ensure_runtime
from ironclaw.guest.agent_loop import McpClient, ServerSpec, ToolCall, execute_tool
from ironclaw.mcp_servers.patch import PatchError, apply_patch

pytestmark = pytest.mark.timeout(60)


def test_patch_applies_strictly() -> None:
    text = "a\nb\nc\nd\ne\n"
    assert apply_patch(text, "@@ -2,2 +2,2 @@\n b\n-c\n+C\n") == "a\nb\nC\nd\ne\n"
    # Line numbers are hints: a shifted hunk still lands on its context.
    assert apply_patch("x\n" + text, "@@ -4,1 +4,1 @@\n-d\n+D\n") == "x\na\nb\nc\nD\ne\n"
    with pytest.raises(PatchError):
        apply_patch(text, "@@ -1,1 +1,1 @@\n-zzz\n+y\n")
    with pytest.raises(PatchError):
        apply_patch(text, "not a patch")


def test_runtime_is_content_addressed_and_read_only_for_others(tmp_path: Path) -> None:
    names = {d.metadata["Name"].lower() for d in dependency_closure()}
    assert {"mcp", "pydantic", "pydantic_core", "anyio"} <= names
    root = tmp_path / "rt"
    first = ensure_runtime(root)
    assert ensure_runtime(root) == first  # built once
    assert (first / "mcp" / "__init__.py").is_file()
    assert (first / "ironclaw" / "mcp_servers" / "shell.py").is_file()
    assert list((first / "mcp").glob("__pycache__/*.cpython-311.pyc"))
    for dirpath, dirnames, filenames in os.walk(first):
        for n in dirnames + filenames:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, n)).st_mode)
            assert mode in (0o755, 0o644), (n, oct(mode))


@pytest.fixture(scope="module")
def runtime() -> Path:
    return ensure_runtime()


def _server(name: str, runtime: Path) -> ServerSpec:
    boot = (
        f"import sys; sys.path.insert(0, {str(runtime)!r}); import runpy; "
        f"runpy.run_module('ironclaw.mcp_servers.{name}', run_name='__main__')"
    )
    return ServerSpec(name=name, command="/usr/bin/python3", args=("-I", "-B", "-c", boot))


async def test_servers_over_stdio(
    runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the guest does; undone after the test, or later subprocesses spawned from this
    # interpreter would import the runtime's partial copy of the ironclaw package.
    monkeypatch.syspath_prepend(str(runtime))
    servers = tuple(_server(n, runtime) for n in ("shell", "files", "python"))
    async with McpClient(servers, workdir=str(tmp_path)) as client:
        names = {t.name for t in client.tool_infos}
        assert {"shell__run", "files__edit_file", "files__write_file",
                "python__run_python"} <= names  # fmt: skip

        async def run(name: str, **args: object) -> tuple[str, bool]:
            r = await execute_tool(ToolCall("c", name, dict(args)), client, timeout=20)
            return r.content, r.is_error

        assert await run("files__write_file", path="d/f.txt", content="1\n2\n") == (
            f"wrote 4 bytes to {tmp_path}/d/f.txt", False)  # fmt: skip
        assert (await run("files__edit_file", path="d/f.txt", patch="@@ -2 +2 @@\n-2\n+3\n"))[
            1] is False  # fmt: skip
        assert (tmp_path / "d" / "f.txt").read_text() == "1\n3\n"
        text, err = await run("shell__run", command="cat d/f.txt; exit 4")
        assert not err and text.startswith("exit code 4") and "1\n3" in text
        text, err = await run("shell__run", command="sleep 5", timeout=0.3)
        assert "timed out" in text
        text, err = await run("python__run_python", code="print(6 * 7)")
        assert "42" in text
        text, err = await run("files__read_file", path="missing.txt")
        assert err and "FileNotFoundError" in text
        text, err = await run("files__edit_file", path="d/f.txt", patch="@@ -1 +1 @@\n-9\n+8\n")
        assert err and "does not apply" in text
        text, err = await run("nope__tool")
        assert err and "unknown tool" in text
