"""Network isolation proven from inside real sandboxes, with real packets (invariant 3).

Peer hosts live in network namespaces this test creates; no traffic leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from ironclaw.host.manager import SandboxManager
from ironclaw.policy.network import sandbox_names
from ironclaw.resources.net import NetworkManager
from ironclaw.resources.procs import host_uid
from nethelpers import PEER_SERVER, PROBE, PeerHost, host_listener, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture
async def peers() -> AsyncIterator[tuple[PeerHost, PeerHost]]:
    a = await PeerHost.start((8080, 8081, 80))
    try:
        b = await PeerHost.start((8080,))
    except BaseException:
        await a.stop()
        raise
    yield a, b
    await a.stop()
    await b.stop()


async def probe_in(mgr: SandboxManager, sid: str, targets: list[tuple[str, int]]) -> dict[str, str]:
    r = await mgr.exec(sid, ["python3", "-c", PROBE, json.dumps(targets), "1.5"], timeout=30)
    assert r.exit_code == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


async def test_only_the_allowed_ip_and_port_connect_from_a_sandbox(
    manager: SandboxManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, b = peers
    one = await manager.create({"network": {"allow": [f"{a.ip}:8080/tcp"]}}, sandbox_id="net-1")
    two = await manager.create({"network": {"allow": [f"{a.ip}:8080/tcp"]}}, sandbox_id="net1")
    # A service inside sandbox two, started through its agent.
    await manager.write_file(two.id, "server.py", PEER_SERVER.encode())
    await manager.exec(
        two.id,
        ["sh", "-c", "sleep 600 | python3 server.py sb 9000 > /dev/null &"],
        keep_background=True,
    )
    server, host_port = await host_listener()
    try:
        n1 = (await manager.get(one.id)).info["network"]
        n2 = (await manager.get(two.id)).info["network"]
        await asyncio.sleep(0.5)  # let the server inside sandbox two bind
        targets = [
            (a.ip, 8080),  # allowed
            (a.ip, 8081),  # same host, another port
            (b.ip, 8080),  # another host
            (n1["host_ip"], host_port),  # the host's own veth address (listener on 0.0.0.0)
            (n2["guest_ip"], 9000),  # another sandbox
        ]
        got = await probe_in(manager, one.id, targets)
        assert got[f"{a.ip}:8080"] == a.reply(8080), got
        for host, port in targets[1:]:
            assert got[f"{host}:{port}"].startswith("err:"), (host, port, got)
        # Positive control: the service in sandbox two really listens (seen from inside it).
        inside = await probe_in(manager, two.id, [("127.0.0.1", 9000)])
        assert inside["127.0.0.1:9000"].startswith("ok:peer-sb:9000"), inside
    finally:
        server.close()


async def test_sandbox_without_allows_has_no_network_at_all(manager: SandboxManager) -> None:
    rec = await manager.create()
    r = await manager.exec(rec.id, ["sh", "-c", "cat /proc/net/dev | tail -n +3 | cut -d: -f1"])
    assert r.stdout.split() == [b"lo"]


async def test_destroy_removes_every_network_resource(
    manager: SandboxManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, _ = peers
    rec = await manager.create({"network": {"allow": [f"{a.ip}:8080"]}})
    names = sandbox_names(rec.id)
    before = await manager.net.list_resources()
    assert names.netns in before["netns"] and names.host_ifname in before["links"]
    await manager.destroy(rec.id)
    after = await manager.net.list_resources()
    flat = json.dumps(after)
    for name in (names.netns, names.host_ifname, names.chain, names.nat_chain):
        assert name not in flat
    links = await sh("ip", "-o", "link")
    assert names.host_ifname not in links


HTTP_CLIENT = r"""
import json, sys, urllib.error, urllib.request
out = {}
for name in sys.argv[1:]:
    try:
        with urllib.request.urlopen(f"http://{name}/", timeout=5) as r:
            out[name] = f"{r.status} {r.read().decode()}"
    except urllib.error.HTTPError as e:
        out[name] = str(e.code)
    except Exception as e:
        out[name] = "err:" + type(e).__name__
print(json.dumps(out))
"""


async def test_domain_allow_list_from_a_sandbox(
    manager: SandboxManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, _ = peers
    manager._net = NetworkManager(
        manager.settings,
        pool=manager.net.pool.with_prefixlen,
        proxy_hosts={"allowed.test": a.ip, "denied.test": a.ip},
        proxy_uid=manager.uid_base - 1,
        proxy_allow=(a.ip,),  # the peer is private: reachable by an explicit address rule
    )
    rec = await manager.create({"network": {"allow_domains": ["allowed.test"]}})
    r = await manager.exec(
        rec.id, ["python3", "-c", HTTP_CLIENT, "allowed.test", "denied.test"], timeout=30
    )
    got = json.loads(r.stdout)
    assert got["allowed.test"].startswith(f"200 peer-{a.tag}:80:"), got
    assert got["denied.test"] == "403", got
    # The sandbox cannot go around the proxy.
    direct = await probe_in(manager, rec.id, [(a.ip, 80)])
    assert direct[f"{a.ip}:80"].startswith("err:")
    # The proxy parses the sandbox's requests: it must not be root on the host either.
    proxy_pid = int(rec.info["network"]["proxy_pid"])
    assert host_uid(proxy_pid) == manager.uid_base - 1 != 0
    audit = [json.loads(x) for x in manager.net.audit_path(rec.id).read_text().splitlines()]
    decisions = {(e.get("host"), e["decision"]) for e in audit if e["event"] == "net.proxy"}
    assert {("allowed.test", "allow"), ("denied.test", "deny")} <= decisions


async def test_sandbox_holds_no_capability_over_its_shared_network_namespace(
    manager: SandboxManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    """Invariant 7: the netns is the host's (owned by the initial user namespace)."""
    a, _ = peers
    rec = await manager.create({"network": {"allow": [f"{a.ip}:8080"]}})
    for cmd in (
        "ip link set eth0 down",
        "ip addr add 10.1.2.3/32 dev eth0",
        "ip route del default",
    ):
        r = await manager.exec(rec.id, ["sh", "-c", f"{cmd} 2>&1; echo rc=$?"])
        assert b"rc=0" not in r.stdout, (cmd, r.stdout)
        assert b"Operation not permitted" in r.stdout, (cmd, r.stdout)
    # And the link is still up: the allowed peer is still reachable.
    got = await probe_in(manager, rec.id, [(a.ip, 8080)])
    assert got[f"{a.ip}:8080"] == a.reply(8080)
