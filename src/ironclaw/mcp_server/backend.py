"""What the MCP tools do, over the in-process sandbox manager.

The tools of ``ironclaw mcp`` are thin wrappers over :class:`LocalBackend`: it owns one
:class:`~ironclaw.host.manager.SandboxManager`, remembers the sandboxes it created (the
tools act on those only: an MCP client, often a model, should not reach sandboxes that
other programs run) and removes them when the server stops unless told to keep them.
Every answer is a JSON-ready dict; errors stay :class:`~ironclaw.errors.IronclawError`
and are turned into MCP tool errors one layer up.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass, field
from typing import Any

from ironclaw.config import Settings
from ironclaw.errors import ConfigError, IronclawError, SandboxNotFound
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.store import SandboxRecord

__all__ = ["APPROVE_MODES", "MAX_OUTPUT_LIMIT", "BoundedBuffer", "LocalBackend"]

#: Largest output one ``exec`` or ``read`` returns (a model's context is the scarce part).
MAX_OUTPUT_LIMIT = 1024 * 1024
#: RED calls with nobody to ask: refused (``green-only``) or nothing runs (``never``).
APPROVE_MODES = ("green-only", "never")


@dataclass
class BoundedBuffer:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def __call__(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)


def _limit(value: int) -> int:
    if not 1 <= value <= MAX_OUTPUT_LIMIT:
        raise ConfigError(f"max_output must be between 1 and {MAX_OUTPUT_LIMIT} bytes")
    return value


def _record_json(record: SandboxRecord) -> dict[str, Any]:
    spec = record.spec or {}
    limits = spec.get("limits") or {}
    return {
        "id": record.id,
        "backend": record.backend,
        "state": record.state,
        "reason": record.reason,
        "created_at": record.created_at,
        "image": spec.get("image"),
        "memory_mib": limits.get("memory_mib"),
    }


class LocalBackend:
    """Sandbox operations for the MCP tools, in this process."""

    def __init__(self, settings: Settings | None = None, *, keep: bool = False) -> None:
        self.manager = SandboxManager(settings)
        self.keep = keep
        self.owned: set[str] = set()

    async def open(self) -> None:
        await self.manager.open()

    async def aclose(self) -> None:
        """Remove the sandboxes made here (unless ``keep``), then close the manager."""
        try:
            if not self.keep:
                for sid in sorted(self.owned):
                    with contextlib.suppress(IronclawError):
                        await self.manager.destroy(sid)
                self.owned.clear()
        finally:
            await self.manager.aclose()

    def _mine(self, sandbox_id: str) -> str:
        if sandbox_id not in self.owned:
            known = ", ".join(sorted(self.owned)) or "none yet"
            raise SandboxNotFound(
                f"no sandbox {sandbox_id!r} made by this MCP server (yours: {known}); "
                "create one with sandbox_create"
            )
        return sandbox_id

    async def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        record = await self.manager.create(spec)
        self.owned.add(record.id)
        return _record_json(record)

    async def sandboxes(self) -> list[dict[str, Any]]:
        out = []
        for record in await self.manager.sandboxes():
            if record.id in self.owned:
                out.append(_record_json(record))
        return out

    async def get(self, sandbox_id: str) -> dict[str, Any]:
        return _record_json(await self.manager.get(self._mine(sandbox_id)))

    async def exec(
        self,
        sandbox_id: str,
        command: str | list[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        timeout: float = 60.0,
        max_output: int = 64 * 1024,
    ) -> dict[str, Any]:
        """Run a command: a string through ``/bin/sh -c``, a list as argv. Output beyond
        ``max_output`` bytes per stream is dropped and ``truncated`` says so."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv or not argv[-1 if isinstance(command, str) else 0].strip():
            raise ConfigError("command is empty: give a shell line or an argv list")
        if timeout <= 0:
            raise ConfigError("timeout must be more than 0 seconds")
        out, err = BoundedBuffer(_limit(max_output)), BoundedBuffer(max_output)
        result = await self.manager.exec(
            self._mine(sandbox_id),
            argv,
            cwd=cwd,
            env=env,
            timeout=timeout,
            stdin=stdin.encode() if stdin is not None else None,
            on_stdout=out,
            on_stderr=err,
            capture=False,
        )
        return {
            "exit_code": result.exit_code,
            "signal": result.signal,
            "status": result.status,
            "timed_out": result.timed_out,
            "stdout": out.data.decode(errors="replace"),
            "stderr": err.data.decode(errors="replace"),
            "stdout_bytes": out.total,
            "stderr_bytes": err.total,
            "truncated": out.truncated or err.truncated,
            "duration_ms": round(result.duration_ms, 1),
        }

    async def write_file(
        self, sandbox_id: str, path: str, content: str, *, encoding: str = "text"
    ) -> dict[str, Any]:
        if encoding == "text":
            data = content.encode()
        elif encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("content is not valid base64 (encoding='base64')") from None
        else:
            raise ConfigError(f"encoding {encoding!r}: use 'text' or 'base64'")
        size = await self.manager.write_file(self._mine(sandbox_id), path, data)
        return {"path": path, "size": size}

    async def read_file(
        self, sandbox_id: str, path: str, *, encoding: str = "text", max_bytes: int = 256 * 1024
    ) -> dict[str, Any]:
        if encoding not in ("text", "base64"):
            raise ConfigError(f"encoding {encoding!r}: use 'text' or 'base64'")
        buf = BoundedBuffer(_limit(max_bytes))
        await self.manager.read_file(self._mine(sandbox_id), path, buf)
        data = bytes(buf.data)
        if encoding == "base64":
            content = base64.b64encode(data).decode()
        else:
            try:
                content = data.decode()
            except UnicodeDecodeError:
                if not buf.truncated:
                    raise ConfigError(
                        f"{path} is not UTF-8 text; read it with encoding='base64'"
                    ) from None
                content = data.decode(errors="ignore")  # a character cut at the limit
        return {
            "path": path,
            "encoding": encoding,
            "content": content,
            "size": buf.total,
            "truncated": buf.truncated,
        }

    async def destroy(self, sandbox_id: str) -> dict[str, Any]:
        await self.manager.destroy(self._mine(sandbox_id))
        self.owned.discard(sandbox_id)
        return {"id": sandbox_id, "destroyed": True}

    async def run_task(
        self,
        task: str,
        *,
        model: str,
        script: list[dict[str, Any]] | None,
        approve: str,
        sandbox: dict[str, Any],
        budget: dict[str, Any],
        keep: bool,
    ) -> dict[str, Any]:
        """An agent task in a fresh sandbox; the model is reached through the host's
        gateway, which alone holds the API key. RED calls follow ``approve``."""
        from ironclaw.agent.approval import Approver
        from ironclaw.agent.gateway import Provider, ScriptedProvider, provider_from_name
        from ironclaw.agent.tasks import TaskSpec, run_task
        from ironclaw.guest.agent_loop import Budget

        if approve not in APPROVE_MODES:
            raise ConfigError(
                f"approve={approve!r}: with nobody to ask, use one of {', '.join(APPROVE_MODES)}"
            )
        provider: Provider
        if script is not None:
            provider = ScriptedProvider(script)
        elif model.startswith("scripted"):
            raise ConfigError("a scripted model takes its turns inline in 'script'")
        else:
            provider = provider_from_name(model)
        spec = TaskSpec(
            task=task,
            model=f"{provider.name}:{provider.model}",
            sandbox=sandbox,
            budget=Budget.from_json(budget),
        )
        outcome = await run_task(
            self.manager, spec, provider=provider, approver=Approver(mode=approve), keep=keep
        )
        if keep:
            self.owned.add(outcome.sandbox_id)
        doc = outcome.to_json()
        doc["kept"] = keep
        names = {
            e.get("call_id"): e.get("name") for e in outcome.events if e["event"] == "tool.call"
        }
        doc["decisions"] = [
            {
                "name": names.get(e.get("call_id")),
                "color": e.get("color"),
                "approved": e.get("approved"),
                "reason": e.get("reason"),
            }
            for e in outcome.events
            if e.get("event") == "tool.decision"
        ]
        return doc
