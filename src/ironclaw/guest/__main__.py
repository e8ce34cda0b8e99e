"""Entry point of the guest agent: ``python3 -m ironclaw.guest --listen-fd N``.

The listening socket is normally created by the host and inherited (the namespace
backend), so the agent needs no path on the host and the host never waits for a
socket file to appear. VMs use ``--virtio-port NAME`` (QEMU) or ``--vsock-port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from ironclaw.guest.agent import DEFAULT_WORKDIR, GuestAgent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ironclaw-guest", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen-fd", type=int, help="inherited listening AF_UNIX socket")
    where.add_argument("--unix", help="path of an AF_UNIX socket to listen on")
    where.add_argument("--virtio-port", help="name of a virtio-serial port (VMs)")
    where.add_argument("--vsock-port", type=int, help="AF_VSOCK port to listen on (VMs)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR)
    return parser.parse_args(argv)


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


async def _amain(args: argparse.Namespace) -> int:
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
    else:
        await _serve_vsock(agent, args.vsock_port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    sys.exit(main())
