"""Exposed ports: a server inside a sandbox reachable on the host, one port at a time.

Each exposed port is one detached forwarder process (:mod:`ironclaw.resources.portfwd`)
listening on the host (``127.0.0.1`` unless another address is asked for). Why a process
and not a DNAT rule: the CLI has no daemon, so the forward must outlive the command that
made it; a namespace sandbox without network policy has no veth to route to; and a
process that can dial only one port opens exactly that port (docs/NETWORK.md, "Exposed
ports"). Where it dials is :func:`forward_plan`:

* namespace backend: ``127.0.0.1:PORT`` inside the sandbox's network namespace; the
  firewall is not involved;
* VMs (QEMU, Firecracker): the guest's own address, from the host's namespace through the
  sandbox's host veth (the namespace keeps no address once the tap is bridged). The
  firewall closes that veth to the host's own connections and admits exactly one
  ``(port, forwarder uid)`` per exposed port, added here before the forwarder starts and
  revoked by :func:`unexpose`, by the sandbox's network tear-down, and by ``gc``.

What is exposed is written to ``<run dir>/ports/<port>.json``, created exclusively, so a
second expose of the same port is refused. Every change of a sandbox's ports holds an
exclusive ``flock`` on ``ports/.lock``: whoever holds it sees no half-done expose, so a
record that is not whole, or whose forwarder is gone, is a leftover (a killed exposing
process) and is cleared: forwarder, admission and file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironclaw.backends.base import process_start_time, same_process
from ironclaw.errors import ConfigError, NetworkError
from ironclaw.proto.surface import PortInfo
from ironclaw.resources.audit import record_async
from ironclaw.resources.procs import descendants

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager
    from ironclaw.resources.store import SandboxRecord

__all__ = [
    "ExposedPort",
    "ForwardPlan",
    "collect_leftovers",
    "expose",
    "forward_plan",
    "list_ports",
    "release",
    "unexpose",
]

VM_BACKENDS = frozenset({"qemu", "firecracker"})
_FORWARDER = b"ironclaw.resources.portfwd"


@dataclass(frozen=True)
class ExposedPort(PortInfo):
    """A port as the host keeps it: the shared record and its forwarder process."""

    pid: int  # the forwarder
    pid_start: int | None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ForwardPlan:
    """Where one sandbox's forwarders connect, from its registry record alone.

    ``connect``: the address dialed; ``in_netns``: enter the sandbox's network namespace
    first (namespace backend); ``uid``: the forwarder's (the sandbox's host uid);
    ``admit``: ``(host veth, uid)`` the firewall must admit for each exposed port (VMs),
    None when the firewall is not on the path.
    """

    connect: str
    in_netns: bool
    uid: int
    admit: tuple[str, int] | None


def forward_plan(sandbox_id: str, backend: str, info: Mapping[str, Any]) -> ForwardPlan:
    """Pure: see :class:`ForwardPlan`. A VM without a network has nothing to dial."""
    uid = int(info["host_uid"])
    if backend == "namespace":
        return ForwardPlan("127.0.0.1", True, uid, None)
    if backend not in VM_BACKENDS:
        raise ConfigError(f"sandbox {sandbox_id} runs on {backend}: it cannot expose ports")
    net = info.get("network")
    if not isinstance(net, Mapping) or not info.get("tap"):
        raise ConfigError(
            f"sandbox {sandbox_id} is a VM without a network interface: a VM's ports are "
            "reached through its network, which it gets with a network policy (create it "
            "with --allow or --allow-domain)"
        )
    guest = ipaddress.IPv4Address(str(net["guest_ip"]))
    return ForwardPlan(str(guest), False, uid, (str(net["host_ifname"]), uid))


def _check_port(port: int, what: str = "port") -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{what} {port!r} is out of range: give 1 to 65535")


def _dir(manager: SandboxManager, record: SandboxRecord) -> Path:
    # In the sandbox's run directory: its tear-down removes the records with it.
    return manager.settings.sandbox_runtime_dir(record.rid) / "ports"


@contextlib.asynccontextmanager
async def _locked(folder: Path) -> AsyncIterator[None]:
    """The sandbox's ports lock (released by the kernel if this process dies)."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)  # in the run dir: never recreate that
    except FileNotFoundError:
        raise NetworkError(f"{folder.parent} is gone: the sandbox is not running") from None
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    plan = forward_plan(sandbox_id, record.backend, record.info)
    sup, start = int(record.info["pid"]), record.info.get("pid_start")
    if not same_process(sup, start):
        raise NetworkError(f"sandbox {sandbox_id} is not running: nothing to forward to")
    folder = _dir(manager, record)
    entry = folder / f"{port}.json"
    async with _locked(folder):
        await _drop_stale(manager, plan, entry)
        try:
            fd = os.open(entry, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ConfigError(
                f"port {port} of {sandbox_id} is already exposed: list them with `sandbox port ID`"
            ) from None
        try:
            info = await _start_forwarder(manager, plan, entry, sup, port, addr, host_port)
            os.write(fd, json.dumps(info.to_json()).encode())
        except BaseException:
            await _clear(manager, plan, entry, None)
            raise
        finally:
            os.close(fd)
    await record_async(manager.settings, sandbox_id, "port.expose", port=port, url=info.url)
    return info


async def _start_forwarder(
    manager: SandboxManager, plan: ForwardPlan, entry: Path, sup: int, port: int,
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, host_port: int,
) -> ExposedPort:  # fmt: skip
    host = str(addr)
    listener = socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET)
    try:
        listener.bind((host, host_port))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise NetworkError(f"cannot listen on {host}:{host_port}: {exc.strerror}") from None
    fds: list[int] = []
    try:
        if plan.admit is not None:  # admitted before the forwarder can dial
            await manager.net.firewall.admit_port(plan.admit[0], port, plan.admit[1])
        fds += [listener.fileno(), os.pidfd_open(sup)]
        args = ["--listen-fd", fds[0], "--pidfd", fds[1], "--port", port,
                "--uid", plan.uid, "--connect", plan.connect,
                "--record", entry]  # fmt: skip
        if plan.in_netns:
            fds.append(_netns_of(sup))
            args += ["--netns-fd", fds[-1]]
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "ironclaw.resources.portfwd", *map(str, args)],
            pass_fds=fds, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        bound = listener.getsockname()[1]
    finally:
        for f in fds[1:]:
            os.close(f)
        listener.close()
    _reap_later(proc)
    shown = f"[{host}]" if addr.version == 6 else host
    return ExposedPort(port, host, bound, f"http://{shown}:{bound}", proc.pid,
                       process_start_time(proc.pid))  # fmt: skip


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


def _live(entry: Path) -> ExposedPort | None:
    info = _load(entry)
    return info if info is not None and same_process(info.pid, info.pid_start) else None


async def _drop_stale(manager: SandboxManager, plan: ForwardPlan, entry: Path) -> bool:
    """Under the lock: clear a record that is not whole or whose forwarder is gone."""
    if not entry.exists() or _live(entry) is not None:
        return False
    await _clear(manager, plan, entry, None)
    return True


async def _clear(
    manager: SandboxManager, plan: ForwardPlan, entry: Path, info: ExposedPort | None
) -> None:
    """Stop the forwarder (the recorded one, or any naming ``entry``), revoke the
    admission, remove the record: in that order, so no step leaves a forward without the
    record that lets the next call find it."""
    pids = {info.pid} if info is not None and same_process(info.pid, info.pid_start) else set()
    pids |= set(await asyncio.to_thread(_forwarders_of, entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if plan.admit is not None:
        port = int(entry.stem)
        await manager.net.firewall.revoke_port(plan.admit[0], port, plan.admit[1])
    entry.unlink(missing_ok=True)


def _forwarders_of(entry: Path) -> list[int]:
    """Forwarder processes whose command line names ``entry`` (one exposing process died
    before recording the forwarder it had started)."""
    want = str(entry).encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if _FORWARDER in argv and want in argv:
                out.append(int(name))
    return out


async def list_ports(manager: SandboxManager, sandbox_id: str) -> list[ExposedPort]:
    record = await manager.get(sandbox_id)
    folder = _dir(manager, record)
    if not folder.is_dir():
        return []
    plan = forward_plan(sandbox_id, record.backend, record.info)
    out = []
    async with _locked(folder):
        for entry in sorted(folder.glob("*.json")):
            if not await _drop_stale(manager, plan, entry):
                info = _load(entry)
                if info is not None:
                    out.append(info)
    return sorted(out, key=lambda p: p.port)


async def unexpose(manager: SandboxManager, sandbox_id: str, port: int) -> None:
    _check_port(port)
    record = await manager.get(sandbox_id)
    folder = _dir(manager, record)
    entry = folder / f"{port}.json"
    if not entry.exists():
        raise ConfigError(f"port {port} of {sandbox_id} is not exposed")
    plan = forward_plan(sandbox_id, record.backend, record.info)
    async with _locked(folder):
        info = _live(entry)
        await _clear(manager, plan, entry, info)
    await record_async(manager.settings, sandbox_id, "port.unexpose", port=port)
    if info is None:
        raise ConfigError(f"port {port} of {sandbox_id} is not exposed (its forwarder had died)")


async def release(manager: SandboxManager, record: SandboxRecord) -> None:
    """At tear-down, before the sandbox's network goes: stop its forwarders and revoke
    every admission a port file names, whole or not (an admission never outlives its
    file: expose creates the file first, unexpose and gc remove it last)."""
    folder = _dir(manager, record)
    if not folder.is_dir():
        return
    try:
        plan: ForwardPlan | None = forward_plan(record.id, record.backend, record.info)
    except (ConfigError, KeyError, ValueError):
        plan = None
    async with _locked(folder):
        for entry in sorted(folder.glob("*.json")):
            if plan is None:
                entry.unlink(missing_ok=True)
            else:
                await _clear(manager, plan, entry, _live(entry))


async def collect_leftovers(manager: SandboxManager, *, dry_run: bool = False) -> list[str]:
    """For ``gc``: records whose forwarder is gone or that were never finished (their
    forwarder, admission and file), and admissions of this registry's sandboxes that no
    live record accounts for. Admissions of sandboxes this registry does not know are
    left alone: another IronClaw home may share the table."""
    found: list[str] = []
    admitted: list[tuple[str, int, int]] | None = None
    for record in await manager.store.all():
        try:
            plan = forward_plan(record.id, record.backend, record.info)
        except (ConfigError, KeyError, ValueError):
            continue
        folder = _dir(manager, record)
        if plan.admit is None and not folder.is_dir():
            continue
        if plan.admit is not None and admitted is None:
            admitted = await manager.net.firewall.admitted_ports()
        held = _locked(folder) if folder.parent.is_dir() else contextlib.nullcontext()
        async with held:
            for entry in sorted(folder.glob("*.json")):
                if _live(entry) is None:
                    found.append(f"exposed port {entry.stem} of {record.id} (forwarder gone)")
                    if not dry_run:
                        await _clear(manager, plan, entry, None)
            if plan.admit is None or admitted is None:
                continue
            ifname, uid = plan.admit
            for name, port, who in admitted:
                if name == ifname and (who != uid or not (folder / f"{port}.json").exists()):
                    found.append(f"firewall admission of port {port} of {record.id}")
                    if not dry_run:
                        await manager.net.firewall.revoke_port(name, port, who)
    return found
