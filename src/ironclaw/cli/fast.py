"""The ``ironclaw`` entry point, with a fast path for a plain one-shot ``ironclaw exec``.

Building the typer app imports typer, click and rich (over 100 ms), which a one-shot
``ironclaw exec -- CMD`` pays on every run although it needs none of them. So the entry
point looks at argv first: ``exec`` with only ``--json``, ``--timeout S`` and ``--id ID``
before the command runs here; anything else (``--help``, other options, a malformed
value, another command) goes to the full app, so help and errors stay exactly the app's.

Such a one-shot runs *directly* (:mod:`ironclaw.cli.oneshot`): the same jail, with the
command as its process instead of the guest agent, and no event loop, manager or RPC.
What that path cannot answer exactly as the agent path would (a warm pool to take from,
an unusual ``--timeout``) comes back here and runs as the typer command does
(:func:`ironclaw.cli.main.exec_cmd`): :func:`run_exec`, through the manager and the
agent. ``IRONCLAW_ONESHOT=agent`` always takes that way. This module imports nothing
outside the standard library at load time, and neither path imports pydantic (the
default spec is :mod:`ironclaw.spec_light`'s record) nor anything it does not use; the
direct one imports no asyncio either.
"""

from __future__ import annotations

import os
import sys
import time

#: ``IRONCLAW_TIMING=1``: the one-shot prints where its wall-clock time went (ms since this
#: module loaded, per step) as one JSON line on stderr; ``benchmarks/oneshot.py`` reads it.
_MARKS: list[tuple[str, float]] | None = (
    [("loaded", time.perf_counter())] if os.environ.get("IRONCLAW_TIMING") else None
)

#: ``IRONCLAW_ONESHOT=agent`` sends every one-shot through the manager and the agent.
MODE_ENV = "IRONCLAW_ONESHOT"

#: The status of a one-shot whose output reader went away (``| head``): what a shell
#: reports for a command killed by SIGPIPE, as ``yes | head`` gives.
EXIT_PIPE = 141

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ironclaw.spec import SandboxSpec
    from ironclaw.spec_light import LightSpec

__all__ = ["EXIT_PIPE", "MODE_ENV", "main", "parse_exec"]


def _mark(step: str) -> None:
    if _MARKS is not None:
        _MARKS.append((step, time.perf_counter()))


def _report_marks() -> None:
    """One JSON line on stderr: each step's duration in ms, in order, and the total."""
    if _MARKS is None:
        return
    import contextlib
    import json

    start, prev = _MARKS[0][1], _MARKS[0][1]
    doc: dict[str, float] = {}
    for step, at in _MARKS[1:]:
        doc[step] = round((at - prev) * 1000, 2)
        prev = at
    doc["total"] = round((prev - start) * 1000, 2)
    with contextlib.suppress(OSError):
        os.write(2, f"ironclaw-timing: {json.dumps(doc)}\n".encode())


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


class _Output:
    """The one-shot's stdout and stderr sinks. When a reader goes away (EPIPE: ``| head``
    has read enough) the command is stopped as SIGPIPE would stop a local one: the run is
    cancelled (the sandbox is then destroyed as on Ctrl-C), later output is dropped, and
    the CLI exits :data:`EXIT_PIPE` without a traceback."""

    def __init__(self) -> None:
        self.gone = False
        self._stop: Callable[[], object] | None = None

    def stop_with(self, stop: Callable[[], object]) -> None:
        self._stop = stop

    def reader_gone(self) -> None:
        if not self.gone:
            self.gone = True
            if self._stop is not None:
                self._stop()

    def writer(self, fd: int) -> Callable[[bytes], Awaitable[None]]:
        import asyncio

        def write_all(data: bytes) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        async def write(chunk: bytes) -> None:
            if self.gone:
                return
            try:
                await asyncio.get_running_loop().run_in_executor(None, write_all, chunk)
            except BrokenPipeError:
                self.reader_gone()

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

    _mark("imports")
    command = args.command
    output = _Output()

    async def run() -> int:
        spec = default_spec()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with SandboxManager() as manager:
            _mark("open")
            # A SandboxSpec to mypy: see ironclaw.host.manager._parse.
            as_spec = cast("SandboxSpec", spec)
            record = await manager.create(as_spec, sandbox_id=args.sandbox_id, one_shot=True)
            _mark("create")
            task = asyncio.current_task()
            assert task is not None
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, task.cancel)
            output.stop_with(task.cancel)
            try:
                if args.as_json:
                    result = await manager.exec(record.id, command, timeout=args.timeout)
                else:
                    result = await manager.exec(
                        record.id,
                        command,
                        timeout=args.timeout,
                        on_stdout=output.writer(1),
                        on_stderr=output.writer(2),
                        capture=False,
                    )
                    if result.status != "exited":
                        sys.stderr.write(f"ironclaw: {result.status}\n")
            finally:
                _mark("exec")
                await asyncio.shield(manager.destroy(record.id))
                _mark("destroy")
        _mark("close")
        if args.as_json:
            doc = result.to_json("namespace")
            doc["total_ms"] = round((loop.time() - started) * 1000, 3)
            try:
                print(json.dumps(doc), flush=True)
            except BrokenPipeError:
                output.reader_gone()
        return EXIT_PIPE if output.gone else result.exit_code

    try:
        return asyncio.run(run())
    except IronclawError as exc:
        from ironclaw.cli.common import fail  # rich, but only to report an error

        return fail(exc, args.as_json)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return EXIT_PIPE if output.gone else 130


def _exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (joining idle worker threads, freeing every
    module: some 40 ms here). Only once the sandbox is destroyed, the registry closed and
    the output flushed: nothing is left for that teardown to do."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader left: as a SIGPIPE'd command, quietly
        code = code or EXIT_PIPE
    except OSError:  # another write error: what Python's own exit reports as status 120
        code = code or 120
    _mark("exit")
    _report_marks()
    os._exit(code)


def main() -> None:
    """``ironclaw``: the fast path when it applies, else the full typer app."""
    argv = sys.argv[1:]
    # Through a service (IRONCLAW_API_URL) every command goes the full app's remote way.
    if argv[:1] == ["exec"] and not os.environ.get("IRONCLAW_API_URL"):
        parsed = parse_exec(argv[1:])
        if parsed is not None:
            sys.stdout.flush()
            code = None
            if os.environ.get(MODE_ENV) != "agent":
                from ironclaw.cli.oneshot import run as run_direct

                code = run_direct(parsed, _mark)
            _exit_now(run_exec(parsed) if code is None else code)
    from ironclaw.cli.main import main as full_main

    full_main()
