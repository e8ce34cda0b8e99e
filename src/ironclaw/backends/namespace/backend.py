"""The namespace backend: a bubblewrap jail, the embedded default on any Linux host.

How a sandbox is launched, and why:

* **Unprivileged on the host.** bubblewrap started by root would map the sandbox's
  uid to host root. The launcher therefore drops to a dedicated host uid
  (``uid_base + slot``: distinct per sandbox) before it execs anything, and bubblewrap
  builds an unprivileged user namespace from there. Inside, the command runs as uid
  1000 with every capability dropped, and ``--disable-userns`` plus seccomp stop it
  from making new namespaces.
* **No host paths needed.** Because that uid cannot (and must not) traverse IronClaw's
  0700 runtime directory, nothing of ours is bind-mounted: the agent's code, the
  synthetic ``/etc`` files and the seccomp program reach bubblewrap as file
  descriptors, and the agent's listening socket is created by the host and inherited.
* **A supervisor parent.** bwrap runs under coreutils ``timeout`` (the wall-time
  limit; 0 = none) with ``--die-with-parent``: killing that one process, which the
  registry records with its start time, takes the whole sandbox down.
* **Limits before exec.** A small exec chain (see :func:`.cmdline.launch_chain`) waits until the
  parent has put it in the sandbox's cgroups, sets rlimits, enters the network namespace
  (when the policy allows any egress) and drops privileges; everything the sandbox runs
  inherits all of it. No Python runs between fork and exec, so the child is started
  with vfork, and all the launch's blocking work happens on a spawner thread. On cgroup
  v1 the child is born in the sandbox's cgroups rather than moved (see :mod:`.placement`).

The jail itself is built by :func:`.launch.launch`, which the one-shot ``ironclaw exec``
shares (its jail runs the user's command instead of the agent); this module adds what
only an agent's jail has: the listening socket, the agent's code, its log, the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironclaw.backends.base import (
    BackendInfo,
    BackendStatus,
    LaunchContext,
    agent_unreachable,
    log_tail,
    same_process,
    wait_gone,
    wall_time_reached,
)
from ironclaw.backends.namespace.launch import AGENT_OOM_SCORE_ADJ, Jail, Payload, Tools, launch
from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConnectError, IronclawError
from ironclaw.resources.guest_bundle import bundle_path
from ironclaw.transport import Connection, unix

__all__ = ["AGENT_OOM_SCORE_ADJ", "NamespaceBackend", "NamespaceInfo"]


@dataclass(frozen=True, kw_only=True)
class NamespaceInfo(BackendInfo):
    """One jail as the registry keeps it: its supervisor (``pid``) and its files (the
    fields of :class:`.launch.JailRecord`, which the direct one-shot writes)."""

    socket: str
    status_file: str
    log: str
    host_uid: int
    wall_time_s: float | None = None


def _popen(
    argv: list[str], stdio: tuple[int, int, int], pass_fds: list[int], env: dict[str, str]
) -> subprocess.Popen[Any]:
    stdin, stdout, stderr = stdio
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=pass_fds,
        start_new_session=True,
        env=env,
    )


class NamespaceBackend:
    """bubblewrap + seccomp + cgroups + network namespace."""

    name = "namespace"

    def __init__(self, *, bwrap: str | None = None, timeout_bin: str | None = None) -> None:
        self.tools = Tools.find(bwrap=bwrap, timeout_bin=timeout_bin)
        # Supervisors this process started, by pid: resolved (and reaped) when they exit.
        self._children: dict[int, asyncio.Future[int]] = {}
        # Spawning happens here; a one-shot sandbox's PDEATHSIG follows this thread, which
        # lives as long as the backend (that is, the process).
        self._spawner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ironclaw-spawn")
        self._tools_ok = False

    def load_info(self, data: Mapping[str, Any]) -> NamespaceInfo:
        return NamespaceInfo.from_json(data)

    async def prepare(self, ctx: LaunchContext) -> None:
        if ctx.spec.image != "host":
            raise BackendError(
                f"image {ctx.spec.image!r} is not available to the namespace backend yet; "
                "use image 'host'"
            )
        if self._tools_ok and not ctx.spec.mounts:
            return  # nothing left to check: no thread hop
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._spawner, self._check_host, ctx)

    def _check_host(self, ctx: LaunchContext) -> None:
        """Tools once per backend, mount sources every time (blocking: spawner thread)."""
        if not self._tools_ok:
            self.tools.check(agent=True)
            self._tools_ok = True
        for m in ctx.spec.mounts:
            if not os.path.exists(m.source):
                raise BackendError(f"mount source {m.source} does not exist")

    async def start(self, ctx: LaunchContext) -> NamespaceInfo:
        # Everything that touches the filesystem or the kernel runs on the spawner thread:
        # while many jails are being built, even an lstat or a cgroup open can wait tens
        # of milliseconds on kernel locks, and the event loop must not.
        loop = asyncio.get_running_loop()
        try:
            proc, info = await loop.run_in_executor(self._spawner, self._launch, ctx)
        except OSError as exc:
            raise BackendError(f"could not launch bubblewrap: {exc}") from exc
        self._children[proc.pid] = self._watch_exit(proc)
        return info

    def _launch(self, ctx: LaunchContext) -> tuple[subprocess.Popen[Any], NamespaceInfo]:
        """Start the jail with the agent inside (blocking; on the spawner thread)."""
        jail = Jail(
            spec=ctx.spec,
            sandbox_id=ctx.sandbox_id,
            host_uid=ctx.host_uid,
            run_dir=ctx.run_dir,
            state_dir=ctx.settings.state_dir,
            one_shot=ctx.one_shot,
            cgroup=ctx.cgroup,
            netns_path=ctx.network.netns_path if ctx.network else None,
            extra_env={**(ctx.network.env if ctx.network else {}), **ctx.extra_env},
        )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log_fd = -1
        try:
            listener.bind(str(safe_join(ctx.run_dir, "agent.sock")))
            listener.listen(128)
            log_path = safe_join(ctx.run_dir, "sandbox.log")
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            payload = Payload(
                stdout=log_fd,
                stderr=log_fd,
                oom_score_adj=AGENT_OOM_SCORE_ADJ,
                guest_zip=bundle_path(ctx.settings.state_dir),
                listen=listener.fileno(),
            )
            proc, record = launch(jail, self.tools, payload, _popen)
            return proc, NamespaceInfo(**record)
        finally:
            listener.close()
            if log_fd >= 0:
                os.close(log_fd)

    def _watch_exit(self, proc: subprocess.Popen[Any]) -> asyncio.Future[int]:
        """Reap the supervisor when it exits (a pidfd on the loop: no thread, no zombie)."""
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        pidfd = os.pidfd_open(proc.pid)

        def on_exit() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            code = proc.wait()
            if not exited.done():
                exited.set_result(code)

        loop.add_reader(pidfd, on_exit)
        return exited

    async def wait_exited(self, info: NamespaceInfo) -> None:
        """Return when the sandbox's supervisor has exited (for readiness races)."""
        exited = self._children.get(info.pid)
        if exited is not None:
            await asyncio.shield(exited)
            return
        await wait_gone(info.pid, info.pid_start)

    async def start_failure(self, info: NamespaceInfo) -> IronclawError:
        """Turn bubblewrap's own words into an error that says what to change."""
        log = log_tail(Path(info.log), 4000)
        hint = ""
        if "Permission denied" in log and "source path" in log:
            hint = (
                f" A mount source must be readable by the sandbox's host uid {info.host_uid}"
                " (make it world-readable, or copy files in with `ironclaw sandbox cp`)."
            )
        elif "No space left" in log or "user namespace" in log.lower():
            hint = " Unprivileged user namespaces may be disabled: see `ironclaw doctor`."
        return BackendError(f"the sandbox failed to start: {log or 'no output'}.{hint}")

    async def open_channel(
        self, info: NamespaceInfo | Mapping[str, Any], *, timeout: float = 5.0
    ) -> Connection:
        info = NamespaceInfo.of(info)
        try:
            return await unix.connect(info.socket, timeout=timeout)
        except ConnectError as exc:
            raise agent_unreachable(exc, "of this sandbox") from exc

    async def stop(self, info: NamespaceInfo, *, timeout: float = 2.0) -> None:
        pid, start = info.pid, info.pid_start
        if same_process(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        exited = self._children.pop(pid, None)
        deadline = time.monotonic() + timeout
        if exited is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), timeout)
        await wait_gone(pid, start, timeout=max(0.0, deadline - time.monotonic()))

    async def inspect(self, info: NamespaceInfo) -> BackendStatus:
        if same_process(info.pid, info.pid_start):
            return BackendStatus(alive=True)
        return BackendStatus(alive=False, reason=exit_reason(info))


def exit_reason(info: NamespaceInfo) -> str:
    """Why a sandbox ended, from bubblewrap's status file and the wall-time limit."""
    exit_code: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(info.status_file).read_text().splitlines():
            line = line.strip()
            if line:
                doc = json.loads(line)
                if "exit-code" in doc:
                    exit_code = int(doc["exit-code"])
    if exit_code is None and wall_time_reached(info, info.wall_time_s):
        return "timeout: wall-time limit reached"
    if exit_code is None:
        return "killed"
    return f"exited with code {exit_code}"
