"""IronClaw's one exception tree.

Every error IronClaw raises on purpose derives from :class:`IronclawError`, so a caller
can catch one type at the top and still tell the kinds apart below it::

    IronclawError
    ├── ConfigError               bad input: ids, specs, policies (nothing was changed)
    │   ├── InvalidSandboxId
    │   ├── InvalidRequest        well-formed but refused (a watch outside the workspace; 422)
    │   └── Conflict              clashes with what exists (a port already exposed; 409)
    ├── SandboxError              a sandbox could not do what was asked
    │   ├── SandboxNotFound
    │   ├── SandboxTimeout
    │   ├── SandboxLost           its cluster node was lost (docs/CLUSTER.md)
    │   ├── BackendError          the jail/VM machinery failed (bwrap, qemu, firecracker)
    │   └── ResourceLimitExceeded memory, pids, time, disk
    │       └── BudgetExceeded    an agent task's steps, tokens, cost, wall time or
    │                             concurrent model calls, as the host counts them
    ├── NetworkError              netns/veth/nftables/proxy set-up failed
    ├── TransportError            bytes could not move
    │   ├── ConnectError          could not open the channel (guest not listening yet, ...)
    │   ├── ReadError
    │   ├── WriteError
    │   └── ChannelClosed         the connection is gone; pending calls fail with this
    ├── ProtocolError             bytes moved but make no sense
    │   ├── MalformedFrame
    │   ├── InvalidParams         a call's params or result do not fit its method's
    │   │                         type (also a ConfigError: nothing was changed)
    │   ├── UnknownMethod         no such channel method
    │   └── ChannelViolation      the other end broke a rule of this end (a stream id it
    │       │                     may not use); the channel is closed
    │       └── LimitExceeded     a per-connection cap (``.limit``, ``.value``) was passed
    │           └── FrameTooLarge
    ├── RpcError(code, message, data)   the peer answered with a JSON-RPC error
    │   ├── RequestCancelled
    │   └── ModelError            the model provider failed (HTTP error, bad reply)
    ├── ApprovalDenied            a RED action was refused
    └── ApiError                  the HTTP API refused a request (ironclaw serve)
        ├── AuthError             no valid token (401)
        ├── ScopeError            the token lacks a scope (403)
        ├── QuotaExceeded         the token's quota would be exceeded (403)
        ├── BodyTooLarge          the request body is over the limit (413)
        └── NotFound              no such task or approval (404)

Errors are translated at layer boundaries: OSError from a socket becomes a
TransportError in ``transport``; the rpc layer is the single place where exceptions
become JSON-RPC error objects and back (see :func:`to_wire` / :func:`from_wire`).

This module imports only the standard library: the guest agent uses it too.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "ApprovalDenied",
    "AuthError",
    "BackendError",
    "BodyTooLarge",
    "BudgetExceeded",
    "ChannelClosed",
    "ChannelViolation",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "FrameTooLarge",
    "InvalidParams",
    "InvalidRequest",
    "InvalidSandboxId",
    "IronclawError",
    "LimitExceeded",
    "MalformedFrame",
    "ModelError",
    "NetworkError",
    "NotFound",
    "ProtocolError",
    "QuotaExceeded",
    "ReadError",
    "RequestCancelled",
    "ResourceLimitExceeded",
    "RpcError",
    "SandboxError",
    "SandboxLost",
    "SandboxNotFound",
    "SandboxTimeout",
    "ScopeError",
    "TransportError",
    "UnknownMethod",
    "WriteError",
    "from_wire",
    "to_wire",
]


class IronclawError(Exception):
    """Root of every error IronClaw raises on purpose."""

    #: JSON-RPC error code used when this error crosses the channel (a subclass names
    #: its own as a class keyword: ``class X(IronclawError, wire_code=-32099)``).
    wire_code: int = -32000

    def __init_subclass__(cls, wire_code: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if wire_code is not None:
            cls.wire_code = wire_code

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its fields, whatever its constructor takes (a cluster node's
        error travels to the service as a pickle)."""
        return (_restore, (type(self), self.args, self.__dict__))


def _restore(cls: type[IronclawError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class ConfigError(IronclawError, wire_code=-32602):
    """Bad input (an id, a spec, a policy). Raised before anything is created."""


class InvalidSandboxId(ConfigError):
    """A sandbox id does not match ``[a-z0-9][a-z0-9-]{0,62}``."""


class InvalidRequest(ConfigError):
    """Input that parses but cannot be done as asked (the API answers 422)."""


class Conflict(ConfigError):
    """The request clashes with what exists, e.g. a port already exposed (the API: 409)."""


class SandboxError(IronclawError, wire_code=-32010):
    """A sandbox could not do what was asked."""


class SandboxNotFound(SandboxError, wire_code=-32011):
    """No sandbox has the id asked for."""


class SandboxTimeout(SandboxError, wire_code=-32012):
    """A sandbox did not answer (or start) within the time allowed."""


class BackendError(SandboxError, wire_code=-32013):
    """The jail or VM machinery failed (bubblewrap, QEMU, Firecracker)."""


class ResourceLimitExceeded(SandboxError, wire_code=-32014):
    """A sandbox hit one of its limits: memory, pids, time, disk."""


class SandboxLost(SandboxError, wire_code=-32016):
    """The cluster node that held the sandbox was lost; so is the sandbox's state."""


class BudgetExceeded(ResourceLimitExceeded, wire_code=-32015):
    """An agent task asked for more than its budget; the host refused the call."""


class NetworkError(IronclawError, wire_code=-32020):
    """Network set-up failed: namespace, veth, nftables or the egress proxy."""


class TransportError(IronclawError, wire_code=-32030):
    """Bytes could not move between host and guest."""


class ConnectError(TransportError):
    """The channel could not be opened (the guest may not be listening yet)."""


class ReadError(TransportError):
    """Reading from the channel failed."""


class WriteError(TransportError):
    """Writing to the channel failed."""


class ChannelClosed(TransportError):
    """The connection is gone; every pending call fails with this at once."""


class ProtocolError(IronclawError, wire_code=-32600):
    """Bytes arrived that do not form valid frames or messages."""


class MalformedFrame(ProtocolError):
    """A frame header or body that the format does not allow."""


# -- channel limits: what a hostile other end may not do (see ChannelLimits) -------------
class ChannelViolation(ProtocolError):
    """The other end broke a rule of the channel; this end closed it (never a retry)."""


class LimitExceeded(ChannelViolation):
    """A per-connection cap was passed; ``limit`` names it, ``value`` is its setting."""

    def __init__(self, message: str, *, limit: str = "", value: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.value = value


class FrameTooLarge(LimitExceeded):
    """A frame header claims more than the configured maximum (checked before allocating)."""


# -- end of channel limits ---------------------------------------------------------------


class InvalidParams(ProtocolError, ConfigError, wire_code=-32602):
    """A call's params (or a reply) do not fit the method's type: unknown or missing
    fields, wrong JSON types, values out of range. Raised before the handler runs, so
    nothing was changed; a ConfigError too, as any other bad input."""


class UnknownMethod(ProtocolError, wire_code=-32601):
    """A method name that is not part of the channel's API."""


class RpcError(IronclawError):
    """The peer answered a call with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (code {self.code})"


class RequestCancelled(RpcError):
    """The call was cancelled before it completed."""

    CODE = -32800

    def __init__(self, message: str = "request cancelled", data: Any = None) -> None:
        super().__init__(self.CODE, message, data)


class ModelError(RpcError):
    """The model provider failed; the message never echoes request headers (keys)."""

    CODE = -32060

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(self.CODE, message, data if data is not None else {"type": "ModelError"})


class ApprovalDenied(IronclawError, wire_code=-32040):
    """A RED action was refused by a person or a policy."""


class ApiError(IronclawError):
    """The HTTP API refused a request; the remote SDK raises the same class the server did."""


class AuthError(ApiError):
    """No token, or an unknown, malformed or revoked one."""


class ScopeError(ApiError):
    """The token lacks the scope an operation needs."""


class QuotaExceeded(ApiError):
    """A token's quota (sandboxes, memory) would be exceeded."""


class BodyTooLarge(ApiError):
    """A request body is larger than the server accepts."""


class NotFound(ApiError):
    """An API object (a task, an approval) that does not exist or is not the caller's."""


# Standard JSON-RPC codes, for reference by the rpc layer.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

_BY_NAME: dict[str, type[IronclawError]] = {
    cls.__name__: cls
    for cls in (
        ConfigError,
        InvalidSandboxId,
        SandboxError,
        SandboxNotFound,
        SandboxTimeout,
        SandboxLost,
        BackendError,
        ResourceLimitExceeded,
        BudgetExceeded,
        NetworkError,
        ApprovalDenied,
        InvalidParams,
        UnknownMethod,
    )
}

# Builtin exceptions that guest handlers raise often; mapped so the host sees a clear type.
_BUILTIN_CODES: dict[type[BaseException], int] = {
    FileNotFoundError: -32050,
    PermissionError: -32051,
    IsADirectoryError: -32052,
    NotADirectoryError: -32053,
    FileExistsError: -32054,
    ValueError: INVALID_PARAMS,
    TypeError: INVALID_PARAMS,
}


def to_wire(exc: BaseException) -> dict[str, Any]:
    """Turn an exception into a JSON-RPC error object (``code``, ``message``, ``data``)."""
    if isinstance(exc, RpcError):
        return {"code": exc.code, "message": exc.message, "data": exc.data}
    if isinstance(exc, IronclawError):
        return {"code": exc.wire_code, "message": str(exc), "data": {"type": type(exc).__name__}}
    for btype, code in _BUILTIN_CODES.items():
        if isinstance(exc, btype):
            return {"code": code, "message": str(exc), "data": {"type": btype.__name__}}
    return {
        "code": INTERNAL_ERROR,
        "message": f"internal error: {type(exc).__name__}: {exc}",
        "data": {"type": type(exc).__name__},
    }


def from_wire(error: dict[str, Any]) -> IronclawError:
    """Turn a JSON-RPC error object back into the matching exception.

    IronClaw's own error types are rebuilt by name; everything else becomes an
    :class:`RpcError` carrying the code, message and data unchanged.
    """
    code = int(error.get("code", INTERNAL_ERROR))
    message = str(error.get("message", "unknown error"))
    data = error.get("data")
    if code == RequestCancelled.CODE:
        return RequestCancelled(message, data)
    if code == ModelError.CODE:
        return ModelError(message, data)
    if isinstance(data, dict):
        cls = _BY_NAME.get(str(data.get("type", "")))
        if cls is not None and cls.wire_code == code:
            return cls(message)
    return RpcError(code, message, data)
