"""The CLI's commands run through ``ironclaw serve`` when ``--api URL`` (or
``IRONCLAW_API_URL``) is given: the token comes from ``IRONCLAW_API_TOKEN``.

Routed: ``exec``, ``sandbox create/ls/exec/cp/rm``. Output streams as it is printed
(over the API's WebSocket), and ``cp`` streams files both ways.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from ironclaw.cli.common import err_console, out_console, stream_to
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.client import ApiClient, ExecResult
    from ironclaw.spec import SandboxSpec

__all__ = ["active", "cp", "create", "exec_in", "exec_oneshot", "ls", "rm"]

CHUNK = 1024 * 1024


def active() -> bool:
    """Whether commands go through the API (``--api`` sets the variable too)."""
    return bool(os.environ.get("IRONCLAW_API_URL"))


def _client() -> ApiClient:
    from ironclaw.client import ApiClient

    return ApiClient()


async def _run(
    api: ApiClient,
    sandbox_id: str,
    command: list[str],
    *,
    as_json: bool,
    timeout: float | None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> ExecResult:
    if command and command[0] == "--":
        command = command[1:]
    if as_json:
        return await api.exec(sandbox_id, command, timeout=timeout, env=env, cwd=cwd)
    result = await api.exec_stream(
        sandbox_id,
        command,
        timeout=timeout,
        env=env,
        cwd=cwd,
        on_stdout=await stream_to(1),
        on_stderr=await stream_to(2),
        capture=False,
    )
    if result.status != "exited":
        err_console.print(f"[yellow]ironclaw:[/] {result.status}", highlight=False)
    return result


def _dump(spec: SandboxSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")


async def exec_oneshot(
    spec: SandboxSpec,
    sandbox_id: str | None,
    command: list[str],
    *,
    as_json: bool,
    timeout: float | None,
) -> int:
    """Create, run, destroy (as ``ironclaw exec``), through the API."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with _client() as api:
        record = await api.create(_dump(spec), sandbox_id=sandbox_id)
        try:
            result = await _run(api, record["id"], command, as_json=as_json, timeout=timeout)
        finally:
            await asyncio.shield(api.delete(record["id"]))
    if as_json:
        doc = result.to_json(record["backend"])
        doc["total_ms"] = round((loop.time() - started) * 1000, 3)
        print(json.dumps(doc))
    return result.exit_code


async def create(spec: SandboxSpec, sandbox_id: str | None, *, as_json: bool) -> None:
    async with _client() as api:
        record = await api.create(_dump(spec), sandbox_id=sandbox_id)
    if as_json:
        print(json.dumps({k: record[k] for k in ("id", "backend", "state")}))
    else:
        print(record["id"])


async def ls(*, as_json: bool) -> None:
    async with _client() as api:
        records = await api.list_sandboxes()
    if as_json:
        rows = [
            {k: r.get(k) for k in ("id", "backend", "state", "reason", "created_at", "owner")}
            for r in records
        ]
        print(json.dumps({"sandboxes": rows}))
        return
    table = Table("ID", "BACKEND", "STATE", "OWNER", "REASON")
    for r in records:
        table.add_row(
            r["id"], r["backend"], r["state"], r.get("owner") or "", r.get("reason") or ""
        )
    out_console.print(table)


async def exec_in(
    sandbox_id: str,
    command: list[str],
    *,
    as_json: bool,
    timeout: float | None,
    env: dict[str, str] | None,
    cwd: str | None,
) -> int:
    async with _client() as api:
        record = await api.get(sandbox_id)
        result = await _run(
            api, sandbox_id, command, as_json=as_json, timeout=timeout, env=env, cwd=cwd
        )
    if as_json:
        print(json.dumps(result.to_json(record["backend"])))
    return result.exit_code


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def cp(
    to_sandbox: tuple[str, str] | None, from_sandbox: tuple[str, str] | None, src: str, dst: str
) -> None:
    """Stream a file into or out of a sandbox (never whole in memory)."""
    async with _client() as api:
        if to_sandbox is not None:
            path = Path(src)
            if not path.is_file():
                raise ConfigError(f"{src} is not a file")
            await api.write_file(to_sandbox[0], to_sandbox[1], _chunks(path))
            return
        assert from_sandbox is not None
        with Path(dst).open("wb") as f:

            async def sink(chunk: bytes) -> None:
                await asyncio.to_thread(f.write, chunk)

            await api.read_file(from_sandbox[0], from_sandbox[1], sink)


async def rm(sandbox_ids: list[str], *, as_json: bool) -> None:
    async with _client() as api:
        for sid in sandbox_ids:
            await api.delete(sid)
    if as_json:
        print(json.dumps({"removed": sandbox_ids}))
