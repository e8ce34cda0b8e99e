"""The one exception tree: complete, documented, and faithful across the wire."""

from __future__ import annotations

import pytest

import ironclaw.errors as errors
from ironclaw.errors import (
    BudgetExceeded,
    ConfigError,
    InvalidParams,
    IronclawError,
    ModelError,
    RequestCancelled,
    RpcError,
    SandboxNotFound,
    UnknownMethod,
    from_wire,
    to_wire,
)


def test_every_exported_error_is_in_the_tree_and_documented() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, IronclawError), name
            assert name in doc, f"{name} missing from the module docstring's tree"


@pytest.mark.parametrize(
    "exc",
    [
        SandboxNotFound("no such sandbox"),
        ConfigError("bad"),
        RequestCancelled(),
        ModelError("x"),
        BudgetExceeded("max_steps: 3 of 3 model calls made"),
        InvalidParams("exec.argv: must be a list"),
        UnknownMethod("no such method"),
    ],
)
def test_errors_survive_the_wire(exc: IronclawError) -> None:
    back = from_wire(to_wire(exc))
    assert type(back) is type(exc)
    assert str(exc) in str(back) or str(back) in str(exc)


def test_builtin_errors_keep_their_type_name() -> None:
    back = from_wire(to_wire(FileNotFoundError(2, "No such file", "x")))
    assert isinstance(back, RpcError) and back.data == {"type": "FileNotFoundError"}


def test_unknown_errors_become_internal_errors_without_losing_the_message() -> None:
    wire = to_wire(KeyError("k"))
    assert wire["code"] == -32603 and "KeyError" in wire["message"]
