"""Per-sandbox cgroups: memory, pids and cpu limits, accounting, and a reliable kill.

One cgroup per sandbox per hierarchy at ``<mount>/<root_name>/<sandbox_id>``. Hosts differ:
cgroup v1 mounts one hierarchy per controller (or a few together), pure v2 has a single
tree, hybrids have both. :meth:`CgroupManager.layout` reads ``/proc/self/mountinfo`` and
picks, per controller, the hierarchy that actually carries it (a controller lives on at
most one), so all three shapes run the same code.

The launcher attaches a child *before* exec by writing its pid into file descriptors the
parent opened (:meth:`Cgroup.attach_fds`): the child may already have dropped the privilege
to open cgroupfs files, and the kernel checks the opener's credentials. Nothing in a
sandbox can escape by racing the exec.

Killing is done against the cgroup, never against a pid list remembered elsewhere: v2
writes ``cgroup.kill``; v1 freezes the freezer cgroup so nothing can fork or exit while we
look, SIGKILLs every member through a pidfd (so a recycled pid is never hit), then thaws.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError, SandboxNotFound
from ironclaw.ids import ID_PATTERN, validate_sandbox_id
from ironclaw.policy.limits import (
    OPTIONAL_FILES,
    ResourceLimits,
    cgroup_v1_settings,
    cgroup_v2_settings,
)

__all__ = [
    "OPTIONAL_CONTROLLERS",
    "REQUIRED_CONTROLLERS",
    "Cgroup",
    "CgroupDir",
    "CgroupLayout",
    "CgroupManager",
    "CgroupStats",
    "Hierarchy",
    "detect_layout",
    "parse_mountinfo",
]

#: Without these the sandbox's limits could not be enforced, so create() refuses.
REQUIRED_CONTROLLERS: Final = ("memory", "pids", "cpu")
#: v1 only: cpuacct for cpu time, freezer for a race-free kill. v2 has both built in.
OPTIONAL_CONTROLLERS: Final = ("cpuacct", "freezer")
_WANTED: Final = REQUIRED_CONTROLLERS + OPTIONAL_CONTROLLERS
_V2_BUILTIN: Final = frozenset({"cpuacct", "freezer"})
_PROCS: Final = "cgroup.procs"


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup tree and the controllers we use from it."""

    version: Literal[1, 2]
    mount: Path
    controllers: frozenset[str]


@dataclass(frozen=True)
class CgroupLayout:
    """What this host offers: controller -> hierarchy, and why the rest is unusable."""

    controllers: dict[str, Hierarchy]
    unusable: dict[str, str]

    @property
    def hierarchies(self) -> tuple[Hierarchy, ...]:
        """The distinct hierarchies in use, in a stable order."""
        seen: dict[Path, Hierarchy] = {}
        for name in _WANTED:
            h = self.controllers.get(name)
            if h is not None:
                seen.setdefault(h.mount, h)
        return tuple(seen.values())

    @property
    def mode(self) -> Literal["v1", "v2", "hybrid", "none"]:
        versions = {h.version for h in self.hierarchies}
        if not versions:
            return "none"
        if versions == {1}:
            return "v1"
        return "v2" if versions == {2} else "hybrid"

    @property
    def missing_required(self) -> dict[str, str]:
        return {c: self.unusable[c] for c in REQUIRED_CONTROLLERS if c in self.unusable}

    @property
    def usable(self) -> bool:
        return not self.missing_required


@dataclass(frozen=True)
class CgroupDir:
    """One sandbox's directory in one hierarchy."""

    version: Literal[1, 2]
    path: Path
    controllers: frozenset[str]


@dataclass(frozen=True)
class CgroupStats:
    """Counters since the cgroup was created; the v1/v2 source file is named per field."""

    oom_kills: int  # v1 memory.oom_control oom_kill; v2 memory.events oom_kill
    memory_failcnt: int  # limit hits: v1 memory{,.memsw}.failcnt; v2 memory.events max
    memory_current_bytes: int  # v1 memory.usage_in_bytes; v2 memory.current
    memory_peak_bytes: int | None  # v1 memory.max_usage_in_bytes; v2 memory.peak (5.19+)
    pids_max_hits: int  # forks refused at pids.max: pids.events max
    pids_current: int  # pids.current
    cpu_usage_ns: int  # v1 cpuacct.usage; v2 cpu.stat usage_usec * 1000


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class _Mount:
    fstype: str
    mount_point: Path
    super_options: frozenset[str]
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts in ``/proc/<pid>/mountinfo`` text, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mount_opts = set(fields[5].split(","))
        super_opts = frozenset(fields[sep + 3].split(","))
        mounts.append(
            _Mount(
                fstype=fstype,
                mount_point=Path(_unescape(fields[4])),
                super_options=super_opts,
                read_only="ro" in mount_opts or "ro" in super_opts,
            )
        )
    return mounts


def detect_layout(mountinfo_text: str) -> CgroupLayout:
    """Map each controller we want to the hierarchy that carries it, with reasons for gaps.

    v1 wins for a controller bound to a v1 hierarchy (the kernel then hides it from v2);
    otherwise the controller must be listed in the cgroup2 mount's ``cgroup.controllers``.
    """
    controllers: dict[str, Hierarchy] = {}
    unusable: dict[str, str] = {}
    mounts = parse_mountinfo(mountinfo_text)
    v2_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2_available: frozenset[str] = frozenset()
    if v2_mount is not None:
        try:
            v2_available = frozenset(
                (v2_mount.mount_point / "cgroup.controllers").read_text().split()
            )
        except OSError:
            v2_available = frozenset()

    for name in _WANTED:
        v1 = next((m for m in mounts if m.fstype == "cgroup" and name in m.super_options), None)
        if v1 is not None:
            if v1.read_only:
                unusable[name] = f"cgroup v1 hierarchy {v1.mount_point} is mounted read-only"
                continue
            bound = frozenset(o for o in v1.super_options if o in _WANTED)
            controllers[name] = Hierarchy(1, v1.mount_point, bound)
            continue
        if v2_mount is None:
            unusable[name] = "no cgroup v1 hierarchy carries it and no cgroup2 is mounted"
        elif v2_mount.read_only:
            unusable[name] = f"cgroup2 at {v2_mount.mount_point} is mounted read-only"
        elif name in _V2_BUILTIN or name in v2_available:
            continue  # assigned below, once the v2 set is known
        else:
            unusable[name] = (
                f"not bound to a cgroup v1 hierarchy and not in {v2_mount.mount_point}"
                "/cgroup.controllers (bound elsewhere, or disabled on the kernel command line)"
            )

    if v2_mount is not None and not v2_mount.read_only:
        v2_names = frozenset(n for n in _WANTED if n not in controllers and n not in unusable)
        # cpuacct/freezer are only worth a v2 directory if a real v2 controller is there.
        if v2_names - _V2_BUILTIN:
            v2 = Hierarchy(2, v2_mount.mount_point, v2_names)
            for n in v2_names:
                controllers[n] = v2
        else:
            for n in v2_names:
                unusable[n] = "no controller of ours is on cgroup2 here; v1 has no such hierarchy"
    return CgroupLayout(controllers=controllers, unusable=unusable)


# --------------------------------------------------------------------------- file helpers


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


# --------------------------------------------------------------------------- Cgroup


@dataclass(frozen=True)
class Cgroup:
    """One sandbox's cgroups, one directory per hierarchy in use."""

    sandbox_id: str
    dirs: tuple[CgroupDir, ...]
    #: settings the kernel lacked and were skipped (e.g. memsw without swap accounting)
    skipped: tuple[str, ...] = field(default=())

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
        oom_kills = failcnt = current = pids_hits = pids_current = cpu_ns = 0
        peak: int | None = None
        if mem is not None and mem.version == 1:
            oom_kills = _read_keyed(mem.path / "memory.oom_control").get("oom_kill", 0)
            # With memsw == limit the memory+swap counter trips first and counts there.
            failcnt = sum(
                _read_int(mem.path / f) or 0 for f in ("memory.failcnt", "memory.memsw.failcnt")
            )
            current = _read_int(mem.path / "memory.usage_in_bytes") or 0
            peak = _read_int(mem.path / "memory.max_usage_in_bytes")
        elif mem is not None:
            events = _read_keyed(mem.path / "memory.events")
            oom_kills, failcnt = events.get("oom_kill", 0), events.get("max", 0)
            current = _read_int(mem.path / "memory.current") or 0
            peak = _read_int(mem.path / "memory.peak")
        if pids is not None:
            pids_hits = _read_keyed(pids.path / "pids.events").get("max", 0)
            pids_current = _read_int(pids.path / "pids.current") or 0
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


# --------------------------------------------------------------------------- manager

#: Weight of IronClaw's root cgroup against its siblings (v1 default 1024, v2 default 100).
ROOT_CPU_SHARES: Final = 256
ROOT_CPU_WEIGHT: Final = 25


class CgroupManager:
    """Creates, finds and destroys sandbox cgroups below ``<mount>/<root_name>``."""

    def __init__(
        self, root_name: str = "ironclaw", *, mountinfo: Path = Path("/proc/self/mountinfo")
    ) -> None:
        if ID_PATTERN.fullmatch(root_name) is None:
            raise ConfigError(f"invalid cgroup root name {root_name!r}")
        self.root_name = root_name
        self._mountinfo = mountinfo
        self._layout: CgroupLayout | None = None

    def layout(self) -> CgroupLayout:
        """Detected once per manager; hosts do not remount cgroupfs under a running daemon."""
        if self._layout is None:
            try:
                text = self._mountinfo.read_text()
            except OSError as exc:
                raise BackendError(f"cannot read {self._mountinfo}: {exc}") from exc
            self._layout = detect_layout(text)
        return self._layout

    # The only two calls that change cgroupfs structure; the kernel fills a new directory
    # with its interface files. A test double for a cgroupfs that cannot be mounted here
    # (v2 on a v1 host) overrides these two, nothing else.
    def _mkdir(self, path: Path, *, exist_ok: bool) -> None:
        path.mkdir(mode=0o755, exist_ok=exist_ok)

    def _rmdir(self, path: Path) -> None:
        path.rmdir()

    def _root(self, h: Hierarchy) -> Path:
        return safe_join(h.mount, self.root_name)

    def _plan(self, sandbox_id: str) -> tuple[CgroupDir, ...]:
        validate_sandbox_id(sandbox_id)
        layout = self.layout()
        return tuple(
            CgroupDir(h.version, safe_join(self._root(h), sandbox_id), h.controllers)
            for h in layout.hierarchies
        )

    # -- create

    async def create(self, sandbox_id: str, limits: ResourceLimits) -> Cgroup:
        """Make the sandbox's cgroups and apply ``limits``; all or nothing.

        Refuses an id that already has a cgroup in any hierarchy: that is a sandbox still
        running or the remains of one that crashed, and :meth:`destroy` clears it.
        """
        dirs = self._plan(sandbox_id)
        missing = self.layout().missing_required
        if missing:
            why = "; ".join(f"{c}: {r}" for c, r in missing.items())
            raise BackendError(f"cgroups cannot enforce limits on this host ({why})")
        return await asyncio.to_thread(self._create_sync, sandbox_id, dirs, limits)

    def _create_sync(
        self, sandbox_id: str, dirs: tuple[CgroupDir, ...], limits: ResourceLimits
    ) -> Cgroup:
        stale = [str(d.path) for d in dirs if d.path.exists()]
        if stale:
            raise BackendError(
                f"cgroup for sandbox {sandbox_id!r} already exists ({', '.join(stale)}): "
                "a running sandbox or the remains of a crashed one; destroy it first"
            )
        created: list[Path] = []
        skipped: list[str] = []
        try:
            for d in dirs:
                self._prepare_root(d)
                try:
                    self._mkdir(d.path, exist_ok=False)
                except FileExistsError:
                    raise BackendError(f"cgroup {d.path} appeared concurrently") from None
                except OSError as exc:
                    raise BackendError(f"cannot create cgroup {d.path}: {exc}") from exc
                created.append(d.path)
                skipped += self._apply(d, limits)
        except BaseException:
            for path in reversed(created):
                with contextlib.suppress(OSError):
                    self._rmdir(path)
            raise
        return Cgroup(sandbox_id, dirs, tuple(skipped))

    def _prepare_root(self, d: CgroupDir) -> None:
        root = d.path.parent
        try:
            self._mkdir(root, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"cannot create cgroup root {root}: {exc}") from exc
        if d.version == 2:
            # Controllers must be enabled in every ancestor's subtree_control.
            wanted = sorted(d.controllers - _V2_BUILTIN)
            for parent in (root.parent, root):
                try:
                    enabled = set((parent / "cgroup.subtree_control").read_text().split())
                except OSError as exc:
                    raise BackendError(
                        f"cannot read {parent}/cgroup.subtree_control: {exc}"
                    ) from exc
                todo = [c for c in wanted if c not in enabled]
                if todo:
                    _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))
        # All sandboxes together weigh a quarter of a default task group against the rest
        # of the host, so a burst of sandbox start-ups cannot starve the orchestrator's
        # event loop (each sandbox's own quota still caps it individually).
        for name, value in (("cpu.shares", ROOT_CPU_SHARES), ("cpu.weight", ROOT_CPU_WEIGHT)):
            path = root / name
            if "cpu" in d.controllers and path.exists():
                with contextlib.suppress(BackendError):
                    _write(path, str(value))

    def _apply(self, d: CgroupDir, limits: ResourceLimits) -> list[str]:
        """Write the limits for this directory's controllers; returns skipped optional files."""
        if d.version == 2:
            plan = list(cgroup_v2_settings(limits).items())
        else:
            v1 = cgroup_v1_settings(limits)
            plan = [(f, v) for c in sorted(d.controllers) for f, v in v1.get(c, {}).items()]
        skipped = []
        for name, value in plan:
            path = d.path / name
            if name in OPTIONAL_FILES and not path.exists():
                skipped.append(name)
                continue
            _write(path, value)
        return skipped

    async def update(self, sandbox_id: str, limits: ResourceLimits) -> None:
        """Apply new limits to a live sandbox (a warm-pool sandbox taking its real limits)."""
        cg = self.open(sandbox_id)
        await asyncio.to_thread(self._update_sync, cg, limits)

    def _update_sync(self, cg: Cgroup, limits: ResourceLimits) -> None:
        for d in cg.dirs:
            if d.version == 1 and "memory" in d.controllers:
                # v1 requires memsw >= limit at every step, whichever way the limit moves:
                # memsw first (may be refused when shrinking), limit, then memsw again.
                memsw = d.path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    with contextlib.suppress(BackendError):
                        _write(memsw, str(limits.memory_bytes))
            self._apply(d, limits)

    # -- find

    def open(self, sandbox_id: str) -> Cgroup:
        """The existing cgroups of ``sandbox_id`` (for a process that did not create them)."""
        dirs = tuple(d for d in self._plan(sandbox_id) if d.path.is_dir())
        if not dirs:
            raise SandboxNotFound(f"no cgroup for sandbox {sandbox_id!r}")
        return Cgroup(sandbox_id, dirs)

    def list_owned(self) -> list[str]:
        """Sandbox ids that have a cgroup in any hierarchy now (from the filesystem)."""
        ids: set[str] = set()
        for h in self.layout().hierarchies:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self._root(h)):
                    if entry.is_dir(follow_symlinks=False) and ID_PATTERN.fullmatch(entry.name):
                        ids.add(entry.name)
        return sorted(ids)

    def remove_root(self) -> None:
        """Remove the empty ``<mount>/<root_name>`` directories (uninstall, test cleanup)."""
        for h in self.layout().hierarchies:
            try:
                self._rmdir(self._root(h))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise BackendError(f"cannot remove {self._root(h)}: {exc}") from exc

    # -- destroy

    async def destroy(self, sandbox_id: str, *, wait_s: float = 10.0) -> None:
        """Kill everything in the sandbox's cgroups, wait until empty, remove them.

        Idempotent: an id without cgroups is done already. Raises :class:`BackendError`
        if processes survive ``wait_s`` seconds (e.g. stuck in uninterruptible sleep).
        """
        dirs = tuple(d for d in self._plan(sandbox_id) if d.path.is_dir())
        if not dirs:
            return
        cg = Cgroup(sandbox_id, dirs)
        deadline = time.monotonic() + wait_s
        await self._kill_all(cg, deadline)
        delay = 0.002
        while True:
            left = await asyncio.to_thread(self._try_remove, dirs)
            if not left:
                return
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"sandbox {sandbox_id!r}: cgroups still busy after {wait_s:.1f}s "
                    f"(pids {cg.pids()}, dirs {', '.join(map(str, left))})"
                )
            _kill_members(cg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _kill_all(self, cg: Cgroup, deadline: float) -> None:
        v2 = next((d for d in cg.dirs if d.version == 2), None)
        if v2 is not None and (v2.path / "cgroup.kill").exists():
            _write(v2.path / "cgroup.kill", "1")  # kills the whole subtree (Linux 5.14+)
        freezer = cg.dir_for("freezer")
        frozen: Path | None = None
        if (
            freezer is not None
            and freezer.version == 1
            and cg.pids()
            and await _freeze_v1(freezer.path, deadline)
        ):
            frozen = freezer.path / "freezer.state"
        try:
            _kill_members(cg)
        finally:
            if frozen is not None:
                _write(frozen, "THAWED")
        delay = 0.002
        while cg.pids() and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            _kill_members(cg)  # stragglers forked before the freeze / without one

    def _try_remove(self, dirs: Iterable[CgroupDir]) -> list[Path]:
        """rmdir every directory, children first; returns those still present."""
        left: list[Path] = []
        for d in dirs:
            for sub in _walk_bottom_up(d.path):
                try:
                    self._rmdir(sub)
                except FileNotFoundError:
                    continue
                except OSError:
                    left.append(sub)
        return left


async def _freeze_v1(path: Path, deadline: float) -> bool:
    """Freeze, waiting (bounded) until the kernel reports FROZEN; False if it never did."""
    state = path / "freezer.state"
    _write(state, "FROZEN")
    delay = 0.001
    while time.monotonic() < deadline:
        try:
            if state.read_text().strip() == "FROZEN":
                return True
        except FileNotFoundError:
            return False
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    _write(state, "THAWED")
    return False


def _kill_members(cg: Cgroup) -> None:
    """SIGKILL each member through a pidfd that is proven to belong to the cgroup.

    Opening the pidfd first and re-reading the member list second means a pid that was
    recycled in between either shows up as not a member, or the pidfd points at the dead
    original and the signal goes nowhere.
    """
    pidfds: dict[int, int] = {}
    try:
        for pid in cg.pids():
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        members = set(cg.pids())
        for pid, fd in pidfds.items():
            if pid in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd in pidfds.values():
            os.close(fd)
