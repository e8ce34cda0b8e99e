"""Specs: strict validation with errors that name the field to change."""

from __future__ import annotations

import pytest

from ironclaw.errors import ConfigError
from ironclaw.spec import MountSpec, SandboxSpec, parse_spec


def test_defaults_are_safe() -> None:
    spec = parse_spec({})
    assert spec.backend == "namespace"
    assert spec.seccomp == "default"
    assert not spec.network.needs_network
    assert spec.mounts == ()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"bogus": 1}, "bogus"),
        ({"backend": "docker"}, "backend"),
        ({"seccomp": "none"}, "seccomp"),
        ({"env": {"BAD NAME": "x"}}, "env"),
        ({"limits": {"memory_mib": -1}}, "memory_mib"),
        ({"mounts": [{"source": "relative", "target": "/x"}]}, "mounts"),
        ({"mounts": [{"source": "/etc", "target": "/proc/x"}]}, "reserved"),
        ({"hostname": "Bad_Host"}, "hostname"),
    ],
)
def test_bad_specs_raise_config_error_naming_the_field(
    data: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_spec(data)


def test_mount_parse() -> None:
    assert MountSpec.parse("/data:/data") == MountSpec(source="/data", target="/data")
    assert MountSpec.parse("/a:/b:rw").writable
    with pytest.raises(ConfigError):
        MountSpec.parse("/a:/b:xx")
    with pytest.raises(ConfigError):
        MountSpec.parse("/a/../etc:/b")


def test_spec_round_trips_through_json() -> None:
    spec = parse_spec({"env": {"A": "1"}, "limits": {"memory_mib": 64}})
    assert SandboxSpec.model_validate(spec.model_dump(mode="json")) == spec
