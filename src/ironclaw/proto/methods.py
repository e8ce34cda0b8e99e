"""The channel's typed API: every method's request and result, and one decode step.

Both ends use this module (as the MCP SDK's ``types`` serves its client and server):
the host's :class:`~ironclaw.host.guest.GuestClient` and the guest agent's dispatcher
for host->guest methods, the agent loop and the host's task handlers for guest->host
ones. :func:`decode_request` and :func:`decode_result` turn JSON into typed records
and reject unknown methods, unknown or missing fields, wrong JSON types and values out
of range with :class:`~ironclaw.errors.InvalidParams` (JSON-RPC invalid params), before
any handler runs.

Records (:mod:`ironclaw.proto.records`) are frozen and slotted; each one's field checks
are declared beside it with ``declare``.

Standard library only: the guest imports it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol, TypeVar

from ironclaw.errors import UnknownMethod
from ironclaw.proto.frames import MAX_STREAM_ID
from ironclaw.proto.proc_methods import (
    ProcConnectRequest,
    ProcInfo,
    ProcListRequest,
    ProcListResult,
    ProcRef,
    ProcResizeRequest,
    ProcSignalRequest,
    ProcStartRequest,
    ProcStdinRequest,
    ProcWaitRequest,
    WatchEvent,
    WatchRequest,
    WatchResult,
)
from ironclaw.proto.records import (
    MAX_ARG,
    MAX_PATH,
    Bool,
    Float,
    Int,
    Json,
    Nested,
    Opt,
    Record,
    Seq,
    Str,
    StrMap,
    declare,
    decode,
    schema,
    to_json,
)

__all__ = [
    "METHODS",
    "AgentEventRequest",
    "AgentEventResult",
    "AgentRunRequest",
    "AgentRunResult",
    "AssistantMessage",
    "Budget",
    "Caller",
    "Decision",
    "ExecExit",
    "ExecRequest",
    "ExecSignalRequest",
    "ExecSignalResult",
    "FileEntry",
    "FilesListRequest",
    "FilesListResult",
    "FilesMkdirRequest",
    "FilesMkdirResult",
    "FilesReadRequest",
    "FilesRemoveRequest",
    "FilesRemoveResult",
    "FilesStatRequest",
    "FilesTransferResult",
    "FilesWriteRequest",
    "IdentityResetRequest",
    "IdentityResetResult",
    "MethodSpec",
    "ModelCompleteRequest",
    "ModelCompleteResult",
    "PingRequest",
    "PingResult",
    "ProcConnectRequest",
    "ProcInfo",
    "ProcListRequest",
    "ProcListResult",
    "ProcRef",
    "ProcResizeRequest",
    "ProcSignalRequest",
    "ProcStartRequest",
    "ProcStdinRequest",
    "ProcWaitRequest",
    "Record",
    "ServerSpec",
    "ShutdownRequest",
    "ShutdownResult",
    "TokenUsage",
    "ToolAuthorizeRequest",
    "ToolCall",
    "WatchEvent",
    "WatchRequest",
    "WatchResult",
    "call",
    "decode",
    "decode_request",
    "decode_result",
    "encode",
    "encode_result",
    "schema",
    "to_json",
]

R = TypeVar("R", bound=Record)

PATH = Str(min_len=1, max_len=MAX_PATH, no_nul=True)
STREAM = Int(1, MAX_STREAM_ID)
MODE = Int(0, 0o7777)
TEXT = Str()
NAME = Str(max_len=1024)

# -- shared types -------------------------------------------------------------------------


class Budget(Record):
    """When the agent loop must stop even if the model does not."""

    max_steps: int = 20
    max_tokens: int = 200_000
    wall_time_s: float = 600.0
    tool_timeout_s: float = 120.0

    @classmethod
    def from_json(cls, doc: Any) -> Budget:
        return decode(cls, doc, "budget")


declare(Budget, max_steps=Int(1), max_tokens=Int(1), wall_time_s=Float(positive=True),
        tool_timeout_s=Float(positive=True))  # fmt: skip


class ToolCall(Record):
    """One tool call the model asked for."""

    id: str
    name: str
    arguments: dict[str, Any]


declare(ToolCall, id=NAME, name=Str(min_len=1, max_len=1024), arguments=Json(obj=True))


class ServerSpec(Record):
    """An MCP server to start over stdio inside the sandbox."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None


declare(ServerSpec, name=Str(min_len=1, max_len=256, without="__"),
        command=Str(min_len=1, max_len=MAX_ARG, no_nul=True),
        args=Seq(Str(max_len=MAX_ARG, no_nul=True)), env=Opt(StrMap()))  # fmt: skip


class FileEntry(Record):
    """One file as ``files.stat`` and ``files.list`` describe it (lstat: links not followed)."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float


declare(FileEntry, name=Str(max_len=MAX_PATH), path=PATH,
        type=Str(choices=("file", "dir", "symlink", "other")), size=Int(), mode=MODE,
        mtime=Float())  # fmt: skip


class Decision(Record):
    """The host's answer to ``tool.authorize``."""

    approved: bool
    color: str
    reason: str
    decided_by: str


declare(Decision, approved=Bool(), color=Str(choices=("GREEN", "RED")), reason=TEXT,
        decided_by=NAME)  # fmt: skip


class TokenUsage(Record):
    input_tokens: int = 0
    output_tokens: int = 0


declare(TokenUsage, input_tokens=Int(), output_tokens=Int())


class AssistantMessage(Record):
    role: str
    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


declare(AssistantMessage, role=Str(choices=("assistant",)), content=Opt(TEXT),
        tool_calls=Seq(Nested(ToolCall)))  # fmt: skip

# -- host -> guest ------------------------------------------------------------------------


class PingRequest(Record):
    pass


class PingResult(Record):
    pong: bool
    kernel: str
    uid: int
    gid: int
    pid: int
    hostname: str
    workdir: str
    python: str


class ExecRequest(Record):
    """Run ``argv``; output streams back on the given stream ids as binary frames."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    timeout: float | None = None
    stdout_stream: int | None = None
    stderr_stream: int | None = None
    stdin_stream: int | None = None
    exec_id: str | None = None
    keep_background: bool = False


class ExecExit(Record):
    """How a command ended (``exit_code`` 128+N when killed by signal N)."""

    exit_code: int
    signal: int | None
    timed_out: bool
    duration_ms: float
    pid: int | None
    spawn_error: str | None = None


class ExecSignalRequest(Record):
    exec_id: str
    signal: int = 9


class ExecSignalResult(Record):
    signalled: bool


class FilesWriteRequest(Record):
    path: str
    stream: int
    mode: int = 0o644
    mkdir: bool = True


class FilesReadRequest(Record):
    path: str
    stream: int


class FilesTransferResult(Record):
    path: str
    size: int


class FilesListRequest(Record):
    path: str


class FilesListResult(Record):
    path: str
    entries: tuple[FileEntry, ...]


class FilesStatRequest(Record):
    path: str


class FilesRemoveRequest(Record):
    path: str
    recursive: bool = False


class FilesRemoveResult(Record):
    removed: str


class FilesMkdirRequest(Record):
    path: str
    parents: bool = True


class FilesMkdirResult(Record):
    path: str


class ShutdownRequest(Record):
    pass


class ShutdownResult(Record):
    stopping: bool


class IdentityResetRequest(Record):
    """A VM restored from a shared snapshot becomes its own machine (backends/restored.py).

    Every restored VM starts with the snapshot's RNG state, hostname and address; the host
    sends fresh ``seed`` bytes (hex), names and the sandbox's address (a kernel ``ip=``
    value) right after the restore, before any command runs.
    """

    seed: str
    hostname: str
    sandbox_id: str
    machine_id: str
    ip: str | None = None
    env: Mapping[str, str] | None = None
    workspace_mib: int = 0


class IdentityResetResult(Record):
    hostname: str
    machine_id: str
    reseeded: bool


class AgentRunRequest(Record):
    task: str
    system: str = ""
    runtime: str = ""
    servers: tuple[ServerSpec, ...] = ()
    budget: Budget = Budget()
    workdir: str | None = None


class AgentRunResult(Record):
    status: str
    answer: str | None
    steps: int
    tokens: int
    tool_calls: int
    reason: str | None = None
    error: str | None = None


declare(PingRequest)
declare(PingResult, pong=Bool(), kernel=NAME, uid=Int(), gid=Int(), pid=Int(), hostname=NAME,
        workdir=PATH, python=NAME)  # fmt: skip
declare(ExecRequest, argv=Seq(Str(max_len=MAX_ARG, no_nul=True), min_items=1),
        env=Opt(StrMap()), cwd=Opt(Str(max_len=MAX_PATH, no_nul=True)),
        timeout=Opt(Float(positive=True)), stdout_stream=Opt(STREAM), stderr_stream=Opt(STREAM),
        stdin_stream=Opt(STREAM), exec_id=Opt(Str(min_len=1, max_len=256)),
        keep_background=Bool())  # fmt: skip
declare(ExecExit, exit_code=Int(0, 255), signal=Opt(Int(1, 64)), timed_out=Bool(),
        duration_ms=Float(lo=0.0), pid=Opt(Int(1)), spawn_error=Opt(TEXT))  # fmt: skip
declare(ExecSignalRequest, exec_id=Str(min_len=1, max_len=256), signal=Int(1, 64))
declare(ExecSignalResult, signalled=Bool())
declare(FilesWriteRequest, path=PATH, stream=STREAM, mode=MODE, mkdir=Bool())
declare(FilesReadRequest, path=PATH, stream=STREAM)
declare(FilesTransferResult, path=PATH, size=Int())
declare(FilesListRequest, path=PATH)
declare(FilesListResult, path=PATH, entries=Seq(Nested(FileEntry), max_items=1 << 20))
declare(FilesStatRequest, path=PATH)
declare(FilesRemoveRequest, path=PATH, recursive=Bool())
declare(FilesRemoveResult, removed=PATH)
declare(FilesMkdirRequest, path=PATH, parents=Bool())
declare(FilesMkdirResult, path=PATH)
declare(ShutdownRequest)
declare(ShutdownResult, stopping=Bool())
declare(IdentityResetRequest, seed=Str(min_len=1, max_len=1024),
        hostname=Str(min_len=1, max_len=64), sandbox_id=Str(min_len=1, max_len=256),
        machine_id=Str(min_len=1, max_len=32),
        ip=Opt(Str(min_len=1, max_len=256)), env=Opt(StrMap()),
        workspace_mib=Int(0, 1 << 20))  # fmt: skip
declare(IdentityResetResult, hostname=Str(max_len=64), machine_id=Str(max_len=32),
        reseeded=Bool())  # fmt: skip
declare(AgentRunRequest, task=TEXT, system=TEXT, runtime=Str(max_len=MAX_PATH, no_nul=True),
        servers=Seq(Nested(ServerSpec), max_items=64), budget=Nested(Budget),
        workdir=Opt(PATH))  # fmt: skip
declare(AgentRunResult, status=Str(choices=("completed", "budget_exceeded", "error")),
        answer=Opt(TEXT), steps=Int(), tokens=Int(), tool_calls=Int(), reason=Opt(TEXT),
        error=Opt(TEXT))  # fmt: skip

# -- guest -> host ------------------------------------------------------------------------


class ModelCompleteRequest(Record):
    """One model turn: the neutral conversation (see :mod:`ironclaw.agent.gateway`)."""

    messages: tuple[dict[str, Any], ...]
    system: str = ""
    tools: tuple[dict[str, Any], ...] = ()


class ModelCompleteResult(Record):
    message: AssistantMessage
    usage: TokenUsage
    stop_reason: str


class ToolAuthorizeRequest(Record):
    call: ToolCall
    server: str | None = None
    tool: str | None = None
    workdir: str | None = None


class AgentEventRequest(Record):
    """A tool call's outcome, recorded in the host's trace."""

    call_id: str
    name: str
    is_error: bool
    content: str
    duration_ms: float
    executed: bool
    type: str = "tool.result"


class AgentEventResult(Record):
    ok: bool


declare(ModelCompleteRequest, messages=Seq(Json(obj=True), max_items=1 << 16), system=TEXT,
        tools=Seq(Json(obj=True), max_items=1024))  # fmt: skip
declare(ModelCompleteResult, message=Nested(AssistantMessage), usage=Nested(TokenUsage),
        stop_reason=NAME)  # fmt: skip
declare(ToolAuthorizeRequest, call=Nested(ToolCall), server=Opt(NAME), tool=Opt(NAME),
        workdir=Opt(PATH))  # fmt: skip
declare(AgentEventRequest, call_id=NAME, name=NAME, is_error=Bool(), content=TEXT,
        duration_ms=Float(lo=0.0), executed=Bool(), type=Str(choices=("tool.result",)))  # fmt: skip
declare(AgentEventResult, ok=Bool())

# -- registry -----------------------------------------------------------------------------


class MethodSpec(Record):
    """One channel method: its name, request and result types, and its direction."""

    name: str
    request: type[Record]
    result: type[Record]
    to_guest: bool  # host -> guest (False: the guest calls the host)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("ping", PingRequest, PingResult, True),
        MethodSpec("exec", ExecRequest, ExecExit, True),
        MethodSpec("exec.signal", ExecSignalRequest, ExecSignalResult, True),
        MethodSpec("files.write", FilesWriteRequest, FilesTransferResult, True),
        MethodSpec("files.read", FilesReadRequest, FilesTransferResult, True),
        MethodSpec("files.list", FilesListRequest, FilesListResult, True),
        MethodSpec("files.stat", FilesStatRequest, FileEntry, True),
        MethodSpec("files.remove", FilesRemoveRequest, FilesRemoveResult, True),
        MethodSpec("files.mkdir", FilesMkdirRequest, FilesMkdirResult, True),
        MethodSpec("shutdown", ShutdownRequest, ShutdownResult, True),
        MethodSpec("agent.run", AgentRunRequest, AgentRunResult, True),
        MethodSpec("proc.start", ProcStartRequest, ProcInfo, True),
        MethodSpec("proc.list", ProcListRequest, ProcListResult, True),
        MethodSpec("proc.connect", ProcConnectRequest, ProcInfo, True),
        MethodSpec("proc.stdin", ProcStdinRequest, ProcInfo, True),
        MethodSpec("proc.signal", ProcSignalRequest, ProcInfo, True),
        MethodSpec("proc.wait", ProcWaitRequest, ProcInfo, True),
        MethodSpec("proc.resize", ProcResizeRequest, ProcInfo, True),
        MethodSpec("files.watch", WatchRequest, WatchResult, True),
        MethodSpec("identity.reset", IdentityResetRequest, IdentityResetResult, True),
        MethodSpec("model.complete", ModelCompleteRequest, ModelCompleteResult, False),
        MethodSpec("tool.authorize", ToolAuthorizeRequest, Decision, False),
        MethodSpec("agent.event", AgentEventRequest, AgentEventResult, False),
    )
}
_METHOD_OF: dict[type[Record], str] = {s.request: s.name for s in METHODS.values()}


def _spec(method: str) -> MethodSpec:
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise UnknownMethod(f"unknown channel method {str(method)[:80]!r}")
    return spec


def encode(request: Record) -> tuple[str, dict[str, Any]]:
    """``(method, params)`` for a request record."""
    method = _METHOD_OF.get(type(request))
    if method is None:
        raise TypeError(f"{type(request).__name__} is not a request type")
    return method, to_json(request)


def decode_request(method: str, params: Any) -> Record:
    """The typed request for ``method``, or :class:`InvalidParams` / :class:`UnknownMethod`."""
    return decode(_spec(method).request, params, method)


def encode_result(result: Record) -> dict[str, Any]:
    return to_json(result)


def decode_result(method: str, raw: Any) -> Record:
    """The typed result of ``method``: replies are checked like requests."""
    return decode(_spec(method).result, raw, f"{method} result")


class Caller(Protocol):
    """What :func:`call` needs of a channel end (an :class:`ironclaw.rpc.Peer`)."""

    def call(
        self, method: str, params: Any = None, *, timeout: float | None = None
    ) -> Awaitable[Any]: ...


async def call(
    peer: Caller, request: Record, result: type[R], *, timeout: float | None = None
) -> R:
    """Send ``request`` over ``peer``; return its typed result, checked like a request."""
    method, params = encode(request)
    reply = decode_result(method, await peer.call(method, params, timeout=timeout))
    if not isinstance(reply, result):
        raise TypeError(f"{method} answers {type(reply).__name__}, not {result.__name__}")
    return reply
