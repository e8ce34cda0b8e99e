"""Exposed ports on real sandboxes: one port reachable from the host, nothing else."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import CGROUP_ROOT
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.sdk import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SERVE = "import http.server as h, sys; h.HTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()"  # noqa: E501


async def _serving(sb: Sandbox, port: int, bind: str = "127.0.0.1") -> None:
    serve = SERVE.replace("'127.0.0.1'", repr(bind))
    h = await sb.commands.start(["python3", "-c", serve, str(port)], tag=f"http{port}")
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    for _ in range(200):
        if (await sb.exec(["python3", "-c", probe])).exit_code == 0:
            return
        if not (await h.wait(0)).running:
            break
        await asyncio.sleep(0.05)
    out = b"".join([c async for c in h.output()])
    raise AssertionError(f"server on {port} did not start: {await h.wait(0)} {out!r}")


# Sockets need a network policy (seccomp refuses AF_INET to sandboxes without one).
NET = {"network": {"allow": ["192.0.2.0/24"]}}


async def test_one_exposed_port_is_reachable_and_another_is_not(settings: Settings) -> None:
    async with Sandbox.create(NET, settings=settings) as sb:
        await sb.files.write("index.html", "hello from inside")
        await _serving(sb, 8000)
        await _serving(sb, 8001)
        url = await sb.ports.expose(8000)
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(url + "/index.html")
            assert r.status_code == 200 and r.text == "hello from inside"
        # 8001 listens too, but nothing on the host leads to it.
        listed = await sb.ports.list()
        assert [(p.port, p.url) for p in listed] == [(8000, url)]
        host_port = listed[0].host_port
        for other in (8001, host_port + 1):
            with pytest.raises(OSError):
                socket_probe("127.0.0.1", other)
        # Nor does the sandbox's own address: the firewall still drops what enters it.
        who = "import socket; s = socket.socket(2, 2); s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])"  # noqa: E501
        inner_ip = (await sb.exec(["python3", "-c", who])).stdout.decode().strip()
        assert inner_ip.startswith("10.")
        with pytest.raises(OSError):
            socket_probe(inner_ip, 8000)
        # A server on every address inside answers there, but not to the host's own
        # sockets: the output hook closes a sandbox's veth to them.
        await _serving(sb, 8002, bind="0.0.0.0")
        reach = f"import socket; socket.create_connection(({inner_ip!r}, 8002), 2)"
        assert (await sb.exec(["python3", "-c", reach])).exit_code == 0
        with pytest.raises(OSError):
            socket_probe(inner_ip, 8002)
        await sb.ports.unexpose(8000)
        assert await sb.ports.list() == []
        for _ in range(100):  # the forwarder is gone: its port is closed
            try:
                socket_probe("127.0.0.1", host_port)
            except OSError:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the host port still answers after unexpose")


def socket_probe(host: str, port: int) -> None:
    import socket

    with socket.create_connection((host, port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        if not s.recv(1):
            raise ConnectionResetError("closed without an answer")


async def test_bad_ports_are_refused_and_change_nothing(
    settings: Settings, ironclaw_home: Path
) -> None:
    async with Sandbox.create(NET, settings=settings) as sb:
        await _serving(sb, 8000)
        for bad in (0, 65536, -1):
            with pytest.raises(ConfigError, match="out of range"):
                await sb.ports.expose(bad)
        url = await sb.ports.expose(8000)
        with pytest.raises(ConfigError, match="already exposed"):
            await sb.ports.expose(8000)
        with pytest.raises(ConfigError, match="not exposed"):
            await sb.ports.unexpose(8001)
        assert [p.url for p in await sb.ports.list()] == [url]
        env = {
            **os.environ,
            "IRONCLAW_HOME": str(ironclaw_home),
            "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT,
        }
        cli = subprocess.run(
            [sys.executable, "-m", "ironclaw.cli", "sandbox", "port", sb.id, "70000"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 2 and "out of range" in cli.stderr
        cli = subprocess.run(
            [sys.executable, "-m", "ironclaw.cli", "sandbox", "port", sb.id],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0 and cli.stdout == f"8000\t{url}\n"
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(url)).status_code == 200
        pid = (await sb.ports.list())[0].pid
    # The forwarder ends with its sandbox.
    for _ in range(200):
        if (
            not os.path.exists(f"/proc/{pid}")
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the forwarder outlived its sandbox")
