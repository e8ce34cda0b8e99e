"""A hostile program inside a real sandbox against its own egress proxy, as deployed.

The manager builds the sandbox's network and starts its proxy; the program speaks raw
HTTP to it. The attacker's DNS (the proxy's hosts map) points allowed names at a trap
on the host's loopback, in plain and IPv6-wrapped forms, at the metadata address and
at the host's own addresses; the trap must never see a connection. The control is a
peer in a namespace of its own, reachable through an explicit address rule.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import pytest

from ironclaw.host.manager import SandboxManager
from ironclaw.resources.net import NetworkManager
from nethelpers import PeerHost

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

HOSTILE = r"""
import json, os, socket
host, port = os.environ["HTTP_PROXY"].removeprefix("http://").rsplit(":", 1)
def ask(raw):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(raw)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        out.append(int(head[9:12]))
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                data = data[int(line.split(b":")[1]):]
                break
        else:
            data = b""
    return out
def get(name, extra=""):
    return f"GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n{extra}\r\n".encode()
names = ["ok", "loop", "mapped", "nat64", "sixtofour", "meta", "own", "pool"]
out = {n: ask(get(f"{n}.allowed.test")) for n in names}
out["literal"] = ask(b"CONNECT [::ffff:127.0.0.1]:443 HTTP/1.1\r\n\r\n")
out["keepalive"] = ask(get("ok.allowed.test") + get("loop.allowed.test"))
out["duphost"] = ask(get("ok.allowed.test", "Host: loop.allowed.test\r\n"))
out["barelf"] = ask(b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\n\r\n")
print(json.dumps(out))
"""


@pytest.fixture
async def peer() -> AsyncIterator[PeerHost]:
    a = await PeerHost.start((80,))
    yield a
    await a.stop()


async def test_hostile_program_in_a_sandbox_reaches_only_what_is_allowed(
    manager: SandboxManager, peer: PeerHost
) -> None:
    hits: list[str] = []

    async def trap(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hits.append(str(w.get_extra_info("sockname")[0]))
        w.close()

    # A loopback address of its own, so the trap's ports 80 and 443 are free.
    trap_ip = f"127.{20 + secrets.randbelow(200)}.1.{2 + secrets.randbelow(250)}"
    servers = [await asyncio.start_server(trap, trap_ip, port) for port in (80, 443)]
    pool = manager.net.pool
    try:
        manager._net = NetworkManager(
            manager.settings,
            pool=pool.with_prefixlen,
            proxy_uid=manager.uid_base - 1,
            proxy_hosts={
                "ok.allowed.test": peer.ip,
                "loop.allowed.test": trap_ip,
                "mapped.allowed.test": f"::ffff:{trap_ip}",
                "nat64.allowed.test": f"64:ff9b::{trap_ip}",
                "sixtofour.allowed.test": "2002:{:02x}{:02x}:{:02x}{:02x}::1".format(
                    *map(int, trap_ip.split("."))
                ),
                "meta.allowed.test": "169.254.169.254",
                "own.allowed.test": peer.host_ip,  # the host's end of the peer's link
                "pool.allowed.test": str(pool.network_address + 1),
            },
            proxy_allow=(peer.ip,),  # the control: private, allowed by an address rule
        )
        rec = await manager.create({"network": {"allow_domains": ["*.allowed.test"]}})
        r = await manager.exec(rec.id, ["python3", "-c", HOSTILE], timeout=60)
        assert r.exit_code == 0, r.stderr
        got = json.loads(r.stdout)
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert got["ok"] == [200]  # the control
    for name in ("loop", "mapped", "nat64", "sixtofour", "meta", "own", "pool", "literal"):
        assert got[name] == [403], (name, got)
    assert got["keepalive"] == [200, 403]
    assert got["duphost"] == [400]
    assert got["barelf"] == [400]
    assert hits == []
    audit = [json.loads(x) for x in manager.net.audit_path(rec.id).read_text().splitlines()]
    reasons = {
        e.get("host"): e.get("reason", "")
        for e in audit
        if e["event"] == "net.proxy" and e["decision"] == "deny"
    }
    assert "IPv4-mapped form of" in reasons["mapped.allowed.test"]
    assert "forbidden address 169.254.169.254: link-local" in reasons["meta.allowed.test"]
