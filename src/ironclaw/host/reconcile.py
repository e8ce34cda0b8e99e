"""Making the system agree with the registry: what ``ironclaw gc`` and every manager start run.

Kept apart from the lifecycle because it reasons about other processes' sandboxes:
whether their owner still lives, which kernel objects no registry row accounts for.
It tears down only through the manager's own teardown, so there is one way to remove
a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ironclaw.backends.base import same_process
from ironclaw.config import safe_join
from ironclaw.errors import IronclawError
from ironclaw.resources.lifetime import due, read_lifetime
from ironclaw.resources.store import SandboxRecord

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager

__all__ = ["GcReport", "owner_alive", "reconcile"]


@dataclass
class GcReport:
    """What reconcile found and did (or, with ``dry_run``, would do)."""

    removed: list[str] = field(default_factory=list)
    marked_dead: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def owner_alive(record: SandboxRecord) -> bool:
    """Whether the process that created (or took) the sandbox still runs."""
    if record.owner_pid == os.getpid():
        return True
    return same_process(record.owner_pid, record.info.get("owner_start"))


def _why_remove(record: SandboxRecord) -> str | None:
    alive = owner_alive(record)
    if record.state in ("creating", "stopping", "failed") and not alive:
        return f"left {record.state} by a process that died"
    if record.state == "running" and record.one_shot and not alive:
        return "one-shot sandbox whose owner died"
    if record.state == "running" and record.info.get("restoring") and not alive:
        return "restore from a snapshot cut short (its creator died)"
    if record.state == "dead":
        return f"dead ({record.reason})"
    return None


async def reconcile(mgr: SandboxManager, *, dry_run: bool = False, scan: bool = True) -> GcReport:
    """See :meth:`SandboxManager.reconcile`."""
    report = GcReport(dry_run=dry_run)
    found = await _scan(mgr) if scan else None
    records = await mgr.store.all()
    for record in records:
        record = await mgr._refresh(record)
        why = _why_remove(record) or await _lifetime_over(mgr, record, report)
        if why is None:
            continue
        if record.state == "dead":
            report.marked_dead.append(record.id)
        report.removed.append(f"sandbox {record.id}: {why}")
        if not dry_run:
            try:
                await mgr._teardown(record, reason=why)
            except IronclawError as exc:
                report.errors.append(str(exc))
    if found is not None:
        await _remove_orphans(mgr, found, records, report)
        from ironclaw.host import ports  # gc only: not on every command's start-up path

        try:  # forwards whose exposing process died half-way, or whose forwarder is gone
            report.orphans += await ports.collect_leftovers(mgr, dry_run=dry_run)
        except IronclawError as exc:
            report.errors.append(str(exc))
        from ironclaw.host.snapshots import SnapshotStore  # tarfile: only for a scan

        store = SnapshotStore(mgr.settings)
        report.orphans += await asyncio.to_thread(store.collect_leftovers, dry_run=dry_run)
    return report


async def _lifetime_over(
    mgr: SandboxManager, record: SandboxRecord, report: GcReport
) -> str | None:
    """Apply a lifetime whose watchdog did not (e.g. it was killed): destroy or pause."""
    if record.state != "running":
        return None
    doc = read_lifetime(mgr.settings.sandbox_runtime_dir(record.rid))
    why = due(doc) if doc is not None else None
    if why is None or doc is None:
        return None
    if doc.get("on_timeout") != "pause":
        return why
    report.removed.append(f"sandbox {record.id}: paused ({why})")
    if not report.dry_run:
        try:
            await mgr.pause(record.id)
        except IronclawError as exc:
            report.errors.append(str(exc))
    return None


async def _scan(mgr: SandboxManager) -> dict[str, list[str]]:
    from ironclaw.resources.procs import processes_with_uid_in

    runtime = safe_join(mgr.settings.runtime_dir, "sandboxes")
    dirs = sorted(p.name for p in runtime.iterdir()) if runtime.is_dir() else []
    procs = processes_with_uid_in(mgr.uid_base, mgr.uid_base + mgr.store.max_slots)
    return {
        "cgroups": await asyncio.to_thread(mgr.cgroups.list_owned),
        "runtime_dirs": dirs,
        "processes": [f"{pid}:{uid}" for pid, uid in procs],
    }


async def _remove_orphans(
    mgr: SandboxManager,
    found: dict[str, list[str]],
    records: list[SandboxRecord],
    report: GcReport,
) -> None:
    live = {r.rid for r in records} | {r.id for r in records}
    slots = {r.slot for r in records}
    for cg in found["cgroups"]:
        if cg not in live:
            report.orphans.append(f"cgroup {cg}")
            if not report.dry_run:
                try:
                    await mgr.cgroups.destroy(cg)
                except IronclawError as exc:
                    report.errors.append(str(exc))
    for name in found["runtime_dirs"]:
        if name not in live:
            report.orphans.append(f"runtime directory {name}")
            if not report.dry_run:
                path = safe_join(mgr.settings.runtime_dir, "sandboxes", name)
                await asyncio.to_thread(shutil.rmtree, path, True)
    for item in found["processes"]:
        pid, uid = (int(x) for x in item.split(":"))
        if uid - mgr.uid_base not in slots:
            report.orphans.append(f"process {pid} (uid {uid})")
            if not report.dry_run:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
