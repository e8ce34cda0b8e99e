"""A QEMU VM's agent channels, and the host process's claim on one of them.

QEMU's chardev socket serves one client at a time, so one virtio-serial port can carry
only one host connection: a second process (``ironclaw exec --id`` while ``ironclaw
serve`` holds the VM) would wait behind the first. A VM therefore has
:data:`AGENT_CHANNELS` ports for its agent, each behind a socket of its own in the run
directory, and the agent serves them all at once, each an independent session stream
(:func:`ironclaw.transport.virtio_serial.serve_ports`). A host connection takes one:

* a free channel is **claimed** with a non-blocking ``flock`` on its lock file beside
  the socket, held by the connection (closed with it). The kernel drops the lock when
  that descriptor closes, so a claim never outlives its holder, SIGKILL included; the
  lock files are root's, in the 0700 run directory QEMU's uid cannot reach;
* the holder writes its pid into the lock file, so one who finds every channel taken is
  told by whom (:class:`ChannelsBusy`), after waiting a bounded time for one to free.

Port 0 keeps the name and socket of the single-port VMs before it (:data:`AGENT_PORT`,
``agent.sock``), and how many channels a VM has is read from the sockets in its run
directory (:func:`channels_of`): a VM started before there were several has its one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Final

from ironclaw.errors import ConnectError
from ironclaw.transport import SocketConnection, virtio_serial

__all__ = [
    "AGENT_CHANNELS",
    "AGENT_PORT",
    "CHANNEL_SOCKET",
    "ChannelsBusy",
    "channel_run_files",
    "channels_of",
    "connect_channel",
    "holders",
    "lock_path",
    "port_name",
    "socket_path",
    "try_claim",
]

#: Agent channels (virtio-serial ports) per VM: how many host connections, from any
#: processes, a VM serves at once. Part of the VM's device set, so of every snapshot's.
AGENT_CHANNELS: Final = 4
#: The guest's name of channel 0; channel ``i`` is ``AGENT_PORT.i``.
AGENT_PORT: Final = "org.ironclaw.agent"
#: The host socket of channel 0 in the run directory; channel ``i`` is ``agent.i.sock``.
CHANNEL_SOCKET: Final = "agent.sock"
_POLL_S = 0.05


class ChannelsBusy(ConnectError):
    """Every agent channel of a VM stayed held by other connections for the whole wait."""


def port_name(index: int) -> str:
    return AGENT_PORT if index == 0 else f"{AGENT_PORT}.{index}"


def socket_path(first: Path | str, index: int) -> Path:
    """Channel ``index``'s socket, beside channel 0's (``first``)."""
    first = Path(first)
    if index == 0:
        return first
    stem, dot, suffix = first.name.rpartition(".")
    return first.with_name(f"{stem}.{index}.{suffix}" if dot else f"{first.name}.{index}")


def channels_of(first: Path | str) -> int:
    """How many agent channels the VM whose channel 0 is ``first`` has: its sockets in the
    run directory (only root, and QEMU before it drops root, can make them there)."""
    count = 1
    while count < AGENT_CHANNELS and socket_path(first, count).exists():
        count += 1
    return count


def lock_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".lock")


def channel_run_files(channels: int = AGENT_CHANNELS) -> tuple[str, ...]:
    """The run directory's channel files (sockets and lock files), for removal at stop."""
    socks = [socket_path(CHANNEL_SOCKET, i).name for i in range(channels)]
    return (*socks, *(lock_path(Path(s)).name for s in socks))


def try_claim(sock: Path) -> int | None:
    """Claim the channel of ``sock``: the locked descriptor (close it to release), or None
    when another connection holds it. The lock file then names this process."""
    fd = os.open(lock_path(sock), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # only a name for others' error messages
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holders(first: Path | str, channels: int) -> list[int | None]:
    """The pid each channel's lock file names (None: unreadable, or never claimed)."""
    found: list[int | None] = []
    for i in range(channels):
        try:
            found.append(int(lock_path(socket_path(first, i)).read_text().strip()))
        except (OSError, ValueError):
            found.append(None)
    return found


def _describe(pid: int | None) -> str:
    if pid is None:
        return "an unknown process"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return f"pid {pid}"
    words = [os.path.basename(argv[0].decode(errors="replace"))]
    words += [a.decode(errors="replace") for a in argv[1:]]
    text = " ".join(words)
    return f"pid {pid} ({_literal(text[:60]) + '…' if len(text) > 60 else _literal(text)})"


def _literal(text: str) -> str:
    """``text`` with each control or invisible character written out as an escape: a
    command line is anyone's text, and the error reaches a terminal."""
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        for c in text
    )


def busy_error(first: Path | str, channels: int, waited_s: float) -> ChannelsBusy:
    pids = holders(first, channels)
    who = ", ".join(_describe(p) for p in dict.fromkeys(pids))
    return ChannelsBusy(
        f"all {channels} agent channels of this VM are held by other connections ({who}) "
        f"and none came free within {waited_s:.0f}s: wait for one of them to finish, send "
        "the work through one that holds a channel (e.g. the API of a running `ironclaw "
        "serve`), or end a process you no longer need"
    )


async def connect_channel(
    first: Path | str,
    channels: int | None = None,
    *,
    timeout: float = 5.0,
    handshake_s: float | None = 30.0,
    wait_s: float = 5.0,
) -> SocketConnection:
    """A session on the first free channel, holding its claim until closed.

    ``channels`` defaults to :func:`channels_of`. ``timeout`` and ``handshake_s`` are
    :func:`virtio_serial.connect`'s; with every channel held, one is waited for up to
    ``wait_s``, then :class:`ChannelsBusy`.
    A channel whose socket is missing or refuses (QEMU not up yet) raises that
    :class:`ConnectError` at once; its claim is released.
    """
    deadline = time.monotonic() + wait_s
    while True:
        count = channels_of(first) if channels is None else channels
        for i in range(count):
            sock = socket_path(first, i)
            try:  # an open and a non-blocking flock in the private run directory
                claim = try_claim(sock)
            except OSError as exc:
                raise ConnectError(f"cannot claim the channel {sock}: {exc}") from exc
            if claim is not None:
                return await virtio_serial.connect(
                    sock, timeout=timeout, handshake_s=handshake_s, claim=claim
                )
        if time.monotonic() >= deadline:
            raise busy_error(first, count, wait_s)
        await asyncio.sleep(_POLL_S)
