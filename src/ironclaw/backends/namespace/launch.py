"""How a namespace jail is launched: the one definition both ways of running one share.

:class:`~.backend.NamespaceBackend` launches a jail whose process is the guest agent;
the one-shot ``ironclaw exec`` (:mod:`ironclaw.cli.oneshot`) launches the same jail with
the user's command as its process instead. Everything that makes the jail (the exec
chain's cgroups, rlimits, network namespace and uid drop, the ``timeout`` supervisor,
bubblewrap's argv, the seccomp program from the cache, the synthetic ``/etc`` and the
hostname) is built here, once, by :func:`launch`; the two callers differ only in the
payload (:class:`Payload`) and in how the process is started (``subprocess.Popen`` on the
backend's spawner thread; :func:`spawn_here`, ``os.posix_spawn``, in the CLI, which cannot
afford to import subprocess). Standard library and the resources layer only: no asyncio
at import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from ironclaw.backends.namespace.cmdline import (
    JailFds,
    PlainRecord,
    bwrap_argv,
    etc_files,
    launch_chain,
)
from ironclaw.backends.namespace.placement import ThreadPlacement
from ironclaw.config import safe_join
from ironclaw.errors import BackendError
from ironclaw.policy.knobs import rlimits
from ironclaw.resources.cgroupfs import Cgroup
from ironclaw.resources.procs import process_start_time
from ironclaw.resources.seccomp_cache import seccomp_program

if TYPE_CHECKING:
    from typing import Protocol

    class Process(Protocol):
        """The started launcher: ``subprocess.Popen`` or :class:`SpawnedChild`."""

        @property
        def pid(self) -> int: ...
        def kill(self) -> None: ...
        def wait(self) -> int: ...


__all__ = [
    "AGENT_OOM_SCORE_ADJ",
    "COMMAND_OOM_SCORE_ADJ",
    "Jail",
    "JailRecord",
    "Payload",
    "SpawnedChild",
    "Tools",
    "launch",
    "spawn_here",
]

#: Memory pressure kills the command, not the agent: the agent's floor is set here,
#: commands raise theirs (see ironclaw.guest.agent), to this.
AGENT_OOM_SCORE_ADJ = -500
COMMAND_OOM_SCORE_ADJ = 1000
#: The launcher's own environment (the jail's is set by bubblewrap's ``--setenv``).
LAUNCH_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class JailRecord(TypedDict):
    """What the registry keeps of a launched jail: the fields of the backend's
    ``NamespaceInfo`` (its supervisor, ``pid``, with its start time, and its files).
    A TypedDict rather than that record: the one-shot CLI writes it without loading
    the backends' base module (its records and protocols cost start-up time)."""

    pid: int
    pid_start: int | None
    started_at: float
    socket: str
    status_file: str
    log: str
    host_uid: int
    wall_time_s: float | None


def _which(name: str, default: str) -> str:
    """``shutil.which`` without importing shutil (it loads compression modules)."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return default


class Tools(PlainRecord):
    """The host programs a launch runs, found once per process."""

    bwrap: str
    timeout: str
    nsenter: str
    setpriv: str

    @classmethod
    def find(cls, *, bwrap: str | None = None, timeout_bin: str | None = None) -> Tools:
        return cls(
            bwrap=bwrap or _which("bwrap", "/usr/bin/bwrap"),
            timeout=timeout_bin or _which("timeout", "/usr/bin/timeout"),
            nsenter=_which("nsenter", "/usr/bin/nsenter"),
            setpriv=_which("setpriv", "/usr/bin/setpriv"),
        )

    def check(self, *, agent: bool) -> None:
        """Raise what to install when one is missing (``agent``: its interpreter too)."""
        if not os.access(self.bwrap, os.X_OK):
            raise BackendError(
                "bubblewrap is not installed: run `apt-get install bubblewrap` "
                "(or `ironclaw doctor` for everything this host lacks)"
            )
        for tool in (self.timeout, self.nsenter, self.setpriv):
            if not os.access(tool, os.X_OK):
                raise BackendError(
                    f"{os.path.basename(tool)} is missing: apt-get install coreutils util-linux"
                )
        if agent and not os.access("/usr/bin/python3", os.X_OK):
            raise BackendError("the guest agent needs /usr/bin/python3: apt-get install python3")


class Jail(PlainRecord):
    """One jail to launch, as its creator prepared it (registry slot, cgroup, network).

    ``spec`` is a ``SandboxSpec`` or the one-shot's pydantic-free ``LightSpec`` (which has
    every attribute read here).
    """

    spec: Any
    sandbox_id: str
    host_uid: int
    run_dir: Path
    state_dir: Path
    one_shot: bool
    cgroup: Cgroup | None = None
    netns_path: str | None = None
    extra_env: dict[str, str] | None = None

    @property
    def hostname(self) -> str:
        return str(self.spec.hostname or self.sandbox_id)

    @property
    def status_path(self) -> Path:
        """bubblewrap's ``--json-status-fd`` lines: the payload's exit code at the end."""
        return safe_join(self.run_dir, "status.json")


class Payload(PlainRecord):
    """What runs in the jail and where its output goes.

    ``argv`` None is the guest agent, serving ``listen`` with its code from ``guest_zip``.
    """

    stdout: int
    stderr: int
    oom_score_adj: int
    argv: list[str] | None = None
    guest_zip: Path | None = None
    listen: int | None = None


P = TypeVar("P", bound="Process")
#: Starts the launcher: argv, (stdin, stdout, stderr), descriptors it must inherit, and
#: its environment; always in a new session (not the caller's terminal's group).
Spawn = Callable[[list[str], tuple[int, int, int], list[int], dict[str, str]], P]


class SpawnedChild:
    """The launcher started with ``posix_spawn`` (the shape ``subprocess.Popen`` has)."""

    __slots__ = ("_status", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._status: int | None = None

    def kill(self) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self._status is None:
            self._status = os.waitpid(self.pid, 0)[1]
        return os.waitstatus_to_exitcode(self._status)


def _above_stdio(fd: int) -> int:
    """``fd`` itself, or a copy numbered 3 or more (a closed stdin made it 0)."""
    if fd > 2:
        return fd
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)


def spawn_here(
    argv: list[str], stdio: tuple[int, int, int], pass_fds: list[int], env: dict[str, str]
) -> SpawnedChild:
    """A :data:`Spawn` for a single-threaded caller: ``posix_spawn`` (vfork semantics,
    and no subprocess import, which the one-shot CLI cannot afford).

    Only ``pass_fds`` and the three stdio descriptors reach the launcher: every other
    descriptor of this process is marked close-on-exec first, as ``close_fds=True``
    would close them, inherited ones included. That flips flags process-wide, hence
    single-threaded callers only (the backend's spawner thread uses Popen).
    """
    keep = set(pass_fds)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                os.set_inheritable(fd, False)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    src = [_above_stdio(fd) for fd in stdio]
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(src)]
    try:
        pid = os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores them; commands not
        )
    finally:
        for new, old in zip(src, stdio, strict=True):
            if new != old:
                os.close(new)
    return SpawnedChild(pid)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def launch(
    jail: Jail, tools: Tools, payload: Payload, spawn: Spawn[P], *, place_cpu: bool = False
) -> tuple[P, JailRecord]:
    """Start the jail (blocking): the launcher, placed in the jail's cgroups, told to go.

    Returns the launcher, which becomes the supervisor (``timeout``), and the record the
    registry keeps. On a failure nothing is left running. ``place_cpu``: the calling
    thread steps into the v1 CPU hierarchy too (see :meth:`.ThreadPlacement.places`).
    """
    spec = jail.spec
    status_path = jail.status_path
    bpf = seccomp_program(jail.state_dir, spec.seccomp, allow_inet=jail.netns_path is not None)
    fds: JailFds | None = None
    go_r = go_w = -1
    cgroup_fds: list[int] = []
    placement: ThreadPlacement | None = None
    try:
        etc = {k: _memfd(f"ironclaw-etc-{k}", v) for k, v in etc_files(jail.hostname).items()}
        zip_path = payload.guest_zip
        fds = JailFds(
            seccomp=_memfd("ironclaw-seccomp", bpf),
            etc=etc,
            status=os.open(status_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            guest_zip=None if zip_path is None else os.open(zip_path, os.O_RDONLY),
            listen=payload.listen,
        )
        if jail.cgroup is not None:
            # v1 directories by birth (this thread steps in for the fork), the rest
            # (v2, or v1 when the way back is unknown) by writing the child's pid.
            placement = ThreadPlacement.for_thread(jail.cgroup, cpu=place_cpu)
            moved = jail.cgroup.dirs
            if placement is not None:
                moved = tuple(d for d in moved if not placement.places(d, cpu=place_cpu))
            cgroup_fds = Cgroup(jail.cgroup.sandbox_id, moved).attach_fds()
        wall = spec.limits.wall_time_s
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        argv = [
            *launch_chain(
                uid=jail.host_uid,
                limits=rlimits(spec.limits),
                netns_path=jail.netns_path,
                die_with_parent=jail.one_shot,
                nsenter=tools.nsenter,
                setpriv=tools.setpriv,
            ),
            tools.timeout,
            "--signal=KILL",
            f"{wall:.3f}s" if wall else "0",
            *bwrap_argv(
                spec,
                hostname=jail.hostname,
                fds=fds,
                share_net=jail.netns_path is not None,
                extra_env=jail.extra_env,
                bwrap=tools.bwrap,
                payload=payload.argv,
            ),
        ]
        stdio = (go_r, payload.stdout, payload.stderr)
        proc = _spawn(spawn, argv, stdio, fds.all(), placement)
        try:
            pid = str(proc.pid).encode()
            for fd in cgroup_fds:
                os.write(fd, pid)
            with (
                contextlib.suppress(OSError),
                open(f"/proc/{proc.pid}/oom_score_adj", "w") as f,
            ):
                f.write(str(payload.oom_score_adj))  # lowering it needs CAP_SYS_RESOURCE
            os.write(go_w, b"go\n")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        if placement is not None:
            placement.close()
        if fds is not None:
            fds.close()
        for fd in [go_r, go_w, *cgroup_fds]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
    record = JailRecord(
        pid=proc.pid,
        pid_start=process_start_time(proc.pid),
        started_at=time.time(),
        socket=str(safe_join(jail.run_dir, "agent.sock")),
        status_file=str(status_path),
        log=str(safe_join(jail.run_dir, "sandbox.log")),
        host_uid=jail.host_uid,
        wall_time_s=spec.limits.wall_time_s,
    )
    return proc, record


def _spawn(
    spawn: Spawn[P],
    argv: list[str],
    stdio: tuple[int, int, int],
    pass_fds: list[int],
    placement: ThreadPlacement | None,
) -> P:
    """``spawn``, with the calling thread inside the sandbox's v1 cgroups for the fork."""
    if placement is None:
        return spawn(argv, stdio, pass_fds, dict(LAUNCH_ENV))
    placement.enter()
    try:
        proc = spawn(argv, stdio, pass_fds, dict(LAUNCH_ENV))
    except BaseException:
        placement.leave()
        raise
    try:
        placement.leave()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc
