"""``ironclaw token``: bearer tokens for the API (create, ls, revoke).

Tokens are stored hashed in the local registry, so these commands work on the machine
that runs ``ironclaw serve``; the token itself is printed once, when created.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from ironclaw.cli.common import new_app, out_console, run
from ironclaw.cli.options import JsonOpt

__all__ = ["token_app"]

token_app = new_app("API tokens: create, ls, revoke.")


@token_app.command("create")
def token_create(
    scope: Annotated[
        list[str], typer.Option("--scope", help="read, write, approve or admin (repeat).")
    ],
    name: Annotated[str, typer.Option("--name", help="A label for the token.")] = "",
    max_sandboxes: Annotated[
        int | None, typer.Option("--max-sandboxes", help="Sandboxes it may own at once.")
    ] = None,
    max_memory: Annotated[
        int | None, typer.Option("--max-memory", help="MiB of sandbox memory it may hold.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print it (once: only its hash is kept)."""
    from ironclaw.api.auth import create_token
    from ironclaw.config import Settings
    from ironclaw.resources.store import Store

    async def main() -> None:
        settings = Settings.from_env()
        settings.ensure()
        async with Store(settings.registry_path) as store:
            token, row = await create_token(
                store, scope, name=name, max_sandboxes=max_sandboxes, max_memory_mib=max_memory
            )
        if as_json:
            print(
                json.dumps(
                    {"id": row.id, "name": row.name, "scopes": list(row.scopes), "token": token}
                )
            )
        else:
            print(token)

    run(main(), as_json)


@token_app.command("ls")
def token_ls(as_json: JsonOpt = False) -> None:
    """List tokens (ids, scopes, quotas; never the secrets)."""
    from ironclaw.config import Settings
    from ironclaw.resources.store import Store

    async def main() -> None:
        settings = Settings.from_env()
        settings.ensure()
        async with Store(settings.registry_path) as store:
            rows = await store.tokens()
        if as_json:
            print(
                json.dumps(
                    {
                        "tokens": [
                            {
                                "id": r.id,
                                "name": r.name,
                                "scopes": list(r.scopes),
                                "max_sandboxes": r.max_sandboxes,
                                "max_memory_mib": r.max_memory_mib,
                                "revoked": r.revoked_at is not None,
                            }
                            for r in rows
                        ]
                    }
                )
            )
            return
        table = Table("ID", "NAME", "SCOPES", "MAX SANDBOXES", "MAX MEMORY", "REVOKED")
        for r in rows:
            table.add_row(
                r.id,
                r.name,
                ",".join(r.scopes),
                str(r.max_sandboxes or "-"),
                str(r.max_memory_mib or "-"),
                "yes" if r.revoked_at else "",
            )
        out_console.print(table)

    run(main(), as_json)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="The token's id.")]) -> None:
    """Revoke a token at once (the server checks the registry on every request)."""
    from ironclaw.config import Settings
    from ironclaw.errors import ConfigError
    from ironclaw.resources.store import Store

    async def main() -> None:
        settings = Settings.from_env()
        settings.ensure()
        async with Store(settings.registry_path) as store:
            if not await store.revoke_token(token_id):
                raise ConfigError(f"no live token {token_id!r}; `ironclaw token ls` lists them")
        out_console.print(f"revoked {token_id}")

    run(main())
