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
* **Limits before exec.** A small exec chain (see :func:`launch_chain`) waits until the
  parent has put it in the sandbox's cgroups, sets rlimits, enters the network namespace
  (when the policy allows any egress) and drops privileges; everything the sandbox runs
  inherits all of it. No Python runs between fork and exec, so the child is started
  with vfork, and all the launch's blocking work happens on a spawner thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ironclaw.backends.base import (
    BackendStatus,
    LaunchContext,
    process_start_time,
    same_process,
    wait_gone,
)
from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConnectError, IronclawError
from ironclaw.policy.limits import rlimits
from ironclaw.resources.guest_bundle import bundle_path
from ironclaw.resources.seccomp_cache import seccomp_program
from ironclaw.spec import SandboxSpec
from ironclaw.transport import Connection, unix

__all__ = ["GUEST_GID", "GUEST_UID", "NamespaceBackend", "bwrap_argv", "etc_files"]

GUEST_UID = 1000
GUEST_GID = 1000
GUEST_ZIP = "/opt/ironclaw/ironclaw.zip"
WORKSPACE = "/workspace"
MiB = 1024 * 1024
# Memory pressure kills the command, not the agent: the agent's floor is set here,
# commands raise theirs (see ironclaw.guest.agent).
AGENT_OOM_SCORE_ADJ = -500

_AGENT_BOOT = (
    "import sys; sys.path.insert(0, {zip!r}); "
    "from ironclaw.guest.__main__ import main; sys.exit(main(sys.argv[1:]))"
)

# Host files the "host" image shares read-only; everything else in /etc is synthetic.
_HOST_ETC_BINDS = ("ld.so.cache", "alternatives", "ssl", "ca-certificates", "localtime")
_USR_LINKS = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")


def etc_files(hostname: str) -> dict[str, bytes]:
    """The synthetic /etc of the "host" image: no host accounts, no secrets."""
    return {
        "passwd": (
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
            f"sandbox:x:{GUEST_UID}:{GUEST_GID}:sandbox:{WORKSPACE}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ).encode(),
        "group": f"root:x:0:\nsandbox:x:{GUEST_GID}:\nnogroup:x:65534:\n".encode(),
        "hostname": f"{hostname}\n".encode(),
        "hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost\n".encode(),
        "nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
        "resolv.conf": b"# no resolver: names are resolved by the egress proxy, if any\n",
    }


@dataclass(frozen=True)
class _Fds:
    """Descriptors handed to bubblewrap; closed in the parent once it started."""

    seccomp: int
    guest_zip: int
    etc: dict[str, int]
    listen: int
    status: int

    def all(self) -> list[int]:
        return [self.seccomp, self.guest_zip, self.listen, self.status, *self.etc.values()]

    def close(self) -> None:
        # ``listen`` belongs to its socket object, which closes it exactly once: closing
        # the number here too could close another sandbox's descriptor that reused it.
        for fd in self.all():
            if fd != self.listen:
                with contextlib.suppress(OSError):
                    os.close(fd)


def bwrap_argv(
    spec: SandboxSpec,
    *,
    hostname: str,
    fds: _Fds,
    share_net: bool,
    extra_env: dict[str, str] | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """The full bubblewrap command line for ``spec`` (pure: golden-testable)."""
    lim = spec.limits
    a: list[str] = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(GUEST_UID),
        "--gid",
        str(GUEST_GID),
        "--hostname",
        hostname,
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    if share_net:
        a.append("--share-net")
    for name in _USR_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            a += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            a += ["--ro-bind", str(host), f"/{name}"]
    a += ["--proc", "/proc", "--dev", "/dev", "--dir", "/etc"]
    for name in _HOST_ETC_BINDS:
        if (Path("/etc") / name).exists():
            a += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for name, fd in sorted(fds.etc.items()):
        a += ["--perms", "0444", "--file", str(fd), f"/etc/{name}"]
    a += ["--perms", "0555", "--dir", "/opt/ironclaw"]
    a += ["--perms", "0444", "--file", str(fds.guest_zip), GUEST_ZIP]
    a += ["--perms", "1777", "--size", str(lim.tmp_mib * MiB), "--tmpfs", "/tmp"]
    a += ["--perms", "0755", "--size", str(lim.workspace_mib * MiB), "--tmpfs", WORKSPACE]
    a += ["--symlink", "/tmp", "/var/tmp"]
    for m in spec.mounts:
        a += ["--bind" if m.writable else "--ro-bind", m.source, m.target]
    a += ["--remount-ro", "/"]
    a += ["--seccomp", str(fds.seccomp), "--json-status-fd", str(fds.status)]
    a += ["--chdir", WORKSPACE, "--clearenv"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": WORKSPACE,
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **(extra_env or {}),
        **spec.env,
    }
    for k, v in env.items():
        a += ["--setenv", k, v]
    a += [
        "--",
        "/usr/bin/python3",
        "-I",
        "-S",
        "-B",
        "-c",
        _AGENT_BOOT.format(zip=GUEST_ZIP),
        "--listen-fd",
        str(fds.listen),
        "--workdir",
        WORKSPACE,
    ]
    return a


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# The launcher's last steps as root, as an exec chain rather than a Python preexec hook:
# without a hook, Python starts the child with vfork, which does not copy the
# orchestrator's page tables. (A plain fork of a large process holds its memory-map lock
# for milliseconds, stalling the event loop's thread even when done on another thread.)
#   sh      waits until the parent has put it in the sandbox's cgroups (a "go" line on
#           its stdin, a pipe), then sets the rlimits: all after inherit both;
#   nsenter enters the sandbox's network namespace (when it has one);
#   setpriv drops to the sandbox's host uid, no supplementary groups, and for a one-shot
#           sandbox asks for SIGKILL when the orchestrator goes away.
LAUNCH_SCRIPT = (
    'read -r go && [ "$go" = go ] || exit 97; exec </dev/null; '
    'ulimit -c "$1" && ulimit -n "$2" && ulimit -f "$3" || exit 98; shift 3; exec "$@"'
)


def launch_chain(
    *,
    uid: int,
    limits: list[tuple[int, int, int]],
    netns_path: str | None,
    die_with_parent: bool,
    sh: str = "/bin/sh",
    nsenter: str = "nsenter",
    setpriv: str = "setpriv",
) -> list[str]:
    """The argv prefix that turns root into the sandbox's unprivileged launcher (pure)."""
    values = {res: _clamp(res, soft) for res, soft, _hard in limits}
    core = values.get(resource.RLIMIT_CORE, 0)
    nofile = values.get(resource.RLIMIT_NOFILE, 1024)
    fsize = values.get(resource.RLIMIT_FSIZE, resource.RLIM_INFINITY)
    blocks = "unlimited" if fsize == resource.RLIM_INFINITY else str(max(1, fsize // 512))
    argv = [sh, "-c", LAUNCH_SCRIPT, "ironclaw-launch", str(core), str(nofile), blocks]
    if netns_path is not None:
        argv += [nsenter, f"--net={netns_path}", "--"]
    argv += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if die_with_parent:
        argv += ["--pdeathsig=KILL"]
    argv += ["--"]
    return argv


def _clamp(res: int, value: int) -> int:
    """Never above the current hard limit: raising it needs CAP_SYS_RESOURCE, which hosts
    and containers often withhold even from root."""
    hard = resource.getrlimit(res)[1]
    if hard == resource.RLIM_INFINITY:
        return value
    return hard if value == resource.RLIM_INFINITY else min(value, hard)


class NamespaceBackend:
    """bubblewrap + seccomp + cgroups + network namespace."""

    name = "namespace"

    def __init__(self, *, bwrap: str | None = None, timeout_bin: str | None = None) -> None:
        self.bwrap = bwrap or shutil.which("bwrap") or "/usr/bin/bwrap"
        self.timeout_bin = timeout_bin or shutil.which("timeout") or "/usr/bin/timeout"
        self.nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        # Supervisors this process started, by pid: resolved (and reaped) when they exit.
        self._children: dict[int, asyncio.Future[int]] = {}
        # Spawning happens here; a one-shot sandbox's PDEATHSIG follows this thread, which
        # lives as long as the backend (that is, the process).
        self._spawner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ironclaw-spawn")
        self._tools_ok = False

    async def prepare(self, ctx: LaunchContext) -> None:
        if ctx.spec.image != "host":
            raise BackendError(
                f"image {ctx.spec.image!r} is not available to the namespace backend yet; "
                "use image 'host'"
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._spawner, self._check_host, ctx)

    def _check_host(self, ctx: LaunchContext) -> None:
        """Tools once per backend, mount sources every time (blocking: spawner thread)."""
        if not self._tools_ok:
            if not os.access(self.bwrap, os.X_OK):
                raise BackendError(
                    "bubblewrap is not installed: run `apt-get install bubblewrap` "
                    "(or `ironclaw doctor` for everything this host lacks)"
                )
            for tool in (self.timeout_bin, self.nsenter, self.setpriv):
                if not os.access(tool, os.X_OK):
                    raise BackendError(
                        f"{os.path.basename(tool)} is missing: apt-get install coreutils util-linux"
                    )
            if not os.access("/usr/bin/python3", os.X_OK):
                raise BackendError(
                    "the guest agent needs /usr/bin/python3: apt-get install python3"
                )
            self._tools_ok = True
        for m in ctx.spec.mounts:
            if not os.path.exists(m.source):
                raise BackendError(f"mount source {m.source} does not exist")

    async def start(self, ctx: LaunchContext) -> dict[str, Any]:
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

    def _launch(self, ctx: LaunchContext) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
        """Start the jail (blocking; on the spawner thread). Returns the supervisor."""
        spec = ctx.spec
        hostname = spec.hostname or ctx.sandbox_id
        sock_path = safe_join(ctx.run_dir, "agent.sock")
        status_path = safe_join(ctx.run_dir, "status.json")
        log_path = safe_join(ctx.run_dir, "sandbox.log")
        zip_path = bundle_path(ctx.settings.state_dir)
        allow_inet = ctx.network is not None
        bpf = seccomp_program(ctx.settings.state_dir, spec.seccomp, allow_inet=allow_inet)

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: _Fds | None = None
        go_r = go_w = -1
        cgroup_fds: list[int] = []
        log_fd = -1
        try:
            listener.bind(str(sock_path))
            listener.listen(128)
            fds = _Fds(
                seccomp=_memfd("ironclaw-seccomp", bpf),
                guest_zip=os.open(zip_path, os.O_RDONLY),
                etc={k: _memfd(f"ironclaw-etc-{k}", v) for k, v in etc_files(hostname).items()},
                listen=listener.fileno(),
                status=os.open(status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            )
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            if ctx.cgroup is not None:
                cgroup_fds = ctx.cgroup.attach_fds()
            wall = spec.limits.wall_time_s
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            argv = [
                *launch_chain(
                    uid=ctx.host_uid,
                    limits=rlimits(spec.limits),
                    netns_path=ctx.network.netns_path if ctx.network else None,
                    die_with_parent=ctx.one_shot,
                    nsenter=self.nsenter,
                    setpriv=self.setpriv,
                ),
                self.timeout_bin,
                "--signal=KILL",
                f"{wall:.3f}s" if wall else "0",
                *bwrap_argv(
                    spec,
                    hostname=hostname,
                    fds=fds,
                    share_net=ctx.network is not None,
                    extra_env={**(ctx.network.env if ctx.network else {}), **ctx.extra_env},
                    bwrap=self.bwrap,
                ),
            ]
            proc = subprocess.Popen(
                argv,
                stdin=go_r,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=fds.all(),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            try:
                pid = str(proc.pid).encode()
                for fd in cgroup_fds:
                    os.write(fd, pid)
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{proc.pid}/oom_score_adj", "w") as f,
                ):
                    f.write(str(AGENT_OOM_SCORE_ADJ))  # needs CAP_SYS_RESOURCE
                os.write(go_w, b"go\n")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        finally:
            listener.close()
            if fds is not None:
                fds.close()
            for fd in [go_r, go_w, log_fd, *cgroup_fds]:
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        info: dict[str, Any] = {
            "pid": proc.pid,
            "pid_start": process_start_time(proc.pid),
            "socket": str(sock_path),
            "status_file": str(status_path),
            "log": str(log_path),
            "host_uid": ctx.host_uid,
            "started_at": time.time(),
            "wall_time_s": spec.limits.wall_time_s,
        }
        return proc, info

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

    async def wait_exited(self, info: dict[str, Any]) -> None:
        """Return when the sandbox's supervisor has exited (for readiness races)."""
        exited = self._children.get(int(info["pid"]))
        if exited is not None:
            await asyncio.shield(exited)
            return
        await wait_gone(info.get("pid"), info.get("pid_start"))

    async def open_channel(self, info: dict[str, Any], *, timeout: float = 5.0) -> Connection:
        try:
            return await unix.connect(info["socket"], timeout=timeout)
        except ConnectError as exc:
            raise ConnectError(
                f"cannot reach the agent of this sandbox ({exc}); it may have stopped: "
                "see `ironclaw sandbox ls`"
            ) from exc

    async def stop(self, info: dict[str, Any], *, timeout: float = 2.0) -> None:
        pid, start = info.get("pid"), info.get("pid_start")
        if same_process(pid, start):
            assert isinstance(pid, int)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        exited = self._children.pop(int(pid), None) if pid else None
        deadline = time.monotonic() + timeout
        if exited is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), timeout)
        await wait_gone(pid, start, timeout=max(0.0, deadline - time.monotonic()))

    async def inspect(self, info: dict[str, Any]) -> BackendStatus:
        if same_process(info.get("pid"), info.get("pid_start")):
            return BackendStatus(alive=True)
        return BackendStatus(alive=False, reason=self.exit_reason(info))

    @staticmethod
    def exit_reason(info: dict[str, Any]) -> str:
        """Why a sandbox ended, from bubblewrap's status file and the wall-time limit."""
        status = Path(str(info.get("status_file", "")))
        exit_code: int | None = None
        with contextlib.suppress(OSError, ValueError):
            import json

            for line in status.read_text().splitlines():
                line = line.strip()
                if line:
                    doc = json.loads(line)
                    if "exit-code" in doc:
                        exit_code = int(doc["exit-code"])
        wall = info.get("wall_time_s")
        started = float(info.get("started_at", 0.0))
        if exit_code is None and wall and time.time() - started >= float(wall) - 0.5:
            return "timeout: wall-time limit reached"
        if exit_code is None:
            return "killed"
        return f"exited with code {exit_code}"

    def read_log(self, info: dict[str, Any], limit: int = 4000) -> str:
        try:
            data = Path(str(info["log"])).read_bytes()
        except (OSError, KeyError):
            return ""
        return data[-limit:].decode(errors="replace").strip()


def describe_launch_failure(backend: NamespaceBackend, info: dict[str, Any]) -> IronclawError:
    """Turn bubblewrap's own words into an error that says what to change."""
    log = backend.read_log(info)
    hint = ""
    if "Permission denied" in log and "source path" in log:
        hint = (
            f" A mount source must be readable by the sandbox's host uid {info.get('host_uid')}"
            " (make it world-readable, or copy files in with `ironclaw sandbox cp`)."
        )
    elif "No space left" in log or "user namespace" in log.lower():
        hint = " Unprivileged user namespaces may be disabled: see `ironclaw doctor`."
    return BackendError(f"the sandbox failed to start: {log or 'no output'}.{hint}")
