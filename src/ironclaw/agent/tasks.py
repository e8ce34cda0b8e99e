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
from typing import NotRequired

from typing_extensions import TypedDict

from ironclaw.agent.approval import CARD_READ_LIMIT, Approver, FilePrefix
from ironclaw.agent.gateway import Gateway, GatewayLimits, Provider, provider_from_name
from ironclaw.agent.handlers import HostOutcome, TaskHandlers, await_guest, host_outcome
from ironclaw.agent.host_tools import HostServerSpec, HostTools
from ironclaw.agent.trace import TraceEvent, TraceWriter, merge_network_audit, state_trace_path
from ironclaw.config import safe_join
from ironclaw.errors import ConfigError, IronclawError, ResourceLimitExceeded
from ironclaw.host.manager import SandboxManager
from ironclaw.mcp_servers import BUILTIN_SERVERS
from ironclaw.proto import methods
from ironclaw.proto.host_tools_methods import HOSTTOOLS_CALL, HOSTTOOLS_LIST
from ironclaw.proto.jsonval import JsonObject, JsonValue
from ironclaw.proto.methods import Budget, ServerSpec

__all__ = [
    "DEFAULT_SYSTEM",
    "TaskDoc",
    "TaskOutcome",
    "TaskSpec",
    "bounded_card_read",
    "builtin_server",
    "parse_mcp",
    "run_task",
]

GUEST_PYTHON = "/usr/bin/python3"
DEFAULT_SYSTEM = (
    "You are an agent working inside an isolated Linux sandbox. Your workspace is "
    "/workspace. Use the tools to act; when done, answer without calling a tool. Some "
    "actions need approval and may be refused: adapt instead of retrying them."
)
EventCallback = Callable[[TraceEvent], None]


def builtin_server(name: str, runtime: Path) -> ServerSpec:
    """The stdio command of a built-in MCP server over the agent runtime."""
    module = BUILTIN_SERVERS.get(name)
    if module is None:
        raise ConfigError(f"no built-in MCP server {name!r} (have {', '.join(BUILTIN_SERVERS)})")
    boot = (
        f"import sys; sys.path.insert(0, {str(runtime)!r}); import runpy; "
        f"runpy.run_module({module!r}, run_name='__main__')"
    )
    return ServerSpec(name=name, command=GUEST_PYTHON, args=("-I", "-B", "-c", boot))


def parse_mcp(text: str, index: int) -> ServerSpec:
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
    doc = {"name": name, "command": argv[0], "args": argv[1:]}
    return methods.decode(ServerSpec, doc, f"--mcp {text[:80]!r}")


@dataclass
class TaskSpec:
    """One agent task: what to do, with which model, tools, sandbox and budgets."""

    task: str
    model: str = "openai:gpt-4o-mini"
    #: The sandbox spec as given (free-form until :func:`ironclaw.spec.parse_spec`).
    sandbox: JsonObject = field(default_factory=dict)
    builtin_servers: tuple[str, ...] = ("shell", "files", "python")
    mcp: list[ServerSpec] = field(default_factory=list)
    #: MCP servers run on the host with their secrets (see ironclaw.agent.host_tools).
    host_tools: list[HostServerSpec] = field(default_factory=list)
    budget: Budget = field(default_factory=Budget)
    system: str = DEFAULT_SYSTEM
    #: Host-enforced only (the guest does not count these): USD, needs a priced model.
    max_cost_usd: float | None = None
    max_concurrent_model_calls: int = 2


class TaskDoc(TypedDict):
    """How a task ended, as ``ironclaw run --json`` prints it and the MCP tool returns it
    (``id`` is the sandbox's; ``trace`` is there when run here, ``task_id`` when run by a
    service). ``usage`` is :meth:`TaskUsage.to_json`'s, free-form to its readers."""

    id: str
    status: str
    reason: str | None
    answer: str | None
    steps: int
    tool_calls: int
    usage: JsonObject | None
    trace: NotRequired[str]
    task_id: NotRequired[str]


@dataclass
class TaskOutcome:
    sandbox_id: str
    status: str
    answer: str | None
    steps: int
    tool_calls: int
    usage: JsonObject
    trace_path: Path
    reason: str | None = None
    events: list[TraceEvent] = field(default_factory=list)

    def to_json(self) -> TaskDoc:
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
    if len({s.name for s in servers}) != len(servers):
        raise ConfigError("two MCP servers share a name")
    if spec.host_tools and any(s.name == "host" for s in servers):
        raise ConfigError("an MCP server in the sandbox cannot be named 'host' with host tools")
    # Built before the sandbox: a missing secret is reported before anything exists.
    host_tools = HostTools(spec.host_tools, approver, max_call_s=spec.budget.tool_timeout_s)
    limits = GatewayLimits(
        max_steps=spec.budget.max_steps,
        max_tokens=spec.budget.max_tokens,
        max_cost_usd=spec.max_cost_usd,
        max_concurrent=spec.max_concurrent_model_calls,
        wall_time_s=spec.budget.wall_time_s,
    )
    gateway = Gateway(provider, limits=limits)  # before the sandbox: it checks the budget

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

    async def read_for_card(path: str) -> FilePrefix:
        return await bounded_card_read(manager, sid, path)

    handlers = TaskHandlers(
        gateway=gateway,
        approver=approver,
        trace=trace,
        read_for_card=read_for_card,
        on_event=on_event,
    )
    emit = handlers.emit
    outcome: HostOutcome = {"status": "error", "reason": None, "answer": None, "steps": 0,
                            "tool_calls": 0}  # fmt: skip
    try:
        guest = await manager.guest(sid)
        handlers.register(guest.peer)
        # Host tools: credentialed MCP servers on this side, each call decided here.
        host_tools.emit = emit
        guest.peer.register(HOSTTOOLS_LIST, host_tools.handle_list)
        guest.peer.register(HOSTTOOLS_CALL, host_tools.handle_call)
        await emit(
            "task.start",
            task=spec.task,
            model=f"{provider.name}:{provider.model}",
            sandbox_id=sid,
            servers=[s.name for s in servers],
            budget=methods.to_json(spec.budget),
            limits=limits.__dict__,
            network={"allow": _policy_list(spec.sandbox, "allow"),
                     "allow_domains": _policy_list(spec.sandbox, "allow_domains")},
        )  # fmt: skip
        request = methods.AgentRunRequest(
            task=spec.task,
            system=spec.system,
            runtime=str(runtime),
            servers=tuple(servers),
            budget=spec.budget,
        )
        await host_tools.start()
        gateway.meter.start_clock()
        # The host's budget ends the task (a refused model call or the wall time, then a
        # short grace); this timeout is only a backstop.
        run = asyncio.ensure_future(guest.run_agent(request, timeout=spec.budget.wall_time_s + 30))
        # If this task is cancelled first, the guest's call ends with the sandbox.
        run.add_done_callback(lambda t: t.cancelled() or t.exception())
        ran = await await_guest(run, gateway)
        claimed = None if ran is None else methods.to_json(ran)
        outcome = host_outcome(claimed, gateway, handlers)
    except TimeoutError:
        outcome = host_outcome({"status": "budget_exceeded"}, gateway, handlers)
        outcome["reason"], outcome["enforced_by"] = "wall_time (host)", "host"
    except IronclawError as exc:
        outcome = host_outcome({"status": "error", "error": f"{type(exc).__name__}: {exc}"},
                               gateway, handlers)  # fmt: skip
    finally:
        usage = gateway.usage.to_json()
        end_fields: JsonObject = {
            "status": outcome["status"],
            "reason": outcome["reason"],
            "answer": outcome["answer"],
            "steps": outcome["steps"],
            "tool_calls": outcome["tool_calls"],
            "enforced_by": outcome.get("enforced_by"),
            "guest_reported": outcome.get("guest_reported"),
            "usage": usage,
        }
        with contextlib.suppress(Exception):
            await gateway.aclose()
        with contextlib.suppress(Exception):
            await host_tools.aclose()
        if created and not keep:
            with contextlib.suppress(IronclawError):
                await asyncio.shield(manager.destroy(sid))
        # After destroy: the network manager appends its drop summary on tear-down.
        merge_network_audit(trace, manager.net.audit_path(sid), since=started - 1)
        await emit("task.end", **end_fields)
    return TaskOutcome(
        sandbox_id=sid,
        status=outcome["status"],
        answer=outcome["answer"],
        steps=outcome["steps"],
        tool_calls=outcome["tool_calls"],
        usage=usage,
        trace_path=paths[-1],
        reason=str(end_fields["reason"]) if end_fields["reason"] else None,
        events=list(trace.events),
    )


#: How long the host waits for the file behind an approval card (a FIFO never answers).
CARD_READ_TIMEOUT_S = 10.0


async def bounded_card_read(manager: SandboxManager, sid: str, path: str) -> FilePrefix:
    """At most :data:`CARD_READ_LIMIT` bytes of a file in the sandbox, for a diff card.

    The sandbox is hostile: a directory or device is not read at all, and whatever the
    path turns out to be (a symlink to ``/dev/zero``, a FIFO), the read stops at the
    limit or after :data:`CARD_READ_TIMEOUT_S`, and the card says so.
    """
    guest = await manager.guest(sid)
    try:
        info = await guest.stat(path)
    except IronclawError:
        return FilePrefix(None)  # a new file: the card diffs against /dev/null
    if info.type != "file":
        return FilePrefix(None, f"{path} is not a regular file ({info.type}): not read")
    kept = bytearray()

    def keep(chunk: bytes) -> None:
        kept.extend(chunk)

    truncated = False
    try:
        async with asyncio.timeout(CARD_READ_TIMEOUT_S):
            await guest.read_file(path, keep, limit=CARD_READ_LIMIT)
    except TimeoutError:
        return FilePrefix(None, f"{path} did not answer in {CARD_READ_TIMEOUT_S:g} s: not shown")
    except ResourceLimitExceeded:
        truncated = True  # the guest sent more: the read stopped at the limit
    except IronclawError as exc:
        return FilePrefix(None, f"{path} could not be read ({type(exc).__name__}): not shown")
    text = bytes(kept[:CARD_READ_LIMIT]).decode(errors="replace")
    if truncated:
        return FilePrefix(text, f"{path} is longer than {CARD_READ_LIMIT} bytes: truncated, "
                                "only its beginning is compared")  # fmt: skip
    return FilePrefix(text)


async def _running(manager: SandboxManager, sandbox_id: str) -> bool:
    try:
        record = await manager.get(sandbox_id)
    except IronclawError:
        return False
    return record.state == "running"


def _policy_list(sandbox: JsonObject, key: str) -> list[JsonValue]:
    """What the spec's ``network`` lists under ``key`` (for the trace; parse_spec checks it)."""
    net = sandbox.get("network") or {}
    items: JsonValue = net.get(key) if isinstance(net, dict) else None
    return [str(a) for a in items] if isinstance(items, list) else []
