"""MCP server ``files``: read, write, list, and edit files with a unified diff."""

from __future__ import annotations

import json
import os
import stat

from mcp.server.mcpserver import MCPServer

from ironclaw.mcp_servers._common import MAX_OUTPUT, resolve, tool_errors
from ironclaw.mcp_servers.patch import apply_patch

__all__ = ["main", "server"]

server: MCPServer = MCPServer("ironclaw-files", instructions="Files in /workspace.")


def _write_atomic(path: str, data: str) -> int:
    """Write through a temporary name so a reader never sees half a file."""
    tmp = f"{path}.ironclaw-tmp"
    raw = data.encode()
    with open(tmp, "wb") as f:
        f.write(raw)
    os.replace(tmp, path)
    return len(raw)


@server.tool()
def read_file(path: str) -> str:
    """Return the text of PATH (relative to the workspace)."""
    with tool_errors():
        p = resolve(path)
        data = p.read_bytes()
        text = data[:MAX_OUTPUT].decode(errors="replace")
        if len(data) > MAX_OUTPUT:
            text += f"\n[... {len(data) - MAX_OUTPUT} more bytes cut]"
        return text


@server.tool()
def write_file(path: str, content: str) -> str:
    """Create or replace PATH with CONTENT; parent directories are created."""
    with tool_errors():
        p = resolve(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        n = _write_atomic(str(p), content)
        return f"wrote {n} bytes to {p}"


@server.tool()
def list_dir(path: str = ".") -> str:
    """List PATH: one JSON object per entry (name, type, size)."""
    with tool_errors():
        p = resolve(path)
        rows = []
        with os.scandir(p) as it:
            for e in sorted(it, key=lambda e: e.name):
                st = e.stat(follow_symlinks=False)
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
                if stat.S_ISLNK(st.st_mode):
                    kind = "symlink"
                rows.append(json.dumps({"name": e.name, "type": kind, "size": st.st_size}))
        return "\n".join(rows) if rows else "(empty)"


@server.tool()
def edit_file(path: str, patch: str) -> str:
    """Apply a unified diff (``@@ -a,b +c,d @@`` hunks) to PATH; fails if it does not apply."""
    with tool_errors():
        p = resolve(path)
        old = p.read_text()
        new = apply_patch(old, patch)
        _write_atomic(str(p), new)
        return f"patched {p} ({len(old.splitlines())} -> {len(new.splitlines())} lines)"


@server.tool()
def delete_file(path: str) -> str:
    """Remove the file PATH."""
    with tool_errors():
        p = resolve(path)
        p.unlink()
        return f"deleted {p}"


def main() -> None:
    server.run("stdio")


if __name__ == "__main__":
    main()
