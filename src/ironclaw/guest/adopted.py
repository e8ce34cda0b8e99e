"""Commands the first stage started, carried on by the full agent after the handover.

See :mod:`ironclaw.guest.first_stage`: a command it was running when something else came
is not started again; the full agent's ``exec`` handler picks it up from a
:class:`~ironclaw.guest.first_stage.Running` and waits on it through this wrapper.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ironclaw.guest.first_stage import Running

__all__ = ["AdoptedProcess", "discard"]


class AdoptedProcess:
    """Waited on like an ``asyncio.subprocess.Process``: its pidfd on the loop, then reaped."""

    def __init__(self, running: Running) -> None:
        self.pid = running.pid
        self.returncode = running.returncode
        self._pidfd = running.pidfd

    async def wait(self) -> int:
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self._pidfd, on_exit)
            try:
                await exited
            finally:
                loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            # The pidfd is readable: the child has exited, reaping it does not block.
            status = os.waitpid(self.pid, os.WNOHANG)[1]  # noqa: ASYNC222
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def discard(running: Running) -> None:
    """A command whose request never ran (the channel ended first): killed, fds closed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(running.pid, signal.SIGKILL)
    for fd in (running.out_r, running.err_r, running.pidfd):
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
