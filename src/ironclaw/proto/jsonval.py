"""JSON as a type: :data:`JsonValue` for data that is truly free-form, and one bounded
decode step for such data when it comes from an untrusted side.

Free-form means no shape IronClaw could name: a tool's arguments, a tool's input
schema, a model's raw response, a sandbox spec before :func:`ironclaw.spec.parse_spec`
reads it, the fields of a trace event. Where data has a shape, use a record
(:mod:`ironclaw.proto.records`) or a ``TypedDict`` instead. Unlike ``Any``, a
:data:`JsonValue` must be narrowed before use, so a type checker finds code that
assumes a shape it never checked.

:func:`json_object` is the decode step for JSON from a guest, a remote API or a model:
it checks the value is JSON all the way down, within the channel's bounds (nodes, depth,
string length), and raises :class:`~ironclaw.errors.InvalidParams` saying where it is
not. Standard library only: the guest imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

from ironclaw.proto.records import Json

__all__ = ["JsonObject", "JsonValue", "json_object", "json_value"]

if TYPE_CHECKING:
    #: Any JSON value: what ``json.loads`` can return.
    JsonValue: TypeAlias = (
        str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None
    )
    #: A JSON object with free-form members.
    JsonObject: TypeAlias = dict[str, JsonValue]
else:
    try:  # on the host: a named alias pydantic builds a schema from (its models use it)
        from typing_extensions import TypeAliasType

        _members = str | int | float | bool | list["JsonValue"] | dict[str, "JsonValue"] | None
        JsonValue = TypeAliasType("JsonValue", _members)
    except ImportError:  # in the guest's minimal image: annotations only
        JsonValue = str | int | float | bool | list | dict | None
    JsonObject = dict[str, JsonValue]

_ANY = Json()
_OBJECT = Json(obj=True)


def json_value(value: Any, where: str) -> JsonValue:
    """``value`` once checked to be bounded JSON (else :class:`InvalidParams`)."""
    checked: JsonValue = _ANY.decode(value, where)
    return checked


def json_object(value: Any, where: str) -> JsonObject:
    """``value`` once checked to be a bounded JSON object (else :class:`InvalidParams`)."""
    checked: JsonObject = _OBJECT.decode(value, where)
    return checked
