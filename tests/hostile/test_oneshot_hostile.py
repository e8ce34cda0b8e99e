"""The direct one-shot (``ironclaw exec -- CMD``, the command as bubblewrap's payload)
against a hostile command (invariant 8). Real bubblewrap jails, real cgroups, a real
terminal (a pty) as the CLI's.

The command must reach no descriptor of the host's (bubblewrap's status and seccomp
descriptors, the registry) nor the terminal (TIOCSTI), cannot pass its own output off
as bubblewrap's "command not found", and cannot hang the CLI or outlive it with
children, a daemon that left its session, or a CLI killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import UID_BASE
from ironclaw.config import Settings
from ironclaw.host.manager import SandboxManager
from ironclaw.resources.procs import processes_with_uid_in
from test_oneshot_direct import NOTHING, env_for, leftovers

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "ironclaw.cli", "exec"]

PROBE = """
import fcntl, os, termios
print(sorted(os.listdir("/proc/self/fd")))
print("tty_nr", open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4])
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        print("injected", fd)
    except OSError:
        print("refused", fd)
try:
    os.open("/dev/tty", os.O_RDWR)
    print("tty opened")
except OSError:
    print("no tty")
"""


def _sandbox_processes() -> list[int]:
    return [pid for pid, _ in processes_with_uid_in(UID_BASE, UID_BASE + 16384)]


def test_the_command_reaches_no_host_descriptor_nor_the_terminal(ironclaw_home: Path) -> None:
    """The CLI runs on a terminal; the command has /dev/null and two pipes, no
    controlling terminal, and no other descriptor (the listing's own is 3)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*CLI, "--", "python3", "-I", "-c", PROBE],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env_for("direct", ironclaw_home),
            start_new_session=True,  # the pty is the CLI's controlling terminal
        )
        os.close(slave)
        slave = -1
        out = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the pty's other end is gone
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=120) == 0, out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode().replace("\r\n", "\n")
    assert text == ("['0', '1', '2', '3']\ntty_nr 0\nrefused 0\nrefused 1\nrefused 2\nno tty\n"), (
        text
    )
    assert leftovers(ironclaw_home) == NOTHING


def test_a_forged_command_not_found_is_the_commands_own_output(ironclaw_home: Path) -> None:
    forged = "bwrap: execvp sh: No such file or directory"
    got = subprocess.run(
        [*CLI, "--", "sh", "-c", f"echo '{forged}' >&2; exit 1"],
        capture_output=True,
        env=env_for("direct", ironclaw_home),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert (got.returncode, got.stdout, got.stderr) == (1, b"", f"{forged}\n".encode())
    missing = subprocess.run(
        [*CLI, "--", "no-such-command"],
        capture_output=True,
        env=env_for("direct", ironclaw_home),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert (missing.returncode, missing.stderr) == (127, b"no-such-command: command not found\n")
    assert leftovers(ironclaw_home) == NOTHING


def test_children_holding_the_pipes_and_a_daemon_neither_hang_nor_outlive_it(
    ironclaw_home: Path,
) -> None:
    """The command ends at once; a child in the background, one in a subshell and a
    daemon in its own session keep the output pipes open for ten minutes: the CLI
    returns with the command, and none of them is left (the guard is the run's timeout)."""
    script = "sleep 600 & (sleep 600 &); setsid sh -c 'sleep 600' & echo done"
    got = subprocess.run(
        [*CLI, "--", "sh", "-c", script],
        capture_output=True,
        env=env_for("direct", ironclaw_home),
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert (got.returncode, got.stdout) == (0, b"done\n"), got.stderr
    assert leftovers(ironclaw_home) == NOTHING


async def test_a_daemon_dies_with_a_killed_cli(ironclaw_home: Path) -> None:
    """SIGKILL to the CLI: the jail and a daemon in its own session go with it (no
    process of the sandbox's uid stays); what is left on disk is what a manager's start
    (as ``gc``) removes."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, "--", "sh", "-c", "setsid sh -c 'sleep 600' & echo up; sleep 600",
        stdout=asyncio.subprocess.PIPE, env=env_for("direct", ironclaw_home),
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        assert await proc.stdout.readline() == b"up\n"
    assert len(_sandbox_processes()) >= 4  # timeout, bubblewrap (two), sh, the daemon
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    # Killed by the kernel (parent-death signals), then reaped: wait for the reaping only.
    end = time.monotonic() + 60
    while _sandbox_processes() and time.monotonic() < end:
        await asyncio.sleep(0.1)
    assert _sandbox_processes() == []
    mgr = SandboxManager(Settings.from_env({"IRONCLAW_HOME": str(ironclaw_home)}))
    await mgr.open()
    await mgr.aclose()
    assert leftovers(ironclaw_home) == NOTHING
