"""Typed requests and results of the agent's channel methods, and the types the agent
loop shares with the host (:class:`Budget`, tool calls, model messages).

``agent.run``       host -> guest: run the agent loop on a task inside the sandbox
``model.complete``  guest -> host: one model turn through the host's gateway
``tool.authorize``  guest -> host: the host's approval of one tool call
``agent.event``     guest -> host: a tool call's outcome, for the host's trace

Registered in :mod:`ironclaw.proto.methods`; the guest's agent loop imports this module,
so it stays standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ironclaw.proto import records as f
from ironclaw.proto.records import Record, declare, decode

__all__ = [
    "AgentEventRequest",
    "AgentEventResult",
    "AgentRunRequest",
    "AgentRunResult",
    "AssistantMessage",
    "Budget",
    "Decision",
    "ModelCompleteRequest",
    "ModelCompleteResult",
    "ServerSpec",
    "TokenUsage",
    "ToolAuthorizeRequest",
    "ToolCall",
]


class Budget(Record):
    """When the agent loop must stop even if the model does not."""

    max_steps: int = 20
    max_tokens: int = 200_000
    wall_time_s: float = 600.0
    tool_timeout_s: float = 120.0

    @classmethod
    def from_json(cls, doc: Any) -> Budget:
        return decode(cls, doc, "budget")


declare(
    Budget,
    max_steps=f.Int(1),
    max_tokens=f.Int(1),
    wall_time_s=f.Float(positive=True),
    tool_timeout_s=f.Float(positive=True),
)


class ToolCall(Record):
    """One tool call the model asked for."""

    id: str
    name: str
    arguments: dict[str, Any]


declare(ToolCall, id=f.NAME, name=f.Str(min_len=1, max_len=1024), arguments=f.Json(obj=True))


class ServerSpec(Record):
    """An MCP server to start over stdio inside the sandbox."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None


declare(
    ServerSpec,
    name=f.Str(min_len=1, max_len=256, without="__"),
    command=f.Str(min_len=1, max_len=f.MAX_ARG, no_nul=True),
    args=f.Seq(f.Str(max_len=f.MAX_ARG, no_nul=True)),
    env=f.Opt(f.StrMap()),
)


class Decision(Record):
    """The host's answer to ``tool.authorize``."""

    approved: bool
    color: str
    reason: str
    decided_by: str


declare(
    Decision,
    approved=f.Bool(),
    color=f.Str(choices=("GREEN", "RED")),
    reason=f.TEXT,
    decided_by=f.NAME,
)


class TokenUsage(Record):
    input_tokens: int = 0
    output_tokens: int = 0


declare(TokenUsage, input_tokens=f.Int(), output_tokens=f.Int())


class AssistantMessage(Record):
    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


declare(
    AssistantMessage,
    role=f.Str(choices=("assistant",)),
    content=f.Opt(f.TEXT),
    tool_calls=f.Seq(f.Nested(ToolCall)),
)


class AgentRunRequest(Record):
    task: str
    system: str = ""
    runtime: str = ""
    servers: tuple[ServerSpec, ...] = ()
    budget: Budget = Budget()
    workdir: str | None = None


class AgentRunResult(Record):
    status: str
    answer: str | None
    steps: int
    tokens: int
    tool_calls: int
    reason: str | None = None
    error: str | None = None


declare(
    AgentRunRequest,
    task=f.TEXT,
    system=f.TEXT,
    runtime=f.Str(max_len=f.MAX_PATH, no_nul=True),
    servers=f.Seq(f.Nested(ServerSpec), max_items=64),
    budget=f.Nested(Budget),
    workdir=f.Opt(f.PATH),
)
declare(
    AgentRunResult,
    status=f.Str(choices=("completed", "budget_exceeded", "error")),
    answer=f.Opt(f.TEXT),
    steps=f.Int(),
    tokens=f.Int(),
    tool_calls=f.Int(),
    reason=f.Opt(f.TEXT),
    error=f.Opt(f.TEXT),
)


class ModelCompleteRequest(Record):
    """One model turn: the neutral conversation (see :mod:`ironclaw.agent.gateway`)."""

    messages: tuple[dict[str, Any], ...]
    system: str = ""
    tools: tuple[dict[str, Any], ...] = ()


class ModelCompleteResult(Record):
    message: AssistantMessage
    usage: TokenUsage
    stop_reason: str


class ToolAuthorizeRequest(Record):
    call: ToolCall
    server: str | None = None
    tool: str | None = None
    workdir: str | None = None


class AgentEventRequest(Record):
    """A tool call's outcome, recorded in the host's trace."""

    call_id: str
    name: str
    is_error: bool
    content: str
    duration_ms: float
    executed: bool
    type: str = "tool.result"


class AgentEventResult(Record):
    ok: bool


declare(
    ModelCompleteRequest,
    messages=f.Seq(f.Json(obj=True), max_items=1 << 16),
    system=f.TEXT,
    tools=f.Seq(f.Json(obj=True), max_items=1024),
)
declare(
    ModelCompleteResult,
    message=f.Nested(AssistantMessage),
    usage=f.Nested(TokenUsage),
    stop_reason=f.NAME,
)
declare(
    ToolAuthorizeRequest,
    call=f.Nested(ToolCall),
    server=f.Opt(f.NAME),
    tool=f.Opt(f.NAME),
    workdir=f.Opt(f.PATH),
)
declare(
    AgentEventRequest,
    call_id=f.NAME,
    name=f.NAME,
    is_error=f.Bool(),
    content=f.TEXT,
    duration_ms=f.Float(lo=0.0),
    executed=f.Bool(),
    type=f.Str(choices=("tool.result",)),
)
declare(AgentEventResult, ok=f.Bool())
