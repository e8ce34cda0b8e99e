"""Our terminal handed to a command's PTY (``exec -t``), in-process or through the API:
raw mode, window size followed, keys sent on, all undone when the command ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from ironclaw.errors import ConfigError

__all__ = ["raw_terminal", "terminal_size"]


def terminal_size() -> tuple[int, int]:
    """Columns and rows of the terminal on stdin (there must be one)."""
    if not os.isatty(0):
        raise ConfigError("-t needs a terminal on stdin: run it from a shell, or drop -t")
    cols, rows = os.get_terminal_size(0)
    return cols, rows


@contextlib.asynccontextmanager
async def raw_terminal(
    resize: Callable[[int, int], Coroutine[Any, Any, None]],
    send_keys: Callable[[AsyncIterator[bytes]], Awaitable[None]],
) -> AsyncIterator[None]:
    """Raw mode on stdin while inside: each window change goes to ``resize`` and the keys,
    in the order typed, to ``send_keys``; the terminal is restored on the way out."""
    import termios
    import tty

    loop = asyncio.get_running_loop()
    saved = termios.tcgetattr(0)
    resizes: set[asyncio.Task[None]] = set()

    def on_winch() -> None:
        size = os.get_terminal_size(0)
        task = loop.create_task(resize(size.columns, size.lines))
        resizes.add(task)
        task.add_done_callback(resizes.discard)

    async def keys() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
        loop.add_reader(0, lambda: queue.put_nowait(os.read(0, 4096)) if not queue.full() else None)
        try:
            while chunk := await queue.get():
                yield chunk
        finally:
            loop.remove_reader(0)

    tty.setraw(0, termios.TCSANOW)  # not TCSAFLUSH: keys typed ahead are kept
    loop.add_signal_handler(signal.SIGWINCH, on_winch)
    feeder = asyncio.ensure_future(send_keys(keys()))
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGWINCH)
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        feeder.cancel()
        with contextlib.suppress(BaseException):
            await feeder
        sys.stdout.flush()
