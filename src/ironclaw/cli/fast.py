"""The ``ironclaw`` entry point, with a fast path for a plain one-shot ``ironclaw exec``.

Building the typer app imports typer, click and rich (over 100 ms), which a one-shot
``ironclaw exec -- CMD`` pays on every run although it needs none of them. So the entry
point looks at argv first: ``exec`` with only ``--json``, ``--timeout S`` and ``--id ID``
before the command runs here, with the same code path as the typer command
(:func:`ironclaw.cli.main.exec_cmd`); anything else (``--help``, other options, a
malformed value, another command) goes to the full app, so help and errors stay exactly
the app's. This module imports nothing outside the standard library at load time, and
the path imports neither pydantic (the default spec is :mod:`ironclaw.spec_light`'s
record) nor anything the one-shot does not use.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ironclaw.spec import SandboxSpec
    from ironclaw.spec_light import LightSpec

__all__ = ["main", "parse_exec"]


class ExecArgs:
    __slots__ = ("as_json", "command", "sandbox_id", "timeout")

    def __init__(self) -> None:
        self.as_json = False
        self.sandbox_id: str | None = None
        self.timeout: float | None = None
        self.command: list[str] = []


def parse_exec(args: list[str]) -> ExecArgs | None:
    """``exec``'s arguments (after the word ``exec``) if the fast path can run them as typer
    would, else None (the full app then parses, and explains any error)."""
    out = ExecArgs()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--json":
            out.as_json = True
        elif arg in ("--timeout", "--id") and i + 1 < len(args):
            value = args[i + 1]
            i += 1
            if arg == "--id":
                if value.startswith("-"):
                    return None
                out.sandbox_id = value
            else:
                try:
                    out.timeout = float(value)
                except ValueError:
                    return None
        elif arg == "--":
            out.command = args[i + 1 :]
            break
        elif arg.startswith("-"):
            return None
        else:
            out.command = args[i:]
            break
        i += 1
    return out if out.command else None


def default_spec() -> LightSpec:
    """What ``SandboxOptions().spec()`` gives (the exec command with no sandbox options),
    as the pydantic-free record: building the model would import pydantic (~200 ms)."""
    from ironclaw.spec_light import DEFAULT_SPEC

    return DEFAULT_SPEC


def _writer(fd: int) -> Callable[[bytes], Awaitable[None]]:
    import asyncio
    import os

    def write_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    async def write(chunk: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(None, write_all, chunk)

    return write


def run_exec(args: ExecArgs) -> int:
    """The typer ``exec`` command's work, without typer or rich: the process exit status."""
    # A one-shot namespace sandbox without network uses no TLS in this process: asyncio
    # loads without ssl (OpenSSL is some milliseconds), which stays importable later.
    from ironclaw.guest.__main__ import import_asyncio_without_ssl

    import_asyncio_without_ssl()
    import asyncio
    import json
    import signal
    from typing import cast

    from ironclaw.errors import IronclawError
    from ironclaw.host.manager import SandboxManager

    command = args.command

    async def run() -> int:
        spec = default_spec()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with SandboxManager() as manager:
            # A SandboxSpec to mypy: see ironclaw.host.manager._parse.
            as_spec = cast("SandboxSpec", spec)
            record = await manager.create(as_spec, sandbox_id=args.sandbox_id, one_shot=True)
            task = asyncio.current_task()
            assert task is not None
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)
            try:
                if args.as_json:
                    result = await manager.exec(record.id, command, timeout=args.timeout)
                else:
                    result = await manager.exec(
                        record.id,
                        command,
                        timeout=args.timeout,
                        on_stdout=_writer(1),
                        on_stderr=_writer(2),
                        capture=False,
                    )
                    if result.status != "exited":
                        sys.stderr.write(f"ironclaw: {result.status}\n")
            finally:
                await asyncio.shield(manager.destroy(record.id))
        if args.as_json:
            doc = result.to_json("namespace")
            doc["total_ms"] = round((loop.time() - started) * 1000, 3)
            print(json.dumps(doc))
        return result.exit_code

    try:
        return asyncio.run(run())
    except IronclawError as exc:
        from ironclaw.cli.common import fail  # rich, but only to report an error

        return fail(exc, args.as_json)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (joining idle worker threads, freeing every
    module: some 40 ms here). Only once the sandbox is destroyed, the registry closed and
    the output flushed: nothing is left for that teardown to do."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe: what Python's own exit reports as status 120
        code = code or 120
    os._exit(code)


def main() -> None:
    """``ironclaw``: the fast path when it applies, else the full typer app."""
    argv = sys.argv[1:]
    # Through a service (IRONCLAW_API_URL) every command goes the full app's remote way.
    if argv[:1] == ["exec"] and not os.environ.get("IRONCLAW_API_URL"):
        parsed = parse_exec(argv[1:])
        if parsed is not None:
            sys.stdout.flush()
            _exit_now(run_exec(parsed))
    from ironclaw.cli.main import main as full_main

    full_main()
