"""Typed requests and results of the host-tool channel methods (guest -> host).

Credentialed MCP servers run on the host; the guest's agent loop lists their tools and
asks the host to call one. Both ends decode strictly (unknown fields, missing fields and
wrong types are rejected), because either end may be lying: the host trusts nothing
from inside, and the guest should not feed the model a malformed answer.

``hosttools.list``  {} -> {tools: [{name, description, input_schema}]}
``hosttools.call``  {call_id, name, arguments, timeout_s}
                    -> {content, is_error, executed, color, reason}

A request that does not decode raises :class:`ConfigError` (it crosses the channel as
"invalid params"); a result that does not decode raises :class:`ProtocolError`. A tool's
arguments and input schema are free-form JSON (:data:`~ironclaw.proto.jsonval.JsonObject`),
checked to be JSON within the channel's bounds.
Standard library only: the guest imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ironclaw.errors import ConfigError, InvalidParams, IronclawError, ProtocolError
from ironclaw.proto.jsonval import JsonObject, json_object

__all__ = [
    "HOSTTOOLS_CALL",
    "HOSTTOOLS_LIST",
    "HostTool",
    "HostToolsCallRequest",
    "HostToolsCallResult",
    "HostToolsListRequest",
    "HostToolsListResult",
]

HOSTTOOLS_LIST: Final = "hosttools.list"
HOSTTOOLS_CALL: Final = "hosttools.call"
_Err = type[IronclawError]


def _fields(doc: Any, what: str, required: frozenset[str], err: _Err) -> JsonObject:
    if not isinstance(doc, dict):
        raise err(f"{what}: expected an object, got {type(doc).__name__}")
    unknown = set(doc) - required
    if unknown:
        raise err(f"{what}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    missing = required - set(doc)
    if missing:
        raise err(f"{what}: missing field(s) {', '.join(sorted(missing))}")
    checked: JsonObject = doc  # each field is checked by the caller
    return checked


def _str(doc: JsonObject, key: str, what: str, err: _Err) -> str:
    value = doc[key]
    if not isinstance(value, str):
        raise err(f"{what}: {key!r} must be a string")
    return value


def _bool(doc: JsonObject, key: str, what: str, err: _Err) -> bool:
    value = doc[key]
    if not isinstance(value, bool):
        raise err(f"{what}: {key!r} must be true or false")
    return value


def _object(doc: JsonObject, key: str, what: str, err: _Err) -> JsonObject:
    value = doc[key]
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise err(f"{what}: {key!r} must be an object")
    try:
        return json_object(value, f"{what}: {key!r}")
    except InvalidParams as exc:
        raise err(str(exc)) from None


@dataclass(frozen=True)
class HostToolsListRequest:
    """``hosttools.list`` takes no parameters."""

    def to_json(self) -> JsonObject:
        return {}

    @classmethod
    def from_json(cls, doc: Any) -> HostToolsListRequest:
        _fields({} if doc is None else doc, HOSTTOOLS_LIST, frozenset(), ConfigError)
        return cls()


@dataclass(frozen=True)
class HostTool:
    """One host tool as the model sees it (``host__<server>__<tool>``)."""

    name: str
    description: str
    input_schema: JsonObject = field(hash=False)

    _KEYS = frozenset({"name", "description", "input_schema"})

    def to_json(self) -> JsonObject:
        return {"name": self.name, "description": self.description,
                "input_schema": self.input_schema}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any) -> HostTool:
        what = f"{HOSTTOOLS_LIST} tool"
        d = _fields(doc, what, cls._KEYS, ProtocolError)
        return cls(
            _str(d, "name", what, ProtocolError),
            _str(d, "description", what, ProtocolError),
            _object(d, "input_schema", what, ProtocolError),
        )


@dataclass(frozen=True)
class HostToolsListResult:
    tools: tuple[HostTool, ...]

    def to_json(self) -> JsonObject:
        return {"tools": [t.to_json() for t in self.tools]}

    @classmethod
    def from_json(cls, doc: Any) -> HostToolsListResult:
        d = _fields(doc, f"{HOSTTOOLS_LIST} result", frozenset({"tools"}), ProtocolError)
        if not isinstance(d["tools"], list):
            raise ProtocolError(f"{HOSTTOOLS_LIST} result: 'tools' must be a list")
        tools = tuple(HostTool.from_json(t) for t in d["tools"])
        if len({t.name for t in tools}) != len(tools):
            raise ProtocolError(f"{HOSTTOOLS_LIST} result: two tools share a name")
        return cls(tools)


@dataclass(frozen=True)
class HostToolsCallRequest:
    """Call one host tool; ``timeout_s`` bounds its run (the host caps it further)."""

    call_id: str
    name: str
    arguments: JsonObject = field(hash=False)
    timeout_s: float

    _KEYS = frozenset({"call_id", "name", "arguments", "timeout_s"})

    def to_json(self) -> JsonObject:
        return {"call_id": self.call_id, "name": self.name, "arguments": self.arguments,
                "timeout_s": self.timeout_s}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any) -> HostToolsCallRequest:
        what = HOSTTOOLS_CALL
        d = _fields(doc, what, cls._KEYS, ConfigError)
        timeout = d["timeout_s"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"{what}: 'timeout_s' must be a positive number")
        return cls(
            _str(d, "call_id", what, ConfigError),
            _str(d, "name", what, ConfigError),
            _object(d, "arguments", what, ConfigError),
            float(timeout),
        )


@dataclass(frozen=True)
class HostToolsCallResult:
    """What the call produced; ``executed`` is false when it never reached the server."""

    content: str
    is_error: bool
    executed: bool
    color: str  # "GREEN" or "RED"; "" when the call was not classified (unknown tool)
    reason: str

    _KEYS = frozenset({"content", "is_error", "executed", "color", "reason"})

    def to_json(self) -> JsonObject:
        return {"content": self.content, "is_error": self.is_error, "executed": self.executed,
                "color": self.color, "reason": self.reason}  # fmt: skip

    @classmethod
    def from_json(cls, doc: Any) -> HostToolsCallResult:
        what = f"{HOSTTOOLS_CALL} result"
        d = _fields(doc, what, cls._KEYS, ProtocolError)
        color = _str(d, "color", what, ProtocolError)
        if color not in ("GREEN", "RED", ""):
            raise ProtocolError(f"{what}: 'color' must be GREEN, RED or empty")
        return cls(
            _str(d, "content", what, ProtocolError),
            _bool(d, "is_error", what, ProtocolError),
            _bool(d, "executed", what, ProtocolError),
            color,
            _str(d, "reason", what, ProtocolError),
        )
