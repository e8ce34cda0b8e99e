"""A tiny per-sandbox watchdog for backends whose process cannot run under ``timeout``.

A QEMU sandbox's process drops its own privileges (``-runas``), which clears any
parent-death signal, and it is not started under a supervisor that could enforce a
wall-time limit. The watchdog is a separate process that holds a pidfd to it (no
pid-reuse race) and SIGKILLs it when the wall-time limit passes or, for a one-shot
sandbox, when the owning process dies. It exits as soon as the sandbox does. It reads
nothing from the sandbox.

A guest that escapes into QEMU must not be able to end its own watchdog, so the
watchdog does not share QEMU's uid. It takes its pidfds as root, then keeps no
capability and drops to real and saved uid :func:`watchdog_uid` with *effective* uid
QEMU's. The kernel lets a signal through when the sender's real or effective uid equals
the target's real or saved uid: the watchdog's effective uid matches QEMU's, while none
of QEMU's uids matches the watchdog's real or saved one, so the permission runs one way
only. Nor can QEMU's uid ptrace it (that needs all three uids to match, and the uid change
made it non-dumpable). A pidfd alone would not do: ``pidfd_send_signal`` checks the same
permission at send time. The nice value and scheduler policy, which an equal effective
uid could change, are out of QEMU's reach through its seccomp filter
(``resourcecontrol=deny``).
"""

from __future__ import annotations

import os
import subprocess

from ironclaw.config import DEFAULT_UID_BASE
from ironclaw.errors import BackendError, ConfigError

__all__ = ["PIDFD_POLL", "WATCHDOG", "spawn_script", "spawn_watchdog", "watchdog_uid"]

#: How every watchdog script starts, once it has ``target``: a pidfd on it in a poll set
#: (or exit at once if it is gone already). Needs ``os``, ``select`` and ``sys``.
PIDFD_POLL = r"""
try:
    t = os.pidfd_open(target)
except ProcessLookupError:
    sys.exit(0)
poll = select.poll()
poll.register(t, select.POLLIN)
"""

WATCHDOG = (
    r"""
import os, select, signal, sys
target, seconds, owner = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
uid, as_uid = int(sys.argv[4]), int(sys.argv[5])
"""
    + PIDFD_POLL
    + r"""
if owner > 0:
    try:
        poll.register(os.pidfd_open(owner), select.POLLIN)
    except ProcessLookupError:
        seconds = 0.001
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, as_uid, uid)
if os.getresuid() != (uid, as_uid, uid) or os.getresgid() != (uid, uid, uid):
    sys.exit(3)
os.write(1, b"1")
os.close(1)
ready = poll.poll(int(seconds * 1000) if seconds > 0 else None)
if not any(fd == t for fd, _ in ready):
    try:
        signal.pidfd_send_signal(t, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""
)


def spawn_script(python: str, script: str, *args: object, stdout: int) -> subprocess.Popen[bytes]:
    """Run ``script`` on an isolated interpreter (no site, no user paths, no bytecode)
    in its own session, with ``args`` as its argv; only ``stdout`` may be kept."""
    argv = [python, "-I", "-S", "-B", "-c", script, *(str(a) for a in args)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")  # fmt: skip


def watchdog_uid() -> int:
    """The watchdogs' own host uid: two below the sandboxes' range (the proxies' is one)."""
    return int(os.environ.get("IRONCLAW_UID_BASE", DEFAULT_UID_BASE)) - 2


def spawn_watchdog(
    pid: int,
    *,
    uid: int,
    wall_time_s: float | None,
    owner_pid: int | None,
    python: str = "/usr/bin/python3",
    own_uid: int | None = None,
) -> int | None:
    """Start the watchdog for ``pid`` (running as ``uid``); None if not needed.

    Blocking (call it off the event loop): returns once the watchdog holds its pidfds and
    has dropped to ``own_uid`` (default :func:`watchdog_uid`), or None if ``pid`` is gone.
    """
    if not wall_time_s and not owner_pid:
        return None
    own = watchdog_uid() if own_uid is None else own_uid
    if own in (uid, 0) or uid == 0:
        raise ConfigError(f"the watchdog's uid {own} must differ from root and the VM's uid {uid}")
    args = (pid, wall_time_s or 0, owner_pid or 0, own, uid)
    proc = spawn_script(python, WATCHDOG, *args, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        ready = proc.stdout.read(1)
    if ready == b"1":
        return proc.pid
    if proc.wait() == 0:
        return None  # the target was already gone
    raise BackendError(f"the VM watchdog could not drop to uid {own} (exit {proc.returncode})")
