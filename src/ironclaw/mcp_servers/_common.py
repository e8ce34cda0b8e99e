"""What the built-in servers share: the workspace, path resolution, running a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

__all__ = ["MAX_OUTPUT", "format_process", "resolve", "run_process", "tool_errors", "workspace"]

#: Output beyond this is cut (the model's context is the scarce resource, not the disk).
MAX_OUTPUT = 64 * 1024


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Let the model see why a call failed (the SDK hides unexpected exceptions' text)."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc


def workspace() -> Path:
    return Path(os.environ.get("IRONCLAW_WORKSPACE") or os.getcwd())


def resolve(path: str) -> Path:
    """A path relative to the workspace, or absolute; the jail bounds what it reaches."""
    if not path or "\0" in path:
        raise ValueError("path must be a non-empty string")
    p = Path(path)
    return p if p.is_absolute() else workspace() / p


def _cut(data: bytes) -> str:
    text = data[:MAX_OUTPUT].decode(errors="replace")
    if len(data) > MAX_OUTPUT:
        text += f"\n[... {len(data) - MAX_OUTPUT} more bytes cut]"
    return text


async def run_process(
    argv: list[str], *, cwd: Path, timeout: float, stdin: bytes | None = None
) -> tuple[int, bytes, bytes, bool]:
    """Run ``argv`` in its own process group; on timeout kill the whole group."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=str(cwd),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    timed_out = False
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = await proc.communicate()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, out, err, timed_out


def format_process(rc: int, out: bytes, err: bytes, timed_out: bool, timeout: float) -> str:
    head = f"timed out after {timeout:g}s (killed)" if timed_out else f"exit code {rc}"
    parts = [head]
    if out:
        parts.append("--- stdout ---\n" + _cut(out))
    if err:
        parts.append("--- stderr ---\n" + _cut(err))
    return "\n".join(parts)
