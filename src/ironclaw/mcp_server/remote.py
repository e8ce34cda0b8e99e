"""The MCP tools over a running ``ironclaw serve`` (``ironclaw mcp --api URL``).

The same tools as in-process, through the remote SDK: the service's token decides what
this server may do (its scopes and quotas), and the service holds the model keys. The
exec and file tools run through :class:`~ironclaw.mcp_server.backend.SandboxTools` itself,
as the client offers them under the manager's names.
"""

from __future__ import annotations

from ironclaw.agent.tasks import TaskDoc
from ironclaw.agent.trace import TraceEvent
from ironclaw.client import ApiClient
from ironclaw.client.api import SandboxDoc, TaskFields
from ironclaw.mcp_server.backend import SandboxTools, SandboxView, TaskRun, sandbox_view
from ironclaw.proto import methods

__all__ = ["RemoteBackend"]


def _view(doc: SandboxDoc) -> SandboxView:
    return sandbox_view(
        doc["id"], doc["backend"], doc["state"], doc["reason"], doc["created_at"], doc["spec"]
    )


class RemoteBackend(SandboxTools[SandboxDoc]):
    """Over the HTTP API with one :class:`~ironclaw.client.ApiClient`."""

    def __init__(
        self, api_url: str | None = None, token: str | None = None, *, keep: bool = False
    ) -> None:
        self.api = ApiClient(api_url, token)
        super().__init__(self.api, _view, keep=keep)

    async def open(self) -> None:
        await self.api.list_sandboxes()  # fail now on a bad URL or token

    async def _list(self) -> list[SandboxView]:
        return [_view(d) for d in await self.api.list_sandboxes()]

    async def _destroy(self, sandbox_id: str) -> None:
        await self.api.delete(sandbox_id)

    async def _task(self, run: TaskRun) -> tuple[TaskDoc, list[TraceEvent]]:
        fields = TaskFields(
            model=run.model, sandbox=run.sandbox, budget=methods.to_json(run.budget),
            approve=run.approve, keep=run.keep,
        )  # fmt: skip
        if run.script is not None:
            fields["script"] = run.script
        started = await self.api.start_task(run.task, **fields)
        events = []
        async for event in self.api.events(started["id"]):
            events.append(event)
            run.on_event(event)
        done = await self.api.task(started["id"])
        end = next((e for e in reversed(events) if e.get("event") == "task.end"), {})
        usage = end.get("usage")
        return TaskDoc(
            id=done["sandbox_id"],
            task_id=done["id"],
            status=done["status"],
            reason=done["reason"],
            answer=done["answer"],
            steps=done["steps"],
            tool_calls=done["tool_calls"],
            usage=usage if isinstance(usage, dict) else None,
        ), events
