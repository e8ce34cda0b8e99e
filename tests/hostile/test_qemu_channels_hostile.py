"""The busy error of a VM's agent channels names who holds them: the holders' command
lines, which are anyone's text (``ironclaw exec -- CMD`` carries its command, perhaps a
model's or a sandbox's), so they reach the person's terminal with every control and
invisible character written out (invariant 8). Real processes holding real locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ironclaw.backends.qemu.channels import (
    AGENT_CHANNELS,
    ChannelsBusy,
    connect_channel,
    socket_path,
)

# A terminal title change and a bidi override, in a holder's argv.
HOSTILE_ARG = "\x1b]0;owned\x07\u202eexe.txt"

_HOLDER = """
import sys, time
from pathlib import Path
from ironclaw.backends.qemu.channels import AGENT_CHANNELS, socket_path, try_claim
first = Path(sys.argv[2])
fds = [try_claim(socket_path(first, i)) for i in range(AGENT_CHANNELS)]
print("held" if None not in fds else "busy", flush=True)
time.sleep(600)
"""


async def test_the_busy_error_shows_a_holders_command_line_literally(tmp_path: Path) -> None:
    first = tmp_path / "agent.sock"
    (tmp_path / "holder.py").write_text(_HOLDER)
    # The hostile argument first: the error shows the start of a command line.
    child = subprocess.Popen(
        [sys.executable, "-m", "holder", HOSTILE_ARG, str(first)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        for i in range(1, AGENT_CHANNELS):
            socket_path(first, i).touch()  # the VM's sockets: how many channels it has
        with pytest.raises(ChannelsBusy) as busy:
            await connect_channel(first, wait_s=0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    text = str(busy.value)
    assert f"pid {child.pid} (" in text
    assert not any(c in text for c in "\x1b\x07\u202e")
    assert "\\x1b]0;owned" in text and "\\u202e" in text
