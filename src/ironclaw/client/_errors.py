"""Problem details back into the one exception tree (the server sends the class name)."""

from __future__ import annotations

from typing import Any

import ironclaw.errors as errors
from ironclaw.errors import ApiError, IronclawError, RpcError

__all__ = ["from_problem"]

# RpcError and its subclasses take a code; rebuilt through from_wire instead.
_SIMPLE = {
    name: cls
    for name in errors.__all__
    if isinstance(cls := getattr(errors, name), type)
    and issubclass(cls, IronclawError)
    and not issubclass(cls, RpcError)
}


def from_problem(status: int, doc: Any) -> IronclawError:
    """The exception a problem-details body stands for; :class:`ApiError` for others."""
    if not isinstance(doc, dict):
        return ApiError(f"HTTP {status}: {str(doc)[:300]}")
    detail = str(doc.get("detail") or doc.get("title") or f"HTTP {status}")
    name = str(doc.get("error", ""))
    if "code" in doc and isinstance(doc["code"], int):
        return errors.from_wire({"code": doc["code"], "message": detail, "data": {"type": name}})
    cls = _SIMPLE.get(name)
    if cls is not None:
        return cls(detail)
    if status in (400, 422):
        return errors.ConfigError(detail)
    return ApiError(f"HTTP {status}: {detail}")
