"""A live egress change on a running sandbox, proven with real packets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from ironclaw.errors import ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.sdk import Sandbox
from nethelpers import PeerHost, probe_in_sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    a = await PeerHost.start((8080, 8081, 8082))
    yield a
    await a.stop()


async def probe_in(mgr: SandboxManager, sid: str, targets: list[tuple[str, int]]) -> dict[str, str]:
    return await probe_in_sandbox(mgr, sid, targets, wait=1.5, limit=30)


async def test_live_policy_change_opens_one_port_and_closes_another(
    manager: SandboxManager, peer: PeerHost
) -> None:
    a = peer
    rec = await manager.create({"network": {"allow": [f"{a.ip}:8080/tcp", f"{a.ip}:8082/tcp"]}})
    other = await manager.create({"network": {"allow": [f"{a.ip}:8080/tcp"]}})
    ports = [(a.ip, 8080), (a.ip, 8081), (a.ip, 8082)]
    before = await probe_in(manager, rec.id, ports)
    assert before[f"{a.ip}:8080"] == a.reply(8080), before
    assert before[f"{a.ip}:8081"].startswith("err:"), before
    assert before[f"{a.ip}:8082"] == a.reply(8082), before

    sb = Sandbox(manager, rec, owns=False)
    policy = await sb.network.update(allow=[f"{a.ip}:8081/tcp", f"{a.ip}:8082/tcp"])
    assert [str(r.port) for r in policy.allow] == ["8081", "8082"]

    after = await probe_in(manager, rec.id, ports)
    assert after[f"{a.ip}:8080"].startswith("err:"), after  # closed
    assert after[f"{a.ip}:8081"] == a.reply(8081), after  # opened
    assert after[f"{a.ip}:8082"] == a.reply(8082), after  # unchanged
    # Nothing else changed: the other sandbox keeps its own rules.
    theirs = await probe_in(manager, other.id, ports)
    assert theirs[f"{a.ip}:8080"] == a.reply(8080), theirs
    assert theirs[f"{a.ip}:8081"].startswith("err:"), theirs
    # The registry holds the new policy, and the audit log says who changed what.
    stored = (await manager.get(rec.id)).spec["network"]["allow"]
    assert [r["port"] for r in stored] == [8081, 8082]
    audit = manager.settings.sandbox_state_dir(rec.id) / "audit.jsonl"
    events = [json.loads(x) for x in audit.read_text().splitlines()]
    change = [e for e in events if e["event"] == "network.update"]
    assert len(change) == 1
    assert [r["port"] for r in change[0]["before"]["allow"]] == [8080, 8082]

    # deny removes a single rule.
    await manager.update_network(rec.id, deny=[f"{a.ip}:8082/tcp"])
    last = await probe_in(manager, rec.id, ports)
    assert last[f"{a.ip}:8082"].startswith("err:"), last
    assert last[f"{a.ip}:8081"] == a.reply(8081), last


async def test_a_sandbox_without_network_cannot_gain_one(manager: SandboxManager) -> None:
    rec = await manager.create()
    with pytest.raises(ConfigError, match="without a network"):
        await manager.update_network(rec.id, allow=["10.0.0.1:80"])
