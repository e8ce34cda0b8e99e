"""Entry point of the guest agent: ``python3 -m ironclaw.guest --listen-fd N``.

The listening socket is normally created by the host and inherited (the namespace
backend), so the agent needs no path on the host and the host never waits for a
socket file to appear. VMs use ``--virtio-port NAME`` (QEMU) or ``--vsock-port P``.
"""

from __future__ import annotations

import sys

# asyncio imports ssl only to offer TLS, which the agent never uses, and loading OpenSSL
# costs ~15 ms of every sandbox's start. Hide the module while asyncio loads (asyncio
# treats it as absent), then unhide it so that later code can import ssl normally.
_HIDE_SSL = "ssl" not in sys.modules
if _HIDE_SSL:
    sys.modules["ssl"] = None  # type: ignore[assignment]
import asyncio

if _HIDE_SSL:
    del sys.modules["ssl"]

import contextlib
import os
import signal
import socket
from dataclasses import dataclass

from ironclaw.guest.agent import DEFAULT_WORKDIR, GuestAgent


@dataclass
class Options:
    listen_fd: int | None = None
    unix: str | None = None
    virtio_port: str | None = None
    vsock_port: int | None = None
    workdir: str = DEFAULT_WORKDIR


USAGE = (
    "usage: python3 -m ironclaw.guest "
    "(--listen-fd N | --unix PATH | --virtio-port NAME | --vsock-port P) [--workdir DIR]"
)


def _parse(argv: list[str] | None) -> Options:
    """A few flags parsed by hand: argparse alone would add ~7 ms to every sandbox start."""
    args = list(sys.argv[1:] if argv is None else argv)
    opts = Options()
    ints = {"--listen-fd": "listen_fd", "--vsock-port": "vsock_port"}
    strs = {"--unix": "unix", "--virtio-port": "virtio_port", "--workdir": "workdir"}
    while args:
        flag = args.pop(0)
        if flag in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if (flag not in ints and flag not in strs) or not args:
            raise SystemExit(f"{USAGE}\nbad or incomplete option: {flag}")
        value = args.pop(0)
        if flag in ints:
            try:
                setattr(opts, ints[flag], int(value))
            except ValueError:
                raise SystemExit(f"{flag} needs a number, got {value!r}") from None
        else:
            setattr(opts, strs[flag], value)
    chosen = [opts.listen_fd, opts.unix, opts.virtio_port, opts.vsock_port]
    if sum(x is not None for x in chosen) != 1:
        raise SystemExit(f"{USAGE}\ngive exactly one of the channel options")
    return opts


async def _serve_listener(agent: GuestAgent, sock: socket.socket) -> None:
    from ironclaw.transport import unix

    server = await unix.serve(sock, agent.serve_connection)
    try:
        await agent.wait_stopped()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)


async def _serve_virtio(agent: GuestAgent, name: str) -> None:
    from ironclaw.transport import virtio_serial

    # One port is one byte stream: serve it again after each host disconnect. While no
    # host is connected the device reads EOF at once, so a session that ends right after
    # it began means "nobody there": back off (up to 1 s) instead of spinning a CPU.
    loop = asyncio.get_running_loop()
    backoff = 0.0
    while True:
        if backoff:
            await asyncio.sleep(backoff)
        began = loop.time()
        conn = await virtio_serial.open_port(name)
        serving = asyncio.ensure_future(agent.serve_connection(conn))
        stopped = asyncio.ensure_future(agent.wait_stopped())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped.done():
            serving.cancel()
            return
        stopped.cancel()
        quick = loop.time() - began < 0.5
        backoff = min(1.0, max(0.02, backoff * 2)) if quick else 0.0


async def _serve_vsock(agent: GuestAgent, port: int) -> None:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    from ironclaw.transport import vsock

    server = await vsock.serve(sock, agent.serve_connection)
    try:
        await agent.wait_stopped()
    finally:
        server.close()


async def _amain(args: Options) -> int:
    if sys.version_info < (3, 12):
        # One thread per child (3.11's default watcher) would count against the pids
        # limit and fail exactly when a command hit it; a pidfd needs no thread.
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    agent = GuestAgent(workdir=args.workdir)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop)
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
        await _serve_listener(agent, sock)
    elif args.unix is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.unix)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.unix)
        sock.listen(64)
        await _serve_listener(agent, sock)
    elif args.virtio_port is not None:
        await _serve_virtio(agent, args.virtio_port)
    elif args.vsock_port is not None:
        await _serve_vsock(agent, args.vsock_port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
