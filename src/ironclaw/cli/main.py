"""The ``ironclaw`` command: a thin layer over :class:`~ironclaw.host.manager.SandboxManager`.

No daemon is needed: every command opens the shared registry, does its work and exits;
long-lived sandboxes keep running and later commands find them by id. Errors are
IronClaw errors printed as one line that says what to change (exit status 2 for bad
input, 1 for everything else); ``--json`` output is exactly one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ironclaw.cli.agent import register as register_agent
from ironclaw.cli.image import register as register_image
from ironclaw.errors import ConfigError, IronclawError

T = TypeVar("T")

app = typer.Typer(
    name="ironclaw",
    help="Run untrusted code and AI agents in isolated sandboxes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
sandbox_app = typer.Typer(
    help="Long-lived sandboxes: create, ls, exec, cp, rm.", no_args_is_help=True
)
app.add_typer(sandbox_app, name="sandbox")
pool_app = typer.Typer(help="The warm pool: pre-created sandboxes.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

err_console = Console(stderr=True)
out_console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
MemoryOpt = Annotated[int | None, typer.Option("--memory", help="Memory limit in MiB.")]
PidsOpt = Annotated[int | None, typer.Option("--pids", help="Maximum number of processes.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPU quota (e.g. 0.5, 2).")]
WallOpt = Annotated[
    float | None, typer.Option("--wall-time", help="Sandbox lifetime limit in seconds.")
]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", help="Allow egress to CIDR[:PORT[/PROTO]] (repeatable)."),
]
AllowDomainOpt = Annotated[
    list[str] | None,
    typer.Option("--allow-domain", help="Allow NAME or *.SUFFIX through the proxy (repeatable)."),
]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")]
MountOpt = Annotated[
    list[str] | None, typer.Option("--mount", help="SRC:DST[:ro|rw] (repeatable; ro default).")
]
SeccompOpt = Annotated[
    str, typer.Option("--seccomp", help="Seccomp profile: strict, default or permissive.")
]
BackendOpt = Annotated[str, typer.Option("--backend", help="namespace, qemu or firecracker.")]
WorkspaceOpt = Annotated[
    int | None, typer.Option("--workspace-size", help="Workspace size limit in MiB.")
]


def _fail(exc: BaseException, as_json: bool) -> int:
    code = 2 if isinstance(exc, ConfigError) else 1
    if as_json:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
    return code


def _run(coro: Coroutine[Any, Any, T], as_json: bool = False) -> T:
    try:
        return asyncio.run(coro)
    except IronclawError as exc:
        raise typer.Exit(_fail(exc, as_json)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def build_spec(
    *,
    backend: str = "namespace",
    memory: int | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    wall_time: float | None = None,
    workspace_size: int | None = None,
    allow: list[str] | None = None,
    allow_domain: list[str] | None = None,
    env: list[str] | None = None,
    mount: list[str] | None = None,
    seccomp: str = "default",
) -> dict[str, Any]:
    """Turn command-line options into a spec dict (validated by the manager)."""
    from ironclaw.policy.network import AllowRule
    from ironclaw.spec import MountSpec

    limits: dict[str, Any] = {}
    for key, value in (
        ("memory_mib", memory),
        ("pids", pids),
        ("cpus", cpus),
        ("wall_time_s", wall_time),
        ("workspace_mib", workspace_size),
    ):
        if value is not None:
            limits[key] = value
    env_map: dict[str, str] = {}
    for item in env or []:
        if "=" not in item:
            raise ConfigError(f"--env {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        env_map[k] = v
    return {
        "backend": backend,
        "limits": limits,
        "env": env_map,
        "mounts": [MountSpec.parse(m).model_dump() for m in mount or []],
        "network": {
            "allow": [AllowRule.parse(a).model_dump(mode="json") for a in allow or []],
            "allow_domains": list(allow_domain or []),
        },
        "seccomp": seccomp,
    }


SPEC_OPTIONS = (
    "backend", "memory", "pids", "cpus", "wall_time", "workspace_size",
    "allow", "allow_domain", "env", "mount", "seccomp",
)  # fmt: skip


def spec_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The spec for a command whose parameters include the shared sandbox options."""
    return build_spec(**{name: options[name] for name in SPEC_OPTIONS})


async def _stream_to(fd: int) -> Callable[[bytes], Awaitable[None]]:
    loop = asyncio.get_running_loop()

    async def write(chunk: bytes) -> None:
        await loop.run_in_executor(None, _write_all, fd, chunk)

    return write


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- exec (one-shot) -------------------------------------------------------------------


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_cmd(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    as_json: JsonOpt = False,
    sandbox_id: Annotated[str | None, typer.Option("--id", help="Sandbox id to use.")] = None,
    backend: BackendOpt = "namespace",
    memory: MemoryOpt = None,
    pids: PidsOpt = None,
    cpus: CpusOpt = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Kill the command after this many seconds.")
    ] = None,
    wall_time: WallOpt = None,
    workspace_size: WorkspaceOpt = None,
    allow: AllowOpt = None,
    allow_domain: AllowDomainOpt = None,
    env: EnvOpt = None,
    mount: MountOpt = None,
    seccomp: SeccompOpt = "default",
) -> None:
    """Create a sandbox, run one command in it, destroy it. Exits with the command's status."""
    from ironclaw.host.manager import SandboxManager

    options = dict(locals())

    if command and command[0] == "--":
        command = command[1:]

    async def main() -> int:
        spec = spec_from_options(options)
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with SandboxManager() as manager:
            record = await manager.create(spec, sandbox_id=sandbox_id, one_shot=True)
            task = asyncio.current_task()
            assert task is not None
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)
            try:
                if as_json:
                    result = await manager.exec(record.id, command, timeout=timeout)
                else:
                    result = await manager.exec(
                        record.id,
                        command,
                        timeout=timeout,
                        on_stdout=await _stream_to(1),
                        on_stderr=await _stream_to(2),
                        capture=False,
                    )
            finally:
                await asyncio.shield(manager.destroy(record.id))
        total_ms = (loop.time() - started) * 1000
        if as_json:
            doc = result.to_json(backend)
            doc["total_ms"] = round(total_ms, 3)
            print(json.dumps(doc))
        elif result.status != "exited":
            err_console.print(f"[yellow]ironclaw:[/] {result.status}", highlight=False)
        return result.exit_code

    try:
        code = asyncio.run(main())
    except IronclawError as exc:
        raise typer.Exit(_fail(exc, as_json)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise typer.Exit(130) from None
    raise typer.Exit(code)


# -- sandbox ---------------------------------------------------------------------------


@sandbox_app.command("create")
def sandbox_create(
    sandbox_id: Annotated[str | None, typer.Option("--id", help="Sandbox id.")] = None,
    as_json: JsonOpt = False,
    backend: BackendOpt = "namespace",
    memory: MemoryOpt = None,
    pids: PidsOpt = None,
    cpus: CpusOpt = None,
    wall_time: WallOpt = None,
    workspace_size: WorkspaceOpt = None,
    allow: AllowOpt = None,
    allow_domain: AllowDomainOpt = None,
    env: EnvOpt = None,
    mount: MountOpt = None,
    seccomp: SeccompOpt = "default",
) -> None:
    """Create a long-lived sandbox and print its id."""
    from ironclaw.host.manager import SandboxManager

    options = dict(locals())

    async def main() -> None:
        spec = spec_from_options(options)
        async with SandboxManager() as manager:
            with err_console.status("creating sandbox…", spinner="dots"):
                record = await manager.create(spec, sandbox_id=sandbox_id)
        if as_json:
            print(json.dumps({"id": record.id, "backend": record.backend, "state": record.state}))
        else:
            print(record.id)

    _run(main(), as_json)


@sandbox_app.command("ls")
def sandbox_ls(as_json: JsonOpt = False) -> None:
    """List sandboxes and their state."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        async with SandboxManager() as manager:
            records = await manager.sandboxes()
        if as_json:
            print(
                json.dumps(
                    {
                        "sandboxes": [
                            {
                                "id": r.id,
                                "backend": r.backend,
                                "state": r.state,
                                "reason": r.reason,
                                "created_at": r.created_at,
                                "pid": r.info.get("pid"),
                            }
                            for r in records
                        ]
                    }
                )
            )
            return
        table = Table("ID", "BACKEND", "STATE", "PID", "REASON")
        for r in records:
            table.add_row(r.id, r.backend, r.state, str(r.info.get("pid", "")), r.reason or "")
        out_console.print(table)

    _run(main(), as_json)


@sandbox_app.command("exec", context_settings={"allow_interspersed_args": False})
def sandbox_exec(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.")],
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    as_json: JsonOpt = False,
    timeout: Annotated[float | None, typer.Option("--timeout")] = None,
    env: EnvOpt = None,
    cwd: Annotated[str | None, typer.Option("--cwd")] = None,
) -> None:
    """Run a command in a running sandbox. Exits with the command's status."""
    from ironclaw.host.manager import SandboxManager

    if command and command[0] == "--":
        command = command[1:]

    async def main() -> int:
        env_map = dict(build_spec(env=env)["env"])
        async with SandboxManager() as manager:
            record = await manager.get(sandbox_id)
            if as_json:
                result = await manager.exec(
                    sandbox_id, command, timeout=timeout, env=env_map or None, cwd=cwd
                )
                print(json.dumps(result.to_json(record.backend)))
            else:
                result = await manager.exec(
                    sandbox_id,
                    command,
                    timeout=timeout,
                    env=env_map or None,
                    cwd=cwd,
                    on_stdout=await _stream_to(1),
                    on_stderr=await _stream_to(2),
                    capture=False,
                )
                if result.status != "exited":
                    err_console.print(f"[yellow]ironclaw:[/] {result.status}", highlight=False)
        return result.exit_code

    raise typer.Exit(_run(main(), as_json))


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

    _run(main())


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
        async with SandboxManager() as manager:
            for sid in sandbox_ids:
                await manager.destroy(sid)
        if as_json:
            print(json.dumps({"removed": sandbox_ids}))

    _run(main(), as_json)


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
            err_console.print(f"[red]error:[/] {err}", highlight=False)
        if not (report.removed or report.orphans or report.errors):
            out_console.print("nothing to clean up")

    _run(main(), as_json)


@pool_app.command("fill")
def pool_fill(
    size: Annotated[int, typer.Option("--size", min=1, help="Ready sandboxes to keep.")] = 2,
    as_json: JsonOpt = False,
    backend: BackendOpt = "namespace",
    wall_time: WallOpt = None,
    workspace_size: WorkspaceOpt = None,
    env: EnvOpt = None,
    mount: MountOpt = None,
    seccomp: SeccompOpt = "default",
    network: Annotated[
        bool, typer.Option("--network", help="Pool sandboxes that will get egress rules.")
    ] = False,
) -> None:
    """Pre-create sandboxes so that later creates of the same template start warm."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        spec = build_spec(
            backend=backend,
            wall_time=wall_time,
            workspace_size=workspace_size,
            env=env,
            mount=mount,
            seccomp=seccomp,
            # Any allow rule gives the template a network; acquire replaces the rules.
            allow=["127.0.0.1/32:9/udp"] if network else None,
        )
        async with SandboxManager() as manager:
            with err_console.status(f"filling the pool to {size}…", spinner="dots"):
                made = await manager.fill_pool(spec, size=size)
            ready = await manager.warm(spec)
        if as_json:
            print(json.dumps({"created": made, "ready": ready}))
        else:
            out_console.print(f"created {made}; {ready} ready")

    _run(main(), as_json)


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

    raise typer.Exit(_run(main()))


register_agent(app)  # run, logs
register_image(app)  # image build, image ls


def main() -> None:
    app(prog_name="ironclaw")


if __name__ == "__main__":
    main()
