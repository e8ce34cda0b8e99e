"""MCP server ``python``: run a Python program with the sandbox's interpreter."""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

from ironclaw.mcp_servers._common import format_process, resolve, run_process, tool_errors

__all__ = ["main", "server"]

server: MCPServer = MCPServer("ironclaw-python", instructions="Run Python code in /workspace.")


@server.tool()
async def run_python(code: str, cwd: str = ".", timeout: float = 60.0) -> str:
    """Run CODE as a Python 3 program (fed on stdin) in CWD; returns exit code and output."""
    with tool_errors():
        rc, out, err, timed_out = await run_process(
            [sys.executable, "-I", "-"],
            cwd=resolve(cwd),
            timeout=max(0.1, timeout),
            stdin=code.encode(),
        )
        return format_process(rc, out, err, timed_out, timeout)


def main() -> None:
    server.run("stdio")


if __name__ == "__main__":
    main()
