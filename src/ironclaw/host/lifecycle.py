"""Graceful shutdown for long-running commands (``serve``, ``run``).

On SIGTERM or SIGINT the main task is cancelled, every sandbox the process created is
stopped and removed, and only then does the process exit: a service that is asked to
stop leaves nothing behind. (A SIGKILL cannot be caught; ``ironclaw gc`` and the
reconcile at every manager start clean up after that.)
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ironclaw.host.manager import SandboxManager

__all__ = ["run_until_signalled"]

T = TypeVar("T")


async def run_until_signalled(
    manager: SandboxManager, main: Callable[[], Awaitable[T]]
) -> T | None:
    """Run ``main()``; on SIGTERM/SIGINT cancel it and destroy the manager's sandboxes.

    Returns ``main``'s result, or None when a signal stopped it.
    """
    loop = asyncio.get_running_loop()
    task: asyncio.Task[T] = asyncio.ensure_future(main())
    stopped = asyncio.Event()

    def on_signal() -> None:
        stopped.set()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        return await task
    except asyncio.CancelledError:
        if not stopped.is_set():
            raise
        return None
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await asyncio.shield(manager.destroy_owned())
