"""``ironclaw sandbox``: long-lived sandboxes (create, ls, exec, cp, rm), and the command
runner ``exec`` shares with it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ironclaw.cli import remote as via_api
from ironclaw.cli.common import err_console, new_app, out_console, run, run_code
from ironclaw.cli.options import (
    CommandTimeoutOpt,
    CwdOpt,
    DeadlineOpt,
    EnvOpt,
    JsonOpt,
    NewIdOpt,
    SandboxIdArg,
    SandboxOptions,
    parse_env,
    sandbox_options,
)
from ironclaw.cli.snapshot import (
    explicit_fields,
    parse_labels,
    register_sandbox_controls,
    snapshot_app,
)
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.host.manager import ExecResult, SandboxManager

__all__ = ["CommandArg", "run_command", "sandbox_app", "snapshot_app"]

sandbox_app = new_app(
    "Long-lived sandboxes: create, ls, exec, cp, rm, pause, resume, timeout, net."
)
register_sandbox_controls(sandbox_app)
LabelOpt = Annotated[
    list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE (repeatable).")
]

CommandArg = Annotated[list[str], typer.Argument(help="The command to run, after --.")]


async def run_command(
    manager: SandboxManager,
    sandbox_id: str,
    command: list[str],
    *,
    as_json: bool,
    timeout: float | None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ExecResult:
    """Run ``command``: captured for ``--json``, else streamed to this process's stdout and
    stderr, with a note on stderr when it did not simply exit."""
    return await via_api.run_with(
        manager.exec, manager.exec, sandbox_id, command, (as_json, timeout, env, cwd)
    )


@sandbox_app.command("create")
@sandbox_options(
    "backend", "memory", "pids", "cpus", "wall_time", "workspace_size",
    "allow", "allow_domain", "env", "mount", "seccomp",
)  # fmt: skip
def sandbox_create(
    *,
    sandbox_id: NewIdOpt = None,
    label: LabelOpt = None,
    timeout: DeadlineOpt = None,
    idle_timeout: Annotated[
        float | None, typer.Option("--idle-timeout", help="Seconds without exec/file calls.")
    ] = None,
    on_timeout: Annotated[str, typer.Option("--on-timeout", help="destroy or pause.")] = "destroy",
    from_snapshot: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Restore this snapshot, with its recorded spec; the options given here "
            "override it (not --backend): e.g. --label, --timeout, --allow, --env.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    opts: SandboxOptions,
) -> None:
    """Create a long-lived sandbox and print its id."""
    from ironclaw.host.manager import SandboxManager
    from ironclaw.spec import parse_spec

    async def main() -> None:
        spec = parse_spec(
            {
                **opts.spec().model_dump(mode="json"),
                "labels": parse_labels(label),
                "lifetime": {
                    "timeout_s": timeout,
                    "idle_timeout_s": idle_timeout,
                    "on_timeout": on_timeout,
                },
            }
        )
        if via_api.active():
            given = explicit_fields(spec) if from_snapshot is not None else None
            return await via_api.create(
                spec, sandbox_id, as_json=as_json, from_snapshot=from_snapshot, given=given
            )
        async with SandboxManager() as manager:
            with err_console.status("creating sandbox…", spinner="dots"):
                if from_snapshot is not None:
                    given = explicit_fields(spec)
                    record = await manager.restore(from_snapshot, spec=given, sandbox_id=sandbox_id)
                else:
                    record = await manager.create(spec, sandbox_id=sandbox_id)
        if as_json:
            print(json.dumps({"id": record.id, "backend": record.backend, "state": record.state}))
        else:
            print(record.id)

    run(main(), as_json)


@sandbox_app.command("ls")
def sandbox_ls(
    as_json: JsonOpt = False,
    label: LabelOpt = None,
    state: Annotated[str | None, typer.Option("--state", help="e.g. running, paused.")] = None,
) -> None:
    """List sandboxes and their state (filtered by label and state)."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        if via_api.active():
            return await via_api.ls(as_json=as_json)
        async with SandboxManager() as manager:
            records = await manager.select(labels=parse_labels(label), state=state)
        if as_json:
            rows = [
                {
                    "id": r.id,
                    "backend": r.backend,
                    "state": r.state,
                    "reason": r.reason,
                    "created_at": r.created_at,
                    "pid": r.info.get("pid"),
                    "labels": r.spec.get("labels") or {},
                }
                for r in records
            ]
            print(json.dumps({"sandboxes": rows}))
            return
        table = Table("ID", "BACKEND", "STATE", "PID", "REASON")
        for r in records:
            table.add_row(r.id, r.backend, r.state, str(r.info.get("pid", "")), r.reason or "")
        out_console.print(table)

    run(main(), as_json)


@sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})
def sandbox_exec(
    sandbox_id: SandboxIdArg,
    command: CommandArg,
    as_json: JsonOpt = False,
    timeout: CommandTimeoutOpt = None,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    tty: Annotated[bool, typer.Option("-t", "--tty", help="An interactive terminal.")] = False,
) -> None:
    """Run a command in a running sandbox. Exits with the command's status."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> int:
        env_map = parse_env(env)
        if via_api.active() and tty:
            from ironclaw.cli import remote_procs

            argv = command[1:] if command and command[0] == "--" else command
            return await remote_procs.tty(sandbox_id, argv, env_map or None, cwd)
        if via_api.active():
            return await via_api.exec_in(
                sandbox_id, command, as_json=as_json, timeout=timeout, env=env_map or None, cwd=cwd
            )
        async with SandboxManager() as manager:
            if tty:
                from ironclaw.cli.procs import run_tty

                argv = command[1:] if command and command[0] == "--" else command
                return await run_tty(manager, sandbox_id, argv, env_map or None, cwd)
            record = await manager.get(sandbox_id)
            result = await run_command(
                manager, sandbox_id, command, as_json=as_json, timeout=timeout,
                env=env_map or None, cwd=cwd,
            )  # fmt: skip
            if as_json:
                print(json.dumps(result.to_json(record.backend)))
        return result.exit_code

    run_code(main(), as_json)


@sandbox_app.command("cp")
def sandbox_cp(
    src: Annotated[str, typer.Argument(help="Source: a host path or ID:PATH.")],
    dst: Annotated[str, typer.Argument(help="Destination: a host path or ID:PATH.")],
) -> None:
    """Copy a file into (host → ID:PATH) or out of (ID:PATH → host) a sandbox."""
    from ironclaw.host.manager import SandboxManager
    from ironclaw.ids import ID_PATTERN

    def remote(spec: str) -> tuple[str, str] | None:
        head, sep, tail = spec.partition(":")
        if sep and ID_PATTERN.fullmatch(head) and not spec.startswith("/"):
            return head, tail
        return None

    async def main() -> None:
        rs, rd = remote(src), remote(dst)
        if (rs is None) == (rd is None):
            raise ConfigError("give exactly one side as ID:PATH (e.g. `cp ./a.py sb-x:a.py`)")
        if via_api.active():
            return await via_api.cp(rd, rs, src, dst)
        async with SandboxManager() as manager:
            if rd is not None:
                path = Path(src)
                if not path.is_file():
                    raise ConfigError(f"{src} is not a file")
                data = await asyncio.to_thread(path.read_bytes)
                await manager.write_file(rd[0], rd[1], data)
            else:
                assert rs is not None
                data = await manager.read_file(rs[0], rs[1])
                await asyncio.to_thread(Path(dst).write_bytes, data)

    run(main())


@sandbox_app.command("rm")
def sandbox_rm(
    sandbox_ids: Annotated[list[str], typer.Argument(help="Sandbox ids.")],
    as_json: JsonOpt = False,
) -> None:
    """Stop sandboxes and remove everything they had."""
    from ironclaw.host.manager import SandboxManager
    from ironclaw.ids import validate_sandbox_id

    async def main() -> None:
        for sid in sandbox_ids:
            validate_sandbox_id(sid)
        if via_api.active():
            return await via_api.rm(sandbox_ids, as_json=as_json)
        async with SandboxManager() as manager:
            for sid in sandbox_ids:
                await manager.destroy(sid)
        if as_json:
            print(json.dumps({"removed": sandbox_ids}))

    run(main(), as_json)
