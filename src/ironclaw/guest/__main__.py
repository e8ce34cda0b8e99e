"""Entry point of the guest agent: ``python3 -m ironclaw.guest --listen-fd N``.

The listening socket is normally created by the host and inherited (the namespace
backend), so the agent needs no path on the host and the host never waits for a
socket file to appear. VMs use ``--virtio-port NAME`` (QEMU: ``NAME.1``, ``NAME.2``...
too, where the VM has them) or ``--vsock-port P``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing, dataclasses and asyncio cost imports before the first reply
if TYPE_CHECKING:
    import socket

    from ironclaw.guest.agent import GuestAgent
    from ironclaw.guest.first_stage import Handover

DEFAULT_WORKDIR = "/workspace"  # as ironclaw.guest.agent, without importing it


def import_asyncio_without_ssl() -> None:
    """Import asyncio without ssl: asyncio imports it only to offer TLS, which the agent
    never uses, and loading OpenSSL costs ~15 ms. Hidden while asyncio loads (asyncio
    treats it as absent), then unhidden so that later code can import ssl normally.
    The CLI's exec fast path uses it too (this module imports only os and sys)."""
    hide = "ssl" not in sys.modules
    if hide:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        if hide:
            del sys.modules["ssl"]


class Options:
    __slots__ = ("listen_fd", "unix", "virtio_port", "vsock_port", "workdir")

    def __init__(self) -> None:
        self.listen_fd: int | None = None
        self.unix: str | None = None
        self.virtio_port: str | None = None
        self.vsock_port: int | None = None
        self.workdir: str = DEFAULT_WORKDIR


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
    import asyncio
    import contextlib

    from ironclaw.transport import unix

    server = await unix.serve(sock, agent.serve_connection)
    try:
        await agent.wait_stopped()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)


async def _serve_virtio(agent: GuestAgent, name: str) -> None:
    """Serve port ``name`` and its siblings ``name.1``... side by side (one host
    connection each), until the agent stops or every port's reader has failed."""
    import asyncio

    from ironclaw.transport import virtio_serial

    # Each port stays open for the agent's life: each host connection is a session on
    # it (see ironclaw.transport._port), served like a socket connection. All are open
    # before any is served: a snapshot taken once the agent answers has them all.
    ports = await virtio_serial.serve_ports(virtio_serial.port_family(name))
    serving: set[asyncio.Future[None]] = set()

    async def accept_loop(port: virtio_serial.PortSessions) -> None:
        while True:
            conn = await port.accept()
            task = asyncio.ensure_future(agent.serve_connection(conn))
            serving.add(task)
            task.add_done_callback(serving.discard)

    loops = [asyncio.ensure_future(accept_loop(port)) for port in ports]
    stopped = asyncio.ensure_future(agent.wait_stopped())
    try:
        pending = set(loops)
        while pending and not stopped.done():
            done, pending = await asyncio.wait(
                pending | {stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(stopped)
            for loop in done - {stopped}:  # one port gone: the others serve on
                print(f"ironclaw agent: a virtio port stopped: {loop.exception()!r}",
                      file=sys.stderr)  # fmt: skip
        if not stopped.done():  # every port failed: the agent cannot be reached
            loops[0].result()
    finally:
        stopped.cancel()
        for loop in loops:
            loop.cancel()
        if serving:  # they end with the agent; their replies are flushed as they close
            await asyncio.wait(serving, timeout=3.0)
        await virtio_serial.close_ports(ports)


async def _serve_vsock(agent: GuestAgent, port: int) -> None:
    import socket

    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    from ironclaw.transport import vsock

    server = await vsock.serve(sock, agent.serve_connection)
    try:
        await agent.wait_stopped()
    finally:
        server.close()


async def _amain(args: Options, handover: Handover | None = None) -> int:
    import asyncio
    import contextlib
    import signal
    import socket

    from ironclaw.guest.agent import GuestAgent

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
        first = None
        if handover is not None and handover.conn_fd >= 0:
            first = asyncio.ensure_future(_serve_handed_over(agent, handover))
        try:
            await _serve_listener(agent, socket.socket(fileno=args.listen_fd))
        finally:
            if first is not None:
                first.cancel()
                with contextlib.suppress(BaseException):
                    await first
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


async def _serve_handed_over(agent: GuestAgent, handover: Handover) -> None:
    """The first stage's connection, its unanswered bytes first (see first_stage)."""
    import socket

    from ironclaw.transport._socket import SocketConnection

    conn = SocketConnection(socket.socket(fileno=handover.conn_fd), initiator=False, name="fd")
    conn.unread(handover.replay)
    try:
        await agent.serve_connection(conn, adopt=handover.running)
    finally:
        await conn.aclose()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    handover = None
    if args.listen_fd is not None and _first_stage_usable():
        from ironclaw.guest.first_stage import first_stage

        handover = first_stage(args.listen_fd, args.workdir)
    import_asyncio_without_ssl()
    import asyncio

    return asyncio.run(_amain(args, handover))


def _first_stage_usable() -> bool:
    """The first stage waits on its commands with pidfds (Linux 5.3)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
