"""The port forwarder: ``python -m ironclaw.resources.portfwd`` (one process per exposed port).

It inherits descriptors from the process that exposed the port: a TCP socket already
listening on the host (so a taken port fails in the caller, at once), a pidfd of the
sandbox's supervisor, and for a namespace sandbox its network namespace. It drops to the
sandbox's unprivileged host uid and for each connection on the host side opens one to
``ADDRESS:PORT`` and copies bytes both ways. It connects to that one port and nothing
else, so nothing else of the sandbox becomes reachable:

* namespace sandbox: it enters the namespace and dials ``127.0.0.1:PORT`` there; the
  connection never leaves the namespace's loopback, so the firewall is not involved (and
  a sandbox with no network at all can expose a port too);
* VM: the guest owns its address behind a bridge and the namespace keeps none, so the
  forwarder stays in the host's namespace and dials the guest's address through the
  sandbox's host veth; the firewall admits exactly that (uid, port) there.

It exits when the supervisor does: no daemon, nothing to clean up after ``rm``.
``--record`` only names the file that describes it, so that ``gc`` can tell a forwarder
whose exposing process died before writing that file.
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
_PR_SET_DUMPABLE = 4
_BUF = 64 * 1024
_CONNECT_S = 10.0  # a paused or wedged guest must not hold a connection slot for minutes


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


async def serve(listener: socket.socket, port: int, pidfd: int, target: str = "127.0.0.1") -> None:
    slots = asyncio.Semaphore(MAX_CONNECTIONS)
    # Strong references: a connection whose transports both paused reading (backpressure)
    # is reachable from nothing else, and the garbage collector would end it mid-copy.
    live: set[asyncio.Task[None] | None] = set()

    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        live.add(me)
        try:
            async with slots:
                await _connect_and_copy(r, w)
        finally:
            live.discard(me)

    async def _connect_and_copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ir, iw = await asyncio.wait_for(asyncio.open_connection(target, port), _CONNECT_S)
        except (OSError, TimeoutError):
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
    await asyncio.start_server(client, sock=listener, limit=_BUF)
    await gone
    # The sandbox is gone: so is everything worth copying. Exit at once (the kernel
    # closes every socket) rather than cancel each connection's tasks one by one.
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """``--listen-fd N --pidfd N --port P --uid U [--netns-fd N] [--connect ADDR]
    [--record PATH]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    opts = dict(zip(args[::2], args[1::2], strict=True))
    listener = socket.socket(fileno=int(opts["--listen-fd"]))
    if "--netns-fd" in opts:
        netns = int(opts["--netns-fd"])
        enter_netns(netns)
        os.close(netns)
    uid = int(opts["--uid"])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # In the host's namespace, a process of the sandbox's uid (QEMU) must not be able to
    # take it over: not dumpable means no ptrace and no /proc/<pid>/mem for that uid.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    target = opts.get("--connect", "127.0.0.1")
    asyncio.run(serve(listener, int(opts["--port"]), int(opts["--pidfd"]), target))


if __name__ == "__main__":
    main()
