"""``sandbox run -d / ps / attach / kill / port`` and ``exec -t`` through ``ironclaw serve``
(``--api URL``): the same output as the in-process commands, over the remote SDK."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ironclaw.cli.common import copy_out, exit_status, print_procs

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
        await copy_out(handle.output())
        return exit_status((await handle.wait()).exit_code)


async def ps(sandbox_id: str, *, as_json: bool) -> None:
    async with _client() as api:
        infos = await _commands(api, sandbox_id).list()
    print_procs(infos, as_json)


async def attach(sandbox_id: str, target: str, *, replay: bool) -> int:
    async with _client() as api:
        handle = await _commands(api, sandbox_id).connect(target)
        await copy_out(handle.output(replay=replay))
        return exit_status(handle.info.exit_code)


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
    from ironclaw.cli.terminal import raw_terminal, terminal_size
    from ironclaw.client.procs import RemotePty

    cols, rows = terminal_size()
    async with _client() as api:
        term = await RemotePty(api, sandbox_id).create(cols, rows, argv=argv or None, env=env,
                                                       cwd=cwd)  # fmt: skip

        async def send_keys(keys: AsyncIterator[bytes]) -> None:  # keys go out in order typed
            async for chunk in keys:
                await term.send(chunk)

        try:
            async with raw_terminal(term.resize, send_keys):
                await copy_out(term.output())
        finally:
            with contextlib.suppress(Exception):
                await term.close()
        return exit_status(term.info.exit_code)
