"""``ironclaw mcp``: serve sandboxes as MCP tools (see docs/MCP.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from ironclaw.cli.common import fail, run
from ironclaw.errors import ConfigError

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("mcp")
    def mcp_cmd(
        transport: Annotated[
            str, typer.Option("--transport", help="stdio (default) or http (streamable HTTP).")
        ] = "stdio",
        host: Annotated[str, typer.Option("--host", help="HTTP: address to listen on.")] = (
            "127.0.0.1"
        ),
        port: Annotated[
            int, typer.Option("--port", min=0, max=65535, help="HTTP: port (0: any free one).")
        ] = 8765,
        keep: Annotated[
            bool, typer.Option("--keep", help="Keep the sandboxes it made when it stops.")
        ] = False,
    ) -> None:
        """Serve sandboxes as MCP tools for Claude Desktop/Code and other MCP clients.

        Tools create a sandbox, run commands, read and write files, destroy it, and run
        agent tasks (RED calls refused: nobody is asked). The sandboxes it made are
        removed when it stops unless --keep.
        """
        from ironclaw.mcp_server import serve_http, serve_stdio

        if transport == "stdio":
            run(serve_stdio(keep=keep))
        elif transport == "http":
            run(serve_http(host=host, port=port, keep=keep))
        else:
            raise typer.Exit(
                fail(ConfigError(f"--transport {transport!r}: use stdio or http"), False)
            )
