"""A tiny per-sandbox watchdog for backends whose process cannot run under ``timeout``.

A QEMU sandbox's process drops its own privileges (``-runas``), which clears any
parent-death signal, and it is not started under a supervisor that could enforce a
wall-time limit. The watchdog is a separate process, as unprivileged as the sandbox,
that holds a pidfd to it (no pid-reuse race) and SIGKILLs it when the wall-time limit
passes or, for a one-shot sandbox, when the owning process dies. It exits as soon as
the sandbox does. It reads nothing from the sandbox.
"""

from __future__ import annotations

import subprocess

__all__ = ["WATCHDOG", "spawn_watchdog"]

WATCHDOG = r"""
import os, select, signal, sys
target, seconds, owner = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
try:
    t = os.pidfd_open(target)
except ProcessLookupError:
    sys.exit(0)
poll = select.poll()
poll.register(t, select.POLLIN)
if owner > 0:
    try:
        poll.register(os.pidfd_open(owner), select.POLLIN)
    except ProcessLookupError:
        seconds = 0.001
ready = poll.poll(int(seconds * 1000) if seconds > 0 else None)
if not any(fd == t for fd, _ in ready):
    try:
        signal.pidfd_send_signal(t, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def spawn_watchdog(
    pid: int,
    *,
    uid: int,
    wall_time_s: float | None,
    owner_pid: int | None,
    python: str = "/usr/bin/python3",
) -> int | None:
    """Start the watchdog (blocking: call it off the event loop); None if not needed."""
    if not wall_time_s and not owner_pid:
        return None
    proc = subprocess.Popen(
        [python, "-I", "-S", "-B", "-c", WATCHDOG, str(pid), str(wall_time_s or 0),
         str(owner_pid or 0)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
    )  # fmt: skip
    return proc.pid
