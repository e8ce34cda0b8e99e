"""A channel violation by a guest is written to that sandbox's audit log (and so its trace).

The host end is the one the manager builds for every sandbox (:meth:`_host_peer`), facing
a hostile guest over the in-memory transport.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ironclaw.config import Settings
from ironclaw.errors import ChannelViolation
from ironclaw.host.manager import SandboxManager
from ironclaw.proto.frames import FrameType, encode_frame
from ironclaw.transport import memory


async def test_a_violation_is_audited_and_closes_only_that_channel(settings: Settings) -> None:
    mgr = SandboxManager(settings, reconcile_on_open=False)
    a, hostile = memory.pair()
    peer = mgr._host_peer("sb-hostile", a)
    await peer.start()
    try:
        # DATA on a stream id the host never allocated: the host must not buffer it.
        await hostile.write(encode_frame(FrameType.DATA, 7, b"x" * 1024))
        await asyncio.wait_for(peer.wait_closed(), 10)
        assert isinstance(peer.close_reason, ChannelViolation)
        audit = Path(settings.sandbox_state_dir("sb-hostile")) / "audit.jsonl"
        await asyncio.wait_for(asyncio.gather(*mgr._background), 10)  # the audit write
        (line,) = audit.read_text().splitlines()
        doc = json.loads(line)
        assert doc["event"] == "channel.violation" and doc["sandbox_id"] == "sb-hostile"
        assert "ChannelViolation" in doc["error"] and "stream 7" in doc["error"]
        assert (audit.stat().st_mode & 0o777) == 0o600
    finally:
        await peer.aclose()
        await hostile.aclose()
