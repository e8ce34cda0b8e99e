"""A QEMU VM's agent channels: what a connection costs on each, and an exec from a
second process while this one holds a channel.

Restores one VM from the image's agent-ready snapshot (built first if there is none,
not timed), then ``--rounds`` times: for each channel in turn (the earlier ones held, so
the claim lands on it) the claim, connect and handshake until the agent's ack, then one
``ping``. Last, ``--execs`` times, a second Python process claims a free channel and
runs ``true`` while this one holds channel 0: its time from the claim to the exit status
(interpreter start-up apart) and its whole wall time. ``--json`` prints one JSON line.

Run as root: ``.venv/bin/python benchmarks/vm_channels.py --json`` (IRONCLAW_HOME moves
the state directory, as everywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ironclaw.backends.qemu.accel import probe_accel
from ironclaw.backends.qemu.channels import AGENT_CHANNELS, connect_channel
from ironclaw.backends.qemu.restore import SnapshotKey, SnapshotStore, fresh_identity
from ironclaw.config import Settings
from ironclaw.images import build_image
from ironclaw.proto import methods
from ironclaw.rpc import HOST_LIMITS, Peer

_SECOND = """
import asyncio, sys, time
from ironclaw.backends.qemu.channels import connect_channel
from ironclaw.proto import methods
from ironclaw.rpc import HOST_LIMITS, Peer

async def main() -> None:
    started = time.perf_counter()
    conn = await connect_channel(sys.argv[1], int(sys.argv[2]), timeout=30, wait_s=30)
    peer = Peer(conn, name="second", limits=HOST_LIMITS)
    await peer.start()
    try:
        done = await methods.call(peer, methods.ExecRequest(argv=("true",)), methods.ExecExit)
    finally:
        await peer.aclose()
    print(done.exit_code, (time.perf_counter() - started) * 1000)

asyncio.run(main())
"""


async def _ping_on(first: Path) -> tuple[float, float, Peer]:
    started = time.perf_counter()
    conn = await connect_channel(first, AGENT_CHANNELS, timeout=30, handshake_s=60, wait_s=0)
    acked = time.perf_counter()
    peer = Peer(conn, name="bench", limits=HOST_LIMITS)
    await peer.start()
    await methods.call(peer, methods.PingRequest(), methods.PingResult)
    return (acked - started) * 1000, (time.perf_counter() - acked) * 1000, peer


async def run(rounds: int, execs: int) -> dict[str, Any]:
    settings = Settings.from_env()
    settings.ensure()
    art = await build_image(
        settings, progress=lambda step, f: print(f"  {f:4.0%} {step}", file=sys.stderr)
    )
    accel = await asyncio.to_thread(probe_accel, art, settings)
    store = SnapshotStore(art, settings)
    key = SnapshotKey(accel=accel, cpus=1, memory_mib=288, network=False)
    await store.ensure(key)
    handshake: list[list[float]] = [[] for _ in range(AGENT_CHANNELS)]
    ping: list[list[float]] = [[] for _ in range(AGENT_CHANNELS)]
    second_ms: list[float] = []
    second_wall_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="icch-") as tmp:
        vm = await store.restore(key, Path(tmp) / "vm", fresh_identity("bench-ch"))
        try:
            for _ in range(rounds):
                held = []
                for i in range(AGENT_CHANNELS):
                    hs, pg, peer = await _ping_on(vm.channel_path)
                    handshake[i].append(hs)
                    ping[i].append(pg)
                    held.append(peer)
                for peer in held:
                    await peer.aclose()
            _, _, mine = await _ping_on(vm.channel_path)  # channel 0, held meanwhile
            try:
                for _ in range(execs):
                    started = time.perf_counter()
                    out = await asyncio.to_thread(
                        subprocess.run,
                        [sys.executable, "-c", _SECOND, str(vm.channel_path), str(AGENT_CHANNELS)],
                        capture_output=True, text=True, check=True,
                    )  # fmt: skip
                    second_wall_ms.append((time.perf_counter() - started) * 1000)
                    status, ms = out.stdout.split()
                    assert status == "0", out
                    second_ms.append(float(ms))
            finally:
                await mine.aclose()
        finally:
            await vm.kill()
    return {
        "benchmark": "vm_channels",
        "accel": accel,
        "channels": AGENT_CHANNELS,
        "handshake_p50_ms": [round(statistics.median(v), 1) for v in handshake],
        "ping_p50_ms": [round(statistics.median(v), 1) for v in ping],
        "second_process_exec_p50_ms": round(statistics.median(second_ms), 1) if execs else None,
        "second_process_wall_p50_ms": (
            round(statistics.median(second_wall_ms), 1) if execs else None
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--execs", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(run(args.rounds, args.execs))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
