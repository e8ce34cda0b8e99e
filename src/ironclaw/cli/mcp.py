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
        host: Annotated[
            str, typer.Option("--host", help="HTTP: loopback address to listen on.")
        ] = "127.0.0.1",
        port: Annotated[
            int, typer.Option("--port", min=0, max=65535, help="HTTP: port (0: any free one).")
        ] = 8765,
        keep: Annotated[
            bool, typer.Option("--keep", help="Keep the sandboxes it made when it stops.")
        ] = False,
        api: Annotated[
            str | None,
            typer.Option(
                "--api",
                envvar="IRONCLAW_API_URL",
                help="Work through `ironclaw serve` at this URL (token: IRONCLAW_API_TOKEN).",
            ),
        ] = None,
    ) -> None:
        """Serve sandboxes as MCP tools for Claude Desktop/Code and other MCP clients.

        Tools create a sandbox, run commands, read and write files, destroy it, and run
        agent tasks (RED calls refused: nobody is asked). The sandboxes it made are
        removed when it stops unless --keep. Only the sandboxes it made are reachable.
        """
        from ironclaw.mcp_server import Backend, LocalBackend, serve_http, serve_stdio

        if transport not in ("stdio", "http"):
            raise typer.Exit(
                fail(ConfigError(f"--transport {transport!r}: use stdio or http"), False)
            )
        backend: Backend
        if api:
            from ironclaw.mcp_server import RemoteBackend

            try:
                backend = RemoteBackend(api, keep=keep)
            except ConfigError as exc:
                raise typer.Exit(fail(exc, False)) from None
        else:
            backend = LocalBackend(keep=keep)
        if transport == "stdio":
            run(serve_stdio(backend))
        else:
            run(serve_http(backend, host=host, port=port))
