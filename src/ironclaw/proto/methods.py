"""The channel's typed API: every method's request and result, and one decode step.

Both ends use this module (as the MCP SDK's ``types`` serves its client and server):
the host's :class:`~ironclaw.host.guest.GuestClient` and the guest agent's dispatcher
for host->guest methods, the agent loop and the host's task handlers for guest->host
ones. :func:`decode_request` and :func:`decode_result` turn JSON into typed records
and reject unknown methods, unknown or missing fields, wrong JSON types and values out
of range with :class:`~ironclaw.errors.InvalidParams` (JSON-RPC invalid params), before
any handler runs.

Records (:mod:`ironclaw.proto.records`) are frozen and slotted; each one's field checks
are declared beside it with ``declare``. They are defined by area
(:mod:`~ironclaw.proto.sandbox_methods`, :mod:`~ironclaw.proto.proc_methods`,
:mod:`~ironclaw.proto.agent_methods`) and all re-exported here.

Standard library only: the guest imports it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from ironclaw.errors import UnknownMethod
from ironclaw.proto import agent_methods as a
from ironclaw.proto import proc_methods as p
from ironclaw.proto import sandbox_methods as s
from ironclaw.proto.agent_methods import *  # noqa: F403
from ironclaw.proto.proc_methods import *  # noqa: F403
from ironclaw.proto.records import Record, decode, schema, to_json
from ironclaw.proto.sandbox_methods import *  # noqa: F403

# Each area module lists its records once, in its own ``__all__``; this is their union.
__all__ = [
    "METHODS",
    "Caller",
    "MethodSpec",
    "Record",
    "call",
    "decode",
    "decode_request",
    "decode_result",
    "encode",
    "encode_result",
    "schema",
    "to_json",
]
__all__ += s.__all__
__all__ += p.__all__
__all__ += a.__all__

R = TypeVar("R", bound=Record)


class MethodSpec(Record):
    """One channel method: its name, request and result types, and its direction."""

    name: str
    request: type[Record]
    result: type[Record]
    to_guest: bool  # host -> guest (False: the guest calls the host)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("ping", s.PingRequest, s.PingResult, True),
        MethodSpec("exec", s.ExecRequest, s.ExecExit, True),
        MethodSpec("exec.signal", s.ExecSignalRequest, s.ExecSignalResult, True),
        MethodSpec("files.write", s.FilesWriteRequest, s.FilesTransferResult, True),
        MethodSpec("files.read", s.FilesReadRequest, s.FilesTransferResult, True),
        MethodSpec("files.list", s.FilesListRequest, s.FilesListResult, True),
        MethodSpec("files.stat", s.FilesStatRequest, s.FileEntry, True),
        MethodSpec("files.remove", s.FilesRemoveRequest, s.FilesRemoveResult, True),
        MethodSpec("files.mkdir", s.FilesMkdirRequest, s.FilesMkdirResult, True),
        MethodSpec("shutdown", s.ShutdownRequest, s.ShutdownResult, True),
        MethodSpec("agent.run", a.AgentRunRequest, a.AgentRunResult, True),
        MethodSpec("proc.start", p.ProcStartRequest, p.ProcInfo, True),
        MethodSpec("proc.list", p.ProcListRequest, p.ProcListResult, True),
        MethodSpec("proc.connect", p.ProcConnectRequest, p.ProcInfo, True),
        MethodSpec("proc.stdin", p.ProcStdinRequest, p.ProcInfo, True),
        MethodSpec("proc.signal", p.ProcSignalRequest, p.ProcInfo, True),
        MethodSpec("proc.wait", p.ProcWaitRequest, p.ProcInfo, True),
        MethodSpec("proc.resize", p.ProcResizeRequest, p.ProcInfo, True),
        MethodSpec("files.watch", p.WatchRequest, p.WatchResult, True),
        MethodSpec("identity.reset", s.IdentityResetRequest, s.IdentityResetResult, True),
        MethodSpec("model.complete", a.ModelCompleteRequest, a.ModelCompleteResult, False),
        MethodSpec("tool.authorize", a.ToolAuthorizeRequest, a.Decision, False),
        MethodSpec("agent.event", a.AgentEventRequest, a.AgentEventResult, False),
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
