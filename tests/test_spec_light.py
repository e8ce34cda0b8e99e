"""The one-shot CLI's pydantic-free default spec is ``SandboxSpec()`` in every respect.

The create path reads the light record where it would read the model, so every field,
default, property and the registry's JSON form must agree; a field added to the model
and not to the record fails here.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from pydantic import BaseModel

from ironclaw.host.manager import pool_key
from ironclaw.policy.knobs import cgroup_v1_settings, cgroup_v2_settings, rlimits
from ironclaw.policy.limits import ResourceLimits
from ironclaw.spec import SandboxSpec, parse_spec
from ironclaw.spec_light import DEFAULT_SPEC, LightSpec

PROPERTIES = {
    "limits": ("memory_bytes", "cpu_quota_us"),
    "network": ("needs_network", "needs_proxy"),
    "lifetime": ("active",),
}


def compare(model: BaseModel, light: object, path: str) -> list[str]:
    """Where ``light`` differs from ``model``, field by field, nested models included."""
    diffs: list[str] = []
    for name in type(model).model_fields:
        here = f"{path}.{name}" if path else name
        if not hasattr(light, name):
            diffs.append(f"{here}: missing")
            continue
        value: Any = getattr(model, name)
        if isinstance(value, BaseModel):
            diffs += compare(value, getattr(light, name), here)
        elif getattr(light, name) != value:
            diffs.append(f"{here}: {getattr(light, name)!r} != {value!r}")
    for prop in PROPERTIES.get(path, ()):
        if getattr(light, prop) != getattr(model, prop):
            diffs.append(f"{path}.{prop}: {getattr(light, prop)!r} != {getattr(model, prop)!r}")
    return diffs


def test_every_field_default_and_property_matches_the_model() -> None:
    assert compare(SandboxSpec(), DEFAULT_SPEC, "") == []
    # The comparison sees a difference when there is one.
    assert compare(SandboxSpec(seccomp="strict"), DEFAULT_SPEC, "") == [
        "seccomp: 'default' != 'strict'"
    ]
    assert compare(SandboxSpec(limits={"memory_mib": 64}), DEFAULT_SPEC, "") == [
        "limits.memory_mib: 512 != 64",
        "limits.memory_bytes: 536870912 != 67108864",
    ]


def test_registry_form_pool_key_and_kernel_knobs_match() -> None:
    model = SandboxSpec()
    assert DEFAULT_SPEC.model_dump(mode="json") == model.model_dump(mode="json")
    # A warm sandbox filled by `pool fill` (a real spec) serves the one-shot CLI.
    assert pool_key(DEFAULT_SPEC) == pool_key(model)  # type: ignore[arg-type]
    assert rlimits(DEFAULT_SPEC.limits) == rlimits(ResourceLimits())
    assert cgroup_v1_settings(DEFAULT_SPEC.limits) == cgroup_v1_settings(ResourceLimits())
    assert cgroup_v2_settings(DEFAULT_SPEC.limits) == cgroup_v2_settings(ResourceLimits())


def test_parse_spec_turns_the_record_into_the_model() -> None:
    parsed = parse_spec(DEFAULT_SPEC)
    assert isinstance(parsed, SandboxSpec) and parsed == SandboxSpec()
    assert isinstance(DEFAULT_SPEC, LightSpec) and not isinstance(DEFAULT_SPEC, BaseModel)


def test_the_record_is_read_only_and_hands_out_fresh_mappings() -> None:
    try:
        DEFAULT_SPEC.seccomp = "permissive"  # type: ignore[misc]
    except AttributeError:
        pass
    else:
        raise AssertionError("the default spec could be changed")
    DEFAULT_SPEC.env["X"] = "1"
    assert DEFAULT_SPEC.env == {} and DEFAULT_SPEC.labels == {}


def test_importing_the_record_and_the_knobs_loads_no_pydantic() -> None:
    code = (
        "import sys, ironclaw.spec_light, ironclaw.policy.knobs, ironclaw.resources.cgroups, "
        "ironclaw.backends.namespace, ironclaw.host.manager; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pydantic', 'pydantic_core', 'annotated_types') or m == 'ironclaw.spec'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
