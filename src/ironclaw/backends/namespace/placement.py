"""The launcher born inside its sandbox's cgroups instead of moved there (cgroup v1).

Moving a process into a cgroup (its pid written to ``cgroup.procs``) takes the kernel's
global threadgroup lock for writing, which first waits for an RCU grace period: 10-15 ms
on a v1 host, the largest host-side cost of a cold start. A thread that moves only
itself (``0`` written to a v1 ``tasks`` file) does not take that lock, and a child it
forks starts in the cgroups the thread is in. So the spawner thread steps into the
sandbox's v1 cgroups, forks the launcher and steps back out; v2 directories (where a
thread cannot live apart from its process) still get the launcher's pid written.

The way back is opened before the thread leaves, so that stepping back needs nothing
that could be missing by then. Where the way back cannot be worked out, there is no
placement and the launch moves the child as before.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path, PurePosixPath

from ironclaw.errors import BackendError
from ironclaw.resources.cgroups import Cgroup, CgroupDir

__all__ = ["ThreadPlacement"]

_TASKS = "tasks"
_CPU = frozenset({"cpu", "cpuacct"})


_Mount = tuple[Path, str, frozenset[str]]  # mount point, root of the mount, options
_mounts: list[_Mount] | None = None
_ESCAPE = re.compile(r"\\([0-7]{3})")


def _v1_mounts() -> list[_Mount]:
    """The v1 cgroup mounts, read once per process (as the cgroup layout is: hosts do not
    remount cgroupfs under a running orchestrator). The root matters in a container that
    sees a bind of its own cgroup at the mount point."""
    global _mounts
    if _mounts is None:
        found: list[_Mount] = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-") if "-" in fields else -1
                if sep < 6 or len(fields) < sep + 4 or fields[sep + 1] != "cgroup":
                    continue
                point, root = (_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[i]) for i in (4, 3))
                found.append((Path(point), root, frozenset(fields[sep + 3].split(","))))
        _mounts = found
    return _mounts


def _own_cgroups() -> list[tuple[frozenset[str], str]]:
    """``(controllers, path)`` of each v1 hierarchy the calling thread belongs to."""
    out: list[tuple[frozenset[str], str]] = []
    with open("/proc/thread-self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if names:
                out.append((frozenset(names.split(",")), path))
    return out


def _write_zero(fd: int) -> None:
    if os.write(fd, b"0") != 1:
        raise OSError("short write")


def _write_zero_at(path: str | os.PathLike[str]) -> None:
    """Move the calling thread into the cgroup whose ``tasks`` file is ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _write_zero(fd)
    finally:
        os.close(fd)


class ThreadPlacement:
    """Steps the calling thread into a sandbox's v1 cgroups and back (see the module)."""

    __slots__ = ("_home", "_inside", "_roots")

    def __init__(self, inside: list[Path], home: list[int], roots: list[Path]) -> None:
        self._inside = inside
        self._home = home
        self._roots = roots

    @staticmethod
    def places(d: CgroupDir, *, cpu: bool = False) -> bool:
        """Whether the thread steps into ``d`` (else the child's pid is written there).

        Not the CPU hierarchy unless ``cpu``: in there the thread runs at the sandbox's CPU
        weight and quota while it holds the GIL for the fork, and a busy host then stalls
        the whole orchestrator behind it (100 parallel creates: 70-150 ms stalls against
        30-45 ms). A single-threaded process with nothing else to run (the one-shot CLI)
        has no such stall, and saves the grace period of moving its child there.
        """
        return d.version == 1 and (cpu or not d.controllers & _CPU)

    @classmethod
    def for_thread(cls, cgroup: Cgroup, *, cpu: bool = False) -> ThreadPlacement | None:
        """The placement for the calling thread, or None if the cgroup has no v1 part or
        the thread's way back cannot be opened."""
        v1 = [d for d in cgroup.dirs if cls.places(d, cpu=cpu)]
        if not v1:
            return None
        home: list[int] = []
        roots: list[Path] = []
        try:
            mounts = _v1_mounts()
            own = _own_cgroups()
            for d in v1:
                point, mount_root = _mount_of(d, [m for m in mounts if d.controllers <= m[2]])
                path = next(p for names, p in own if d.controllers <= names)
                below = PurePosixPath(path).relative_to(mount_root)  # ValueError: not here
                home.append(os.open(point / below / _TASKS, os.O_WRONLY | os.O_CLOEXEC))
                roots.append(point / _TASKS)
        except (OSError, StopIteration, ValueError):
            for fd in home:
                os.close(fd)
            return None
        return cls([d.path / _TASKS for d in v1], home, roots)

    def enter(self) -> None:
        """Move the calling thread into every v1 directory of the sandbox."""
        try:
            for path in self._inside:
                _write_zero_at(path)
        except OSError as exc:
            self.leave()
            raise BackendError(f"cannot enter the sandbox's cgroup ({exc})") from exc

    def leave(self) -> None:
        """Move the calling thread back where it was (its hierarchy's root if that fails).

        Never left behind: a thread of the orchestrator inside a sandbox's cgroup would
        make that cgroup's kill reach the orchestrator.
        """
        failed: list[str] = []
        for fd, root in zip(self._home, self._roots, strict=True):
            try:
                _write_zero(fd)
            except OSError:
                try:
                    _write_zero_at(root)
                except OSError as exc:
                    failed.append(f"{root}: {exc}")
        if failed:
            where = "; ".join(failed)
            raise BackendError(f"the spawner thread could not leave the sandbox cgroups: {where}")

    def close(self) -> None:
        """Close the way back (after :meth:`leave`)."""
        for fd in self._home:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._home, self._roots = [], []


def _mount_of(d: CgroupDir, candidates: list[_Mount]) -> tuple[Path, str]:
    """The mount (of those carrying the directory's controllers) above ``d``."""
    above = [m for m in candidates if d.path.is_relative_to(m[0])]
    if not above:
        raise ValueError(f"no cgroup mount above {d.path}")
    point, root, _ = max(above, key=lambda m: len(m[0].parts))
    return point, root
