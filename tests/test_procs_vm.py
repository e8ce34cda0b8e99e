"""Detached commands, PTYs and file watching in a QEMU VM: the same guest methods."""

from __future__ import annotations

import asyncio

import pytest

from ironclaw.errors import ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.images import ImageArtifacts
from ironclaw.sdk import Sandbox
from test_qemu_backend import vm_image, vm_snapshots  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(300)]


async def test_vm_commands_pty_and_watch(
    vm_image: ImageArtifacts,  # noqa: F811
    manager: SandboxManager,
) -> None:
    spec = {"backend": "qemu", "limits": {"memory_mib": 384, "workspace_mib": 64}}
    record = await manager.create(spec, ready_timeout=60)  # TCG on a busy host
    async with Sandbox(manager, record, owns=False) as sb:
        h = await sb.commands.start(["sh", "-c", "echo early; sleep 1000"], tag="bg")
        again = await sb.commands.connect("bg")
        async for chunk in again.output():
            assert chunk.startswith(b"early")
            break
        assert [p.tag for p in await sb.commands.list()] == ["bg"]
        assert (await h.kill()).running in (True, False)
        assert (await h.wait(timeout=30)).exit_code == 137

        term = await sb.pty.create(90, 20, argv=["/bin/sh"])
        out = bytearray()

        async def until(marker: bytes) -> None:
            async for chunk in term.output(replay=False):
                out.extend(chunk)
                if marker in out:
                    return

        reader = asyncio.ensure_future(until(b"33 101"))
        await term.resize(101, 33)
        await term.send(b"stty size\n")
        await asyncio.wait_for(reader, 60)
        await term.send_stdin(b"exit 3\n")
        assert (await term.wait(timeout=30)).exit_code == 3

        await sb.files.mkdir("w")
        seen: list[tuple[str, str]] = []

        async def watch() -> None:
            async for ev in sb.files.watch("w"):
                seen.append((ev.type, ev.path.rsplit("/", 1)[1]))
                if ev.type == "deleted":
                    return

        watcher = asyncio.ensure_future(watch())
        await sb.ping()
        assert (await sb.exec(["sh", "-c", "echo x > w/a && rm w/a"])).exit_code == 0
        await asyncio.wait_for(watcher, 60)
        assert seen == [("created", "a"), ("modified", "a"), ("deleted", "a")]
        with pytest.raises(ConfigError, match="outside the workspace"):
            async for _ in sb.files.watch("/etc"):
                pass
        with pytest.raises(ConfigError, match="VM without a network interface"):
            await sb.ports.expose(8000)  # exposing works on a VM with a network policy
