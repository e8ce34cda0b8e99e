"""The guest agent over an in-memory channel: fast checks of its protocol behaviour.

These run the agent in this process (no jail), as an extra layer beside the real
sandbox tests in test_sandbox_*.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.errors import ConfigError, RpcError
from ironclaw.guest.agent import GuestAgent
from ironclaw.rpc import Peer
from ironclaw.transport import memory


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.05)
    return not alive(pid)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Peer]:
    host_conn, guest_conn = memory.pair()
    agent = GuestAgent(workdir=str(tmp_path))
    serving = asyncio.ensure_future(agent.serve_connection(guest_conn))
    peer = Peer(host_conn, name="test-host")
    async with peer:
        yield peer
    agent.stop()
    await asyncio.wait_for(serving, 5)


async def run(peer: Peer, argv: list[str], **kw: object) -> tuple[dict[str, object], bytes, bytes]:
    out_id, err_id = peer.new_stream_id(), peer.new_stream_id()
    out, err = peer.open_stream(out_id), peer.open_stream(err_id)
    params = {"argv": argv, "stdout_stream": out_id, "stderr_stream": err_id, **kw}
    result, o, e = await asyncio.wait_for(
        asyncio.gather(peer.call("exec", params), out.read_all(), err.read_all()), 30
    )
    return result, o, e


async def test_exec_returns_when_the_command_exits_even_if_a_child_holds_the_pipe(
    client: Peer,
) -> None:
    t0 = time.monotonic()
    result, out, _ = await run(client, ["sh", "-c", "sleep 30 & echo started"])
    assert out == b"started\n" and result["exit_code"] == 0
    assert time.monotonic() - t0 < 5


async def test_background_processes_end_with_the_command(client: Peer, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    await run(client, ["sh", "-c", f"sleep 30 & echo $! > {pidfile}"])
    assert await gone(int(pidfile.read_text()))


async def test_exec_output_keeps_order_and_every_byte(client: Peer) -> None:
    script = "import sys\nfor i in range(20000): print(i)\nsys.stderr.write('done')"
    result, out, err = await run(client, ["python3", "-c", script])
    assert out == b"".join(f"{i}\n".encode() for i in range(20000))
    assert err == b"done" and result["exit_code"] == 0


async def test_bad_exec_params_are_clear_errors(client: Peer) -> None:
    for params in (
        {},
        {"argv": []},
        {"argv": [1]},
        {"argv": ["true"], "timeout": -1},
        {"argv": ["true"], "cwd": "/nonexistent-dir"},
    ):
        with pytest.raises(ConfigError):
            await client.call("exec", params, timeout=10)
    # The channel is still fine afterwards.
    assert (await client.call("ping", timeout=10))["pong"] is True


async def test_cancelling_exec_kills_the_process_group(client: Peer, tmp_path: Path) -> None:
    pidfile = tmp_path / "p"
    call = asyncio.ensure_future(
        client.call("exec", {"argv": ["sh", "-c", f"echo $$ > {pidfile}; sleep 30"]})
    )
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    pid = int(pidfile.read_text())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await gone(pid)


async def test_files_write_read_list_stat_remove(client: Peer, tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    sid = client.new_stream_id()
    call = asyncio.ensure_future(client.call("files.write", {"path": "a/b.bin", "stream": sid}))
    await client.send_bytes(sid, data)
    await client.end_stream(sid)
    assert (await asyncio.wait_for(call, 10))["size"] == len(data)
    assert (tmp_path / "a" / "b.bin").read_bytes() == data
    rid = client.new_stream_id()
    stream = client.open_stream(rid)
    res, back = await asyncio.gather(
        client.call("files.read", {"path": "a/b.bin", "stream": rid}), stream.read_all()
    )
    assert back == data and res["size"] == len(data)
    st = await client.call("files.stat", {"path": "a/b.bin"})
    assert st["type"] == "file" and st["size"] == len(data)
    listing = await client.call("files.list", {"path": "a"})
    assert [e["name"] for e in listing["entries"]] == ["b.bin"]
    await client.call("files.remove", {"path": "a", "recursive": True})
    assert not (tmp_path / "a").exists()
    with pytest.raises(RpcError) as info:
        await client.call("files.stat", {"path": "a"})
    assert info.value.data["type"] == "FileNotFoundError"


def test_guest_command_line_is_checked() -> None:
    from ironclaw.guest.__main__ import _parse

    assert _parse(["--listen-fd", "3"]).listen_fd == 3
    opts = _parse(["--virtio-port", "org.ironclaw.agent", "--workdir", "/w"])
    assert (opts.virtio_port, opts.workdir) == ("org.ironclaw.agent", "/w")
    for bad in (
        [],
        ["--listen-fd"],
        ["--listen-fd", "x"],
        ["--unix", "a", "--listen-fd", "3"],
        ["--bogus", "1"],
    ):
        with pytest.raises(SystemExit):
            _parse(bad)
