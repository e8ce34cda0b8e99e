"""The host's side of a task's channel: what the guest may ask, and what the host records.

Everything inside a sandbox is hostile, the guest's agent loop included, so these
handlers trust nothing they are sent:

``model.complete``  served by the :class:`~ironclaw.agent.gateway.Gateway`, which counts
                    and enforces the task's budget on the host.
``tool.authorize``  the host classifies the call from its name and arguments (any color,
                    server or tool the guest names alongside is ignored), decides, and
                    records ``tool.call``, ``tool.classified`` and ``tool.decision``.
``agent.event``     a guest report, recorded as ``source: guest`` and only of a guest kind
                    (see :meth:`TraceWriter.emit_guest`).

:class:`TaskHandlers` holds them for one task so that they can be driven without a
sandbox too (a peer over an in-memory connection), and :func:`await_guest` waits for
the guest's ``agent.run`` while the host's budget can end it early.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict

from ironclaw.agent.approval import Approver, CardReader, Decision
from ironclaw.agent.gateway import Gateway
from ironclaw.agent.trace import TraceEvent, TraceWriter
from ironclaw.errors import BudgetExceeded, ConfigError
from ironclaw.host.guest import GuestClient
from ironclaw.proto.jsonval import JsonObject, JsonValue
from ironclaw.rpc import CallContext, Peer

__all__ = ["GUEST_STATUSES", "HostOutcome", "TaskHandlers", "await_guest", "host_outcome"]

EventCallback = Callable[[TraceEvent], None]
#: What a guest may say about how its run ended; anything else is recorded as an error.
GUEST_STATUSES = frozenset({"completed", "budget_exceeded", "error"})
#: How long a guest has to wind down once the host has refused it for its budget.
BUDGET_GRACE_S = 5.0
MAX_REASON_CHARS = 500


class HostOutcome(TypedDict):
    """How a task ended, as the host records it (see :func:`host_outcome`)."""

    status: str
    reason: str | None
    answer: str | None
    steps: int
    tool_calls: int
    guest_reported: NotRequired[JsonObject]
    enforced_by: NotRequired[str]


class TaskHandlers:
    """``model.complete``, ``tool.authorize`` and ``agent.event`` for one task."""

    def __init__(
        self,
        *,
        gateway: Gateway,
        approver: Approver,
        trace: TraceWriter,
        read_for_card: CardReader | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.gateway = gateway
        gateway.on_event = self.emit  # the gateway's events go into this task's trace
        self.approver = approver
        self.trace = trace
        self.read_for_card = read_for_card
        self.on_event = on_event
        self.tool_calls = 0
        self._deciding = asyncio.Lock()

    async def emit(self, event: str, /, **fields: JsonValue) -> None:
        """Record a host event (and show it live)."""
        self._show(self.trace.emit(event, **fields))

    def _show(self, record: TraceEvent | None) -> None:
        if record is not None and self.on_event is not None:
            self.on_event(record)

    def register(self, peer: Peer) -> None:
        """Serve the guest's calls on ``peer``, each decoded and its reply checked."""
        guest = GuestClient(peer)
        guest.serve("model.complete", self.model_complete)
        guest.serve("tool.authorize", self.authorize)
        guest.serve("agent.event", self.agent_event)

    # Each reply is the JSON of the method's result record; GuestClient.serve checks it.

    async def model_complete(self, params: Any, ctx: CallContext | None = None) -> JsonObject:
        return await self.gateway.complete(params, ctx)

    async def authorize(self, params: Any, ctx: CallContext | None = None) -> JsonObject:
        call = params.get("call") if isinstance(params, Mapping) else None
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            raise ConfigError("tool.authorize needs {'call': {'name': str, 'arguments': {}}}")
        name, args = call["name"], call.get("arguments") or {}
        if not isinstance(args, Mapping):
            raise ConfigError(f"tool.authorize: arguments of {name[:80]!r} must be an object")
        if self._deciding.locked():
            # One decision at a time: a guest cannot stack up approval prompts.
            raise BudgetExceeded("max_concurrent: one tool authorization at a time")
        async with self._deciding:
            return await self._decide(str(call.get("id") or "")[:200], name, args)

    async def _decide(self, call_id: str, name: str, args: Mapping[str, Any]) -> JsonObject:
        self.tool_calls += 1
        await self.emit("tool.call", call_id=call_id, name=name, arguments=dict(args))
        cls = self.approver.policy.classify(name, args)
        await self.emit("tool.classified", call_id=call_id, color=cls.color.value,
                        reason=cls.reason)  # fmt: skip
        exceeded = self.gateway.meter.exceeded
        if exceeded is not None:
            why = f"the task is over its budget ({exceeded}): no tool call runs"
            decision, card = Decision(False, cls.color, why, "budget"), None
        else:
            decision, request = await self.approver.decide_call(name, args, self.read_for_card)
            card = request.card if request else None
        await self.emit("tool.decision", call_id=call_id, card=card, **decision.to_json())
        return decision.to_json()

    async def agent_event(self, params: Any, ctx: CallContext | None = None) -> JsonObject:
        self._show(self.trace.emit_guest(params))
        return {"ok": True}


async def await_guest(
    run: asyncio.Future[Any], gateway: Gateway, *, grace: float = BUDGET_GRACE_S
) -> Any:
    """The guest's ``agent.run`` result, unless the host's budget ends the task first.

    Over budget (a refused model call, or the host's wall time, which runs whether or
    not the guest calls anything), the guest has ``grace`` seconds to return (a
    well-behaved loop does: it counts too); then its run is cancelled and None returned.
    """
    meter = gateway.meter
    over = asyncio.ensure_future(meter.over_budget.wait())
    try:
        done, _ = await asyncio.wait(
            (run, over), timeout=meter.time_left(), return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            meter.expire("wall_time")
        if not run.done():
            await asyncio.wait((run,), timeout=grace)
        if not run.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
            return None
        return run.result()
    finally:
        over.cancel()


def host_outcome(claimed: JsonValue, gateway: Gateway, handlers: TaskHandlers) -> HostOutcome:
    """How the task ended, as the host records it.

    The counts are the host's; the guest's answer is kept as text; its status is taken
    only from :data:`GUEST_STATUSES`, and a budget the host enforced overrides it.
    """
    doc = claimed if isinstance(claimed, dict) else {}
    status = doc.get("status")
    reason = doc.get("reason") or doc.get("error")
    if not isinstance(status, str) or status not in GUEST_STATUSES:
        status, reason = "error", f"the guest reported no valid status ({str(status)[:80]!r})"
    answer = doc.get("answer")
    out = HostOutcome(
        status=status,
        reason=str(reason)[:MAX_REASON_CHARS] if reason else None,
        answer=None if answer is None else str(answer),
        steps=gateway.meter.steps,
        tool_calls=handlers.tool_calls,
        guest_reported={k: doc.get(k) for k in ("status", "steps", "tool_calls", "tokens")},
    )
    if gateway.meter.exceeded is not None:
        out["status"], out["reason"] = "budget_exceeded", gateway.meter.exceeded
        out["enforced_by"] = "host"
    return out
