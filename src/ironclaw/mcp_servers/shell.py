"""MCP server ``shell``: run a command line with /bin/sh in the workspace."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from ironclaw.mcp_servers._common import format_process, resolve, run_process, tool_errors

__all__ = ["main", "server"]

server: MCPServer = MCPServer("ironclaw-shell", instructions="Run shell commands in /workspace.")


@server.tool()
async def run(command: str, cwd: str = ".", timeout: float = 60.0) -> str:
    """Run COMMAND with /bin/sh -c in CWD (relative to the workspace): exit code and output."""
    with tool_errors():
        if not command.strip():
            raise ValueError("command is empty")
        rc, out, err, timed_out = await run_process(
            ["/bin/sh", "-c", command], cwd=resolve(cwd), timeout=max(0.1, timeout)
        )
        return format_process(rc, out, err, timed_out, timeout)


def main() -> None:
    server.run("stdio")


if __name__ == "__main__":
    main()
