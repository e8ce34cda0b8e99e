"""The shared sandbox options: declared once, typed spec out, errors that name the field."""

from __future__ import annotations

import ipaddress
import json

import pytest
import typer
from typer.testing import CliRunner

from ironclaw.cli.options import SandboxOptions, parse_env, sandbox_options
from ironclaw.errors import ConfigError
from ironclaw.policy.network import AllowRule, NetworkPolicy
from ironclaw.spec import MountSpec, SandboxSpec


def test_spec_is_typed_and_carries_every_option() -> None:
    opts = SandboxOptions(
        backend="qemu",
        memory=256,
        pids=64,
        cpus=0.5,
        wall_time=30.0,
        workspace_size=100,
        allow=("10.0.0.0/8:443/tcp",),
        allow_domain=("example.com",),
        env=("A=1", "B=x=y"),
        mount=("/tmp:/data:rw",),
        seccomp="strict",
    )
    spec = opts.spec()
    assert isinstance(spec, SandboxSpec) and isinstance(spec.network, NetworkPolicy)
    assert spec.network.allow == (
        AllowRule(network=ipaddress.ip_network("10.0.0.0/8"), port=443, proto="tcp"),
    )
    assert spec.network.allow_domains == ("example.com",)
    assert (spec.backend, spec.seccomp) == ("qemu", "strict")
    assert (spec.limits.memory_mib, spec.limits.pids, spec.limits.cpus) == (256, 64, 0.5)
    assert (spec.limits.wall_time_s, spec.limits.workspace_mib) == (30.0, 100)
    assert spec.env == {"A": "1", "B": "x=y"}
    assert spec.mounts == (MountSpec(source="/tmp", target="/data", writable=True),)


def test_defaults_give_the_default_spec() -> None:
    assert SandboxOptions().spec() == SandboxSpec()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (SandboxOptions(allow_domain=("com",)), "network.allow_domains"),
        (SandboxOptions(allow=("10.0.0.1/8",)), "bad allow rule '10.0.0.1/8'"),
        (SandboxOptions(env=("NOEQ",)), "--env 'NOEQ': use KEY=VALUE"),
        (SandboxOptions(mount=("/a:/proc",)), "mount '/a:/proc'"),
        (SandboxOptions(seccomp="bogus"), "seccomp"),
        (SandboxOptions(memory=1), "limits.memory_mib"),
    ],
)
def test_bad_values_are_config_errors_naming_the_option(opts: SandboxOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        opts.spec()


def test_parse_env_keeps_the_last_of_a_repeated_key() -> None:
    assert parse_env(["A=1", "A=2", "B="]) == {"A": "2", "B": ""}
    assert parse_env(None) == {}


def test_decorator_adds_the_named_options_and_passes_them_typed() -> None:
    app = typer.Typer()
    seen: list[SandboxOptions] = []

    @app.command()
    @sandbox_options("allow", "memory", "env")
    def cmd(*, name: str = "x", opts: SandboxOptions) -> None:
        seen.append(opts)
        print(json.dumps({"name": name}))

    runner = CliRunner()
    result = runner.invoke(
        app, ["--name", "y", "--allow", "10.0.0.0/8", "--allow", "10.1.0.0/16", "--memory", "64"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"name": "y"}
    assert seen == [SandboxOptions(memory=64, allow=("10.0.0.0/8", "10.1.0.0/16"), env=())]
    # Options the command did not ask for do not exist on it.
    refused = runner.invoke(app, ["--pids", "3"])
    assert refused.exit_code == 2


def test_unknown_shared_option_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown shared options"):
        sandbox_options("memroy")


@pytest.mark.parametrize("as_json", [False, True])
def test_bad_option_is_refused_before_anything_starts(as_json: bool) -> None:
    """A message quoting ``CIDR[:PORT[/tcp|udp]]`` is printed as text (once read as markup)."""
    from ironclaw.cli.main import app

    args = ["exec", *(["--json"] if as_json else []), "--allow", "10.0.0.1/8", "--", "true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    if as_json:
        assert json.loads(result.stdout)["error"] == "ConfigError"
    else:
        assert "bad allow rule '10.0.0.1/8'" in result.stderr
        assert "CIDR[:PORT[/tcp|udp]]" in result.stderr
