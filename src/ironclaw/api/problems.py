"""Errors as RFC 9457 problem details, from the one exception tree.

:data:`STATUS` is the single mapping table (most specific class first); guest-side
builtin errors arrive as :class:`RpcError` codes and are mapped by :data:`RPC_STATUS`.
Every body carries ``type``, ``title``, ``status``, ``detail`` and ``error`` (the
exception's class name, which the remote SDK turns back into the same exception).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ironclaw.errors import (
    ApprovalDenied,
    AuthError,
    BackendError,
    BodyTooLarge,
    ConfigError,
    Conflict,
    InvalidRequest,
    IronclawError,
    NetworkError,
    NotFound,
    ProtocolError,
    QuotaExceeded,
    RequestCancelled,
    ResourceLimitExceeded,
    RpcError,
    SandboxError,
    SandboxNotFound,
    SandboxTimeout,
    ScopeError,
    TransportError,
)

__all__ = [
    "RPC_STATUS",
    "STATUS",
    "install",
    "problem",
    "status_for",
]

PROBLEM_JSON = "application/problem+json"


#: exception class -> (HTTP status, short title). First match wins.
STATUS: list[tuple[type[BaseException], int, str]] = [
    (AuthError, 401, "unauthorized"),
    (ScopeError, 403, "forbidden"),
    (QuotaExceeded, 403, "quota exceeded"),
    (BodyTooLarge, 413, "body too large"),
    (NotFound, 404, "not found"),
    (SandboxNotFound, 404, "sandbox not found"),
    (InvalidRequest, 422, "invalid request"),
    (Conflict, 409, "conflict"),
    (ConfigError, 400, "bad request"),
    (SandboxTimeout, 504, "sandbox timeout"),
    (ResourceLimitExceeded, 409, "resource limit exceeded"),
    (BackendError, 500, "backend error"),
    (SandboxError, 409, "sandbox not usable"),
    (ApprovalDenied, 403, "approval denied"),
    (RequestCancelled, 409, "request cancelled"),
    (NetworkError, 500, "network set-up failed"),
    (TransportError, 502, "sandbox channel failed"),
    (ProtocolError, 502, "sandbox protocol error"),
]

#: JSON-RPC error codes from the guest (builtin exceptions there) -> (status, title).
RPC_STATUS: dict[int, tuple[int, str]] = {
    -32050: (404, "file not found"),
    -32051: (403, "permission denied"),
    -32052: (400, "is a directory"),
    -32053: (400, "not a directory"),
    -32054: (409, "file exists"),
    -32602: (400, "invalid parameters"),
}


def status_for(exc: BaseException) -> tuple[int, str]:
    for cls, status, title in STATUS:
        if isinstance(exc, cls):
            return status, title
    if isinstance(exc, RpcError):
        if isinstance(exc.data, dict) and exc.data.get("type") == "OSError":
            # Any other file-system refusal inside the sandbox (ELOOP, EROFS, ENOSPC...).
            return 400, "file operation failed"
        return RPC_STATUS.get(exc.code, (502, "sandbox call failed"))
    return 500, "internal error"


def _slug(title: str) -> str:
    return "/problems/" + title.replace(" ", "-")


def problem(status: int, title: str, detail: str, error: str, **extra: Any) -> JSONResponse:
    body = {
        "type": _slug(title),
        "title": title,
        "status": status,
        "detail": detail,
        "error": error,
        **extra,
    }
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def exception_response(exc: BaseException) -> JSONResponse:
    status, title = status_for(exc)
    extra: dict[str, Any] = {}
    detail = str(exc)
    if isinstance(exc, RpcError):
        extra["code"] = exc.code
        detail = exc.message
    return problem(status, title, detail, type(exc).__name__, **extra)


async def _ironclaw(request: Request, exc: Exception) -> JSONResponse:
    return exception_response(exc)


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    title = {404: "not found", 405: "method not allowed", 413: "body too large"}.get(
        exc.status_code, "http error"
    )
    return problem(exc.status_code, title, str(exc.detail), "HTTPException")


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in exc.errors()
    ]
    detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
    return problem(422, "invalid request", detail, "ConfigError", errors=errors)


def install(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into problem details."""
    app.add_exception_handler(IronclawError, _ironclaw)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
