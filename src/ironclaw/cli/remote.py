"""The CLI's commands run through ``ironclaw serve`` when ``--api URL`` (or
``IRONCLAW_API_URL``) is given: the token comes from ``IRONCLAW_API_TOKEN``.

Routed: ``exec``, ``sandbox create [--from]/ls/exec/cp/rm/pause/resume/timeout/net``,
``snapshot create/ls/rm`` and ``run``. Output streams as it is
printed (over the API's WebSocket), ``cp`` streams files both ways, and ``run`` follows
the task's trace (Server-Sent Events) and, when interactive, asks about each held RED
call and answers it through the API (the token then needs the ``approve`` scope).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from rich.panel import Panel
from rich.table import Table

from ironclaw.cli.common import err_console, out_console, print_snapshots, stream_to
from ironclaw.errors import ConfigError

if TYPE_CHECKING:
    from ironclaw.client import ApiClient, ExecResultLike
    from ironclaw.proto.jsonval import JsonObject
    from ironclaw.spec import SandboxSpec

__all__ = [
    "active",
    "control",
    "cp",
    "create",
    "exec_in",
    "exec_oneshot",
    "ls",
    "rm",
    "run_task",
    "snapshot_create",
    "snapshot_ls",
    "snapshot_rm",
]

CHUNK = 1024 * 1024


def active() -> bool:
    """Whether commands go through the API (``--api`` sets the variable too)."""
    return bool(os.environ.get("IRONCLAW_API_URL"))


def _client() -> ApiClient:
    from ironclaw.client import ApiClient

    return ApiClient()


R = TypeVar("R", bound="ExecResultLike")


async def run_with(
    capture: Callable[..., Awaitable[R]],
    stream: Callable[..., Awaitable[R]],
    sandbox_id: str,
    command: list[str],
    opts: tuple[bool, float | None, dict[str, str] | None, str | None],
) -> R:
    """Run ``command`` (a leading ``--`` dropped): through ``capture`` for ``--json``, else
    through ``stream`` to this process's stdout and stderr, with a note on stderr when it
    did not simply exit. ``opts`` is (as_json, timeout, env, cwd). One runner for the
    in-process manager and the API, which name their two ways of running differently."""
    as_json, timeout, env, cwd = opts
    if command and command[0] == "--":
        command = command[1:]
    if as_json:
        return await capture(sandbox_id, command, timeout=timeout, env=env, cwd=cwd)
    result = await stream(
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


def _dump(spec: SandboxSpec) -> JsonObject:
    doc: JsonObject = spec.model_dump(mode="json")
    return doc


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
            result = await run_with(
                api.exec, api.exec_stream, record["id"], command, (as_json, timeout, None, None)
            )
        finally:
            await asyncio.shield(api.delete(record["id"]))
    if as_json:
        doc = result.to_json(record["backend"])
        doc["total_ms"] = round((loop.time() - started) * 1000, 3)
        print(json.dumps(doc))
    return result.exit_code


async def create(
    spec: SandboxSpec,
    sandbox_id: str | None,
    *,
    as_json: bool,
    from_snapshot: str | None = None,
    given: JsonObject | None = None,
) -> None:
    """Create a sandbox, or restore ``from_snapshot`` with the fields ``given`` on top."""
    from ironclaw.client.controls import restore_doc

    async with _client() as api:
        if from_snapshot is not None:
            record = await restore_doc(api, from_snapshot, given, sandbox_id)
        else:
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


async def control(sandbox_id: str, action: str, body: JsonObject | None) -> JsonObject:
    """``sandbox pause|resume|timeout`` (POST) and ``net`` (PATCH) through the API; the
    JSON the local commands print."""
    from ironclaw.client.controls import sandbox_path

    async with _client() as api:
        method, tail = ("PATCH", "network") if action == "net" else ("POST", action)
        doc = await api.request_object(method, sandbox_path(sandbox_id, tail), json=body)
    if action == "net":
        return {"id": sandbox_id, "network": doc}
    if action == "timeout":
        return {"id": sandbox_id, "deadline": doc["deadline"]}
    return {"id": sandbox_id, "state": doc["state"]}


async def snapshot_create(sandbox_id: str, name: str, *, as_json: bool) -> None:
    async with _client() as api:
        snap = await api.snapshots.create(sandbox_id, name)
    print(json.dumps(asdict(snap)) if as_json else snap.name)


async def snapshot_ls(*, as_json: bool) -> None:
    async with _client() as api:
        snaps = await api.snapshots.list()
    print_snapshots([asdict(s) for s in snaps], as_json)


async def snapshot_rm(names: list[str], *, as_json: bool) -> None:
    async with _client() as api:
        for name in names:
            await api.snapshots.remove(name)
    if as_json:
        print(json.dumps({"removed": names}))


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
        result = await run_with(
            api.exec, api.exec_stream, sandbox_id, command, (as_json, timeout, env, cwd)
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


async def run_task(
    task: str,
    *,
    model: str,
    approve: str,
    sandbox: JsonObject,
    budget: JsonObject,
    keep: bool,
    as_json: bool,
    progress: Callable[[JsonObject], None] | None,
    ask: Callable[[Any], Awaitable[bool]] | None,
) -> int:
    """``ironclaw run`` through the API; returns the exit status (0: completed)."""
    from ironclaw.client.api import TaskFields

    body = TaskFields(model=model, approve=approve, sandbox=sandbox, budget=budget, keep=keep)
    if model.startswith("scripted:"):
        # The server never reads a client's file: the turns travel inline.
        path = Path(model.removeprefix("scripted:"))
        try:
            doc = json.loads(await asyncio.to_thread(path.read_text))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read scripted turns from {path}: {exc}") from None
        doc = {"turns": doc} if isinstance(doc, list) else doc
        turns = doc.get("turns") if isinstance(doc, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ConfigError(f"{path}: expected {{'turns': [{{...}}, ...]}}")
        body["script"], body["script_loop"] = turns, bool(doc.get("loop"))
    async with _client() as api:
        started = await api.start_task(task, **body)
        async for event in api.events(started["id"]):
            if progress is not None:
                progress(event)
            if (
                ask is not None
                and event.get("event") == "tool.classified"
                and (event.get("color") == "RED")
            ):
                await _decide(api, started["id"], ask)
        done = await api.task(started["id"])
    if as_json:
        print(json.dumps({**done, "id": done["sandbox_id"], "task_id": done["id"]}))
    else:
        if done.get("answer"):
            from ironclaw.agent.render import literal  # the model's text: never markup

            out_console.print(Panel(literal(done["answer"]), title="answer"), highlight=False)
        err_console.print(f"task {done['id']} in sandbox {done['sandbox_id']}: {done['status']}")
    return 0 if done["status"] == "completed" else 1


async def _decide(api: ApiClient, task_id: str, ask: Callable[[Any], Awaitable[bool]]) -> None:
    """Ask about the RED call this task now holds (it appears once its card is built)."""
    for _ in range(100):
        held = [a for a in await api.approvals() if a["task_id"] == task_id]
        if held:
            a = held[0]
            card = SimpleNamespace(
                card=a["card"], name=a["name"], classification=SimpleNamespace(reason=a["reason"])
            )
            await api.decide(a["id"], await ask(card))
            return
        await asyncio.sleep(0.05)
