"""Exposed ports: a server inside a sandbox reachable on the host, one port at a time.

Each exposed port is one detached forwarder process (:mod:`ironclaw.resources.portfwd`)
listening on the host (``127.0.0.1`` unless another address is asked for) and connecting
to ``127.0.0.1:PORT`` inside the sandbox's network namespace. Why a process and not a
DNAT rule: the CLI has no daemon, so the forward must outlive the command that made it;
a sandbox without network policy has no veth to route to; and a process that can only
dial one port inside the namespace opens exactly that port and leaves the deny-all
firewall as it is (docs/NETWORK.md, "Exposed ports").

What is exposed is written to ``<runtime>/sandboxes/<id>/ports/<port>.json``; creating
that file exclusively is what refuses a second expose of the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ironclaw.backends.base import process_start_time, same_process
from ironclaw.errors import ConfigError, NetworkError
from ironclaw.resources.audit import record_async
from ironclaw.resources.procs import descendants

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager

__all__ = ["ExposedPort", "expose", "list_ports", "unexpose"]


@dataclass(frozen=True)
class ExposedPort:
    port: int  # inside the sandbox
    host: str
    host_port: int
    url: str
    pid: int  # the forwarder
    pid_start: int | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _check_port(port: int, what: str = "port") -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} {port!r} is out of range: give 1 to 65535")


def _dir(manager: SandboxManager, sandbox_id: str) -> Path:
    return manager.settings.sandbox_runtime_dir(sandbox_id) / "ports"


def _netns_of(pid: int) -> int:
    """An fd of the sandbox's network namespace: the first process below the supervisor
    in another namespace than the supervisor's, or the supervisor's own (shared netns)."""
    own = os.readlink(f"/proc/{pid}/ns/net")
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{child}/ns/net") != own:
                return os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    return os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)


async def expose(
    manager: SandboxManager, sandbox_id: str, port: int, *, host: str = "127.0.0.1",
    host_port: int = 0,
) -> ExposedPort:  # fmt: skip
    """Forward ``host:host_port`` (0: any free port) to ``port`` inside the sandbox."""
    _check_port(port)
    if host_port:
        _check_port(host_port, "host port")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{host!r} is not an IP address to listen on") from None
    record = await manager.get(sandbox_id)
    if record.backend != "namespace":
        raise ConfigError(
            f"sandbox {sandbox_id} runs on {record.backend}: exposing ports works on the "
            "namespace backend for now"
        )
    sup, start = int(record.info["pid"]), record.info.get("pid_start")
    if not same_process(sup, start):
        raise NetworkError(f"sandbox {sandbox_id} is not running: nothing to forward to")
    folder = _dir(manager, sandbox_id)
    folder.mkdir(mode=0o700, exist_ok=True)
    entry = folder / f"{port}.json"
    _drop_stale(entry)
    try:
        fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"port {port} of {sandbox_id} is already exposed: list them with `sandbox port ID`"
        ) from None
    try:
        listener = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET)
        try:
            listener.bind((host, host_port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise NetworkError(f"cannot listen on {host}:{host_port}: {exc.strerror}") from None
        netns, pidfd = _netns_of(sup), os.pidfd_open(sup)
        try:
            fds = (listener.fileno(), netns, pidfd)
            args = ["--listen-fd", fds[0], "--netns-fd", fds[1], "--pidfd", fds[2],
                    "--port", port, "--uid", int(record.info["host_uid"])]  # fmt: skip
            proc = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "ironclaw.resources.portfwd", *map(str, args)],
                pass_fds=fds, start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            bound = listener.getsockname()[1]
            for f in (netns, pidfd):
                os.close(f)
            listener.close()
        _reap_later(proc)
        shown = f"[{host}]" if addr.version == 6 else host
        info = ExposedPort(port, host, bound, f"http://{shown}:{bound}", proc.pid,
                           process_start_time(proc.pid))  # fmt: skip
        os.write(fd, json.dumps(info.to_json()).encode())
    except BaseException:
        entry.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    await record_async(manager.settings, sandbox_id, "port.expose", port=port, url=info.url)
    return info


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    """Collect the forwarder's exit status if it ends while this process still runs (an
    SDK program outliving its sandbox would otherwise keep a zombie)."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc.poll()

    loop.add_reader(pidfd, reap)


def _load(entry: Path) -> ExposedPort | None:
    try:
        return ExposedPort(**json.loads(entry.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _drop_stale(entry: Path) -> None:
    """A record whose forwarder is gone (killed, host rebooted) no longer holds its port."""
    if entry.exists():
        info = _load(entry)
        if info is None or not same_process(info.pid, info.pid_start):
            entry.unlink(missing_ok=True)


async def list_ports(manager: SandboxManager, sandbox_id: str) -> list[ExposedPort]:
    await manager.get(sandbox_id)
    folder = _dir(manager, sandbox_id)
    out = []
    for entry in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        _drop_stale(entry)
        info = _load(entry)
        if info is not None:
            out.append(info)
    return sorted(out, key=lambda p: p.port)


async def unexpose(manager: SandboxManager, sandbox_id: str, port: int) -> None:
    _check_port(port)
    await manager.get(sandbox_id)
    entry = _dir(manager, sandbox_id) / f"{port}.json"
    _drop_stale(entry)
    info = _load(entry)
    if info is None:
        raise ConfigError(f"port {port} of {sandbox_id} is not exposed")
    if same_process(info.pid, info.pid_start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
    entry.unlink(missing_ok=True)
    await record_async(manager.settings, sandbox_id, "port.unexpose", port=port)
