"""Every state change of a sandbox is in its audit log (who, what, when), and a restore
takes the snapshot's recorded spec with only the explicitly given fields on top."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.errors import ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.host.snapshots import restore_spec
from ironclaw.resources.audit import acting_as, read_events
from ironclaw.spec import SandboxSpec, parse_spec

NET = {"network": {"allow": ["192.0.2.0/24"]}}


@pytest.mark.root
@pytest.mark.timeout(240)
async def test_every_state_change_is_audited(manager: SandboxManager) -> None:
    start = time.time()
    rec = await manager.create({**NET, "labels": {"team": "a"}})
    sid = rec.id
    await manager.set_timeout(sid, 600)
    await manager.pause(sid)
    await manager.resume(sid)
    from ironclaw.host import ports

    with acting_as("api:ci-token"):
        url = (await ports.expose(manager, sid, 8000)).url
    await ports.unexpose(manager, sid, 8000)
    await manager.update_network(sid, allow=["192.0.2.7:443"])
    snap = await manager.snapshot(sid, "audited")
    fork = await manager.restore(snap)
    await manager.destroy(sid)

    # (the network layer adds its own lines, e.g. a traffic summary at teardown)
    events = [e for e in read_events(manager.settings, sid) if "who" in e]
    assert [e["event"] for e in events] == [
        "sandbox.create", "sandbox.set_timeout", "sandbox.pause", "sandbox.resume",
        "port.expose", "port.unexpose", "network.update", "sandbox.snapshot", "sandbox.destroy",
    ]  # fmt: skip
    for e in events:
        assert e["sandbox_id"] == sid and start <= e["ts"] <= time.time()
        assert e["who"]["uid"] == os.getuid() and e["who"]["pid"] == os.getpid()
    by = {e["event"]: e for e in events}
    assert by["port.expose"]["who"]["via"] == "api:ci-token"
    assert by["port.expose"]["url"] == url and by["port.unexpose"]["port"] == 8000
    assert by["sandbox.set_timeout"]["seconds"] == 600
    assert by["sandbox.snapshot"]["snapshot"] == "audited"
    assert by["sandbox.snapshot"]["sha256"] == snap.sha256
    assert [r["port"] for r in by["network.update"]["after"]["allow"]] == [443]
    restored = [e for e in read_events(manager.settings, fork.id) if "who" in e]
    assert [e["event"] for e in restored] == ["sandbox.create", "sandbox.restore"]
    assert restored[1]["snapshot"] == "audited" and restored[1]["source"] == sid


def test_restore_spec_keeps_the_recorded_spec_and_applies_only_what_is_given() -> None:
    recorded = parse_spec(
        {"limits": {"memory_mib": 256, "pids": 50}, "labels": {"team": "a"}, "env": {"A": "1"}}
    ).model_dump(mode="json")
    same = restore_spec(recorded, None)
    assert same.model_dump(mode="json") == recorded
    # A spec object counts only its fields that were set.
    given = SandboxSpec.model_validate({"labels": {"team": "b"}, "limits": {"pids": 80}})
    out = restore_spec(recorded, given)
    assert out.labels == {"team": "b"}
    assert (out.limits.memory_mib, out.limits.pids) == (256, 80)  # field by field
    assert out.env == {"A": "1"}
    out = restore_spec(recorded, {"lifetime": {"timeout_s": 30}, **NET})
    assert out.lifetime.timeout_s == 30 and out.network.needs_network
    assert restore_spec(recorded, {"backend": "namespace"}).backend == "namespace"  # same
    with pytest.raises(ConfigError, match="own backend"):
        restore_spec(recorded, {"backend": "qemu"})
    with pytest.raises(ConfigError, match="own image"):
        restore_spec(recorded, {"image": "other"})


@pytest.mark.root
@pytest.mark.timeout(240)
async def test_cli_create_from_uses_the_snapshot_spec_and_explicit_flags(
    manager: SandboxManager, ironclaw_home: Path
) -> None:
    rec = await manager.create({"limits": {"memory_mib": 200}, "labels": {"team": "a"}})
    await manager.write_file(rec.id, "f.txt", b"kept")
    await manager.snapshot(rec.id, "base")
    env = {**os.environ, "IRONCLAW_HOME": str(ironclaw_home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ironclaw.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await cli("sandbox", "create", "--from", "base", "--label", "team=b", "--json")
    assert code == 0, out
    made = await manager.get(json.loads(out)["id"])
    assert made.spec["limits"]["memory_mib"] == 200  # from the snapshot
    assert made.spec["labels"] == {"team": "b"}  # given explicitly
    assert await manager.read_file(made.id, "f.txt") == b"kept"
    code, out = await cli("sandbox", "create", "--from", "base", "--backend", "qemu", "--json")
    assert code != 0 and "own backend" in out, out
