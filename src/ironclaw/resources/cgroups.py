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

This module is the manager; host detection is in :mod:`.cgroup_layout`, a sandbox's
directories and their files in :mod:`.cgroupfs`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ironclaw.config import safe_join
from ironclaw.errors import BackendError, ConfigError, SandboxNotFound
from ironclaw.ids import ID_PATTERN, validate_sandbox_id
from ironclaw.policy.knobs import OPTIONAL_FILES, cgroup_v1_settings, cgroup_v2_settings

from .cgroup_layout import (
    _V2_BUILTIN,
    OPTIONAL_CONTROLLERS,
    REQUIRED_CONTROLLERS,
    CgroupLayout,
    Hierarchy,
    detect_layout,
    parse_mountinfo,
)

# The cgroupfs helpers (the ``as`` ones too) stay reachable here under their old names,
# for manager code written against the single module this was.
from .cgroupfs import _PROCS as _PROCS
from .cgroupfs import (
    Cgroup,
    CgroupDir,
    CgroupStats,
    _walk_bottom_up,
    _write,
)
from .cgroupfs import _read_int as _read_int
from .cgroupfs import _read_ints as _read_ints
from .cgroupfs import _read_keyed as _read_keyed

if TYPE_CHECKING:  # the model is pydantic: a one-shot launch does without it
    import asyncio  # the async methods import it where they run: the one-shot CLI has no loop

    from ironclaw.policy.limits import ResourceLimits

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
    "limit_status",
    "parse_mountinfo",
]

#: Weight of IronClaw's root cgroup against its siblings (v1 default 1024, v2 default 100).
ROOT_CPU_SHARES: Final = 256
ROOT_CPU_WEIGHT: Final = 25


def limit_status(cg: Cgroup, before: tuple[int, int]) -> str | None:
    """The limit a command ran into, as an exec result's ``status`` names it, or None.

    ``before`` is ``cg.limit_hits()`` taken as the command started; the agent path and
    the direct one-shot both report through this.
    """
    oom, pids = cg.limit_hits()
    if oom > before[0]:
        return "memory limit exceeded"
    if pids > before[1]:
        return "pids limit"
    return None


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
        return tuple(CgroupDir(h, safe_join(self._root(h), sandbox_id)) for h in layout.hierarchies)

    # -- create

    async def create(self, sandbox_id: str, limits: ResourceLimits) -> Cgroup:
        """Make the sandbox's cgroups and apply ``limits``; all or nothing.

        Refuses an id that already has a cgroup in any hierarchy: that is a sandbox still
        running or the remains of one that crashed, and :meth:`destroy` clears it.
        """
        import asyncio

        dirs = self._plan(sandbox_id)
        self._require_limits()
        return await asyncio.to_thread(self._create_sync, sandbox_id, dirs, limits)

    def create_blocking(self, sandbox_id: str, limits: ResourceLimits) -> Cgroup:
        """:meth:`create` on the calling thread (for a caller without an event loop)."""
        dirs = self._plan(sandbox_id)
        self._require_limits()
        return self._create_sync(sandbox_id, dirs, limits)

    def _require_limits(self) -> None:
        missing = self.layout().missing_required
        if missing:
            why = "; ".join(f"{c}: {r}" for c, r in missing.items())
            raise BackendError(f"cgroups cannot enforce limits on this host ({why})")

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
        import asyncio

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
        cg = self._existing(sandbox_id)
        if cg is None:
            raise SandboxNotFound(f"no cgroup for sandbox {sandbox_id!r}")
        return cg

    def _existing(self, sandbox_id: str) -> Cgroup | None:
        dirs = tuple(d for d in self._plan(sandbox_id) if d.path.is_dir())
        return Cgroup(sandbox_id, dirs) if dirs else None

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
        import asyncio

        cg = self._existing(sandbox_id)
        if cg is None:
            return
        deadline = time.monotonic() + wait_s
        await self._kill_all(cg, deadline)
        await asyncio.to_thread(self._remove, cg, deadline, wait_s, 0.002)

    def destroy_blocking(self, sandbox_id: str, *, wait_s: float = 10.0) -> None:
        """:meth:`destroy` for a caller without an event loop whose sandbox is already
        ending: its pid namespace's init is gone, so the kernel is killing every member
        and none can fork any more (no freezer step is needed). Members left are
        SIGKILLed again until the directories can be removed."""
        cg = self._existing(sandbox_id)
        if cg is not None:
            self._remove(cg, time.monotonic() + wait_s, wait_s, 0.0005)

    def _remove(self, cg: Cgroup, deadline: float, wait_s: float, delay: float) -> None:
        """Remove the directories (blocking), SIGKILLing members again between tries,
        ``delay`` doubling up to 50 ms; both destroys end here."""
        while True:
            left = self._try_remove(cg.dirs)
            if not left:
                return
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"sandbox {cg.sandbox_id!r}: cgroups still busy after {wait_s:.1f}s "
                    f"(pids {cg.pids()}, dirs {', '.join(map(str, left))})"
                )
            _kill_members(cg)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _kill_all(self, cg: Cgroup, deadline: float) -> None:
        import asyncio

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
            pidfds = _signal_members(cg)
        finally:
            if frozen is not None:
                _write(frozen, "THAWED")
        # Each killed member's pidfd turns readable as it exits: the loop wakes on that,
        # not on a timer. Stragglers (forked before the freeze, or without one) get the
        # same again; the short sleep only paces a member whose pidfd could not be opened.
        delay = 0.001
        while time.monotonic() < deadline:
            try:
                await _exits(pidfds, deadline)
            finally:
                for fd in pidfds:
                    os.close(fd)
            if not cg.pids():
                return
            pidfds = _signal_members(cg)
            if not pidfds:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        for fd in pidfds:
            os.close(fd)

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
    import asyncio

    state = path / "freezer.state"
    _write(state, "FROZEN")
    delay = 0.0002  # tasks mostly freeze within a scheduler tick or two
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


async def _exits(pidfds: list[int], deadline: float) -> None:
    """Return once every pidfd is readable (its process has exited) or at ``deadline``."""
    import asyncio

    if not pidfds:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pending = set(pidfds)

    def exited(fd: int) -> None:
        loop.remove_reader(fd)
        pending.discard(fd)
        if not pending and not done.done():
            done.set_result(None)

    for fd in pidfds:
        loop.add_reader(fd, exited, fd)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, max(0.0, deadline - time.monotonic()))
    finally:
        for fd in pending:
            loop.remove_reader(fd)


def _signal_members(cg: Cgroup) -> list[int]:
    """SIGKILL each member through a pidfd that is proven to belong to the cgroup; return
    the pidfds of those signalled (the caller waits on them and closes them).

    Opening the pidfd first and re-reading the member list second means a pid that was
    recycled in between either shows up as not a member, or the pidfd points at the dead
    original and the signal goes nowhere.
    """
    pidfds: dict[int, int] = {}
    signalled: list[int] = []
    try:
        for pid in cg.pids():
            with contextlib.suppress(ProcessLookupError):
                pidfds[pid] = os.pidfd_open(pid)
        members = set(cg.pids())
        for pid, fd in list(pidfds.items()):
            if pid in members:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                signalled.append(pidfds.pop(pid))
    finally:
        for fd in pidfds.values():
            os.close(fd)
    return signalled


def _kill_members(cg: Cgroup) -> None:
    """:func:`_signal_members` without waiting for the exits."""
    for fd in _signal_members(cg):
        os.close(fd)
