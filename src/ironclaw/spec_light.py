"""The default sandbox spec as plain records, for the one-shot ``ironclaw exec``.

Importing pydantic and building the spec models costs about 200 ms here, more than the
rest of a one-shot run. That command only ever asks for the default spec, so it passes
:data:`DEFAULT_SPEC`: the values, properties and JSON form of ``SandboxSpec()`` (a test
compares the two field by field, so a new field or default cannot drift), built from
the standard library. Nothing here validates input: there is no input, only the safe
defaults. Anything with options (other CLI commands, the API, the SDK) goes through
:mod:`ironclaw.spec`, whose ``parse_spec`` turns this record into the real model.
"""

from __future__ import annotations

from typing import Any, Literal

from ironclaw.policy.knobs import DerivedLimits

__all__ = ["DEFAULT_SPEC", "LightSpec"]


class _Limits(DerivedLimits):
    """``ResourceLimits()``; byte and quota values from :class:`DerivedLimits`, as the model."""

    __slots__ = ()
    memory_mib = 512
    pids = 256
    cpus = 1.0
    nofile = 1024
    fsize_mib = 1024
    workspace_mib = 1024
    tmp_mib = 256
    wall_time_s: float | None = None


class _Network:
    """``NetworkPolicy()``: deny-all (loopback only, no veth, nothing to filter)."""

    __slots__ = ()
    allow: tuple[Any, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()
    needs_network = False
    needs_proxy = False


class _Lifetime:
    """``Lifetime()``: no deadline, no idle timer."""

    __slots__ = ()
    timeout_s: float | None = None
    idle_timeout_s: float | None = None
    on_timeout = "destroy"
    active = False


class LightSpec:
    """``SandboxSpec()`` without pydantic: read-only, with ``model_dump`` for the registry."""

    __slots__ = ()
    backend = "namespace"
    image = "host"
    limits = _Limits()
    mounts: tuple[Any, ...] = ()
    network = _Network()
    seccomp = "default"
    hostname: str | None = None
    lifetime = _Lifetime()

    @property
    def env(self) -> dict[str, str]:
        return {}

    @property
    def labels(self) -> dict[str, str]:
        return {}

    def model_dump(self, *, mode: Literal["json"]) -> dict[str, Any]:
        """What ``SandboxSpec().model_dump(mode="json")`` gives (the registry's form)."""
        lim, life = self.limits, self.lifetime
        return {
            "backend": self.backend,
            "image": self.image,
            "limits": {
                "memory_mib": lim.memory_mib,
                "pids": lim.pids,
                "cpus": lim.cpus,
                "nofile": lim.nofile,
                "fsize_mib": lim.fsize_mib,
                "workspace_mib": lim.workspace_mib,
                "tmp_mib": lim.tmp_mib,
                "wall_time_s": lim.wall_time_s,
            },
            "env": {},
            "mounts": [],
            "network": {"allow": [], "allow_domains": [], "deny_domains": []},
            "seccomp": self.seccomp,
            "hostname": self.hostname,
            "labels": {},
            "lifetime": {
                "timeout_s": life.timeout_s,
                "idle_timeout_s": life.idle_timeout_s,
                "on_timeout": life.on_timeout,
            },
        }


#: The one instance: the spec of ``ironclaw exec -- CMD`` without sandbox options.
DEFAULT_SPEC = LightSpec()
