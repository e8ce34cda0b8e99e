"""The MCP tools over a running ``ironclaw serve`` (``ironclaw mcp --api URL``).

The same tools as in-process, through the remote SDK: the service's token decides what
this server may do (its scopes and quotas), and the service holds the model keys.
"""

from __future__ import annotations

from typing import Any

from ironclaw.client import ApiClient
from ironclaw.client.protocol import ExecResultLike
from ironclaw.mcp_server.backend import Backend, BoundedBuffer, ExecRun, TaskRun, sandbox_json

__all__ = ["RemoteBackend"]


class RemoteBackend(Backend):
    """Over the HTTP API with one :class:`~ironclaw.client.ApiClient`."""

    def __init__(
        self, api_url: str | None = None, token: str | None = None, *, keep: bool = False
    ) -> None:
        super().__init__(keep=keep)
        self.api = ApiClient(api_url, token)

    async def open(self) -> None:
        await self.api.request("GET", "/v1/sandboxes")  # fail now on a bad URL or token

    async def _close(self) -> None:
        await self.api.aclose()

    async def _create(self, spec: dict[str, Any]) -> dict[str, Any]:
        return sandbox_json(await self.api.create(spec))

    async def _list(self) -> list[dict[str, Any]]:
        return [sandbox_json(d) for d in await self.api.list_sandboxes()]

    async def _get(self, sandbox_id: str) -> dict[str, Any]:
        return sandbox_json(await self.api.get(sandbox_id))

    async def _destroy(self, sandbox_id: str) -> None:
        await self.api.delete(sandbox_id)

    async def _exec(self, run: ExecRun) -> ExecResultLike:
        # The WebSocket form: output is streamed into the bounded buffers, never kept whole.
        return await self.api.exec_stream(
            run.sandbox_id, run.argv, env=run.env, cwd=run.cwd, timeout=run.timeout,
            stdin=run.stdin, on_stdout=run.out, on_stderr=run.err, capture=False,
        )  # fmt: skip

    async def _write(self, sandbox_id: str, path: str, data: bytes) -> int:
        return await self.api.write_file(sandbox_id, path, data)

    async def _read(self, sandbox_id: str, path: str, sink: BoundedBuffer) -> None:
        await self.api.read_file(sandbox_id, path, sink)

    async def _task(self, run: TaskRun) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        fields: dict[str, Any] = {
            "model": run.model, "sandbox": run.sandbox, "budget": run.budget,
            "approve": run.approve, "keep": run.keep,
        }  # fmt: skip
        if run.script is not None:
            fields["script"] = run.script
        started = await self.api.start_task(run.task, **fields)
        events = []
        async for event in self.api.events(started["id"]):
            events.append(event)
            run.on_event(event)
        done = await self.api.task(started["id"])
        end: dict[str, Any] = next(
            (e for e in reversed(events) if e.get("event") == "task.end"), {}
        )
        return {
            "id": done["sandbox_id"],
            "task_id": done["id"],
            "status": done["status"],
            "reason": done.get("reason"),
            "answer": done.get("answer"),
            "steps": done.get("steps"),
            "tool_calls": done.get("tool_calls"),
            "usage": end.get("usage"),
        }, events
