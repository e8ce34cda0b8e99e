"""Event-loop stall detection: a blocked loop stalls every sandbox at once.

Two parts that work together:

* a *ticker* task on the loop that wakes every ``interval`` and records how late it
  woke (the loop's lag: what the benchmark reports as stall times);
* a *watchdog* thread that notices while the loop is still stuck (no tick for longer
  than ``threshold``) and captures the loop thread's Python stack at that moment, so
  the log says what was running, not just that something was.

Enable it in debug mode (``IRONCLAW_DEBUG_LOOP=1`` in the CLI) or around a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

__all__ = ["LoopLagMonitor", "Stall"]

log = logging.getLogger("ironclaw.looplag")


@dataclass(frozen=True)
class Stall:
    """A stall the watchdog caught while it lasted: how long the loop had gone without a
    tick by then (so at least this long), and the loop thread's stack at that moment."""

    lag_ms: float
    stack: str


@dataclass
class LoopLagMonitor:
    """Measures loop lag; logs stalls over ``threshold_ms`` with the blocking stack."""

    threshold_ms: float = 20.0
    interval_ms: float = 1.0
    lags_ms: list[float] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _last_tick: float = 0.0
    _loop_thread: int = 0

    async def __aenter__(self) -> LoopLagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._stop.clear()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="looplag-ticker")
        self._thread = threading.Thread(target=self._watch, name="looplag-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._thread is not None:
            self._thread.join(1.0)

    async def _tick(self) -> None:
        interval = self.interval_ms / 1000
        while True:
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.lags_ms.append(max(0.0, (now - before - interval) * 1000))
            self._last_tick = now

    def _watch(self) -> None:
        threshold = self.threshold_ms / 1000
        reported_for = 0.0
        while not self._stop.wait(threshold / 4):
            stuck = time.monotonic() - self._last_tick
            if stuck > threshold and self._last_tick != reported_for:
                reported_for = self._last_tick
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "?"
                stall = Stall(stuck * 1000, stack)
                self.stalls.append(stall)
                log.warning(
                    "event loop blocked for %.1f ms; it was running:\n%s", stall.lag_ms, stack
                )

    @property
    def max_ms(self) -> float:
        return max(self.lags_ms, default=0.0)

    def percentile(self, q: float) -> float:
        if not self.lags_ms:
            return 0.0
        ordered = sorted(self.lags_ms)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
