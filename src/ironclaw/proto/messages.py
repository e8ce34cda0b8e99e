"""JSON-RPC 2.0 message models (dataclasses) and their strict JSON codec.

Decoding never raises for bad content: a frame whose payload is not a valid JSON-RPC 2.0
object becomes an :class:`InvalidMessage` carrying the error code to answer with and the
request id when one could be read, so the receiver can reply and keep the connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from ironclaw.errors import INVALID_REQUEST, PARSE_ERROR

__all__ = [
    "ErrorObject",
    "ErrorResponse",
    "InvalidMessage",
    "Message",
    "Notification",
    "Request",
    "RequestId",
    "Response",
    "decode_message",
    "encode_message",
]

RequestId = int | str
_VERSION: Final = "2.0"
_encode = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
).encode
_decode = json.JSONDecoder().decode


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: Any = None


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Any = None


@dataclass(frozen=True, slots=True)
class Response:
    id: RequestId
    result: Any = None


@dataclass(frozen=True, slots=True)
class ErrorObject:
    code: int
    message: str
    data: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    id: RequestId | None  # None: the request's id could not be read
    error: ErrorObject


Message = Request | Notification | Response | ErrorResponse


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A well-framed payload that is not valid JSON-RPC 2.0 (answer it with ``code``)."""

    code: int
    reason: str
    id: RequestId | None = None
    is_response: bool = field(default=False)


def encode_message(message: Message) -> bytes:
    """Compact UTF-8 JSON. Raises ``ValueError``/``TypeError`` if params are not JSON."""
    obj: dict[str, Any]
    if isinstance(message, Request):
        obj = {"jsonrpc": _VERSION, "id": message.id, "method": message.method}
        if message.params is not None:
            obj["params"] = message.params
    elif isinstance(message, Notification):
        obj = {"jsonrpc": _VERSION, "method": message.method}
        if message.params is not None:
            obj["params"] = message.params
    elif isinstance(message, Response):
        obj = {"jsonrpc": _VERSION, "id": message.id, "result": message.result}
    elif isinstance(message, ErrorResponse):
        obj = {"jsonrpc": _VERSION, "id": message.id, "error": message.error.to_dict()}
    else:
        raise TypeError(f"not a message: {type(message).__name__}")
    return _encode(obj).encode()


def _valid_id(value: object) -> bool:
    # bool is an int subclass but never a valid id; floats are legal JSON-RPC but lossy.
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def decode_message(payload: bytes | bytearray | memoryview) -> Message | InvalidMessage:
    try:
        obj = _decode(str(payload, "utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return InvalidMessage(PARSE_ERROR, f"parse error: {type(exc).__name__}")
    except RecursionError:
        return InvalidMessage(PARSE_ERROR, "parse error: nesting too deep")
    if not isinstance(obj, dict):
        return InvalidMessage(INVALID_REQUEST, "invalid request: not a JSON object")
    rid = obj.get("id")
    has_id = "id" in obj
    id_ok = _valid_id(rid)
    safe_id: RequestId | None = rid if id_ok else None
    is_response = "result" in obj or "error" in obj
    if obj.get("jsonrpc") != _VERSION:
        return InvalidMessage(
            INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', safe_id, is_response
        )
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or is_response:
            return InvalidMessage(INVALID_REQUEST, "invalid request: bad method", safe_id)
        params = obj.get("params")
        if params is not None and not isinstance(params, dict | list):
            return InvalidMessage(
                INVALID_REQUEST, "invalid request: params must be an object or array", safe_id
            )
        if not has_id:
            return Notification(method, params)
        if safe_id is None:
            return InvalidMessage(INVALID_REQUEST, "invalid request: bad id")
        return Request(safe_id, method, params)
    if not is_response or ("result" in obj and "error" in obj):
        return InvalidMessage(
            INVALID_REQUEST, "invalid message: neither call nor response", safe_id
        )
    if "result" in obj:
        if safe_id is None:
            return InvalidMessage(INVALID_REQUEST, "invalid response: bad id", None, True)
        return Response(safe_id, obj["result"])
    err = obj["error"]
    if (
        not isinstance(err, dict)
        or not isinstance(err.get("code"), int)
        or isinstance(err.get("code"), bool)
        or not isinstance(err.get("message"), str)
    ):
        return InvalidMessage(INVALID_REQUEST, "invalid response: bad error object", safe_id, True)
    if rid is not None and not id_ok:
        return InvalidMessage(INVALID_REQUEST, "invalid response: bad id", None, True)
    return ErrorResponse(safe_id, ErrorObject(err["code"], err["message"], err.get("data")))
