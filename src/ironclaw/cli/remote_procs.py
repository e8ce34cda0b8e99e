"""``sandbox run -d / ps / attach / kill / port`` and ``exec -t`` through ``ironclaw serve``
(``--api URL``): the same output as the in-process commands, over the remote SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ironclaw.cli.common import out_console
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.client import ApiClient
    from ironclaw.client.procs import RemoteCommands

__all__ = ["attach", "kill", "port", "ps", "run", "tty"]


def _commands(api: ApiClient, sandbox_id: str) -> RemoteCommands:
    from ironclaw.client.procs import RemoteCommands

    return RemoteCommands(api, sandbox_id)


def _client() -> ApiClient:
    from ironclaw.client import ApiClient

    return ApiClient()


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _status(code: int | None) -> int:
    return 0 if code is None else int(code)


def _json(info: Any) -> str:
    from ironclaw.proto.methods import to_json

    return json.dumps(to_json(info))


async def run(
    sandbox_id: str,
    argv: list[str],
    *,
    detach: bool,
    tag: str | None,
    env: dict[str, str] | None,
    cwd: str | None,
    as_json: bool,
) -> int:
    async with _client() as api:
        handle = await _commands(api, sandbox_id).start(argv, tag=tag, env=env, cwd=cwd)
        if as_json:
            print(_json(handle.info))
        elif detach:
            print(handle.pid)
        if detach:
            return 0
        async for chunk in handle.output():
            await asyncio.to_thread(_write, 1, chunk)
        return _status((await handle.wait()).exit_code)


async def ps(sandbox_id: str, *, as_json: bool) -> None:
    from rich.table import Table

    from ironclaw.agent.render import literal
    from ironclaw.proto.methods import to_json

    async with _client() as api:
        infos = await _commands(api, sandbox_id).list()
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


async def attach(sandbox_id: str, target: str, *, replay: bool) -> int:
    async with _client() as api:
        handle = await _commands(api, sandbox_id).connect(target)
        async for chunk in handle.output(replay=replay):
            await asyncio.to_thread(_write, 1, chunk)
        return _status(handle.info.exit_code)


async def kill(sandbox_id: str, target: str, signum: int, *, as_json: bool) -> None:
    async with _client() as api:
        handle = await _commands(api, sandbox_id).connect(target)
        await handle.kill(signum)
        info = await handle.wait(timeout=5.0)
    if as_json:
        print(_json(info))


async def port(
    sandbox_id: str, number: int | None, *, host: str, host_port: int, remove: bool, as_json: bool
) -> None:
    from dataclasses import asdict

    from ironclaw.client.procs import RemotePorts

    async with _client() as api:
        ports = RemotePorts(api, sandbox_id)
        if number is None:
            listed = await ports.list()
            if as_json:
                print(json.dumps({"ports": [asdict(p) for p in listed]}))
            for p in [] if as_json else listed:
                print(f"{p.port}\t{p.url}")
        elif remove:
            await ports.unexpose(number)
        else:
            url = await ports.expose(number, host=host, host_port=host_port)
            if as_json:
                made = next(p for p in await ports.list() if p.port == number)
                print(json.dumps(asdict(made)))
            else:
                print(url)


async def tty(sandbox_id: str, argv: list[str], env: dict[str, str] | None, cwd: str | None) -> int:
    """An interactive terminal over the API's PTY WebSocket: raw mode here, window size
    followed, the command's exit status returned."""
    import termios
    import tty as tty_mode

    from ironclaw.client.procs import RemotePty

    if not os.isatty(0):
        raise ConfigError("-t needs a terminal on stdin: run it from a shell, or drop -t")
    cols, rows = os.get_terminal_size(0)
    loop = asyncio.get_running_loop()
    async with _client() as api:
        term = await RemotePty(api, sandbox_id).create(cols, rows, argv=argv or None, env=env,
                                                       cwd=cwd)  # fmt: skip
        saved = termios.tcgetattr(0)
        pending: set[asyncio.Task[None]] = set()

        def on_winch() -> None:
            size = os.get_terminal_size(0)
            task = loop.create_task(term.resize(size.columns, size.lines))
            pending.add(task)
            task.add_done_callback(pending.discard)

        keys: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

        async def send_keys() -> None:  # one sender: keys go out in the order typed
            while True:
                await term.send(await keys.get())

        def on_key() -> None:
            if not keys.full():
                keys.put_nowait(os.read(0, 4096))

        tty_mode.setraw(0, termios.TCSANOW)  # not TCSAFLUSH: keys typed ahead are kept
        loop.add_signal_handler(signal.SIGWINCH, on_winch)
        loop.add_reader(0, on_key)
        sender = asyncio.ensure_future(send_keys())
        try:
            async for chunk in term.output():
                await asyncio.to_thread(_write, 1, chunk)
        finally:
            loop.remove_reader(0)
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            with contextlib.suppress(Exception):
                await term.close()
        sys.stdout.flush()
        return _status(term.info.exit_code)
