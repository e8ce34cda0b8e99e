"""``ironclaw serve``: the HTTP API (see docs/API.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ironclaw.cli.common import run

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[
            int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")
        ] = 8000,
        unix_socket: Annotated[
            Path | None, typer.Option("--socket", help="Also listen on this Unix socket.")
        ] = None,
        no_tcp: Annotated[
            bool, typer.Option("--no-tcp", help="Listen on the Unix socket only.")
        ] = False,
        log_level: Annotated[str, typer.Option("--log-level")] = "warning",
        max_upload: Annotated[
            int, typer.Option("--max-upload", min=1, help="Largest file upload, in MiB.")
        ] = 4096,
        max_creating: Annotated[
            int | None,
            typer.Option(
                "--max-creating",
                min=1,
                help="Sandboxes starting at once (default: 2 per CPU); others queue.",
            ),
        ] = None,
        cluster: Annotated[
            str | None,
            typer.Option(
                "--cluster",
                help="Run sandboxes on a Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                "(needs ironclaw[ray]; see docs/CLUSTER.md).",
            ),
        ] = None,
    ) -> None:
        """Serve the HTTP API (sandboxes, exec, files, agent tasks, approvals, metrics).

        Reconciles the registry at start; Ctrl-C shuts down gracefully and leaves
        sandboxes running. Clients need a token: `ironclaw token create`.
        """
        from ironclaw.api.server import serve

        run(
            serve(
                host=host,
                port=port,
                unix_socket=unix_socket,
                tcp=not no_tcp,
                log_level=log_level,
                max_upload_mib=max_upload,
                max_creating=max_creating,
                cluster=cluster,
            )
        )
