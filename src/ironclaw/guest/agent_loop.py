"""The agent loop, inside the sandbox: model through the host, tools through MCP.

The loop holds no credentials: it asks the host for each model turn
(``model.complete`` on the same channel the host used to start it), and before every
tool call it asks the host whether the call may run (``tool.authorize``: the host
classifies it GREEN or RED and, for RED, waits for a person or a policy). Tools run
on MCP servers started inside the sandbox over stdio with the official SDK; a refused
call or a failing tool goes back to the model as a tool error, so the model can adapt.

It stops on a final answer (a turn without tool calls) or on a budget: steps (model
turns), tokens (input plus output, as the host's gateway counted them), wall time, and
a per-tool timeout. The ``mcp`` SDK is imported only when a task starts, from the agent
runtime directory the host names (see :mod:`ironclaw.agent.agent_runtime`), so plain
sandboxes start without it. Host RPC methods this module calls, typed in
:mod:`ironclaw.proto.methods` (the host's replies are checked like requests):

``model.complete``  {system, messages, tools} -> {message, usage, stop_reason}
``tool.authorize``  {call, server, tool, workdir} -> {approved, color, reason, decided_by}
``agent.event``     {type: "tool.result", ...} (recorded in the trace)
``hosttools.list``  the host's own tools (credentialed MCP servers on the host)
``hosttools.call``  runs one of them; the host authorizes it there, not here
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ironclaw.errors import METHOD_NOT_FOUND, ConfigError, IronclawError, RpcError
from ironclaw.proto import methods as m
from ironclaw.proto.host_tools_methods import (
    HOSTTOOLS_CALL,
    HOSTTOOLS_LIST,
    HostToolsCallRequest,
    HostToolsCallResult,
    HostToolsListResult,
)
from ironclaw.proto.jsonval import JsonObject
from ironclaw.proto.methods import AgentRunRequest, ServerSpec, ToolCall
from ironclaw.rpc import CallContext, Peer

if TYPE_CHECKING:
    from mcp import ClientSession

__all__ = [
    "TOOL_SEPARATOR",
    "AgentLoop",
    "McpClient",
    "ServerSpec",
    "ToolCall",
    "ToolInfo",
    "ToolResult",
    "execute_tool",
    "handle_agent_run",
]

#: Model-visible tool names are ``<server>__<tool>`` (allowed by every vendor's rules).
TOOL_SEPARATOR = "__"
MAX_RESULT_CHARS = 32_000


@dataclass(frozen=True)
class ToolResult:
    """What a tool call produced, as the model will see it."""

    call_id: str
    name: str
    content: str
    is_error: bool = False
    duration_ms: float = 0.0

    def to_message(self) -> JsonObject:
        return {
            "role": "tool",
            "tool_call_id": self.call_id,
            "name": self.name,
            "content": self.content,
            "is_error": self.is_error,
        }


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str
    input_schema: JsonObject

    def to_json(self) -> JsonObject:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


def _use_runtime(path: str) -> None:
    """Make the agent runtime importable (once); its packages win over the distro's."""
    if path and path not in sys.path:
        if not os.path.isdir(path):
            raise ConfigError(f"the agent runtime {path} is not visible in this sandbox")
        sys.path.insert(0, path)


def _content_text(blocks: list[Any]) -> str:
    parts: list[str] = []
    for block in blocks:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{getattr(block, 'type', 'content')}]")
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[... {len(text) - MAX_RESULT_CHARS} chars cut]"
    return text


class McpClient:
    """Sessions to every MCP server of one task, and the tool names they expose.

    Use as ``async with McpClient(servers, workdir) as client`` from one task: the SDK's
    stdio transport keeps task groups that must be entered and left by the same task.
    """

    def __init__(self, servers: tuple[ServerSpec, ...], *, workdir: str) -> None:
        self.servers = servers
        self.workdir = workdir
        self._stack = contextlib.AsyncExitStack()
        self._sessions: dict[str, ClientSession] = {}
        self._tools: dict[str, tuple[str, str]] = {}  # exposed name -> (server, tool)
        self.tool_infos: list[ToolInfo] = []

    async def __aenter__(self) -> McpClient:
        from mcp import ClientSession, StdioServerParameters, stdio_client

        try:
            for spec in self.servers:
                params = StdioServerParameters(
                    command=spec.command,
                    args=list(spec.args),
                    # The sandbox's environment is clean by construction (bwrap
                    # --clearenv); servers get all of it, e.g. the proxy settings.
                    env={**os.environ, **(spec.env or {})},
                    cwd=self.workdir,
                )
                read, write = await self._stack.enter_async_context(stdio_client(params))
                session = await self._stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self._sessions[spec.name] = session
                listing = await session.list_tools()
                for tool in listing.tools:
                    exposed = f"{spec.name}{TOOL_SEPARATOR}{tool.name}"
                    self._tools[exposed] = (spec.name, tool.name)
                    self.tool_infos.append(
                        ToolInfo(exposed, tool.description or "", dict(tool.input_schema))
                    )
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    def resolve(self, exposed: str) -> tuple[str, str] | None:
        return self._tools.get(exposed)

    async def call(
        self, server: str, tool: str, arguments: JsonObject, *, timeout: float | None
    ) -> tuple[str, bool]:
        """Call one tool; returns (text, is_error). Transport failures raise."""
        session = self._sessions[server]
        result = await session.call_tool(tool, arguments, read_timeout_seconds=timeout)
        content = getattr(result, "content", None) or []
        return _content_text(list(content)), bool(getattr(result, "is_error", False))


async def execute_tool(
    call: ToolCall, mcp_client: McpClient, *, timeout: float | None = None
) -> ToolResult:
    """Run one tool call on the server that exposes it; every failure becomes a tool error."""
    started = time.monotonic()

    def done(text: str, is_error: bool) -> ToolResult:
        ms = round((time.monotonic() - started) * 1000, 3)
        return ToolResult(call.id, call.name, text, is_error, ms)

    target = mcp_client.resolve(call.name)
    if target is None:
        return done(f"unknown tool {call.name!r}", True)
    server, tool = target
    try:
        text, is_error = await mcp_client.call(server, tool, call.arguments, timeout=timeout)
    except TimeoutError:
        return done(f"tool {call.name} timed out after {timeout:g}s", True)
    except Exception as exc:
        from mcp import MCPError

        if isinstance(exc, MCPError) and "timed out" in str(exc).lower():
            return done(f"tool {call.name} timed out after {timeout:g}s", True)
        return done(f"tool {call.name} failed: {type(exc).__name__}: {exc}", True)
    return done(text, is_error)


class AgentLoop:
    """One task: conversation, model turns via the host, tool calls via MCP."""

    def __init__(self, request: AgentRunRequest, peer: Peer, *, workdir: str) -> None:
        self.request = request
        self.peer = peer
        self.workdir = workdir
        self.messages: list[JsonObject] = [{"role": "user", "content": request.task}]
        self.steps = 0
        self.tokens = 0
        self.tool_calls = 0
        self.host_tools: frozenset[str] = frozenset()

    def _outcome(
        self,
        status: str,
        answer: str | None = None,
        *,
        reason: str | None = None,
        error: str | None = None,
    ) -> m.AgentRunResult:
        return m.AgentRunResult(
            status=status,
            answer=answer,
            steps=self.steps,
            tokens=self.tokens,
            tool_calls=self.tool_calls,
            reason=reason,
            error=error,
        )

    async def run(self) -> m.AgentRunResult:
        budget = self.request.budget
        deadline = time.monotonic() + budget.wall_time_s
        _use_runtime(self.request.runtime)
        async with McpClient(self.request.servers, workdir=self.workdir) as client:
            tools = tuple(t.to_json() for t in client.tool_infos)
            tools += tuple(await self._list_host_tools())
            while True:
                if self.steps >= budget.max_steps:
                    return self._outcome("budget_exceeded", reason="max_steps")
                if self.tokens >= budget.max_tokens:
                    return self._outcome("budget_exceeded", reason="max_tokens")
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._outcome("budget_exceeded", reason="wall_time")
                self.steps += 1
                turn = m.ModelCompleteRequest(
                    messages=tuple(self.messages), system=self.request.system, tools=tools
                )
                try:
                    reply = await m.call(self.peer, turn, m.ModelCompleteResult, timeout=left)
                except TimeoutError:
                    return self._outcome("budget_exceeded", reason="wall_time")
                self.tokens += reply.usage.input_tokens + reply.usage.output_tokens
                message = reply.message
                calls = message.tool_calls
                self.messages.append(
                    {
                        "role": "assistant",
                        "content": message.content,
                        "tool_calls": [m.to_json(c) for c in calls],
                    }
                )
                if not calls:
                    return self._outcome("completed", message.content or "")
                for call in calls:
                    result = await self._one_call(call, client, deadline)
                    self.messages.append(result.to_message())

    async def _one_call(self, call: ToolCall, client: McpClient, deadline: float) -> ToolResult:
        self.tool_calls += 1
        if call.name in self.host_tools:
            return await self._host_call(call, deadline)
        target = client.resolve(call.name)
        server, tool = target if target else (None, None)
        ask = m.ToolAuthorizeRequest(call=call, server=server, tool=tool, workdir=self.workdir)
        decision = await m.call(self.peer, ask, m.Decision)
        if not decision.approved:
            reason = decision.reason or "refused"
            result = ToolResult(
                call.id, call.name, f"refused by the approval policy: {reason}", True
            )
        else:
            left = max(0.1, deadline - time.monotonic())
            timeout = min(self.request.budget.tool_timeout_s, left)
            result = await execute_tool(call, client, timeout=timeout)
        return await self._report(result, executed=decision.approved)

    async def _report(self, result: ToolResult, *, executed: bool) -> ToolResult:
        """Record the call's outcome in the host's trace; returns ``result``."""
        event = m.AgentEventRequest(
            call_id=result.call_id,
            name=result.name,
            is_error=result.is_error,
            content=result.content,
            duration_ms=result.duration_ms,
            executed=executed,
        )
        await m.call(self.peer, event, m.AgentEventResult)
        return result

    async def _list_host_tools(self) -> list[JsonObject]:
        """The host's tools, offered to the model next to the sandbox's (none on old hosts)."""
        try:
            listing = HostToolsListResult.from_json(await self.peer.call(HOSTTOOLS_LIST, {}))
        except RpcError as exc:
            if exc.code == METHOD_NOT_FOUND:
                return []
            raise
        self.host_tools = frozenset(t.name for t in listing.tools)
        return [t.to_json() for t in listing.tools]

    async def _host_call(self, call: ToolCall, deadline: float) -> ToolResult:
        """A host tool runs on the host, which classifies and decides it there."""
        started = time.monotonic()
        left = max(0.1, deadline - started)
        req = HostToolsCallRequest(call.id, call.name, call.arguments,
                                   min(self.request.budget.tool_timeout_s, left))  # fmt: skip
        try:
            # Bounded by the wall time only: a RED call may wait for a person.
            doc = await self.peer.call(HOSTTOOLS_CALL, req.to_json(), timeout=left)
            res = HostToolsCallResult.from_json(doc)
        except TimeoutError:
            res = HostToolsCallResult(f"tool {call.name} timed out", True, False, "", "")
        ms = round((time.monotonic() - started) * 1000, 3)
        result = ToolResult(call.id, call.name, res.content, res.is_error, ms)
        return await self._report(result, executed=res.executed)


async def handle_agent_run(request: AgentRunRequest, ctx: CallContext) -> m.AgentRunResult:
    """The ``agent.run`` handler: run one task to its end and report how it ended.

    Failures after the task started (a server that will not start, a lost channel) end
    the task with status ``error`` and the reason, rather than as an RPC error, so the
    host's trace always records an end.
    """
    if len({s.name for s in request.servers}) != len(request.servers):
        raise ConfigError("two MCP servers share a name")
    loop = AgentLoop(request, ctx.peer, workdir=request.workdir or os.getcwd())
    try:
        return await loop.run()
    except IronclawError as exc:
        return loop._outcome("error", error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # the SDK raises ExceptionGroups, OSError, RuntimeError...
        return loop._outcome("error", error=f"{type(exc).__name__}: {exc}")
