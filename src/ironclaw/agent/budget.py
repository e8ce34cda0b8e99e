"""A task's model budget, counted and enforced on the host.

The guest's loop counts its steps and tokens too, but the guest is hostile by
assumption: these counts are the ones that hold. :class:`BudgetMeter` admits each
``model.complete`` call (steps, tokens, cost, wall time, concurrent calls) and refuses
the rest with :class:`~ironclaw.errors.BudgetExceeded`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ironclaw.errors import BudgetExceeded, ConfigError
from ironclaw.proto.agent_methods import TokenUsage

__all__ = [
    "CHARS_PER_TOKEN_ESTIMATE",
    "PRICES",
    "BudgetMeter",
    "EventSink",
    "GatewayLimits",
    "TaskUsage",
]

#: USD per million (input, output) tokens; unknown models cost 0 (reported as unknown).
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "claude-3-5-haiku-latest": (0.8, 4.0),
    "claude-3-5-sonnet-latest": (3.0, 15.0),
    "claude-sonnet-4-0": (3.0, 15.0),
    "claude-opus-4-0": (15.0, 75.0),
}
#: Characters per token when a provider reports no usage: fewer than the usual ~4, so
#: the estimate errs high and a budget is never outrun by a provider that does not count.
CHARS_PER_TOKEN_ESTIMATE = 3

EventSink = Callable[..., Awaitable[None]]


@dataclass
class TaskUsage:
    """Per-task accounting, in the units bills use."""

    model: str = ""
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    price: tuple[float, float] | None = None

    def unit_price(self) -> tuple[float, float] | None:
        return self.price if self.price is not None else PRICES.get(self.model)

    def add(self, usage: TokenUsage) -> None:
        self.requests += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        price = self.unit_price()
        if price is None:
            self.cost_usd = None
        elif self.cost_usd is not None:
            self.cost_usd += (usage.input_tokens * price[0] + usage.output_tokens * price[1]) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
        }


@dataclass(frozen=True)
class GatewayLimits:
    """A task's budget as the host enforces it (None: no limit of that kind).

    ``price`` (USD per million input, output tokens) overrides :data:`PRICES` for the
    cost budget; a cost budget on a model without a price is refused up front.
    """

    max_steps: int | None = None
    max_tokens: int | None = None
    max_cost_usd: float | None = None
    max_concurrent: int = 2
    wall_time_s: float | None = None
    price: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ConfigError("max_concurrent model calls must be at least 1")
        for name in ("max_steps", "max_tokens", "max_cost_usd", "wall_time_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"budget {name} must be positive")


class BudgetMeter:
    """Admits model calls while the budget has room; the first limit hit ends the task.

    Over a limit the call fails with :class:`BudgetExceeded` and a ``model.refused``
    event is recorded. Every limit but concurrency also sets :attr:`exceeded` (its name)
    and :attr:`over_budget`, and refuses every later call: the task ends with status
    ``budget_exceeded`` whatever the guest says. Excess concurrent calls are refused at
    once, never queued, and do not end the task.
    """

    def __init__(self, limits: GatewayLimits, usage: TaskUsage, on_event: EventSink | None) -> None:
        if limits.price is not None:
            usage.price = limits.price
        if limits.max_cost_usd is not None and usage.unit_price() is None:
            raise ConfigError(
                f"a cost budget needs the price of {usage.model!r}, which is not in the "
                "price table: give the price or drop the cost budget"
            )
        self.limits = limits
        self.usage = usage
        self.on_event = on_event
        self.steps = 0
        self.exceeded: str | None = None
        self.over_budget = asyncio.Event()
        self.slots = asyncio.Semaphore(limits.max_concurrent)
        self._deadline: float | None = None

    def start_clock(self) -> None:
        """Start the wall-time budget (when the guest is told to start)."""
        if self.limits.wall_time_s is not None:
            self._deadline = time.monotonic() + self.limits.wall_time_s

    def time_left(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def expire(self, limit: str) -> None:
        """End the task for ``limit`` without a call to refuse (the wall time ran out)."""
        if self.exceeded is None:
            self.exceeded = limit
            self.over_budget.set()

    async def refuse(self, limit: str, why: str, *, ends_task: bool = True) -> BudgetExceeded:
        """Record a refusal and return the error to raise."""
        if ends_task and self.exceeded is None:
            self.exceeded = limit
            self.over_budget.set()
        if self.on_event is not None:
            await self.on_event("model.refused", limit=limit, reason=why, steps=self.steps)
        return BudgetExceeded(f"{limit}: {why}")

    async def admit(self) -> None:
        """Refuse a call the budget has no room for; else count it as a step."""
        lim, u = self.limits, self.usage
        tokens = u.input_tokens + u.output_tokens
        if self.exceeded is not None:
            raise await self.refuse(self.exceeded, "the task is over its budget")
        if lim.max_steps is not None and self.steps >= lim.max_steps:
            made = f"{self.steps} of {lim.max_steps} model calls made"
            raise await self.refuse("max_steps", made)
        if lim.max_tokens is not None and tokens >= lim.max_tokens:
            raise await self.refuse("max_tokens", f"{tokens} of {lim.max_tokens} tokens used")
        if lim.max_cost_usd is not None and (u.cost_usd or 0.0) >= lim.max_cost_usd:
            spent = f"${u.cost_usd or 0.0:.4f} of ${lim.max_cost_usd:g} spent"
            raise await self.refuse("max_cost_usd", spent)
        if self.time_left() == 0.0:
            raise await self.refuse("wall_time", f"the {lim.wall_time_s:g} s are up")
        if self.slots.locked():
            raise await self.refuse(
                "max_concurrent",
                f"{lim.max_concurrent} model calls already in flight for this task",
                ends_task=False,
            )
        self.steps += 1
