"""The ``ironclaw`` command: a thin layer over :class:`~ironclaw.host.manager.SandboxManager`.

No daemon is needed: every command opens the shared registry, does its work and exits;
long-lived sandboxes keep running and later commands find them by id. Errors are
IronClaw errors printed as one line that says what to change (exit status 2 for bad
input, 1 for everything else); ``--json`` output is exactly one JSON object.

The app is assembled here from the command modules, which import only
:mod:`ironclaw.cli.common` and :mod:`ironclaw.cli.options`, never this module.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ironclaw.cli import remote as via_api
from ironclaw.cli.agent import register as register_agent
from ironclaw.cli.common import err_console, new_app, out_console, run, run_code
from ironclaw.cli.image import register as register_image
from ironclaw.cli.mcp import register as register_mcp
from ironclaw.cli.options import (
    CommandTimeoutOpt,
    JsonOpt,
    NewIdOpt,
    SandboxOptions,
    sandbox_options,
)
from ironclaw.cli.procs import run_tty  # also registers sandbox run/ps/attach/kill
from ironclaw.cli.sandbox import CommandArg, run_command, sandbox_app, snapshot_app
from ironclaw.cli.serve import register as register_serve
from ironclaw.cli.token import token_app

__all__ = ["app", "main", "run_tty"]

app = new_app(
    "Run untrusted code and AI agents in isolated sandboxes.",
    name="ironclaw",
    add_completion=False,
    pretty_exceptions_enable=False,
)
pool_app = new_app("The warm pool: pre-created sandboxes.")


@app.callback()
def _global_options(
    api: Annotated[
        str | None,
        typer.Option(
            "--api",
            envvar="IRONCLAW_API_URL",
            metavar="URL",
            help="Run commands through `ironclaw serve` at URL (http://HOST:PORT or "
            "unix:PATH); the token is read from IRONCLAW_API_TOKEN.",
        ),
    ] = None,
) -> None:
    """Run untrusted code and AI agents in isolated sandboxes."""
    if api:
        os.environ["IRONCLAW_API_URL"] = api


# -- exec (one-shot) -------------------------------------------------------------------


@app.command("exec", context_settings={"allow_interspersed_args": False})
@sandbox_options(
    "backend", "memory", "pids", "cpus", "wall_time", "workspace_size",
    "allow", "allow_domain", "env", "mount", "seccomp",
)  # fmt: skip
def exec_cmd(
    command: CommandArg,
    *,
    as_json: JsonOpt = False,
    sandbox_id: NewIdOpt = None,
    timeout: CommandTimeoutOpt = None,
    opts: SandboxOptions,
) -> None:
    """Create a sandbox, run one command in it, destroy it. Exits with the command's status."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> int:
        spec = opts.spec()
        if via_api.active():
            return await via_api.exec_oneshot(
                spec, sandbox_id, command, as_json=as_json, timeout=timeout
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with SandboxManager() as manager:
            record = await manager.create(spec, sandbox_id=sandbox_id, one_shot=True)
            task = asyncio.current_task()
            assert task is not None
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)
            try:
                result = await run_command(
                    manager, record.id, command, as_json=as_json, timeout=timeout
                )
            finally:
                await asyncio.shield(manager.destroy(record.id))
        if as_json:
            doc = result.to_json(opts.backend)
            doc["total_ms"] = round((loop.time() - started) * 1000, 3)
            print(json.dumps(doc))
        return result.exit_code

    run_code(main(), as_json)


# -- lifecycle: gc, pool ---------------------------------------------------------------


@app.command("gc")
def gc_cmd(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; change nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove what crashed or dead sandboxes left behind (registry first, then a scan)."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        async with SandboxManager(reconcile_on_open=False) as manager:
            report = await manager.reconcile(dry_run=dry_run, scan=True)
        if as_json:
            print(json.dumps(report.to_json()))
            return
        verb = "would remove" if dry_run else "removed"
        for item in report.removed + report.orphans:
            out_console.print(f"{verb}: {item}", highlight=False)
        for err in report.errors:
            err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        if not (report.removed or report.orphans or report.errors):
            out_console.print("nothing to clean up")

    run(main(), as_json)


@pool_app.command("fill")
@sandbox_options("backend", "wall_time", "workspace_size", "env", "mount", "seccomp")
def pool_fill(
    *,
    size: Annotated[int, typer.Option("--size", min=1, help="Ready sandboxes to keep.")] = 2,
    as_json: JsonOpt = False,
    network: Annotated[
        bool, typer.Option("--network", help="Pool sandboxes that will get egress rules.")
    ] = False,
    opts: SandboxOptions,
) -> None:
    """Pre-create sandboxes so that later creates of the same template start warm."""
    from dataclasses import replace

    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        # Any allow rule gives the template a network; acquire replaces the rules.
        spec = replace(opts, allow=("127.0.0.1/32:9/udp",) if network else ()).spec()
        async with SandboxManager() as manager:
            with err_console.status(f"filling the pool to {size}…", spinner="dots"):
                made = await manager.fill_pool(spec, size=size)
            ready = await manager.warm(spec)
        if as_json:
            print(json.dumps({"created": made, "ready": ready}))
        else:
            out_console.print(f"created {made}; {ready} ready")

    run(main(), as_json)


# -- doctor, demo ----------------------------------------------------------------------


@app.command("doctor")
def doctor_cmd(as_json: JsonOpt = False) -> None:
    """Say what this host supports, and how to fix what is missing."""
    from ironclaw.host.doctor import run_checks

    checks = asyncio.run(run_checks())
    if as_json:
        print(json.dumps({"checks": [c.to_json() for c in checks]}))
    else:
        table = Table("CHECK", "OK", "DETAIL", "FIX")
        for c in checks:
            table.add_row(c.name, "[green]yes[/]" if c.ok else "[red]no[/]", c.detail, c.fix or "")
        out_console.print(table)
    required_ok = all(c.ok for c in checks if c.required)
    raise typer.Exit(0 if required_ok else 1)


@app.command("demo")
def demo_cmd() -> None:
    """Untrusted code in a sandbox, then a scripted agent task with its timeline."""
    from ironclaw.agent_demo import run_agent_demo
    from ironclaw.demo import run_demo

    async def main() -> int:
        first = await run_demo()
        second, _outcome = await run_agent_demo(out_console)
        return first or second

    run_code(main())


register_agent(app)  # run, logs
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(pool_app, name="pool")
register_image(app)  # image build, image ls
register_serve(app)  # serve
register_mcp(app)  # mcp
app.add_typer(token_app, name="token")


def main() -> None:
    app(prog_name="ironclaw")


if __name__ == "__main__":
    main()
