"""A sandbox's command listing with arguments as large as Linux allows.

Each detached command is reported with its argv, and a listing carries up to
``MAX_PROCS`` of them in one channel message, which the host caps at 2 MiB. Arguments
of 128 KiB each (Linux's largest), or of control characters that JSON spells in six
bytes, must not push a listing over that cap: the host would close the channel on every
``ps`` and every attach by tag. The guest reports a long argv abbreviated. Real sandbox.
"""

from __future__ import annotations

import json

import pytest

from ironclaw.config import Settings
from ironclaw.guest.processes import SHOWN_ARGV
from ironclaw.sdk import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


async def test_huge_arguments_are_listed_abbreviated_and_the_channel_stays(
    settings: Settings,
) -> None:
    async with Sandbox.create(settings=settings) as sb:
        big = ["x" * 120_000] * 8  # ~1 MiB of argv, under Linux's 2 MiB
        ctl = ["\x01" * 100_000] * 3  # 6 bytes of JSON per character
        for i, extra in enumerate((big, big, ctl, ctl)):
            h = await sb.commands.start(["sh", "-c", "sleep 600", "sh", *extra], tag=f"big{i}")
            assert h.info.argv[:4] == ("sh", "-c", "sleep 600", "sh")
        listed = await sb.commands.list()
        assert [p.tag for p in listed] == ["big0", "big1", "big2", "big3"]
        for p in listed:
            assert p.running and p.argv[:4] == ("sh", "-c", "sleep 600", "sh")
            assert p.argv[-1].endswith("…")
            assert len(json.dumps(list(p.argv))) <= SHOWN_ARGV + 64
        again = await sb.commands.connect("big2")  # resolving a tag lists them
        assert again.pid == listed[2].pid
        short = await sb.commands.start(["sleep", "600"], tag="short")
        assert short.info.argv == ("sleep", "600")  # short ones are reported whole
        assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"
