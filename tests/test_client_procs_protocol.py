"""Both SDKs share the process, terminal, port and watch surface: mypy accepts a program
that drives ``sb.commands``, ``sb.pty``, ``sb.ports`` and ``sb.files.watch`` through
``SandboxAPI`` for either, and the objects satisfy the protocols at run time."""

from __future__ import annotations

from pathlib import Path

from ironclaw.client import ApiClient
from ironclaw.client import Sandbox as RemoteSandbox
from ironclaw.client.proc_protocol import CommandsAPI, PortsAPI, PtyAPI
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.store import SandboxRecord
from ironclaw.sdk import Sandbox as LocalSandbox
from test_client_protocol import _mypy

USES = """
from ironclaw.client import Sandbox as Remote, SandboxAPI
from ironclaw.sdk import Sandbox as Local

async def use(sb: SandboxAPI) -> list[int]:
    h = await sb.commands.start(["sleep", "1"], tag="t")
    await h.send_stdin(b"x", close=True)
    async for ev in sb.files.watch(".", recursive=False):
        print(ev.type, ev.path)
    t = await sb.pty.create(80, 24, argv=["/bin/sh"])
    await t.resize(100, 30)
    url: str = await sb.ports.expose(8000)
    return [h.pid, (await h.wait(1.0)).pid, t.pid] + [p.port for p in await sb.ports.list()]

def both(local: Local, remote: Remote) -> list[SandboxAPI]:
    return [local, remote]
"""

MISUSE = """
from ironclaw.client import SandboxAPI

async def use(sb: SandboxAPI) -> str:
    return await sb.ports.expose("8000")
"""


def test_mypy_accepts_the_shared_surface_and_rejects_a_misuse(tmp_path: Path) -> None:
    ok = _mypy(tmp_path, USES)
    assert ok.returncode == 0, ok.stdout
    bad = _mypy(tmp_path, MISUSE)
    assert bad.returncode == 1 and 'incompatible type "str"; expected "int"' in bad.stdout


def test_both_sandboxes_have_the_surface_at_run_time(tmp_path: Path) -> None:
    record = SandboxRecord(id="sb-x", slot=0, backend="namespace", state="running", spec={})
    local = LocalSandbox(
        SandboxManager(Settings(runtime_dir=tmp_path / "r", state_dir=tmp_path / "s")),
        record,
        owns=False,
    )
    remote = RemoteSandbox(
        ApiClient("http://127.0.0.1:9", "t"), {"id": "sb-x", "backend": "namespace"}, owns=True
    )
    for sb in (local, remote):
        assert isinstance(sb.commands, CommandsAPI)
        assert isinstance(sb.pty, PtyAPI)
        assert isinstance(sb.ports, PortsAPI)
        assert callable(sb.files.watch)
