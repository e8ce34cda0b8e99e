"""What the MCP tools do: :class:`SandboxTools`, over the in-process manager
(:class:`LocalBackend`) or over ``ironclaw serve``
(:class:`~ironclaw.mcp_server.remote.RemoteBackend`).

The tools of ``ironclaw mcp`` are thin wrappers over a backend: it remembers the
sandboxes it created (the tools act on those only: an MCP client, often a model, should
not reach sandboxes that other programs run) and removes them when the server stops
unless told to keep them. The argument checks, output bounds and encodings live in the
base class once, over the calls the manager and the API client share
(:class:`SandboxService`); a subclass supplies the rest. Every answer is a ``TypedDict``
the MCP SDK publishes as the tool's output schema; errors stay
:class:`~ironclaw.errors.IronclawError` and become MCP tool errors one layer up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, Unpack

from typing_extensions import TypedDict

from ironclaw.agent.tasks import TaskDoc
from ironclaw.agent.trace import TraceEvent
from ironclaw.client.protocol import ExecResultLike
from ironclaw.config import Settings
from ironclaw.errors import ConfigError, IronclawError, SandboxNotFound
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.jsonval import JsonObject, JsonValue
from ironclaw.proto.methods import Budget
from ironclaw.proto.surface import ExecOptions, OutputSink
from ironclaw.resources.store import SandboxRecord

__all__ = [
    "APPROVE_MODES",
    "MAX_OUTPUT_LIMIT",
    "Backend",
    "BoundedBuffer",
    "Destroyed",
    "ExecOutput",
    "ExecRun",
    "FileRead",
    "FileWritten",
    "LocalBackend",
    "Progress",
    "SandboxService",
    "SandboxTools",
    "SandboxView",
    "TaskRun",
    "TaskSummary",
    "ToolDecision",
]

#: Largest output one ``exec`` or ``read`` returns (a model's context is the scarce part).
MAX_OUTPUT_LIMIT = 1024 * 1024
#: RED calls with nobody to ask: refused (``green-only``) or nothing runs (``never``).
APPROVE_MODES = ("green-only", "never")
#: Told of each trace event of an agent task: (its number, the event).
Progress = Callable[[int, TraceEvent], Awaitable[None]]

# What the tools answer. TypedDicts (from typing_extensions, which pydantic reads on
# Python 3.11) so that the MCP SDK publishes each tool's output schema and checks it.


class SandboxView(TypedDict):
    """What a tool shows of a sandbox (``sandbox_create``, ``sandbox_list``, resources)."""

    id: str
    backend: str | None
    state: str | None
    reason: str | None
    created_at: float | None
    image: str | None
    memory_mib: int | None


class ExecOutput(TypedDict):
    """``sandbox_exec``: the result, each stream cut at ``max_output`` bytes."""

    exit_code: int
    signal: int | None
    status: str
    timed_out: bool
    duration_ms: float
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool


class FileWritten(TypedDict):
    path: str
    size: int


class FileRead(TypedDict):
    path: str
    encoding: str
    content: str
    size: int
    truncated: bool


class Destroyed(TypedDict):
    id: str
    destroyed: bool


class ToolDecision(TypedDict):
    """One RED/GREEN decision of an agent task, as the calling model sees it."""

    name: str | None
    color: str | None
    approved: bool | None
    reason: str | None


class TaskSummary(TaskDoc):
    """``agent_run``: the task's outcome, whether its sandbox was kept, each decision."""

    kept: bool
    decisions: list[ToolDecision]


R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class SandboxService(Protocol[R_co]):
    """What the manager and the API client both offer, under the same names (``R_co``:
    how each describes a sandbox): the tools run through it once, whichever side the
    sandboxes are on."""

    async def aclose(self) -> None: ...

    async def create(self, spec: JsonObject) -> R_co: ...

    async def get(self, sandbox_id: str) -> R_co: ...

    async def exec(
        self, sandbox_id: str, argv: list[str], **opts: Unpack[ExecOptions]
    ) -> ExecResultLike: ...

    async def write_file(self, sandbox_id: str, path: str, data: bytes) -> int: ...

    async def read_file(
        self, sandbox_id: str, path: str, sink: OutputSink | None = None
    ) -> bytes: ...


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


def _str(value: JsonValue) -> str | None:
    return value if isinstance(value, str) else None


def sandbox_view(
    sandbox_id: str,
    backend: str,
    state: str,
    reason: str | None,
    created_at: float,
    spec: Mapping[str, JsonValue],
) -> SandboxView:
    """What a tool shows of a sandbox, from a record's fields (local or over the API)."""
    limits = spec.get("limits")
    memory = limits.get("memory_mib") if isinstance(limits, dict) else None
    return SandboxView(
        id=sandbox_id,
        backend=backend,
        state=state,
        reason=reason,
        created_at=created_at,
        image=_str(spec.get("image")),
        memory_mib=memory if isinstance(memory, int) and not isinstance(memory, bool) else None,
    )


def _record_view(record: SandboxRecord) -> SandboxView:
    return sandbox_view(
        record.id, record.backend, record.state, record.reason, record.created_at, record.spec
    )


def task_summary(doc: TaskDoc, events: list[TraceEvent], keep: bool) -> TaskSummary:
    """An agent task's outcome for the model: answer, status and each tool decision."""
    names = {e.get("call_id"): e.get("name") for e in events if e.get("event") == "tool.call"}
    decisions = [
        ToolDecision(
            name=_str(names.get(_str(e.get("call_id")))),
            color=_str(e.get("color")),
            approved=approved if isinstance(approved := e.get("approved"), bool) else None,
            reason=_str(e.get("reason")),
        )
        for e in events
        if e.get("event") == "tool.decision"
    ]
    return TaskSummary(**doc, kept=keep, decisions=decisions)


@dataclass(frozen=True)
class ExecRun:
    """One command for :meth:`SandboxTools._exec`, its output going to the bounded buffers."""

    sandbox_id: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str] | None
    stdin: bytes | None
    timeout: float
    out: BoundedBuffer
    err: BoundedBuffer


@dataclass(frozen=True)
class TaskRun:
    """One agent task for :meth:`SandboxTools._task`; ``on_event`` hears each trace event.
    ``script`` and ``sandbox`` are free-form JSON, checked where they are used (the
    scripted provider, :func:`ironclaw.spec.parse_spec`)."""

    task: str
    model: str
    script: list[JsonObject] | None
    approve: str
    sandbox: JsonObject
    budget: Budget
    keep: bool
    on_event: Callable[[TraceEvent], None]


class SandboxTools(Generic[R]):
    """The tools' operations over a :class:`SandboxService` whose sandboxes ``view``
    shows; a subclass adds what the two sides name differently (``open``, ``_list``,
    ``_destroy``) and how an agent task runs (``_task``)."""

    def __init__(
        self, service: SandboxService[R], view: Callable[[R], SandboxView], *, keep: bool = False
    ) -> None:
        self.service = service
        self.view = view
        self.keep = keep
        self.owned: set[str] = set()

    # -- primitives --------------------------------------------------------------------

    async def open(self) -> None:
        raise NotImplementedError

    async def _list(self) -> list[SandboxView]:
        raise NotImplementedError

    async def _destroy(self, sandbox_id: str) -> None:
        raise NotImplementedError

    async def _task(self, run: TaskRun) -> tuple[TaskDoc, list[TraceEvent]]:
        """Run an agent task to its end, calling ``run.on_event`` with each trace event as
        it happens: (its outcome, its events)."""
        raise NotImplementedError

    async def _exec(self, run: ExecRun) -> ExecResultLike:
        """Run; stream output into ``run.out``/``run.err``; return the result (its own
        output left empty)."""
        return await self.service.exec(
            run.sandbox_id, run.argv, cwd=run.cwd, env=run.env, timeout=run.timeout,
            stdin=run.stdin, on_stdout=run.out, on_stderr=run.err, capture=False,
        )  # fmt: skip

    # -- the tools' operations ---------------------------------------------------------

    async def aclose(self) -> None:
        """Remove the sandboxes made here (unless ``keep``), then close."""
        try:
            if not self.keep:
                for sid in sorted(self.owned):
                    with contextlib.suppress(IronclawError):
                        await self._destroy(sid)
                self.owned.clear()
        finally:
            await self.service.aclose()

    def _mine(self, sandbox_id: str) -> str:
        if sandbox_id not in self.owned:
            known = ", ".join(sorted(self.owned)) or "none yet"
            raise SandboxNotFound(
                f"no sandbox {sandbox_id!r} made by this MCP server (yours: {known}); "
                "create one with sandbox_create"
            )
        return sandbox_id

    async def create(self, spec: JsonObject) -> SandboxView:
        doc = self.view(await self.service.create(spec))
        self.owned.add(doc["id"])
        return doc

    async def sandboxes(self) -> list[SandboxView]:
        return [doc for doc in await self._list() if doc["id"] in self.owned]

    async def get(self, sandbox_id: str) -> SandboxView:
        return self.view(await self.service.get(self._mine(sandbox_id)))

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
    ) -> ExecOutput:
        """Run a command: a string through ``/bin/sh -c``, a list as argv. Output beyond
        ``max_output`` bytes per stream is dropped and ``truncated`` says so."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        if not argv or not argv[-1 if isinstance(command, str) else 0].strip():
            raise ConfigError("command is empty: give a shell line or an argv list")
        if timeout <= 0:
            raise ConfigError("timeout must be more than 0 seconds")
        out, err = BoundedBuffer(_limit(max_output)), BoundedBuffer(max_output)
        stdin_bytes = stdin.encode() if stdin is not None else None
        result = await self._exec(
            ExecRun(self._mine(sandbox_id), argv, cwd, env, stdin_bytes, timeout, out, err)
        )
        return ExecOutput(
            exit_code=result.exit_code,
            signal=result.signal,
            status=result.status,
            timed_out=result.timed_out,
            duration_ms=round(result.duration_ms, 1),
            stdout=out.data.decode(errors="replace"),
            stderr=err.data.decode(errors="replace"),
            stdout_bytes=out.total,
            stderr_bytes=err.total,
            truncated=out.truncated or err.truncated,
        )

    async def write_file(
        self, sandbox_id: str, path: str, content: str, *, encoding: str = "text"
    ) -> FileWritten:
        if encoding == "text":
            data = content.encode()
        elif encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError("content is not valid base64 (encoding='base64')") from None
        else:
            raise ConfigError(f"encoding {encoding!r}: use 'text' or 'base64'")
        size = await self.service.write_file(self._mine(sandbox_id), path, data)
        return FileWritten(path=path, size=size)

    async def read_file(
        self, sandbox_id: str, path: str, *, encoding: str = "text", max_bytes: int = 256 * 1024
    ) -> FileRead:
        if encoding not in ("text", "base64"):
            raise ConfigError(f"encoding {encoding!r}: use 'text' or 'base64'")
        buf = BoundedBuffer(_limit(max_bytes))
        await self.service.read_file(self._mine(sandbox_id), path, buf)
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
        return FileRead(
            path=path, encoding=encoding, content=content, size=buf.total, truncated=buf.truncated
        )

    async def destroy(self, sandbox_id: str) -> Destroyed:
        await self._destroy(self._mine(sandbox_id))
        self.owned.discard(sandbox_id)
        return Destroyed(id=sandbox_id, destroyed=True)

    async def run_task(
        self,
        task: str,
        *,
        model: str,
        script: list[JsonObject] | None,
        approve: str,
        sandbox: JsonObject,
        budget: JsonObject,
        keep: bool,
        progress: Progress | None = None,
    ) -> TaskSummary:
        """An agent task in a fresh sandbox; the model is reached through the host's
        gateway, which alone holds the API key. RED calls follow ``approve``.
        ``progress`` hears of each trace event, in order (MCP progress notifications keep
        a client's request alive through a long task)."""
        if approve not in APPROVE_MODES:
            raise ConfigError(
                f"approve={approve!r}: with nobody to ask, use one of {', '.join(APPROVE_MODES)}"
            )
        if script is None and model.startswith("scripted"):
            raise ConfigError("a scripted model takes its turns inline in 'script'")
        limits = Budget.from_json(budget)
        queue: asyncio.Queue[TraceEvent | None] = asyncio.Queue()

        async def forward() -> None:
            n = 0
            while (event := await queue.get()) is not None:
                n += 1
                if progress is not None:
                    with contextlib.suppress(Exception):  # a gone client must not stop the task
                        await progress(n, event)

        forwarder = asyncio.ensure_future(forward())
        try:
            doc, events = await self._task(
                TaskRun(task, model, script, approve, sandbox, limits, keep, queue.put_nowait)
            )
        finally:
            queue.put_nowait(None)
            await forwarder
        if keep:
            self.owned.add(doc["id"])
        return task_summary(doc, events, keep)


#: Either backend, whatever its sandboxes' record type.
Backend: TypeAlias = SandboxTools[Any]


class LocalBackend(SandboxTools[SandboxRecord]):
    """In this process, over a :class:`~ironclaw.host.manager.SandboxManager`."""

    def __init__(self, settings: Settings | None = None, *, keep: bool = False) -> None:
        self.manager = SandboxManager(settings)
        super().__init__(self.manager, _record_view, keep=keep)

    async def open(self) -> None:
        await self.manager.open()

    async def _list(self) -> list[SandboxView]:
        return [_record_view(r) for r in await self.manager.sandboxes()]

    async def _destroy(self, sandbox_id: str) -> None:
        await self.manager.destroy(sandbox_id)

    async def _task(self, run: TaskRun) -> tuple[TaskDoc, list[TraceEvent]]:
        from ironclaw.agent.approval import Approver
        from ironclaw.agent.gateway import Provider, ScriptedProvider, provider_from_name
        from ironclaw.agent.tasks import TaskSpec, run_task

        provider: Provider = ScriptedProvider(run.script) if run.script is not None else (
            provider_from_name(run.model)
        )  # fmt: skip
        spec = TaskSpec(
            task=run.task,
            model=f"{provider.name}:{provider.model}",
            sandbox=run.sandbox,
            budget=run.budget,
        )
        outcome = await run_task(
            self.manager, spec, provider=provider, approver=Approver(mode=run.approve),
            keep=run.keep, on_event=run.on_event,
        )  # fmt: skip
        return outcome.to_json(), outcome.events
