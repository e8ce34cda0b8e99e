"""The sandbox spec: everything a caller may ask of a sandbox, validated strictly.

A spec is checked in full before anything is created (invariant: bad input gets a clear
error and changes nothing). Pydantic's ValidationError is translated into
:class:`~ironclaw.errors.ConfigError` here, at the boundary, with a message that says
which field to change.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ironclaw.errors import ConfigError
from ironclaw.policy.limits import ResourceLimits
from ironclaw.policy.network import NetworkPolicy
from ironclaw.spec_light import LightSpec

__all__ = [
    "BackendName",
    "Lifetime",
    "MountSpec",
    "OnTimeout",
    "SandboxSpec",
    "SeccompProfileName",
    "parse_spec",
    "validate_labels",
]

BackendName = Literal["namespace", "qemu", "firecracker"]
SeccompProfileName = Literal["strict", "default", "permissive"]
OnTimeout = Literal["destroy", "pause"]

_LABEL_KEY = re.compile(r"[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")
MAX_LABELS = 32

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Paths inside the sandbox that a user mount may not cover: the agent, /proc, /dev.
_RESERVED_TARGETS = ("/opt/ironclaw", "/proc", "/dev", "/sys")


class MountSpec(BaseModel):
    """A host path made visible inside the sandbox; read-only unless ``writable``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    target: str
    writable: bool = False

    @field_validator("source", "target")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or "\0" in v or ".." in PurePosixPath(v).parts:
            raise ValueError(f"{v!r} must be an absolute path without '..'")
        return str(PurePosixPath(v))

    @field_validator("target")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        for reserved in _RESERVED_TARGETS:
            if v == "/" or v == reserved or v.startswith(reserved + "/"):
                raise ValueError(f"mount target {v!r} is reserved")
        return v

    @classmethod
    def parse(cls, text: str) -> MountSpec:
        """``SRC:DST[:ro|rw]``, as on the command line."""
        parts = text.split(":")
        if len(parts) == 2:
            parts.append("ro")
        if len(parts) != 3 or parts[2] not in ("ro", "rw"):
            raise ConfigError(f"mount {text!r}: use SRC:DST or SRC:DST:ro|rw")
        try:
            return cls(source=parts[0], target=parts[1], writable=parts[2] == "rw")
        except ValidationError as exc:
            raise ConfigError(f"mount {text!r}: {_first_error(exc)}") from None


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels are for filtering, so they stay small and plain (as Kubernetes labels do)."""
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ValueError(
                f"label key {key!r}: use 1-63 of a-z 0-9 . _ / -, starting and ending alphanumeric"
            )
        if not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"label {key}: value {value!r} may hold up to 63 of A-Z a-z 0-9 . _ -")
    return labels


class Lifetime(BaseModel):
    """When a sandbox ends by itself, counted in wall-clock time from its start.

    ``timeout_s`` is a deadline (``set_timeout`` moves it); ``idle_timeout_s`` runs from the
    last exec or file call made through the manager (connecting is not activity). Pauses
    do not stop the deadline; the idle timer does not run while paused, and a resume
    counts as activity. ``on_timeout`` says what happens then: destroy, or pause (the
    sandbox keeps its memory and files, uses no CPU, and waits for a resume).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float | None = Field(default=None, gt=0, le=366 * 86400)
    idle_timeout_s: float | None = Field(default=None, gt=0, le=366 * 86400)
    on_timeout: OnTimeout = "destroy"

    @property
    def active(self) -> bool:
        return self.timeout_s is not None or self.idle_timeout_s is not None


class SandboxSpec(BaseModel):
    """What to run a sandbox with. Defaults are the safe choice for every field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: BackendName = "namespace"
    image: str = Field(default="host", pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    env: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=65536)]] = (
        Field(default_factory=dict)
    )
    mounts: tuple[MountSpec, ...] = ()
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    seccomp: SeccompProfileName = "default"
    hostname: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    labels: dict[str, str] = Field(default_factory=dict)
    lifetime: Lifetime = Field(default_factory=Lifetime)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        return validate_labels(v)

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
            if "\0" in value:
                raise ValueError(f"environment variable {name} contains a NUL byte")
        return v

    @field_validator("mounts")
    @classmethod
    def _distinct_targets(cls, v: tuple[MountSpec, ...]) -> tuple[MountSpec, ...]:
        targets = [m.target for m in v]
        if len(set(targets)) != len(targets):
            raise ValueError("two mounts share a target")
        return v


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    return f"{loc}: {msg}" if loc else msg


def parse_spec(data: Any) -> SandboxSpec:
    """Validate ``data`` (a dict or a spec) into a :class:`SandboxSpec` or raise ConfigError."""
    if isinstance(data, SandboxSpec):
        return data
    if isinstance(data, LightSpec):
        data = data.model_dump(mode="json")
    try:
        return SandboxSpec.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        raise ConfigError(f"invalid sandbox spec: {details}") from None
