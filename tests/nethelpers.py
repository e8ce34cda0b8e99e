"""Peer hosts in their own network namespaces, and probes run from inside a sandbox's.

Built with the ``ip`` tool, independently of the code under test, so a bug in
:mod:`ironclaw.resources.net` cannot hide itself. Traffic only ever goes to namespaces created
here (or to loopback).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

PEER_SERVER = r"""
import socket, sys, threading
tag = sys.argv[1]
def serve(sock, port):
    while True:
        conn, _ = sock.accept()
        conn.settimeout(5)
        try:
            data = conn.recv(65536)
            body = f"peer-{tag}:{port}:{len(data)}".encode()
            if data.startswith((b"GET ", b"HEAD ")):
                host = [l for l in data.split(b"\r\n") if l.lower().startswith(b"host:")]
                body += b":" + (host[0].split(b":", 1)[1].strip() if host else b"")
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                conn.sendall(body + b"\n")
        except OSError:
            pass
        finally:
            conn.close()
for port in map(int, sys.argv[2:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    threading.Thread(target=serve, args=(s, port), daemon=True).start()
print("READY", flush=True)
sys.stdin.read()
"""

PROBE = r"""
import asyncio, json, sys
async def one(host, port, timeout):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        w.write(b"ping\n"); await w.drain()
        data = await asyncio.wait_for(r.read(), timeout)
        w.close()
        return "ok:" + data.decode().strip()
    except Exception as e:
        return "err:" + type(e).__name__
async def main():
    targets = json.loads(sys.argv[1]); timeout = float(sys.argv[2])
    res = await asyncio.gather(*(one(h, p, timeout) for h, p in targets))
    print(json.dumps({f"{h}:{p}": r for (h, p), r in zip(targets, res)}))
asyncio.run(main())
"""


async def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {err.decode()}")
    return out.decode()


async def netns_python(
    netns: str, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> str:
    """Run a Python snippet inside ``netns`` (standing in for a sandboxed process)."""
    prefix = ["env", "-i", *(f"{k}={v}" for k, v in (env or {}).items())]
    return await sh(
        "ip", "netns", "exec", netns, *prefix, sys.executable, "-c", code, *args, timeout=timeout
    )


async def probe(
    netns: str, targets: list[tuple[str, int]], *, timeout: float = 1.5
) -> dict[str, str]:
    """Try every target at once from inside ``netns``; ``ok:<reply>`` or ``err:<Exception>``."""
    out = await netns_python(netns, PROBE, json.dumps(targets), str(timeout))
    result: dict[str, str] = json.loads(out)
    return result


async def probe_in_sandbox(
    mgr: Any, sid: str, targets: list[tuple[str, int]], *, wait: float = 1.5, limit: float = 30
) -> dict[str, str]:
    """:func:`probe`, run by the sandbox's own python3 (a namespace jail or a VM guest):
    ``wait`` bounds each connect, ``limit`` the whole exec."""
    r = await mgr.exec(sid, ["python3", "-c", PROBE, json.dumps(targets), str(wait)], timeout=limit)
    assert r.exit_code == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


@dataclass
class PeerHost:
    """A host in its own namespace, routed from the host through a /30 of 10.249.0.0/16."""

    tag: str
    netns: str
    host_if: str
    host_ip: str
    ip: str
    ports: tuple[int, ...]
    _server: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, ports: tuple[int, ...] = (8080, 8081)) -> PeerHost:
        token = secrets.token_hex(4)
        block = secrets.randbelow(16384)
        base = (10 << 24) | (249 << 16) | (block * 4)
        host_ip = ".".join(str((base + 1) >> s & 255) for s in (24, 16, 8, 0))
        ip = ".".join(str((base + 2) >> s & 255) for s in (24, 16, 8, 0))
        peer = cls(token, f"ictp-{token}", f"ictp{token}", host_ip, ip, ports)
        try:
            await sh("ip", "netns", "add", peer.netns)
            await sh(
                "ip", "link", "add", peer.host_if, "type", "veth",
                "peer", "name", "eth0", "netns", peer.netns,
            )  # fmt: skip
            await sh("ip", "addr", "add", f"{host_ip}/30", "dev", peer.host_if)
            await sh("ip", "link", "set", peer.host_if, "up")
            inside = ("ip", "netns", "exec", peer.netns, "ip")
            await sh(*inside, "link", "set", "lo", "up")
            await sh(*inside, "addr", "add", f"{ip}/30", "dev", "eth0")
            await sh(*inside, "link", "set", "eth0", "up")
            await sh(*inside, "route", "add", "default", "via", host_ip)
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", peer.netns, sys.executable, "-c", PEER_SERVER,
                token, *map(str, ports),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            peer._server = proc
            assert proc.stdout is not None
            async with asyncio.timeout(15):
                assert (await proc.stdout.readline()).strip() == b"READY"
        except BaseException:
            await peer.stop()
            raise
        return peer

    def reply(self, port: int) -> str:
        """What the probe sees when it reaches this peer on ``port``."""
        return f"ok:peer-{self.tag}:{port}:5"

    async def stop(self) -> None:
        if self._server is not None and self._server.returncode is None:
            self._server.kill()
            async with asyncio.timeout(10):
                await self._server.wait()
        await sh("ip", "link", "del", self.host_if, check=False)
        await sh("ip", "netns", "del", self.netns, check=False)


async def host_listener() -> tuple[asyncio.Server, int]:
    """A service on all of the host's addresses (port chosen by the kernel)."""

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # Read the probe's line first: closing with unread data would send a reset.
        await r.readline()
        w.write(b"host-service\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(answer, "0.0.0.0", 0)
    return server, server.sockets[0].getsockname()[1]
