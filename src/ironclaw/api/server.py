"""Run the API on uvicorn: TCP on 127.0.0.1 by default, and optionally a Unix socket.

The sockets are bound here (not by uvicorn) so that port 0 works: the chosen address
is printed once the app has started, as ``listening on URL``, for scripts and tests.
Ctrl-C or SIGTERM shuts down gracefully: no new connections, running requests get
``grace`` seconds, agent tasks are cancelled, sandboxes keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from ironclaw.api.app import create_app
from ironclaw.config import Settings
from ironclaw.errors import ConfigError
from ironclaw.host.manager import SandboxManager
from ironclaw.transport._socket import listen_tcp

__all__ = ["serve"]

#: Largest WebSocket message uvicorn reads into memory (the remote SDK sends stdin in
#: 256 KiB frames; attach and PTY routes refuse more than 64 KiB themselves).
WS_MAX_SIZE = 1024 * 1024


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its shutdown (the process dies of the signal);
    here the signal only starts the graceful shutdown, and ``serve`` returns normally."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for signum in signals:
            loop.add_signal_handler(signum, self._stop)
        try:
            yield
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    def _stop(self) -> None:
        if self.should_exit:  # a second signal: do not wait for running requests
            self.force_exit = True
        self.should_exit = True


def _unix(path: Path) -> socket.socket:
    if path.exists() and not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket; choose another --socket path")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600: only this user may connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(
    settings: Settings | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    unix_socket: Path | None = None,
    tcp: bool = True,
    grace: int = 10,
    log_level: str = "warning",
    max_upload_mib: int = 4096,
    max_creating: int | None = None,
    cluster: str | None = None,
) -> None:
    """Serve until interrupted; with ``cluster`` (``auto`` or ``ray://HOST:PORT``) the
    sandboxes live on the nodes of that Ray cluster (docs/CLUSTER.md)."""
    if cluster is not None:
        from ironclaw.cluster.manager import ClusterManager

        manager = ClusterManager(settings or Settings.from_env(), address=cluster)
        await manager.open()
        try:
            await _serve(settings, manager, host, port, unix_socket, tcp, grace, log_level,
                         max_upload_mib, max_creating)  # fmt: skip
        finally:
            await manager.aclose()
        return
    await _serve(settings, None, host, port, unix_socket, tcp, grace, log_level,
                 max_upload_mib, max_creating)  # fmt: skip


async def _serve(
    settings: Settings | None,
    manager: SandboxManager | None,
    host: str,
    port: int,
    unix_socket: Path | None,
    tcp: bool,
    grace: int,
    log_level: str,
    max_upload_mib: int,
    max_creating: int | None,
) -> None:
    sockets: list[socket.socket] = []
    urls: list[str] = []
    if tcp:
        # No delay: else a response's body segment waits for the client's delayed ACK of
        # its header segment (~40 ms per kept-alive request).
        sock = listen_tcp(host, port, backlog=1024, nodelay=True)
        bound = sock.getsockname()
        sockets.append(sock)
        urls.append(f"http://{'[' + host + ']' if ':' in host else host}:{bound[1]}")
    if unix_socket is not None:
        sockets.append(_unix(unix_socket))
        urls.append(f"unix:{unix_socket}")
    if not sockets:
        raise ConfigError("nothing to listen on: give --port or --socket")
    config = uvicorn.Config(
        create_app(
            settings,
            manager=manager,
            max_upload=max_upload_mib * 1024 * 1024,
            max_creating=max_creating,
        ),
        log_level=log_level,
        ws_max_size=WS_MAX_SIZE,
        lifespan="on",
        timeout_graceful_shutdown=grace,
        access_log=False,
    )
    server = _Server(config)

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        for url in urls:
            print(f"listening on {url}", flush=True, file=sys.stdout)

    announcer = asyncio.ensure_future(announce())
    try:
        await server.serve(sockets=sockets)
    finally:
        announcer.cancel()
        for s in sockets:
            s.close()
        if unix_socket is not None:
            with contextlib.suppress(OSError):
                unix_socket.unlink()
