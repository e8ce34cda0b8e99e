"""Guest data the host keeps in memory is bounded: file reads, captured exec output.

A sandbox is untrusted: a link to /dev/zero, a FIFO, a huge file or an endless `yes`
must end in a clear error (or a truncated, flagged result), never in host memory
growing without bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CGROUP_ROOT
from ironclaw.errors import ConfigError, ResourceLimitExceeded, RpcError
from ironclaw.host.manager import SandboxManager

pytestmark = pytest.mark.root
MiB = 2**20


def rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def test_non_regular_files_are_refused(manager: SandboxManager) -> None:
    sid = (await manager.create({})).id
    setup = "ln -s /dev/zero out.txt && mkfifo pipe && mkdir dir && echo ok > real.txt"
    assert (await manager.exec(sid, ["sh", "-c", setup])).exit_code == 0
    before = rss()
    with pytest.raises(ConfigError, match="symbolic link"):
        await manager.read_file(sid, "out.txt")
    with pytest.raises(ConfigError, match="not a regular file"):
        await manager.read_file(sid, "pipe")  # would block the guest without O_NONBLOCK
    with pytest.raises(RpcError) as info:
        await manager.read_file(sid, "dir")
    assert info.value.data == {"type": "IsADirectoryError"}
    assert rss() - before < 16 * MiB
    assert await manager.read_file(sid, "real.txt") == b"ok\n"


async def test_a_file_over_the_read_limit_is_refused_and_memory_stays_bounded(
    manager: SandboxManager,
) -> None:
    sid = (await manager.create({})).id
    make = "truncate -s 256M big.bin && truncate -s 65M just-over.bin && echo ok > small.txt"
    assert (await manager.exec(sid, ["sh", "-c", make])).exit_code == 0
    before = rss()
    with pytest.raises(ResourceLimitExceeded, match="read limit of 8 MiB"):
        await manager.read_file(sid, "big.bin", limit=8 * MiB)
    assert rss() - before < 48 * MiB
    with pytest.raises(ResourceLimitExceeded, match="read limit of 64 MiB"):
        await manager.read_file(sid, "just-over.bin")  # the default limit
    # The cancelled read left the channel usable.
    assert await manager.read_file(sid, "small.txt") == b"ok\n"
    got = []
    await manager.read_file(sid, "small.txt", got.append, limit=3)
    assert b"".join(got) == b"ok\n"


async def test_captured_exec_output_is_capped_and_flagged(manager: SandboxManager) -> None:
    sid = (await manager.create({})).id
    before = rss()
    argv = ["sh", "-c", "yes | head -c 50000000; yes err | head -c 3000000 >&2"]
    result = await manager.exec(sid, argv, capture_limit=1 * MiB)
    assert result.exit_code == 0 and result.truncated
    assert result.stdout == b"y\n" * (MiB // 2) and len(result.stderr) == MiB
    assert (result.stdout_bytes, result.stderr_bytes) == (50_000_000, 3_000_000)
    assert result.to_json("namespace")["truncated"] is True
    assert rss() - before < 32 * MiB
    small = await manager.exec(sid, ["echo", "hi"], capture_limit=1 * MiB)
    assert small.stdout == b"hi\n" and not small.truncated


def test_cli_exec_json_truncates_and_cp_refuses_a_device_link(
    ironclaw_home: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "IRONCLAW_HOME": str(ironclaw_home), "IRONCLAW_CGROUP_ROOT": CGROUP_ROOT}

    def ironclaw(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ironclaw.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    assert ironclaw("sandbox", "create", "--id", "cap-1").returncode == 0
    try:
        r = ironclaw("sandbox", "exec", "--json", "cap-1", "--", "sh", "-c",
                     "yes | head -c 20000000; ln -s /dev/zero out.txt")  # fmt: skip
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["truncated"] is True and doc["stdout_bytes"] == 20_000_000
        assert len(doc["stdout"]) == 16 * MiB
        cp = ironclaw("sandbox", "cp", "cap-1:out.txt", str(tmp_path / "zero"))
        assert cp.returncode != 0 and "symbolic link" in cp.stderr
        assert not (tmp_path / "zero").exists()
    finally:
        assert ironclaw("sandbox", "rm", "cap-1").returncode == 0
