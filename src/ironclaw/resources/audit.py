"""A sandbox's audit log: JSON lines appended by root, read into a task's trace.

Every change of a sandbox's state (create, destroy, pause, resume, timeout, snapshot,
restore, network policy, exposed ports) is one line: ``event``, ``sandbox_id``, ``ts``
and ``who`` (the host user and process that asked, and through what: the CLI, the SDK
or, when the service sets :func:`acting_as`, the API token), plus the event's details.
The log lives in the sandbox's state directory, which outlives the sandbox.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import pwd
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ironclaw.config import Settings, ensure_private_dir, safe_join

__all__ = [
    "acting_as",
    "acting_via",
    "append_line",
    "audit_path",
    "read_events",
    "record",
    "record_async",
]

_via: contextvars.ContextVar[str | None] = contextvars.ContextVar("audit_via", default=None)


def append_line(path: Path, line: str) -> None:
    """Append one line to an audit log (root-owned, 0600), creating it if needed.

    One ``write`` with ``O_APPEND``: lines from the proxy and the orchestrator interleave
    whole, never torn.
    """
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def audit_path(settings: Settings, sandbox_id: str) -> Path:
    return safe_join(settings.sandbox_state_dir(sandbox_id), "audit.jsonl")


@contextlib.contextmanager
def acting_as(via: str) -> Iterator[None]:
    """Name who asked for the changes made in this context (e.g. ``api:token-name``)."""
    token = _via.set(via)
    try:
        yield
    finally:
        _via.reset(token)


def acting_via() -> str | None:
    """Who :func:`acting_as` names here, if anyone: carried along when the change is
    made in another process (a cluster node)."""
    return _via.get()


def _who() -> dict[str, Any]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return {"uid": uid, "user": user, "pid": os.getpid(), "via": _via.get() or program}


def record(settings: Settings, sandbox_id: str, event: str, **details: Any) -> None:
    """Append ``event`` with who asked and when to the sandbox's audit log."""
    doc = {"event": event, "sandbox_id": sandbox_id, "ts": time.time(), "who": _who(), **details}
    append_line(audit_path(settings, sandbox_id), json.dumps(doc, default=str))


async def record_async(settings: Settings, sandbox_id: str, event: str, **details: Any) -> None:
    """:func:`record` off the event loop (``to_thread`` keeps the caller's ``acting_as``)."""
    import asyncio  # here: the one-shot CLI records without an event loop

    await asyncio.to_thread(record, settings, sandbox_id, event, **details)


def read_events(settings: Settings, sandbox_id: str) -> list[dict[str, Any]]:
    """Every line of the sandbox's audit log, oldest first (none if it has none)."""
    try:
        text = audit_path(settings, sandbox_id).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
