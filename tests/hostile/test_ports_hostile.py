"""Exposed ports facing a hostile server inside, other local users, and other sandboxes.

The forwarder copies bytes between a host client and a server the sandbox controls. A
server that floods a client that never reads, or never reads what a client floods it
with, must leave every buffer on the way bounded (the forwarder's among them); a
half-close must travel both ways; the guest must not reach the host's listener through
the forward; a local user that is not root must not reach the sandbox's address except
through the exposed port; and two sandboxes exposing the same port do not collide.
Real namespace sandboxes, real sockets.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from ironclaw.config import Settings
from ironclaw.errors import NetworkError
from ironclaw.sdk import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]
MiB = 2**20
NET = {"network": {"allow": ["192.0.2.0/24"]}}

# One server per mode, on 127.0.0.1:PORT inside. flood: send forever, counting what the
# kernel took in /workspace/sent; sink: accept and never read; half: read to EOF, then
# answer with the count and close.
SERVER = r"""
import os, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port)); ls.listen(8)
open(f"/workspace/ready{port}", "w").close()
while True:
    c, _ = ls.accept()
    if mode == "flood":
        sent, block = 0, b"z" * 65536
        while True:
            sent += c.send(block)
            with open("/workspace/sent.tmp", "w") as f:
                f.write(str(sent))
            os.replace("/workspace/sent.tmp", "/workspace/sent")
    elif mode == "sink":
        time.sleep(3600)
    else:
        n = 0
        while data := c.recv(65536):
            n += len(data)
        c.sendall(b"got %d" % n)
        c.close()
"""


async def _serve(sb: Sandbox, mode: str, port: int) -> None:
    h = await sb.commands.start(["python3", "-c", SERVER, mode, str(port)], tag=mode)
    for _ in range(400):
        if (await sb.exec(["test", "-e", f"/workspace/ready{port}"])).exit_code == 0:
            return
        if not (await h.wait(0)).running:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"{mode} server: {await h.wait(0)}")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _settled(read: object, *, rounds: int = 200) -> int:
    """Poll ``read()`` until it gives the same value twice in a row (the flow stalled)."""
    assert callable(read)
    last = -1
    for _ in range(rounds):
        await asyncio.sleep(0.25)
        now = int(await read())
        if now == last:
            return now
        last = now
    raise AssertionError(f"still moving after {rounds} polls: {last}")


async def test_floods_either_way_stall_with_bounded_buffers(settings: Settings) -> None:
    async with Sandbox.create(NET, settings=settings) as sb:
        await _serve(sb, "flood", 9000)
        await _serve(sb, "sink", 9001)
        flood = await sb.ports.expose(9000)
        sink = await sb.ports.expose(9001)
        listed = {p.port: p for p in await sb.ports.list()}
        # The server floods a client that never reads.
        reader = socket.create_connection(("127.0.0.1", listed[9000].host_port))

        async def sent() -> int:
            try:
                return int(await sb.files.read("sent") or b"0")
            except Exception:
                return 0

        try:
            stalled = await _settled(sent)
            assert 0 < stalled < 64 * MiB, stalled
            assert _rss_mib(listed[9000].pid) < 96
        finally:
            reader.close()
        # A client floods a server that never reads.
        writer = socket.create_connection(("127.0.0.1", listed[9001].host_port))
        writer.setblocking(False)
        total, full = 0, 0
        try:
            while full < 8 and total < 512 * MiB:
                try:
                    total += writer.send(b"y" * 65536)
                    full = 0
                except BlockingIOError:
                    full += 1
                    await asyncio.sleep(0.25)
            assert total < 64 * MiB, total
            assert _rss_mib(listed[9001].pid) < 96
        finally:
            writer.close()
        assert flood != sink


async def test_a_half_close_travels_both_ways(settings: Settings) -> None:
    async with Sandbox.create(NET, settings=settings) as sb:
        await _serve(sb, "half", 9002)
        await sb.ports.expose(9002)
        [p] = await sb.ports.list()
        loop = asyncio.get_running_loop()

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", p.host_port), timeout=30) as s:
                s.sendall(b"a" * 300_000)
                s.shutdown(socket.SHUT_WR)  # the server answers only after our EOF
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
                return got

        assert await loop.run_in_executor(None, talk) == b"got 300000"
        assert await loop.run_in_executor(None, talk) == b"got 300000"  # and again


def _connect_as(uid: int, host: str, port: int) -> int:
    """Exit status of a child that drops to ``uid`` and dials: 0 connected, 1 refused."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            socket.create_connection((host, port), timeout=2).close()
            os._exit(0)
        except OSError:
            os._exit(1)
        finally:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


async def test_no_way_around_the_forward_from_inside_or_for_other_users(
    settings: Settings,
) -> None:
    async with Sandbox.create(NET, settings=settings) as sb:
        await _serve(sb, "half", 9003)
        await sb.ports.expose(9003)
        [p] = await sb.ports.list()
        # Inside: the host's listener is not there (another namespace), nor is any
        # address of the host's side of the veth.
        probe = (
            "import socket, sys\n"
            "for host in sys.argv[2:]:\n"
            "    try: socket.create_connection((host, int(sys.argv[1])), 2).close()\n"
            "    except OSError: continue\n"
            "    print('reached', host); sys.exit(1)\n"
        )
        who = "import socket; s = socket.socket(2, 2); s.connect(('192.0.2.1', 9)); print(s.getsockname()[0])"  # noqa: E501
        route = await sb.exec(["python3", "-c", who])
        inner_ip = route.stdout.decode().strip()
        gateway = inner_ip.rsplit(".", 1)[0] + ".1"
        r = await sb.exec(["python3", "-c", probe, str(p.host_port), "127.0.0.1", gateway])
        assert r.exit_code == 0, r.stdout
        # Another local user: the exposed port is its door (loopback, like any local
        # listener); the sandbox's own address is not.
        loop = asyncio.get_running_loop()
        nobody = 65534
        assert await loop.run_in_executor(None, _connect_as, nobody, "127.0.0.1", p.host_port) == 0
        assert await loop.run_in_executor(None, _connect_as, nobody, inner_ip, 9003) == 1


async def test_two_sandboxes_exposing_one_port_do_not_collide(settings: Settings) -> None:
    async with (
        Sandbox.create(NET, settings=settings) as a,
        Sandbox.create(NET, settings=settings) as b,
    ):
        await a.files.write("who", "a")
        await b.files.write("who", "b")
        for sb in (a, b):
            await _serve(sb, "half", 9004)
        await a.ports.expose(9004)
        await b.ports.expose(9004)
        [pa], [pb] = await a.ports.list(), await b.ports.list()
        assert pa.host_port != pb.host_port and pa.pid != pb.pid
        # The same host port asked for by the other sandbox: refused, the first intact.
        with pytest.raises(NetworkError, match=f"cannot listen on 127.0.0.1:{pa.host_port}"):
            await b.ports.expose(9005, host_port=pa.host_port)
        assert [x.port for x in await b.ports.list()] == [9004]

        def talk(port: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"x" * 10)
                s.shutdown(socket.SHUT_WR)
                return s.recv(100)

        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, talk, pa.host_port) == b"got 10"
        assert await loop.run_in_executor(None, talk, pb.host_port) == b"got 10"
        await a.ports.unexpose(9004)
        assert await loop.run_in_executor(None, talk, pb.host_port) == b"got 10"
