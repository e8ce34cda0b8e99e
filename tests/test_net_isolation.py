"""Isolation proven with real packets between real namespaces (no mocks)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw.config import Settings
from ironclaw.policy.network import NetworkPolicy, sandbox_names
from ironclaw.resources.net import NetworkManager, SandboxNetwork
from nethelpers import PEER_SERVER, PROBE, PeerHost, host_listener, netns_python, probe, sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
async def netmgr(tmp_path: Path) -> AsyncIterator[NetworkManager]:
    mgr = NetworkManager(Settings.from_env({"IRONCLAW_HOME": str(tmp_path)}))
    created: list[str] = []
    real_create = mgr.create

    async def tracking_create(sandbox_id: str, policy: NetworkPolicy, *, slot: int) -> Any:
        created.append(sandbox_id)
        return await real_create(sandbox_id, policy, slot=slot)

    mgr.create = tracking_create  # type: ignore[method-assign]
    yield mgr
    for sid in created:
        await mgr.destroy(sid)
    mgr.close()


@pytest.fixture
async def peers() -> AsyncIterator[tuple[PeerHost, PeerHost]]:
    a = await PeerHost.start((8080, 8081, 80, 443))
    try:
        b = await PeerHost.start((8080,))
    except BaseException:
        await a.stop()
        raise
    yield a, b
    await a.stop()
    await b.stop()


async def _serve_in(net: SandboxNetwork, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", net.netns_name, sys.executable, "-c", PEER_SERVER, "sb", str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(15):
        assert (await proc.stdout.readline()).strip() == b"READY"
    return proc


async def test_only_the_allowed_ip_and_port_connect(
    netmgr: NetworkManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, b = peers
    s1 = await netmgr.create("iso-one", NetworkPolicy(allow=(f"{a.ip}:8080/tcp",)), slot=11)
    s2 = await netmgr.create("iso-two", NetworkPolicy(allow=(f"{a.ip}:8080/tcp",)), slot=12)
    server, host_port = await host_listener()
    inner = await _serve_in(s2, 9000)
    try:
        # Positive controls: every target is alive when the firewall is not in the way
        # (s2's server seen from its own namespace: the host's own connections into a
        # sandbox are closed too, except an exposed port's forwarder).
        controls = await probe_from_host([(a.ip, 8081), (b.ip, 8080), ("127.0.0.1", host_port)])
        controls |= await probe(s2.netns_name, [(s2.guest_ip, 9000)])
        assert all(v.startswith("ok:") for v in controls.values()), controls
        from_host = await probe_from_host([(s2.guest_ip, 9000)])
        assert from_host[f"{s2.guest_ip}:9000"].startswith("err:"), from_host
        before = await netmgr.drop_count("iso-one")
        targets = [
            (a.ip, 8080),
            (a.ip, 8081),
            (b.ip, 8080),
            (s1.host_ip, host_port),
            (s2.guest_ip, 9000),
            (s2.host_ip, host_port),
        ]
        got = await probe(s1.netns_name, targets)
        assert got[f"{a.ip}:8080"] == a.reply(8080)
        for host, port in targets[1:]:
            assert got[f"{host}:{port}"].startswith("err:"), (host, port, got)
        assert await netmgr.drop_count("iso-one") >= before + 5
    finally:
        server.close()
        inner.kill()
        await inner.wait()


async def probe_from_host(targets: list[tuple[str, int]]) -> dict[str, str]:
    out = await sh(sys.executable, "-c", PROBE, json.dumps(targets), "3")
    result: dict[str, str] = json.loads(out)
    return result


async def test_policy_update_is_applied_live(
    netmgr: NetworkManager, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, _ = peers
    first = NetworkPolicy(allow=(f"{a.ip}:8080/tcp",))
    net = await netmgr.create("upd-live", first, slot=13)
    got = await probe(net.netns_name, [(a.ip, 8080), (a.ip, 8081)])
    assert got[f"{a.ip}:8081"].startswith("err:")
    wider = NetworkPolicy(allow=(f"{a.ip}:8080/tcp", f"{a.ip}:8081"))
    await netmgr.update_policy("upd-live", wider, slot=13)
    got = await probe(net.netns_name, [(a.ip, 8080), (a.ip, 8081)])
    assert got == {f"{a.ip}:8080": a.reply(8080), f"{a.ip}:8081": a.reply(8081)}
    await netmgr.update_policy("upd-live", NetworkPolicy(allow=(f"{a.ip}:8081",)), slot=13)
    got = await probe(net.netns_name, [(a.ip, 8080), (a.ip, 8081)])
    assert got[f"{a.ip}:8080"].startswith("err:")
    assert got[f"{a.ip}:8081"] == a.reply(8081)


# Pairs that the old scheme (non-alphanumerics to '_', then truncation) mapped together.
COLLIDING = [("task-1", "task1"), ("a-b1", "ab-1"), ("x" * 62 + "a", "x" * 62 + "b")]


def _old_name(sandbox_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in sandbox_id).replace("_", "")[:24]


def _strip_counters(rules: list[dict[str, Any]]) -> list[Any]:
    text = json.dumps([{k: v for k, v in r.items() if k != "handle"} for r in rules])
    return json.loads(text.replace('"packets"', '"p"').replace('"bytes"', '"b"'))


@pytest.mark.parametrize(("first", "second"), COLLIDING)
async def test_colliding_ids_get_distinct_chains(
    netmgr: NetworkManager, peers: tuple[PeerHost, PeerHost], first: str, second: str
) -> None:
    assert _old_name(first) == _old_name(second)  # the old design would have shared a chain
    a, _ = peers
    policy = NetworkPolicy(allow=(f"{a.ip}:8080/tcp",))
    n1 = await netmgr.create(first, policy, slot=21)
    n2 = await netmgr.create(second, policy, slot=22)
    c1, c2 = sandbox_names(first).chain, sandbox_names(second).chain
    assert c1 != c2
    assert n1.host_ifname != n2.host_ifname
    assert n1.netns_name != n2.netns_name
    rules_before = await netmgr.firewall.chain_rules(c2)
    await netmgr.destroy(first)
    res = await netmgr.list_resources()
    assert c1 not in res["chains"]
    assert c2 in res["chains"]
    assert n2.host_ifname in res["map_elements"]
    assert n1.host_ifname not in res["map_elements"]
    rules_after = await netmgr.firewall.chain_rules(c2)
    assert [r["expr"][:-2] for r in rules_after] == [r["expr"][:-2] for r in rules_before]
    assert len(rules_after) == len(rules_before)
    got = await probe(n2.netns_name, [(a.ip, 8080), (a.ip, 8081)])
    assert got[f"{a.ip}:8080"] == a.reply(8080)
    assert got[f"{a.ip}:8081"].startswith("err:")


async def test_destroy_leaves_nothing(netmgr: NetworkManager, tmp_path: Path) -> None:
    policy = NetworkPolicy(allow=("10.249.255.2:8080",), allow_domains=("allowed.test",))
    net = await netmgr.create("gone-soon", policy, slot=30)
    names = sandbox_names("gone-soon")
    res = await netmgr.list_resources()
    assert names.netns in res["netns"]
    assert names.host_ifname in res["links"]
    assert net.proxy_pid is not None
    assert "gone-soon" in res["proxies"]
    await netmgr.destroy("gone-soon")
    await netmgr.destroy("gone-soon")  # idempotent
    res = await netmgr.list_resources()
    assert names.netns not in res["netns"]
    assert names.host_ifname not in res["links"]
    assert names.chain not in res["chains"]
    assert names.nat_chain not in res["chains"]
    assert names.host_ifname not in res["map_elements"] + res["set_elements"]
    assert "gone-soon" not in res["proxies"]
    ruleset = await sh("nft", "-j", "list", "ruleset")
    for name in (names.chain, names.nat_chain, names.host_ifname, net.guest_ip):
        assert name not in ruleset
    assert names.host_ifname not in await sh("ip", "-o", "link")
    assert names.netns not in await sh("ip", "netns", "list")
    assert not Path(f"/proc/{net.proxy_pid}").exists()


async def test_domain_allow_list_through_proxy(
    tmp_path: Path, peers: tuple[PeerHost, PeerHost]
) -> None:
    a, _ = peers
    mgr = NetworkManager(
        Settings.from_env({"IRONCLAW_HOME": str(tmp_path)}),
        proxy_hosts={"allowed.test": a.ip, "denied.test": a.ip, "loop.allowed.test": "127.0.0.1"},
        proxy_allow=(a.ip,),  # the peer is private: reachable by an explicit address rule
    )
    policy = NetworkPolicy(allow_domains=("allowed.test", "*.allowed.test"))
    net = await mgr.create("proxy-user", policy, slot=40)
    try:
        out = await netns_python(net.netns_name, PROXY_CLIENT, env=net.env)
        got = json.loads(out)
        assert got["http_allowed"].startswith(f"200 peer-{a.tag}:80:")
        assert got["http_allowed"].endswith(":allowed.test")
        assert got["http_denied"] == "403"
        assert got["tls_allowed"].startswith(f"peer-{a.tag}:443:")
        assert got["tls_wrong_sni"] == ""
        assert got["tls_denied"].startswith("HTTP/1.1 403")
        assert got["loopback"].startswith("HTTP/1.1 403")
        direct = await probe(net.netns_name, [(a.ip, 80)])
        assert direct[f"{a.ip}:80"].startswith("err:")
        lines = [json.loads(x) for x in mgr.audit_path("proxy-user").read_text().splitlines()]
        decisions = {(r.get("host"), r["decision"]) for r in lines if r["event"] == "net.proxy"}
        assert ("allowed.test", "allow") in decisions
        assert ("denied.test", "deny") in decisions
        assert ("loop.allowed.test", "deny") in decisions
        assert sum(1 for r in lines if r["decision"] == "allow") == 2
    finally:
        await mgr.destroy("proxy-user")
        mgr.close()


PROXY_CLIENT = r"""
import json, os, socket, ssl, urllib.error, urllib.request
out = {}
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return f"{r.status} {r.read().decode()}"
    except urllib.error.HTTPError as e:
        return str(e.code)
out["http_allowed"] = get("http://allowed.test/")
out["http_denied"] = get("http://denied.test/")
proxy = os.environ["HTTPS_PROXY"].removeprefix("http://").split(":")
def tunnel(host, sni):
    ctx = ssl.create_default_context()
    inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outg, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s = socket.create_connection((proxy[0], int(proxy[1])), timeout=5)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        return head.decode(errors="replace")
    s.sendall(outg.read())
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data.decode(errors="replace").strip()
out["tls_allowed"] = tunnel("allowed.test", "allowed.test")
out["tls_wrong_sni"] = tunnel("allowed.test", "denied.test")
out["tls_denied"] = tunnel("denied.test", "denied.test")
out["loopback"] = tunnel("loop.allowed.test", "loop.allowed.test")
print(json.dumps(out))
"""
