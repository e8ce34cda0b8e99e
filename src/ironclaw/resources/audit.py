"""A sandbox's audit log: JSON lines appended by root, read into a task's trace."""

from __future__ import annotations

import os
from pathlib import Path

from ironclaw.config import ensure_private_dir

__all__ = ["append_line"]


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
