"""What every ``ironclaw`` command shares: its apps, consoles and error reporting.

Errors are IronClaw errors printed as one line that says what to change (exit status 2
for bad input, 1 for everything else); with ``--json`` they are one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ironclaw.errors import ConfigError, IronclawError

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager
    from ironclaw.proto.proc_methods import ProcInfo

__all__ = [
    "copy_out",
    "err_console",
    "exit_status",
    "fail",
    "new_app",
    "out_console",
    "print_procs",
    "run",
    "run_code",
    "run_with_manager",
    "stream_to",
]

T = TypeVar("T")

err_console = Console(stderr=True)
out_console = Console()


def new_app(help_text: str, **kwargs: Any) -> typer.Typer:
    """A command group. Help is plain text, not Rich markup: option help such as
    ``CIDR[:PORT[/PROTO]]`` would otherwise be parsed as markup tags (and crash)."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(help=help_text, rich_markup_mode=None, **kwargs)


def fail(exc: BaseException, as_json: bool) -> int:
    """Report ``exc`` on stderr (or as JSON on stdout); return the exit status for it."""
    code = 2 if isinstance(exc, ConfigError) else 1
    if as_json:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    else:
        # Escaped: messages quote user input such as CIDR[:PORT[/tcp|udp]], not markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    return code


def run(coro: Coroutine[Any, Any, T], as_json: bool = False) -> T:
    """Run a command's coroutine; IronClaw errors and Ctrl-C become exit statuses."""
    try:
        return asyncio.run(coro)
    except IronclawError as exc:
        raise typer.Exit(fail(exc, as_json)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise typer.Exit(130) from None


def run_with_manager(step: Callable[[SandboxManager], Awaitable[T]], as_json: bool = False) -> T:
    """:func:`run` ``step`` with a manager opened for it (and closed before returning)."""
    from ironclaw.host.manager import SandboxManager

    async def main() -> T:
        async with SandboxManager() as manager:
            return await step(manager)

    return run(main(), as_json)


def run_code(coro: Coroutine[Any, Any, int], as_json: bool = False) -> None:
    """Run a command whose coroutine returns the process exit status, and exit with it."""
    raise typer.Exit(run(coro, as_json))


async def stream_to(fd: int) -> Callable[[bytes], Awaitable[None]]:
    """A writer of output chunks to ``fd`` that does not block the event loop."""
    loop = asyncio.get_running_loop()

    async def write(chunk: bytes) -> None:
        await loop.run_in_executor(None, _write_all, fd, chunk)

    return write


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def copy_out(chunks: AsyncIterable[bytes]) -> None:
    """Copy a command's output to our stdout as it comes, off the event loop."""
    async for chunk in chunks:
        await asyncio.to_thread(_write_all, 1, chunk)


def exit_status(code: int | None) -> int:
    """A command's exit code as ours: 0 while it has none (still running, or detached)."""
    return 0 if code is None else int(code)


def print_procs(infos: Sequence[ProcInfo], as_json: bool) -> None:
    """``sandbox ps``: one table (or JSON object) whether the list came in-process or remote."""
    import time

    from rich.table import Table

    from ironclaw.agent.render import literal
    from ironclaw.proto.methods import to_json

    if as_json:
        print(json.dumps({"procs": [to_json(i) for i in infos]}))
        return
    table = Table("PID", "TAG", "STATE", "AGE", "COMMAND")
    for i in infos:
        state = "running" if i.running else f"exited {i.exit_code}"
        age = f"{time.time() - i.started_at:.0f}s"
        cells = (i.tag or "", " ".join(i.argv)[:60])  # the guest's or a user's text
        tag, cmd = map(literal, cells)
        table.add_row(str(i.pid), tag, state, age, cmd)
    out_console.print(table)


def print_snapshots(snaps: Sequence[Mapping[str, Any]], as_json: bool) -> None:
    """``snapshot ls``: one table (or JSON object) whether the list came in-process or remote."""
    from rich.table import Table

    if as_json:
        rows = [{k: v for k, v in s.items() if k != "spec"} for s in snaps]
        print(json.dumps({"snapshots": rows}))
        return
    table = Table("NAME", "KIND", "SOURCE", "BACKEND", "SIZE", "SHA256")
    for s in snaps:
        table.add_row(
            s["name"], s["kind"], s["source"], s["backend"], str(s["size"]), s["sha256"][:16]
        )
    out_console.print(table)
