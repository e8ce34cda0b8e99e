"""The port forwarder: ``python -m ironclaw.resources.portfwd`` (one process per exposed port).

It inherits three descriptors from the process that exposed the port: a TCP socket
already listening on the host (so a taken port fails in the caller, at once), the
sandbox's network namespace, and a pidfd of the sandbox's supervisor. It enters the
namespace, drops to the sandbox's unprivileged host uid, and for each connection on the
host side opens one to ``127.0.0.1:PORT`` *inside* the sandbox and copies bytes both
ways. It connects to that one port and nothing else, so nothing else of the sandbox
becomes reachable; the firewall is untouched (the inner connection never leaves the
namespace's loopback, and a sandbox with no network at all can expose a port too). It
exits when the supervisor does: no daemon, nothing to clean up after ``rm``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import sys

__all__ = ["MAX_CONNECTIONS", "main"]

MAX_CONNECTIONS = 256
_CLONE_NEWNET = 0x40000000
_BUF = 64 * 1024


def enter_netns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_BUF):
            writer.write(chunk)
            await writer.drain()  # bounded: a slow side stops the reading of the other
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def serve(listener: socket.socket, port: int, pidfd: int) -> None:
    slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async with slots:
            try:
                ir, iw = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                w.close()
                return
            await asyncio.gather(_pipe(r, iw), _pipe(ir, w))
            for s in (w, iw):
                s.close()
                with contextlib.suppress(Exception):
                    await s.wait_closed()

    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(pidfd, ended)
    server = await asyncio.start_server(client, sock=listener, limit=_BUF)
    async with server:
        await gone


def main(argv: list[str] | None = None) -> None:
    """``--listen-fd N --netns-fd N --pidfd N --port P --uid U``."""
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(zip(args[::2], (int(v) for v in args[1::2]), strict=True))
    listener = socket.socket(fileno=opts["--listen-fd"])
    enter_netns(opts["--netns-fd"])
    os.close(opts["--netns-fd"])
    uid = opts["--uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    asyncio.run(serve(listener, opts["--port"], opts["--pidfd"]))


if __name__ == "__main__":
    main()
