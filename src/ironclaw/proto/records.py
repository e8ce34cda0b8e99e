"""Typed records for the channel API: frozen, slotted, checked field by field.

:class:`Record` subclasses are seen by type checkers as frozen dataclasses
(``dataclass_transform``); at run time a small metaclass builds them instead of
:mod:`dataclasses`, whose code generation costs about a millisecond per class, and the
guest imports every channel type on each sandbox start. Each record's fields get a
:class:`Field` check with :func:`declare`; :func:`decode` applies them (unknown or
missing fields, wrong JSON types, values out of range raise
:class:`~ironclaw.errors.InvalidParams`) and :func:`to_json` writes records back.
Nothing walks type hints at import. They are not :mod:`dataclasses` at run time, so use
:func:`to_json` rather than ``dataclasses.asdict``. Standard library only: the guest
imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, dataclass_transform

from ironclaw.errors import InvalidParams
from ironclaw.proto.frames import MAX_STREAM_ID

__all__ = [
    "MISSING",
    "Bool",
    "Field",
    "Float",
    "Int",
    "Json",
    "Nested",
    "Opt",
    "Record",
    "Seq",
    "Str",
    "StrMap",
    "declare",
    "decode",
    "schema",
    "to_json",
]

MAX_STR = 1 << 20  # any one string field (tool output is cut at 32 000 chars before this)
MAX_PATH = 4096  # PATH_MAX
MAX_ARG = 128 * 1024  # MAX_ARG_STRLEN: the kernel refuses longer argv strings anyway
MAX_ITEMS = 4096  # argv entries, env entries, directory entries in one field...
MAX_JSON_NODES = 200_000  # chat messages and tool schemas the gateway passes through
MAX_JSON_DEPTH = 64
MAX_INT = 2**63 - 1

R = TypeVar("R", bound="Record")


def _bad(where: str, what: str, value: Any) -> InvalidParams:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return InvalidParams(f"{where}: {what}, got {shown}")


# -- field checks -------------------------------------------------------------------------


class Field:
    """How one field is checked when decoded and written when encoded."""

    __slots__ = ()

    def decode(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value


class Str(Field):
    __slots__ = ("choices", "max_len", "min_len", "no_nul", "without")

    def __init__(
        self,
        *,
        min_len: int = 0,
        max_len: int = MAX_STR,
        no_nul: bool = False,
        choices: tuple[str, ...] = (),
        without: str = "",
    ) -> None:
        self.min_len, self.max_len, self.no_nul = min_len, max_len, no_nul
        self.choices, self.without = choices, without

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, str):
            raise _bad(where, "must be a string", value)
        if self.choices and value not in self.choices:
            raise _bad(where, f"must be one of {', '.join(self.choices)}", value)
        if not self.min_len <= len(value) <= self.max_len:
            raise _bad(where, f"must be {self.min_len} to {self.max_len} characters", value)
        if self.no_nul and "\0" in value:
            raise _bad(where, "must not contain NUL bytes", value)
        if self.without and self.without in value:
            raise _bad(where, f"must not contain {self.without!r}", value)
        return value


class Int(Field):
    __slots__ = ("hi", "lo")

    def __init__(self, lo: int = 0, hi: int = MAX_INT) -> None:
        self.lo, self.hi = lo, hi

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _bad(where, "must be an integer", value)
        if not self.lo <= value <= self.hi:
            raise _bad(where, f"must be in [{self.lo}, {self.hi}]", value)
        return value


class Float(Field):
    """A finite number (JSON ints accepted); ``positive`` excludes zero."""

    __slots__ = ("lo", "positive")

    def __init__(self, *, lo: float = -math.inf, positive: bool = False) -> None:
        self.lo, self.positive = lo, positive

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _bad(where, "must be a number", value)
        number = float(value)
        if not math.isfinite(number) or number < self.lo or (self.positive and number <= 0):
            raise _bad(where, "must be a finite " + ("positive " * self.positive) + "number", value)
        return number


class Bool(Field):
    __slots__ = ()

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, bool):
            raise _bad(where, "must be true or false", value)
        return value


class Opt(Field):
    """``null`` or what ``inner`` accepts."""

    __slots__ = ("inner",)

    def __init__(self, inner: Field) -> None:
        self.inner = inner

    def decode(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.decode(value, where)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


class Seq(Field):
    """A JSON array, decoded to a tuple."""

    __slots__ = ("inner", "max_items", "min_items")

    def __init__(self, inner: Field, *, min_items: int = 0, max_items: int = MAX_ITEMS) -> None:
        self.inner, self.min_items, self.max_items = inner, min_items, max_items

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, list | tuple):
            raise _bad(where, "must be a list", value)
        if not self.min_items <= len(value) <= self.max_items:
            raise _bad(where, f"must have {self.min_items} to {self.max_items} items", value)
        return tuple(self.inner.decode(v, f"{where}[{i}]") for i, v in enumerate(value))

    def encode(self, value: Any) -> Any:
        return [self.inner.encode(v) for v in value]


class StrMap(Field):
    """A JSON object of strings to strings (environments)."""

    __slots__ = ()

    def decode(self, value: Any, where: str) -> Any:
        if not isinstance(value, Mapping) or len(value) > MAX_ITEMS:
            raise _bad(where, f"must map at most {MAX_ITEMS} strings to strings", value)
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise _bad(where, "must map strings to strings", {k: v})
            if "\0" in k or "\0" in v or len(k) + len(v) > MAX_ARG:
                raise _bad(where, "entries must be NUL-free and shorter than 128 KiB", k)
        return dict(value)

    def encode(self, value: Any) -> Any:
        return dict(value)


class Json(Field):
    """Any JSON value (``obj``: an object), bounded in nodes and depth, kept as is."""

    __slots__ = ("obj",)

    def __init__(self, *, obj: bool = False) -> None:
        self.obj = obj

    def decode(self, value: Any, where: str) -> Any:
        if self.obj and not isinstance(value, dict):
            raise _bad(where, "must be an object", value)
        budget = [MAX_JSON_NODES]
        _check_json(value, where, 0, budget)
        return value


def _check_json(value: Any, where: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _bad(where, f"is larger than {MAX_JSON_NODES} JSON values", "...")
    if depth > MAX_JSON_DEPTH:
        raise _bad(where, f"nests deeper than {MAX_JSON_DEPTH}", "...")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(where, "numbers must be finite", value)
    elif isinstance(value, str):
        if len(value) > MAX_STR:
            raise _bad(where, f"strings must be at most {MAX_STR} characters", value)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, where, depth + 1, budget)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _bad(where, "object keys must be strings", k)
            if len(k) > MAX_STR:  # a key is a string too
                raise _bad(where, f"strings must be at most {MAX_STR} characters", k)
            _check_json(v, where, depth + 1, budget)
    else:
        raise _bad(where, "must be JSON", value)


class Nested(Field):
    """A record inside a record, as a JSON object."""

    __slots__ = ("cls",)

    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def decode(self, value: Any, where: str) -> Any:
        return decode(self.cls, value, where)

    def encode(self, value: Any) -> Any:
        return to_json(value)


# -- records ------------------------------------------------------------------------------


class _Missing:
    __slots__ = ()


MISSING: Any = _Missing()


@dataclass_transform(frozen_default=True)
class _RecordMeta(type):
    """Builds a frozen slotted record from a class body's annotations and defaults."""

    def __new__(mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any]) -> _RecordMeta:
        notes = ns.get("__annotations__", {})
        fields = tuple(f for f, t in notes.items() if not str(t).startswith("ClassVar"))
        ns["__slots__"] = fields
        ns["_defaults"] = {f: ns.pop(f) for f in fields if f in ns}
        ns["_fields"] = fields
        return super().__new__(mcs, name, bases, ns)


class Record(metaclass=_RecordMeta):
    """Base of every request, result and shared type: frozen, slotted, compared by value."""

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields")
        values = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names or k in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {k!r}")
            values[k] = v
        for f in names:
            v = values.get(f, self._defaults.get(f, MISSING))
            if v is MISSING:
                raise TypeError(f"{type(self).__name__}: missing field {f!r}")
            object.__setattr__(self, f, v)

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")


_SCHEMAS: dict[type[Record], dict[str, Field]] = {}


def declare(cls: type[R], **fields: Field) -> None:
    """Give each field of ``cls`` its check (every field, no more)."""
    if set(fields) != set(cls._fields):
        raise TypeError(f"{cls.__name__}: schema and fields differ")  # caught by any import
    _SCHEMAS[cls] = fields


def schema(cls: type[Record]) -> list[tuple[str, Field, Any]]:
    """(name, check, default or MISSING) of every field, in order: for tests and tooling."""
    checks = _SCHEMAS[cls]
    return [(f, checks[f], cls._defaults.get(f, MISSING)) for f in cls._fields]


def decode(cls: type[R], value: Any, where: str = "") -> R:
    """Check a JSON object against ``cls``'s fields and build the record."""
    where = where or cls.__name__
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _bad(where, "must be an object", value)
    checks = _SCHEMAS[cls]
    unknown = [k for k in value if k not in checks]
    if unknown:
        raise _bad(where, f"unknown field(s) {', '.join(map(str, unknown))}", value)
    kwargs = {}
    for f, check in checks.items():
        if f in value:
            kwargs[f] = check.decode(value[f], f"{where}.{f}")
        elif f not in cls._defaults:
            raise _bad(where, f"missing field {f!r}", value)
    return cls(**kwargs)


def to_json(record: Record) -> dict[str, Any]:
    """The record as a JSON object (every field written, ``null`` included)."""
    checks = _SCHEMAS[type(record)]
    return {f: checks[f].encode(getattr(record, f)) for f in record._fields}


# -- field checks several methods share ----------------------------------------------------

PATH = Str(min_len=1, max_len=MAX_PATH, no_nul=True)
STREAM = Int(1, MAX_STREAM_ID)
MODE = Int(0, 0o7777)
TEXT = Str()
NAME = Str(max_len=1024)
