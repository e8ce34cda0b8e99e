"""Check request bodies against Firecracker's own Swagger 2.0 API description.

The design IronClaw descends from sent fields Firecracker rejects (``ht_enabled``, a vsock
``socket_path``, a top-level ``seccomp`` key) and nothing caught it before a real boot.
Firecracker deserialises every body with unknown fields denied, so this validator treats
every object as closed unless the spec grants ``additionalProperties``, resolves
``$ref``, and checks types, ``required``, ``enum``, bounds and ``readOnly`` fields. It
also applies the one rule the spec leaves implicit: an id in the URL must equal the
same-named id in the body. PyYAML is needed only to load the spec file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironclaw.errors import ConfigError

__all__ = ["ApiSpec", "Operation", "default_spec_path"]

_INT64 = (-(2**63), 2**63 - 1)
_METHODS = ("get", "put", "patch", "post", "delete")


def default_spec_path() -> Path | None:
    """The spec shipped beside the repository (``../shared/data/firecracker``), if present.

    ``IRONCLAW_FIRECRACKER_SPEC`` overrides it (an installed IronClaw has no repository).
    """
    env = os.environ.get("IRONCLAW_FIRECRACKER_SPEC")
    if env:
        return Path(env) if Path(env).is_file() else None
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data" / "firecracker" / "firecracker.yaml"
        if (parent / "pyproject.toml").is_file() and candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class Operation:
    """One (method, path template) of the API and the schema of its body, if it takes one."""

    method: str
    template: str
    pattern: re.Pattern[str]
    params: tuple[str, ...]
    body: Mapping[str, Any] | None


class ApiSpec:
    """A loaded spec: find the operation for a request and list what is wrong with a body."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        if document.get("swagger") != "2.0":
            raise ConfigError("not a Swagger 2.0 document")
        self.version = str(document.get("info", {}).get("version", "?"))
        self.definitions: Mapping[str, Any] = document.get("definitions", {})
        self.operations: list[Operation] = []
        for template, ops in document.get("paths", {}).items():
            names = tuple(re.findall(r"\{(\w+)\}", template))
            regex = re.escape(template)
            for name in names:
                regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>[^/]+)")
            pattern = re.compile(regex)
            for method, op in ops.items():
                if method not in _METHODS:
                    continue
                body = next(
                    (p.get("schema") for p in op.get("parameters", []) if p.get("in") == "body"),
                    None,
                )
                self.operations.append(Operation(method.upper(), template, pattern, names, body))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiSpec:
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls(yaml.safe_load(f))

    def operation(self, method: str, path: str) -> Operation | None:
        for op in self.operations:
            if op.method == method.upper() and op.pattern.fullmatch(path):
                return op
        return None

    def validate_request(self, method: str, path: str, body: Any) -> list[str]:
        """Every reason Firecracker would refuse this request; empty when it is valid."""
        op = self.operation(method, path)
        if op is None:
            return [f"{method.upper()} {path}: no such operation in the API"]
        if op.body is None:
            return [] if body is None else [f"{op.method} {op.template} takes no body"]
        if body is None:
            return [f"{op.method} {op.template} needs a body"]
        errors: list[str] = []
        self._check(op.body, body, "body", errors)
        match = op.pattern.fullmatch(path)
        assert match is not None
        for name in op.params:
            if isinstance(body, dict) and name in body and body[name] != match.group(name):
                errors.append(f"{name}: {body[name]!r} in the body differs from the path")
        return errors

    def validate_definition(self, name: str, value: Any) -> list[str]:
        errors: list[str] = []
        self._check({"$ref": f"#/definitions/{name}"}, value, name, errors)
        return errors

    # -- the checks ----------------------------------------------------------------------

    def _resolve(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema:
            ref = str(schema["$ref"])
            if not ref.startswith("#/definitions/") or seen > 32:
                raise ConfigError(f"unsupported $ref {ref}")
            target = self.definitions.get(ref.removeprefix("#/definitions/"))
            if target is None:
                raise ConfigError(f"dangling $ref {ref}")
            schema, seen = target, seen + 1
        return schema

    def _check(self, schema: Mapping[str, Any], value: Any, where: str, errors: list[str]) -> None:
        schema = self._resolve(schema)
        kind = schema.get("type")
        if kind is not None and not _is_type(value, str(kind)):
            errors.append(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")
            return
        if "enum" in schema:
            allowed = [_enum_value(v, kind) for v in schema["enum"]]
            if value not in allowed:
                errors.append(f"{where}: {value!r} is not one of {allowed}")
        if isinstance(value, int) and not isinstance(value, bool):
            lo, hi = schema.get("minimum"), schema.get("maximum")
            if schema.get("format") == "int64":
                lo = _INT64[0] if lo is None else max(lo, _INT64[0])
                hi = _INT64[1] if hi is None else min(hi, _INT64[1])
            if lo is not None and value < lo:
                errors.append(f"{where}: {value} is below the minimum {lo}")
            if hi is not None and value > hi:
                errors.append(f"{where}: {value} is above the maximum {hi}")
        if kind == "array" and "items" in schema:
            for i, item in enumerate(value):
                self._check(schema["items"], item, f"{where}[{i}]", errors)
        if kind == "object" or "properties" in schema:
            self._check_object(schema, value, where, errors)

    def _check_object(
        self, schema: Mapping[str, Any], value: Any, where: str, errors: list[str]
    ) -> None:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected object, got {type(value).__name__}")
            return
        props: Mapping[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties", False)
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing required field {name!r}")
        for name, item in value.items():
            sub = f"{where}.{name}"
            if name in props:
                prop = props[name]
                if prop.get("readOnly"):
                    errors.append(f"{sub}: read-only, not accepted in a request")
                self._check(prop, item, sub, errors)
            elif extra is False:
                errors.append(f"{sub}: unknown field (Firecracker denies unknown fields)")
            elif isinstance(extra, Mapping):
                self._check(extra, item, sub, errors)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    raise ConfigError(f"unsupported schema type {kind!r}")


def _enum_value(value: Any, kind: Any) -> Any:
    """YAML 1.1 reads a bare ``Off``/``On`` in a string enum as a boolean: undo that."""
    if kind == "string" and isinstance(value, bool):
        return "On" if value else "Off"
    return value
