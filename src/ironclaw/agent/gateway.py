"""The model gateway: the only place that holds model credentials, on the host.

The agent loop inside the sandbox asks for each turn with ``model.complete``; the
gateway hands IronClaw's neutral conversation to a provider
(:mod:`ironclaw.agent.providers`), which calls the vendor over HTTP (httpx) and
translates the answer (text and tool calls) back, and counts and enforces the task's
budget (:mod:`ironclaw.agent.budget`: the guest's own count is only a courtesy). Keys
are read from the host's environment, as the vendors' SDKs read them, and never leave
this process: not in a reply, not in an error, not in the trace.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ironclaw.agent.budget import (
    CHARS_PER_TOKEN_ESTIMATE,
    PRICES,
    BudgetMeter,
    EventSink,
    GatewayLimits,
    TaskUsage,
)
from ironclaw.agent.providers import (
    AnthropicProvider,
    ModelReply,
    OpenAIProvider,
    Provider,
    ScriptedProvider,
    provider_from_name,
)
from ironclaw.errors import ConfigError
from ironclaw.proto.agent_methods import TokenUsage
from ironclaw.proto.jsonval import JsonObject
from ironclaw.proto.records import to_json
from ironclaw.rpc import CallContext

__all__ = [
    "PRICES",
    "AnthropicProvider",
    "Gateway",
    "GatewayLimits",
    "ModelReply",
    "OpenAIProvider",
    "Provider",
    "ScriptedProvider",
    "TaskUsage",
    "TokenUsage",
    "provider_from_name",
]


@dataclass
class Gateway:
    """Serves ``model.complete`` for one task, counts it and enforces its budget.

    See :class:`~ironclaw.agent.budget.BudgetMeter` for what is refused and how the
    task ends when a limit is hit.
    """

    provider: Provider
    on_event: EventSink | None = None
    usage: TaskUsage = field(default_factory=TaskUsage)
    limits: GatewayLimits = field(default_factory=GatewayLimits)

    def __post_init__(self) -> None:
        self.usage.model = self.provider.model
        self.meter = BudgetMeter(self.limits, self.usage, self._emit)

    async def _emit(self, event: str, /, **fields: Any) -> None:
        if self.on_event is not None:
            await self.on_event(event, **fields)

    async def complete(self, params: Any, ctx: CallContext | None = None) -> JsonObject:
        """``model.complete``: ``params`` as its decode left them; the reply is the JSON of
        :class:`~ironclaw.proto.agent_methods.ModelCompleteResult`."""
        if not isinstance(params, dict) or not isinstance(params.get("messages"), list):
            raise ConfigError("model.complete needs {'messages': [...]}")
        system = str(params.get("system") or "")
        messages = params["messages"]
        tools = params.get("tools") or []
        if not isinstance(tools, list):
            raise ConfigError("model.complete: 'tools' must be a list")
        await self.meter.admit()
        async with self.meter.slots:
            if self.on_event is not None:
                await self.on_event(
                    "model.request",
                    provider=self.provider.name,
                    model=self.provider.model,
                    messages=len(messages),
                    tools=len(tools),
                    last=messages[-1] if messages else None,
                )
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.meter.time_left()):
                    reply = await self.provider.complete(system, messages, tools)
            except TimeoutError:
                raise await self.meter.refuse("wall_time", "time ran out in a model call") from None
        usage, estimated = reply.usage, False
        if usage.input_tokens <= 0 and usage.output_tokens <= 0:
            # No usage from the provider: count characters both ways, erring high.
            sent = len(json.dumps([system, messages, tools], default=str))
            got = len(json.dumps(reply.to_json()["message"], default=str))
            per = CHARS_PER_TOKEN_ESTIMATE
            usage, estimated = TokenUsage(sent // per + 1, got // per + 1), True
        self.usage.add(usage)
        doc = reply.to_json()
        doc["usage"] = to_json(usage)
        if self.on_event is not None:
            await self.on_event(
                "model.response",
                content=reply.content,
                tool_calls=reply.calls_json(),
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                estimated=estimated,
                stop_reason=reply.stop_reason,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
            )
        return doc

    async def aclose(self) -> None:
        await self.provider.aclose()
