"""``ironclaw sandbox run -d / ps / attach / kill / port`` and the terminal of ``exec -t``.

Each command is its own short-lived process: the guest keeps detached commands and their
output, so ``attach`` from a new shell replays what the command printed and follows it.
With ``--api URL`` they go through ``ironclaw serve`` (:mod:`ironclaw.cli.remote_procs`).
"""

from __future__ import annotations

import json
import os
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from ironclaw.cli.common import copy_out, exit_status, print_procs, run, run_code
from ironclaw.cli.options import CwdOpt, EnvOpt, JsonOpt, SandboxIdArg, parse_env
from ironclaw.cli.sandbox import CommandArg, sandbox_app
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.host.processes import ProcessHandle

__all__ = ["run_tty"]

TargetArg = Annotated[str, typer.Argument(help="The command's pid or tag.")]


def _api() -> bool:
    """Whether ``--api`` (``IRONCLAW_API_URL``) sends these commands to ``ironclaw serve``."""
    return bool(os.environ.get("IRONCLAW_API_URL"))


@sandbox_app.command("run", context_settings={"allow_interspersed_args": False})
def sandbox_run(
    sandbox_id: SandboxIdArg,
    command: CommandArg,
    detach: Annotated[bool, typer.Option("-d", "--detach", help="Start and return.")] = False,
    tag: Annotated[str | None, typer.Option("--tag", help="A name to find it by.")] = None,
    env: EnvOpt = None,
    cwd: CwdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a command that outlives this CLI (-d), or start it and stay attached."""
    from ironclaw.host import processes
    from ironclaw.host.manager import SandboxManager
    from ironclaw.proto.methods import to_json

    async def main() -> int:
        argv = command[1:] if command and command[0] == "--" else command
        if _api():
            from ironclaw.cli import remote_procs

            return await remote_procs.run(
                sandbox_id, argv, detach=detach, tag=tag, env=parse_env(env) or None, cwd=cwd,
                as_json=as_json,
            )  # fmt: skip
        async with SandboxManager() as manager:
            guest = await manager.guest(sandbox_id)
            handle = await processes.start_process(
                guest, argv, tag=tag, env=parse_env(env) or None, cwd=cwd
            )
            if as_json:
                print(json.dumps(to_json(handle.info)))
            elif detach:
                print(handle.pid)
            if detach:
                return 0
            return await _follow(handle)

    run_code(main(), as_json)


async def _follow(handle: ProcessHandle) -> int:
    await copy_out(handle.output())
    return exit_status((await handle.wait()).exit_code)


@sandbox_app.command("ps")
def sandbox_ps(sandbox_id: SandboxIdArg, as_json: JsonOpt = False) -> None:
    """List the sandbox's detached commands (running and recently ended)."""
    from ironclaw.host import processes
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        if _api():
            from ironclaw.cli import remote_procs

            return await remote_procs.ps(sandbox_id, as_json=as_json)
        async with SandboxManager() as manager:
            infos = await processes.list_processes(await manager.guest(sandbox_id))
        print_procs(infos, as_json)

    run(main(), as_json)


@sandbox_app.command("attach")
def sandbox_attach(
    sandbox_id: SandboxIdArg,
    target: TargetArg,
    no_replay: Annotated[bool, typer.Option("--no-replay", help="Live output only.")] = False,
) -> None:
    """Print what a detached command printed so far, then follow it until it ends."""
    from ironclaw.host import processes
    from ironclaw.host.manager import SandboxManager

    async def main() -> int:
        if _api():
            from ironclaw.cli import remote_procs

            return await remote_procs.attach(sandbox_id, target, replay=not no_replay)
        async with SandboxManager() as manager:
            handle = await processes.connect_process(await manager.guest(sandbox_id), target)
            await copy_out(handle.output(replay=not no_replay))
            return exit_status((await handle.wait()).exit_code)

    run_code(main())


@sandbox_app.command("kill")
def sandbox_kill(
    sandbox_id: SandboxIdArg,
    target: TargetArg,
    sig: Annotated[str, typer.Option("--signal", "-s", help="Name or number.")] = "KILL",
    as_json: JsonOpt = False,
) -> None:
    """Signal a detached command and everything in its process group."""
    from ironclaw.host import processes
    from ironclaw.host.manager import SandboxManager
    from ironclaw.proto.methods import to_json

    async def main() -> None:
        signum = _signum(sig)
        if _api():
            from ironclaw.cli import remote_procs

            return await remote_procs.kill(sandbox_id, target, signum, as_json=as_json)
        async with SandboxManager() as manager:
            handle = await processes.connect_process(await manager.guest(sandbox_id), target)
            await handle.kill(signum)
            info = await handle.wait(timeout=5.0)
        if as_json:
            print(json.dumps(to_json(info)))

    run(main(), as_json)


def _signum(sig: str) -> int:
    if sig.isdigit() and 0 < int(sig) <= 64:
        return int(sig)
    name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ConfigError(f"unknown signal {sig!r}: give a name (TERM) or number (15)") from None


async def run_tty(
    manager: object, sandbox_id: str, argv: list[str], env: dict[str, str] | None, cwd: str | None
) -> int:
    """An interactive terminal: raw mode here, a PTY there, window size followed."""
    from ironclaw.cli.terminal import raw_terminal, terminal_size
    from ironclaw.host import processes
    from ironclaw.host.manager import SandboxManager

    assert isinstance(manager, SandboxManager)
    cols, rows = terminal_size()
    guest = await manager.guest(sandbox_id)
    handle = await processes.start_process(guest, argv, env=env, cwd=cwd, pty=(cols, rows))
    async with raw_terminal(handle.resize, handle.stdin_from):
        await copy_out(handle.output())
    return exit_status((await handle.wait()).exit_code)


@sandbox_app.command("port")
def sandbox_port(
    sandbox_id: SandboxIdArg,
    port: Annotated[int | None, typer.Argument(help="The port inside the sandbox.")] = None,
    host: Annotated[str, typer.Option("--host", help="Host address to listen on.")] = "127.0.0.1",
    host_port: Annotated[int, typer.Option("--host-port", help="0: any free port.")] = 0,
    remove: Annotated[bool, typer.Option("--rm", help="Stop exposing PORT.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Expose PORT on the host and print its URL (--rm: stop; no PORT: list)."""
    from ironclaw.host import ports
    from ironclaw.host.manager import SandboxManager

    async def main() -> None:
        if _api():
            from ironclaw.cli import remote_procs

            return await remote_procs.port(
                sandbox_id, port, host=host, host_port=host_port, remove=remove, as_json=as_json
            )
        async with SandboxManager() as manager:
            if port is None:
                listed = await ports.list_ports(manager, sandbox_id)
                if as_json:
                    print(json.dumps({"ports": [p.to_json() for p in listed]}))
                for p in [] if as_json else listed:
                    print(f"{p.port}\t{p.url}")
            elif remove:
                await ports.unexpose(manager, sandbox_id, port)
            else:
                exposed = await ports.expose(
                    manager, sandbox_id, port, host=host, host_port=host_port
                )
                print(json.dumps(exposed.to_json()) if as_json else exposed.url)

    run(main(), as_json)
