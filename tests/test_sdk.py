"""The Python SDK as the README shows it: one object per sandbox, files beside exec."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw.config import Settings
from ironclaw.errors import SandboxNotFound
from ironclaw.sdk import Sandbox

pytestmark = pytest.mark.root


async def test_create_exec_files_and_destroy_on_exit(settings: Settings) -> None:
    async with Sandbox.create({"limits": {"memory_mib": 256}}, settings=settings) as sb:
        result = await sb.exec(["python3", "-c", "print(6 * 7)"])
        assert result.exit_code == 0 and result.stdout == b"42\n"
        assert await sb.files.write("notes/a.txt", "hello") == 5
        assert await sb.files.read("notes/a.txt") == b"hello"
        assert [e["name"] for e in await sb.files.list("notes")] == ["a.txt"]
        assert (await sb.files.stat("notes/a.txt"))["size"] == 5
        await sb.files.remove("notes", recursive=True)
        assert (await sb.ping())["uid"] == 1000
        sandbox_id = sb.id
    with pytest.raises(SandboxNotFound):
        await Sandbox.connect(sandbox_id, settings=settings)
    assert not settings.sandbox_runtime_dir(sandbox_id).exists()


async def test_a_sandbox_outlives_its_creator_and_can_be_reattached(
    settings: Settings, ironclaw_home: Path
) -> None:
    sb = await Sandbox.create(sandbox_id="sdk-keep", settings=settings)
    await sb.files.write("state.txt", b"kept")
    await sb.aclose()  # detach: the sandbox keeps running
    again = await Sandbox.connect("sdk-keep", settings=settings)
    try:
        assert await again.files.read("state.txt") == b"kept"
    finally:
        await again.destroy()
        await again.aclose()
