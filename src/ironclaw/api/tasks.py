"""Routes: agent tasks (start, status, SSE trace, cancel) and approvals (list, decide).

Each task runs :func:`ironclaw.agent.tasks.run_task` in the server's loop with its own
:class:`Approver` in API mode: a RED call waits in that approver until a caller with
the ``approve`` scope decides it. Events are kept in memory per task, so an SSE client
that connects late still gets the whole trace from ``task.start``.

On a cluster (``serve --cluster``) nothing changes here: the sandbox's node relays the
guest's calls to this process (see docs/CLUSTER.md), so the gateway and its credentials,
the approval queue and the trace stay with the service while the agent runs elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ironclaw.agent.approval import Approver
from ironclaw.agent.gateway import Provider, ScriptedProvider, provider_from_name
from ironclaw.agent.tasks import TaskOutcome, TaskSpec, run_task
from ironclaw.agent.trace import TraceEvent
from ironclaw.api.auth import Principal
from ironclaw.api.service import Approve, Read, Service, ServiceDep, Write
from ironclaw.client.api import ApprovalDoc, TaskInfo
from ironclaw.errors import ConfigError, IronclawError, NotFound
from ironclaw.ids import new_sandbox_id
from ironclaw.proto.jsonval import JsonObject
from ironclaw.proto.methods import Budget
from ironclaw.spec import parse_spec

__all__ = ["TaskRegistry", "TaskRun", "router"]

router = APIRouter(tags=["tasks"])


class TaskCreate(BaseModel):
    """``POST /v1/tasks``. The script's turns, the sandbox spec and the budget are JSON
    here, read by the scripted provider, :func:`parse_spec` and :meth:`Budget.from_json`."""

    task: str = Field(min_length=1, max_length=100_000)
    model: str = "openai:gpt-4o-mini"
    script: list[JsonObject] | None = Field(
        default=None, description="Scripted model turns (instead of a real model)"
    )
    script_loop: bool = Field(default=False, description="Repeat the scripted turns forever")
    sandbox: JsonObject = Field(default_factory=dict)
    budget: JsonObject | None = None
    approve: Literal["prompt", "green-only", "all", "never"] = "prompt"
    keep: bool = False


#: What the task routes answer: the one definition the remote SDK reads too.
TaskOut = TaskInfo
ApprovalOut = ApprovalDoc


class Decide(BaseModel):
    approve: bool


@dataclass
class TaskRun:
    id: str
    owner: str
    sandbox_id: str
    approver: Approver
    events: list[TraceEvent] = field(default_factory=list)
    status: str = "running"
    outcome: TaskOutcome | None = None
    job: asyncio.Task[None] | None = None
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def add(self, event: TraceEvent) -> None:
        self.events.append(event)
        self.wake()

    def wake(self) -> None:
        """Wake every subscriber (each SSE stream waits on a future of its own)."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def next_change(self) -> asyncio.Future[None]:
        """A future done at the next event (registered now: nothing can slip between)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    def to_out(self) -> TaskOut:
        o = self.outcome
        return TaskOut(
            id=self.id,
            sandbox_id=self.sandbox_id,
            status=self.status,
            answer=o.answer if o else None,
            reason=o.reason if o else None,
            steps=o.steps if o else 0,
            tool_calls=o.tool_calls if o else 0,
            events=len(self.events),
        )


class TaskRegistry:
    """The server's agent tasks, by id; also the registry of held approvals."""

    def __init__(self) -> None:
        self.runs: dict[str, TaskRun] = {}

    def get(self, who: Principal, task_id: str) -> TaskRun:
        run = self.runs.get(task_id)
        if run is None or not (who.admin or run.owner == who.token_id):
            raise NotFound(f"no task {task_id!r}; GET /v1/tasks lists yours")
        return run

    def pending(self, who: Principal) -> list[tuple[TaskRun, Any]]:
        return [
            (run, req)
            for run in self.runs.values()
            if who.admin or run.owner == who.token_id
            for req in run.approver.pending()
        ]

    async def aclose(self) -> None:
        """Cancel running tasks (their sandboxes are destroyed by ``run_task``)."""
        jobs = [r.job for r in self.runs.values() if r.job is not None and not r.job.done()]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)


def _provider(body: TaskCreate) -> Provider:
    if body.script is not None:
        return ScriptedProvider(body.script, loop=body.script_loop)
    if body.model.startswith("scripted"):
        raise ConfigError("over the API a scripted model takes its turns inline in 'script'")
    return provider_from_name(body.model)


async def _run(
    service: Service, run: TaskRun, spec: TaskSpec, provider: Provider, keep: bool
) -> None:
    service.metrics.tasks.inc()
    try:
        run.outcome = await run_task(
            service.manager,
            spec,
            provider=provider,
            approver=run.approver,
            sandbox_id=run.sandbox_id,
            keep=keep,
            on_event=run.add,
        )
        run.status = run.outcome.status
    except asyncio.CancelledError:
        run.status = "cancelled"
        run.add({"event": "task.cancelled"})
    except IronclawError as exc:
        run.status = "error"
        run.add({"event": "task.error", "error": type(exc).__name__, "message": str(exc)})
    finally:
        service.metrics.tasks.dec()
        if not keep:  # its sandbox was destroyed with the task: release the quota
            await asyncio.shield(service.store.drop_owner(run.sandbox_id))
        run.wake()


@router.post("/v1/tasks", status_code=201, response_model=TaskOut)
async def start_task(body: TaskCreate, who: Write, service: ServiceDep) -> TaskOut:
    """Start an agent task in a new sandbox owned by the caller; RED calls wait for
    ``POST /v1/approvals/{id}`` when ``approve`` is ``prompt``."""
    provider = _provider(body)
    spec = parse_spec(body.sandbox)
    budget = Budget.from_json(body.budget)
    sid = new_sandbox_id()
    await service.claim(who, sid, spec)
    run = TaskRun(
        id="t" + secrets.token_hex(6),
        owner=who.token_id,
        sandbox_id=sid,
        approver=Approver(mode=body.approve, api=True),
    )
    task_spec = TaskSpec(
        task=body.task,
        model=f"{provider.name}:{provider.model}",
        sandbox=body.sandbox,
        budget=budget,
    )
    service.tasks.runs[run.id] = run
    run.job = asyncio.ensure_future(_run(service, run, task_spec, provider, body.keep))
    return run.to_out()


@router.get("/v1/tasks", response_model=list[TaskOut])
async def list_tasks(who: Read, service: ServiceDep) -> list[TaskOut]:
    return [r.to_out() for r in service.tasks.runs.values() if who.admin or r.owner == who.token_id]


@router.get("/v1/tasks/{task_id}", response_model=TaskOut)
async def get_task(task_id: str, who: Read, service: ServiceDep) -> TaskOut:
    return service.tasks.get(who, task_id).to_out()


@router.post("/v1/tasks/{task_id}/cancel", response_model=TaskOut)
async def cancel_task(task_id: str, who: Write, service: ServiceDep) -> TaskOut:
    run = service.tasks.get(who, task_id)
    if run.job is not None and not run.job.done():
        run.job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(run.job)
    return run.to_out()


@router.get(
    "/v1/tasks/{task_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def task_events(task_id: str, who: Read, service: ServiceDep) -> StreamingResponse:
    """The task's trace as Server-Sent Events, from the first event; ends after the last."""
    run = service.tasks.get(who, task_id)

    async def stream() -> AsyncIterator[bytes]:
        sent = 0
        while True:
            while sent < len(run.events):
                event = run.events[sent]
                sent += 1
                name = str(event.get("event", "event"))
                yield f"id: {sent}\nevent: {name}\ndata: {json.dumps(event)}\n\n".encode()
            if run.job is None or run.job.done():
                if sent >= len(run.events):
                    yield b"event: end\ndata: {}\n\n"
                    return
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.next_change(), timeout=15)
            if sent >= len(run.events) and run.job is not None and not run.job.done():
                yield b": keep-alive\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.get("/v1/approvals", response_model=list[ApprovalOut])
async def list_approvals(who: Read, service: ServiceDep) -> list[ApprovalOut]:
    """RED calls waiting for a decision, with the card a reviewer reads."""
    return [
        ApprovalOut(
            id=f"{run.id}.{req.id}",
            task_id=run.id,
            sandbox_id=run.sandbox_id,
            name=req.name,
            arguments=dict(req.arguments),
            color=req.classification.color.value,
            reason=req.classification.reason,
            card=req.card,
        )
        for run, req in service.tasks.pending(who)
    ]


@router.post("/v1/approvals/{approval_id}", status_code=204)
async def decide(approval_id: str, body: Decide, who: Approve, service: ServiceDep) -> None:
    """Approve or deny one held RED call; the task continues at once."""
    task_id, _, req_id = approval_id.partition(".")
    try:
        run = service.tasks.get(who, task_id)
        run.approver.decide(req_id, body.approve)
    except (NotFound, ConfigError):
        raise NotFound(f"no approval {approval_id!r} is waiting; GET /v1/approvals") from None
