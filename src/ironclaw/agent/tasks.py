"""The host side of an agent task: sandbox, gateway, approval cliff, trace.

:func:`run_task` builds (once) the agent runtime, creates the sandbox (or uses a given
one), registers ``model.complete``, ``tool.authorize`` and ``agent.event`` on the
sandbox's channel, starts the guest's loop with ``agent.run`` and records every event.
The guest never receives a credential: only the gateway, in this process, holds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ironclaw.agent.approval import Approver
from ironclaw.agent.gateway import Gateway, Provider, provider_from_name
from ironclaw.agent.trace import TraceWriter, merge_network_audit, state_trace_path
from ironclaw.config import safe_join
from ironclaw.errors import ConfigError, IronclawError
from ironclaw.host.manager import SandboxManager
from ironclaw.mcp_servers import BUILTIN_SERVERS
from ironclaw.proto import methods
from ironclaw.proto.methods import Budget
from ironclaw.rpc import CallContext

__all__ = ["DEFAULT_SYSTEM", "TaskOutcome", "TaskSpec", "builtin_server", "parse_mcp", "run_task"]

GUEST_PYTHON = "/usr/bin/python3"
DEFAULT_SYSTEM = (
    "You are an agent working inside an isolated Linux sandbox. Your workspace is "
    "/workspace. Use the tools to act; when done, answer without calling a tool. Some "
    "actions need approval and may be refused: adapt instead of retrying them."
)
EventCallback = Callable[[dict[str, Any]], None]


def builtin_server(name: str, runtime: Path) -> dict[str, Any]:
    """The stdio command of a built-in MCP server over the agent runtime."""
    module = BUILTIN_SERVERS.get(name)
    if module is None:
        raise ConfigError(f"no built-in MCP server {name!r} (have {', '.join(BUILTIN_SERVERS)})")
    boot = (
        f"import sys; sys.path.insert(0, {str(runtime)!r}); import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__')"
    )
    return {"name": name, "command": GUEST_PYTHON, "args": ["-I", "-B", "-c", boot]}


def parse_mcp(text: str, index: int) -> dict[str, Any]:
    """``--mcp 'cmd args'`` (optionally ``NAME=cmd args``) as a server spec."""
    name, sep, rest = text.partition("=")
    if not sep or " " in name or not name:
        name, rest = f"mcp{index}", text
    try:
        argv = shlex.split(rest)
    except ValueError as exc:
        raise ConfigError(f"--mcp {text!r}: {exc}") from None
    if not argv:
        raise ConfigError(f"--mcp {text!r}: give a command")
    name = name.replace("__", "_")
    return {"name": name, "command": argv[0], "args": argv[1:]}


@dataclass
class TaskSpec:
    """One agent task: what to do, with which model, tools, sandbox and budgets."""

    task: str
    model: str = "openai:gpt-4o-mini"
    sandbox: dict[str, Any] = field(default_factory=dict)
    builtin_servers: tuple[str, ...] = ("shell", "files", "python")
    mcp: list[dict[str, Any]] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)
    system: str = DEFAULT_SYSTEM


@dataclass
class TaskOutcome:
    sandbox_id: str
    status: str
    answer: str | None
    steps: int
    tool_calls: int
    usage: dict[str, Any]
    trace_path: Path
    reason: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.sandbox_id,
            "status": self.status,
            "reason": self.reason,
            "answer": self.answer,
            "steps": self.steps,
            "tool_calls": self.tool_calls,
            "usage": self.usage,
            "trace": str(self.trace_path),
        }


async def run_task(
    manager: SandboxManager,
    spec: TaskSpec,
    *,
    provider: Provider | None = None,
    approver: Approver | None = None,
    sandbox_id: str | None = None,
    keep: bool = False,
    on_event: EventCallback | None = None,
) -> TaskOutcome:
    """Run ``spec`` in a new sandbox (destroyed at the end unless ``keep``).

    With ``sandbox_id`` of a running sandbox, that one is used and kept.
    """
    from ironclaw.agent.agent_runtime import ensure_runtime

    runtime = await asyncio.to_thread(ensure_runtime)
    provider = provider or provider_from_name(spec.model)
    approver = approver or Approver()
    servers = [builtin_server(n, runtime) for n in spec.builtin_servers]
    servers += spec.mcp
    if len({s["name"] for s in servers}) != len(servers):
        raise ConfigError("two MCP servers share a name")

    created = False
    if sandbox_id is not None and await _running(manager, sandbox_id):
        sid = sandbox_id
    else:
        record = await manager.create(spec.sandbox, sandbox_id=sandbox_id, one_shot=not keep)
        sid, created = record.id, True
    started = time.time()
    paths = [safe_join(manager.settings.sandbox_runtime_dir(sid), "trace.jsonl")]
    paths.append(state_trace_path(manager.settings, sid))
    trace = TraceWriter(paths)

    async def emit(event: str, **fields: Any) -> None:
        record = trace.emit(event, **fields)
        if on_event is not None:
            on_event(record)

    gateway = Gateway(provider, on_event=emit)
    outcome: dict[str, Any] = {"status": "error", "steps": 0, "tool_calls": 0}
    try:
        guest = await manager.guest(sid)

        async def read_for_card(path: str) -> str | None:
            try:
                data = await manager.read_file(sid, path)
            except IronclawError:
                return None
            return data.decode(errors="replace")

        async def authorize(params: Any, ctx: CallContext) -> dict[str, Any]:
            call = params.get("call") or {}
            name, args = str(call.get("name", "")), call.get("arguments") or {}
            await emit("tool.call", call_id=call.get("id"), name=name, arguments=args)
            cls = approver.policy.classify(name, args)
            await emit("tool.classified", call_id=call.get("id"), color=cls.color.value,
                       reason=cls.reason)  # fmt: skip
            decision, request = await approver.decide_call(name, args, read_for_card)
            await emit(
                "tool.decision",
                call_id=call.get("id"),
                card=request.card if request else None,
                **decision.to_json(),
            )
            return decision.to_json()

        async def agent_event(params: Any, ctx: CallContext) -> dict[str, Any]:
            doc = dict(params) if isinstance(params, dict) else {}
            kind = str(doc.pop("type", "agent.event"))
            await emit(kind, **doc)
            return {"ok": True}

        guest.serve("model.complete", gateway.complete)
        guest.serve("tool.authorize", authorize)
        guest.serve("agent.event", agent_event)
        await emit(
            "task.start",
            task=spec.task,
            model=f"{provider.name}:{provider.model}",
            sandbox_id=sid,
            servers=[s["name"] for s in servers],
            budget=methods.to_json(spec.budget),
            network={"allow": [str(a) for a in _policy_allow(spec.sandbox)],
                     "allow_domains": list(_policy_domains(spec.sandbox))},
        )  # fmt: skip
        request = methods.AgentRunRequest(
            task=spec.task,
            system=spec.system,
            runtime=str(runtime),
            servers=tuple(methods.decode(methods.ServerSpec, s, "server") for s in servers),
            budget=spec.budget,
        )
        # The guest enforces the wall time; the host's bound only covers a stuck guest.
        ran = await guest.run_agent(request, timeout=spec.budget.wall_time_s + 30)
        outcome = methods.to_json(ran)
    except TimeoutError:
        outcome = {**outcome, "status": "budget_exceeded", "reason": "wall_time (host)"}
    except IronclawError as exc:
        outcome = {**outcome, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        usage = gateway.usage.to_json()
        end_fields = {
            "status": outcome.get("status"),
            "reason": outcome.get("reason") or outcome.get("error"),
            "answer": outcome.get("answer"),
            "steps": outcome.get("steps"),
            "tool_calls": outcome.get("tool_calls"),
            "usage": usage,
        }
        with contextlib.suppress(Exception):
            await gateway.aclose()
        if created and not keep:
            with contextlib.suppress(IronclawError):
                await asyncio.shield(manager.destroy(sid))
        # After destroy: the network manager appends its drop summary on tear-down.
        merge_network_audit(trace, manager.net.audit_path(sid), since=started - 1)
        await emit("task.end", **end_fields)
    return TaskOutcome(
        sandbox_id=sid,
        status=str(outcome.get("status")),
        answer=outcome.get("answer"),
        steps=int(outcome.get("steps") or 0),
        tool_calls=int(outcome.get("tool_calls") or 0),
        usage=usage,
        trace_path=paths[-1],
        reason=str(end_fields["reason"]) if end_fields["reason"] else None,
        events=list(trace.events),
    )


async def _running(manager: SandboxManager, sandbox_id: str) -> bool:
    try:
        record = await manager.get(sandbox_id)
    except IronclawError:
        return False
    return record.state == "running"


def _policy_allow(sandbox: dict[str, Any]) -> list[Any]:
    net = sandbox.get("network") or {}
    return list(net.get("allow") or []) if isinstance(net, dict) else []


def _policy_domains(sandbox: dict[str, Any]) -> list[str]:
    net = sandbox.get("network") or {}
    return [str(d) for d in net.get("allow_domains") or []] if isinstance(net, dict) else []
