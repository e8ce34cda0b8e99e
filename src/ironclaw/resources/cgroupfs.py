"""One sandbox's cgroup directories and what is read from or written to their files.

The files differ between v1 and v2 (``memory.oom_control`` or ``memory.events``...);
:class:`Cgroup` reads whichever its directory's version has.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Literal, NamedTuple

from ironclaw.errors import BackendError
from ironclaw.resources.cgroup_layout import Hierarchy

_PROCS: Final = "cgroup.procs"


class CgroupDir(NamedTuple):
    """One sandbox's directory in one hierarchy; version and controllers are the
    hierarchy's."""

    hierarchy: Hierarchy
    path: Path

    @property
    def version(self) -> Literal[1, 2]:
        return self.hierarchy.version

    @property
    def controllers(self) -> frozenset[str]:
        return self.hierarchy.controllers


class CgroupStats(NamedTuple):
    """Counters since the cgroup was created; the v1/v2 source file is named per field."""

    oom_kills: int  # v1 memory.oom_control oom_kill; v2 memory.events oom_kill
    memory_failcnt: int  # limit hits: v1 memory{,.memsw}.failcnt; v2 memory.events max
    memory_current_bytes: int  # v1 memory.usage_in_bytes; v2 memory.current
    memory_peak_bytes: int | None  # v1 memory.max_usage_in_bytes; v2 memory.peak (5.19+)
    pids_max_hits: int  # forks refused at pids.max: pids.events max
    pids_current: int  # pids.current
    cpu_usage_ns: int  # v1 cpuacct.usage; v2 cpu.stat usage_usec * 1000


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise BackendError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _read_ints(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []  # the cgroup went away under us: it holds nothing


def _read_keyed(path: Path) -> dict[str, int]:
    """Flat-keyed files such as ``memory.events`` or ``pids.events``: ``key value`` lines."""
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


def _walk_bottom_up(top: Path) -> Iterator[Path]:
    """``top`` and every cgroup below it, children first (the order rmdir needs)."""
    try:
        entries = list(os.scandir(top))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_bottom_up(Path(entry.path))
    yield top


class Cgroup(NamedTuple):
    """One sandbox's cgroups, one directory per hierarchy in use."""

    sandbox_id: str
    dirs: tuple[CgroupDir, ...]
    #: settings the kernel lacked and were skipped (e.g. memsw without swap accounting)
    skipped: tuple[str, ...] = ()

    def dir_for(self, controller: str) -> CgroupDir | None:
        return next((d for d in self.dirs if controller in d.controllers), None)

    def attach_fds(self) -> list[int]:
        """Open each ``cgroup.procs`` for writing, in the parent, close-on-exec.

        The launcher's child writes its own pid (``str(os.getpid()).encode()``) to every fd
        before exec; close-on-exec keeps them out of the sandbox, and the parent closes
        its copies once the child is started. Opening here, as root, matters: the kernel
        checks the opener's credentials, not the writer's, and the child may already
        run as an unprivileged uid.
        """
        fds: list[int] = []
        try:
            for d in self.dirs:
                fds.append(os.open(d.path / _PROCS, os.O_WRONLY | os.O_CLOEXEC))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"cannot open {_PROCS} of {self.sandbox_id}: {exc}") from exc
        return fds

    def pids(self) -> list[int]:
        """Every process in any of the sandbox's cgroups (including nested ones)."""
        found: set[int] = set()
        for d in self.dirs:
            for sub in _walk_bottom_up(d.path):
                found.update(_read_ints(sub / _PROCS))
        return sorted(found)

    def limit_hits(self) -> tuple[int, int]:
        """``(oom_kills, pids_max_hits)`` only: two small reads, cheap enough to take
        around every command so its status can say which limit it hit."""
        mem, pids = self.dir_for("memory"), self.dir_for("pids")
        oom = 0
        if mem is not None:
            name = "memory.oom_control" if mem.version == 1 else "memory.events"
            oom = _read_keyed(mem.path / name).get("oom_kill", 0)
        hits = _read_keyed(pids.path / "pids.events").get("max", 0) if pids is not None else 0
        return oom, hits

    def stats(self) -> CgroupStats:
        mem, pids = self.dir_for("memory"), self.dir_for("pids")
        cpu = self.dir_for("cpuacct") or self.dir_for("cpu")
        oom_kills, pids_hits = self.limit_hits()
        failcnt = current = cpu_ns = 0
        peak: int | None = None
        if mem is not None and mem.version == 1:
            # With memsw == limit the memory+swap counter trips first and counts there.
            failcnt = sum(
                _read_int(mem.path / f) or 0 for f in ("memory.failcnt", "memory.memsw.failcnt")
            )
            current = _read_int(mem.path / "memory.usage_in_bytes") or 0
            peak = _read_int(mem.path / "memory.max_usage_in_bytes")
        elif mem is not None:
            failcnt = _read_keyed(mem.path / "memory.events").get("max", 0)
            current = _read_int(mem.path / "memory.current") or 0
            peak = _read_int(mem.path / "memory.peak")
        pids_current = (_read_int(pids.path / "pids.current") or 0) if pids is not None else 0
        if cpu is not None and cpu.version == 1 and "cpuacct" in cpu.controllers:
            cpu_ns = _read_int(cpu.path / "cpuacct.usage") or 0
        elif cpu is not None and cpu.version == 2:
            cpu_ns = _read_keyed(cpu.path / "cpu.stat").get("usage_usec", 0) * 1000
        return CgroupStats(
            oom_kills=oom_kills,
            memory_failcnt=failcnt,
            memory_current_bytes=current,
            memory_peak_bytes=peak,
            pids_max_hits=pids_hits,
            pids_current=pids_current,
            cpu_usage_ns=cpu_ns,
        )
