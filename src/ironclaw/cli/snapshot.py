"""``ironclaw snapshot ls|rm|create`` and the sandbox controls beside them: ``sandbox
pause|resume|timeout|net``. Snapshots and forks are described in docs/LIFETIMES.md."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ironclaw.cli import remote as via_api
from ironclaw.cli.common import new_app, print_snapshots, run, run_with_manager
from ironclaw.cli.options import AllowDomainOpt, AllowOpt, DeadlineOpt, JsonOpt, SandboxIdArg

if TYPE_CHECKING:
    from ironclaw.spec import SandboxSpec

__all__ = ["explicit_fields", "parse_labels", "register_sandbox_controls", "snapshot_app"]

snapshot_app = new_app(
    "Snapshots: create, ls, rm (restore: sandbox create --from). A VM sandbox's snapshot "
    "holds its memory and disks, a namespace sandbox's its workspace."
)


def parse_labels(items: list[str] | None) -> dict[str, str]:
    """``k=v`` pairs from the command line (validated later, with the spec)."""
    from ironclaw.errors import ConfigError

    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"label {item!r}: use KEY=VALUE")
        out[key] = value
    return out


def explicit_fields(spec: SandboxSpec) -> dict[str, Any]:
    """The fields of ``spec`` that the command line set (those not at their default):
    what ``sandbox create --from`` lays over the snapshot's own spec."""
    from ironclaw.spec import SandboxSpec

    have, base = spec.model_dump(mode="json"), SandboxSpec().model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in have.items():
        if value == base.get(key):
            continue
        if isinstance(value, dict) and key in ("limits", "lifetime"):
            out[key] = {k: v for k, v in value.items() if v != base[key].get(k)}
        else:
            out[key] = value
    return out


@snapshot_app.command("create")
def snapshot_create(
    sandbox_id: SandboxIdArg,
    name: Annotated[str, typer.Argument(help="Snapshot name.")],
    as_json: JsonOpt = False,
) -> None:
    """Save a sandbox as a snapshot (atomically; hash-stamped): a VM's memory and disks,
    else the workspace. `sandbox create --from NAME` restores it with its recorded spec."""
    if via_api.active():
        return run(via_api.snapshot_create(sandbox_id, name, as_json=as_json), as_json)
    snap = run_with_manager(lambda m: m.snapshot(sandbox_id, name), as_json)
    print(json.dumps(snap.to_json()) if as_json else snap.name)


@snapshot_app.command("ls")
def snapshot_ls(as_json: JsonOpt = False) -> None:
    """List complete snapshots (half-written ones never appear)."""
    if via_api.active():
        return run(via_api.snapshot_ls(as_json=as_json), as_json)
    from ironclaw.config import Settings
    from ironclaw.host.snapshots import SnapshotStore

    snaps = SnapshotStore(Settings.from_env()).all()
    print_snapshots([s.to_json() for s in snaps], as_json)


@snapshot_app.command("rm")
def snapshot_rm(
    names: Annotated[list[str], typer.Argument(help="Snapshot names.")], as_json: JsonOpt = False
) -> None:
    """Remove snapshots."""
    if via_api.active():
        return run(via_api.snapshot_rm(names, as_json=as_json), as_json)
    from ironclaw.config import Settings
    from ironclaw.host.snapshots import SnapshotStore

    async def main() -> None:
        store = SnapshotStore(Settings.from_env())
        for name in names:
            store.remove(name)
        if as_json:
            print(json.dumps({"removed": names}))

    run(main(), as_json)


def _remote(sandbox_id: str, action: str, body: dict[str, Any] | None, as_json: bool) -> bool:
    """Run a sandbox control through the API when ``--api`` is given; whether it did."""
    if not via_api.active():
        return False
    doc = run(via_api.control(sandbox_id, action, body), as_json)
    if as_json:
        print(json.dumps(doc))
    return True


def register_sandbox_controls(app: typer.Typer) -> None:
    """Add pause, resume, timeout and net to ``ironclaw sandbox``."""

    @app.command("pause")
    def sandbox_pause(sandbox_id: SandboxIdArg, as_json: JsonOpt = False) -> None:
        """Freeze a sandbox: it keeps its memory and files and uses no CPU."""
        if _remote(sandbox_id, "pause", None, as_json):
            return
        run_with_manager(lambda m: m.pause(sandbox_id), as_json)
        if as_json:
            print(json.dumps({"id": sandbox_id, "state": "paused"}))

    @app.command("resume")
    def sandbox_resume(
        sandbox_id: SandboxIdArg,
        timeout: DeadlineOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Continue a paused sandbox."""
        if _remote(sandbox_id, "resume", {"timeout": timeout}, as_json):
            return
        run_with_manager(lambda m: m.resume(sandbox_id, timeout=timeout), as_json)
        if as_json:
            print(json.dumps({"id": sandbox_id, "state": "running"}))

    @app.command("timeout")
    def sandbox_timeout(
        sandbox_id: SandboxIdArg,
        seconds: Annotated[float, typer.Argument(help="Deadline, seconds from now.")],
        as_json: JsonOpt = False,
    ) -> None:
        """Extend or shorten a sandbox's lifetime (its on-timeout action applies then)."""
        if _remote(sandbox_id, "timeout", {"seconds": seconds}, as_json):
            return
        deadline = run_with_manager(lambda m: m.set_timeout(sandbox_id, seconds), as_json)
        if as_json:
            print(json.dumps({"id": sandbox_id, "deadline": deadline}))

    @app.command("net")
    def sandbox_net(
        sandbox_id: SandboxIdArg,
        allow: AllowOpt = None,
        allow_domain: AllowDomainOpt = None,
        deny: Annotated[
            list[str] | None, typer.Option("--deny", help="Remove this allow rule.")
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Change a running sandbox's egress at once (audited). --allow and --allow-domain
        replace the sandbox's lists; --deny removes one allow rule."""
        change = {"allow": allow, "allow_domains": allow_domain, "deny": deny}
        if _remote(sandbox_id, "net", {k: v for k, v in change.items() if v is not None}, as_json):
            return
        policy = run_with_manager(
            lambda m: m.update_network(
                sandbox_id, allow=allow, allow_domains=allow_domain, deny=deny
            ),
            as_json,
        )
        if as_json:
            print(json.dumps({"id": sandbox_id, "network": policy.model_dump(mode="json")}))
