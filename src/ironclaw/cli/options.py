"""The sandbox options ``exec``, ``sandbox create``, ``run`` and ``pool fill`` share.

Each option is declared once here. A command takes the ones it offers with
:func:`sandbox_options`, which adds them to its parameters and hands it one
:class:`SandboxOptions`; that builds the typed :class:`~ironclaw.spec.SandboxSpec`, so a
bad value is reported before anything is created. The arguments and options several
other commands take (``--json``, the sandbox id, ``--timeout``, ``--cwd``...) are
declared here once too, as ``Annotated`` aliases.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any

import typer

from ironclaw.errors import ConfigError
from ironclaw.spec import SandboxSpec

__all__ = [
    "AllowDomainOpt",
    "AllowOpt",
    "CommandTimeoutOpt",
    "CwdOpt",
    "DeadlineOpt",
    "EnvOpt",
    "JsonOpt",
    "NewIdOpt",
    "SandboxIdArg",
    "SandboxOptions",
    "parse_env",
    "sandbox_options",
]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
EnvOpt = Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")]
AllowOpt = Annotated[
    list[str] | None,
    typer.Option("--allow", help="Allow egress to CIDR[:PORT[/PROTO]] (repeatable)."),
]
AllowDomainOpt = Annotated[
    list[str] | None,
    typer.Option("--allow-domain", help="Allow NAME or *.SUFFIX through the proxy (repeatable)."),
]
SandboxIdArg = Annotated[str, typer.Argument(help="Sandbox id.")]
NewIdOpt = Annotated[
    str | None, typer.Option("--id", help="Sandbox id to use (default: a new one).")
]
CommandTimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", help="Kill the command after this many seconds.")
]
DeadlineOpt = Annotated[
    float | None,
    typer.Option("--timeout", help="The sandbox's deadline, seconds from now (see `timeout`)."),
]
CwdOpt = Annotated[str | None, typer.Option("--cwd", help="Working directory in the sandbox.")]
_REPEATABLE = frozenset({"allow", "allow_domain", "env", "mount"})

# name -> (annotation, default): the typer declaration of each shared option.
_OPTIONS: dict[str, tuple[Any, Any]] = {
    "backend": (
        Annotated[str, typer.Option("--backend", help="namespace, qemu or firecracker.")],
        "namespace",
    ),
    "memory": (Annotated[int | None, typer.Option("--memory", help="Memory limit in MiB.")], None),
    "pids": (
        Annotated[int | None, typer.Option("--pids", help="Maximum number of processes.")],
        None,
    ),
    "cpus": (
        Annotated[float | None, typer.Option("--cpus", help="CPU quota (e.g. 0.5, 2).")],
        None,
    ),
    "wall_time": (
        Annotated[
            float | None, typer.Option("--wall-time", help="Sandbox lifetime limit in seconds.")
        ],
        None,
    ),
    "workspace_size": (
        Annotated[
            int | None, typer.Option("--workspace-size", help="Workspace size limit in MiB.")
        ],
        None,
    ),
    "allow": (AllowOpt, None),  # also taken by ``sandbox net``
    "allow_domain": (AllowDomainOpt, None),
    "env": (EnvOpt, None),  # also taken by ``sandbox exec``
    "mount": (
        Annotated[
            list[str] | None,
            typer.Option("--mount", help="SRC:DST[:ro|rw] (repeatable; ro default)."),
        ],
        None,
    ),
    "seccomp": (
        Annotated[
            str, typer.Option("--seccomp", help="Seccomp profile: strict, default or permissive.")
        ],
        "default",
    ),
}


def parse_env(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``KEY=VALUE`` items as a mapping (the last of a repeated key wins)."""
    env: dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"--env {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return env


@dataclass(frozen=True)
class SandboxOptions:
    """The shared options as given on the command line (unset ones at their defaults)."""

    backend: str = "namespace"
    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    wall_time: float | None = None
    workspace_size: int | None = None
    allow: tuple[str, ...] = ()
    allow_domain: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    mount: tuple[str, ...] = ()
    seccomp: str = "default"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SandboxOptions:
        """From typer's parameter values (repeatable options arrive as a list or None)."""
        values: dict[str, Any] = {
            k: tuple(v or ()) if k in _REPEATABLE else v for k, v in params.items()
        }
        return cls(**values)

    def spec(self) -> SandboxSpec:
        """The validated spec; raises :class:`~ironclaw.errors.ConfigError` naming the field."""
        from ironclaw.policy.network import AllowRule
        from ironclaw.spec import MountSpec, parse_spec

        limits = {
            key: value
            for key, value in (
                ("memory_mib", self.memory),
                ("pids", self.pids),
                ("cpus", self.cpus),
                ("wall_time_s", self.wall_time),
                ("workspace_mib", self.workspace_size),
            )
            if value is not None
        }
        return parse_spec(
            {
                "backend": self.backend,
                "limits": limits,
                "env": parse_env(self.env),
                "mounts": tuple(MountSpec.parse(m) for m in self.mount),
                "network": {
                    "allow": tuple(AllowRule.parse(a) for a in self.allow),
                    "allow_domains": self.allow_domain,
                },
                "seccomp": self.seccomp,
            }
        )


def sandbox_options(*names: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the shared options ``names``, passed to it as ``opts=SandboxOptions``.

    The options are appended to the command's own parameters (typer reads the signature),
    so each is declared once, in :data:`_OPTIONS`, whichever commands offer it.
    """
    unknown = set(names) - _OPTIONS.keys()
    if unknown:
        raise ValueError(f"unknown shared options: {sorted(unknown)}")
    known = {f.name for f in fields(SandboxOptions)}
    assert known == _OPTIONS.keys(), "SandboxOptions and _OPTIONS must list the same options"

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.name != "opts"]
        shared = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annot, default=default
            )
            for name, (annot, default) in ((n, _OPTIONS[n]) for n in names)
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            given = {name: kwargs.pop(name) for name in names}
            command(*args, **kwargs, opts=SandboxOptions.from_params(given))

        signature = own.replace(parameters=[*params, *shared])
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return wrapper

    return decorate
