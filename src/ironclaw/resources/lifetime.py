"""Per-sandbox lifetimes (deadline, idle timeout) enforced without a daemon.

Each sandbox with a lifetime gets a small watchdog process, like the wall-time one in
:mod:`ironclaw.resources.watchdog`: it holds a pidfd to the sandbox's process and
reads ``lifetime.json`` in the sandbox's runtime directory about once a second. The
manager rewrites that file atomically (temp file + rename) to move the deadline, mark a
pause or a resume; every exec or file call touches ``activity`` beside it, whose mtime
is the idle clock. Connecting to a sandbox touches nothing, so it never resets a timer.

When a timer runs out the watchdog either kills the sandbox (``on_timeout: destroy``;
the manager then sees it dead, with the reason from the file, and ``gc`` removes it) or
pauses it (cgroup freezer, or QMP ``stop`` for QEMU) and records the pause. ``gc``
applies the same rule itself (:func:`due`), so a sandbox whose watchdog was killed still
ends on time at the next ``gc``.

How pauses count: the deadline is wall-clock time and keeps running while paused; the
idle timer does not run while paused, and resuming counts as activity.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from functools import cache
from pathlib import Path
from typing import TypedDict, cast

from ironclaw.resources.watchdog import PIDFD_POLL, spawn_script

__all__ = [
    "ACTIVITY_FILE",
    "LIFETIME_FILE",
    "LifetimeDoc",
    "PauseActions",
    "due",
    "lifetime_watchdog",
    "read_lifetime",
    "spawn_lifetime_watchdog",
    "touch_activity",
    "write_lifetime",
]

LIFETIME_FILE = "lifetime.json"
ACTIVITY_FILE = "activity"


class PauseActions(TypedDict, total=False):
    """How the watchdog pauses a sandbox: QMP ``stop`` on this socket (QEMU), or these
    ``[path, value]`` writes to its cgroup freezer (and their undoing)."""

    qmp: str
    freeze: list[list[str]]
    thaw: list[list[str]]


class LifetimeDoc(TypedDict, total=False):
    """``lifetime.json``: written by the manager, read and updated by the watchdog."""

    deadline: float | None  # epoch seconds; wall-clock, runs on while paused
    idle_timeout: float | None
    on_timeout: str  # destroy | pause
    activity: str  # the file whose mtime is the idle clock
    started: float
    paused: bool
    paused_by: str  # why the watchdog paused it
    pause: PauseActions
    watchdog: int  # the watchdog's pid
    ended: str  # why the watchdog ended it
    error: str


# Standalone (python -I -S): :func:`due` itself (its source is put in), plus the pause and
# kill actions.
_WATCHDOG_HEAD = (
    r"""from __future__ import annotations
import json, os, select, signal, socket, sys, time
path, target = sys.argv[1], int(sys.argv[2])
"""
    + PIDFD_POLL
)
_WATCHDOG_BODY = r"""
def load():
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def save(doc):
    tmp = path + ".wd"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)

def qmp_stop(sock_path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    f = s.makefile("rwb")
    f.readline()
    for cmd in ("qmp_capabilities", "stop"):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while b'"return"' not in f.readline():
            pass
    s.close()

def write_all(pairs):
    for p, v in pairs:
        try:
            with open(p, "w") as f:
                f.write(v)
        except OSError:
            pass

while True:
    doc = load()
    if doc is not None:
        why = due(doc, time.time())
        pause = doc.get("pause") or {}
        if why and doc.get("on_timeout") == "pause":
            try:
                if pause.get("qmp"):
                    qmp_stop(pause["qmp"])
                else:
                    write_all(pause.get("freeze", []))
                doc.update(paused=True, paused_by=why)
            except OSError as exc:
                doc["error"] = "pause failed: %s" % exc
            save(doc)
        elif why:
            doc["ended"] = why
            save(doc)
            try:
                signal.pidfd_send_signal(t, signal.SIGKILL)
            except ProcessLookupError:
                pass
            write_all(pause.get("thaw", []))  # a frozen task dies only once thawed
    if poll.poll(1000):
        sys.exit(0)
"""


def read_lifetime(run_dir: Path) -> LifetimeDoc | None:
    """The sandbox's lifetime document, or None if it has no lifetime."""
    try:
        with open(run_dir / LIFETIME_FILE) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return cast(LifetimeDoc, doc) if isinstance(doc, dict) else None


def write_lifetime(run_dir: Path, doc: LifetimeDoc) -> None:
    """Replace the document atomically (the watchdog never reads half a file)."""
    tmp = run_dir / (LIFETIME_FILE + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, run_dir / LIFETIME_FILE)


def touch_activity(run_dir: Path) -> None:
    """Record activity now (the idle clock is this file's mtime)."""
    path = run_dir / ACTIVITY_FILE
    try:
        os.utime(path)
    except FileNotFoundError:
        path.touch(mode=0o600)


def due(doc: LifetimeDoc, now: float | None = None) -> str | None:
    """Why the sandbox's lifetime has run out now, or None (the watchdog's rule)."""
    now = time.time() if now is None else now
    if doc.get("ended"):
        return None
    paused = bool(doc.get("paused"))
    deadline = doc.get("deadline")
    if (
        deadline is not None
        and now >= deadline
        and not (paused and doc.get("on_timeout") == "pause")
    ):
        return "timeout: deadline reached"
    idle = doc.get("idle_timeout")
    if idle and not paused:
        try:
            last = os.stat(doc["activity"]).st_mtime
        except (OSError, KeyError):
            last = float(doc.get("started", now))
        if now - last >= idle:
            return f"timeout: idle for {idle:g}s"
    return None


@cache
def lifetime_watchdog() -> str:
    """The watchdog script: the shared start, :func:`due`'s own source, the loop."""
    import inspect

    return _WATCHDOG_HEAD + inspect.getsource(due) + _WATCHDOG_BODY


def spawn_lifetime_watchdog(run_dir: Path, pid: int, *, python: str = "/usr/bin/python3") -> int:
    """Start the watchdog for the sandbox process ``pid`` (blocking: off the event loop).

    It runs as root because pausing writes the sandbox's freezer (or QMP socket), which
    the sandbox's own uid must not reach; it reads only the files named above, which
    live in the root-only runtime directory.
    """
    script = lifetime_watchdog()
    return spawn_script(python, script, run_dir / LIFETIME_FILE, pid, stdout=subprocess.DEVNULL).pid
