"""What a user does to a running sandbox besides exec and files: lifetimes, pause and
resume, workspace snapshots and restore (fork), label filters, live network policy.

Kept apart from :mod:`ironclaw.host.manager` (the create/destroy lifecycle) so that each
stays readable; every function here takes the manager and goes through its registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, cast

from ironclaw.backends.base import Pausable
from ironclaw.errors import ConfigError, SandboxError
from ironclaw.resources.audit import record_async
from ironclaw.resources.lifetime import (
    ACTIVITY_FILE,
    LifetimeDoc,
    PauseActions,
    read_lifetime,
    spawn_lifetime_watchdog,
    touch_activity,
    write_lifetime,
)
from ironclaw.resources.store import SandboxRecord

if TYPE_CHECKING:
    from ironclaw.host.manager import SandboxManager
    from ironclaw.host.snapshots import Snapshot, SnapshotStore
    from ironclaw.policy.network import NetworkChange, NetworkPolicy
    from ironclaw.spec import SandboxSpec

# pydantic (spec, policy) and tarfile (snapshots) are imported where they are used: the
# manager imports this module, and a one-shot `ironclaw exec` needs neither.

__all__ = [
    "Controls",
    "RestoreOptions",
    "arm_lifetime",
    "matches",
    "pause",
    "restore",
    "resume",
    "set_timeout",
    "snapshot",
    "update_network",
]

MiB = 1 << 20


class RestoreOptions(TypedDict, total=False):
    """A restore's options after the snapshot (the manager's and the cluster's)."""

    spec: SandboxSpec | dict[str, Any] | None
    sandbox_id: str | None
    ready_timeout: float


def run_dir(mgr: SandboxManager, record: SandboxRecord) -> Path:
    return mgr.settings.sandbox_runtime_dir(record.rid)


def matches(record: SandboxRecord, labels: dict[str, str] | None, state: str | None) -> bool:
    """Whether ``record`` has every label given (key=value) and the state, if given."""
    have = record.spec.get("labels") or {}
    if state is not None and record.state != state:
        return False
    return all(have.get(k) == v for k, v in (labels or {}).items())


# -- lifetimes -------------------------------------------------------------------------


def _pause_actions(mgr: SandboxManager, record: SandboxRecord) -> PauseActions:
    """How the watchdog pauses this sandbox on ``on_timeout: pause``."""
    if record.backend == "qemu" and record.info.get("qmp"):
        return {"qmp": record.info["qmp"]}
    return _freezer_actions(mgr, record)


def _freezer_actions(mgr: SandboxManager, record: SandboxRecord) -> PauseActions:
    cg = mgr._cgroup_or_none(record.rid)
    d = cg.dir_for("freezer") if cg is not None else None
    if d is None:
        return {}
    name, frozen, thawed = (
        ("freezer.state", "FROZEN", "THAWED") if d.version == 1 else ("cgroup.freeze", "1", "0")
    )
    path = str(d.path / name)
    return {"freeze": [[path, frozen]], "thaw": [[path, thawed]]}


async def arm_lifetime(mgr: SandboxManager, record: SandboxRecord, spec: SandboxSpec) -> None:
    """Write the sandbox's lifetime file and start its watchdog (if it has a lifetime)."""
    life = spec.lifetime
    if not life.active:
        return
    now = time.time()
    rd = run_dir(mgr, record)
    doc: LifetimeDoc = {
        "deadline": now + life.timeout_s if life.timeout_s else None,
        "idle_timeout": life.idle_timeout_s,
        "on_timeout": life.on_timeout,
        "activity": str(rd / ACTIVITY_FILE),
        "started": now,
        "paused": False,
        "pause": _pause_actions(mgr, record),
    }
    await asyncio.to_thread(_arm_sync, rd, doc, int(record.info["pid"]))


def _arm_sync(rd: Path, doc: LifetimeDoc, pid: int) -> None:
    touch_activity(rd)
    doc["watchdog"] = spawn_lifetime_watchdog(rd, pid)  # it waits for the file
    write_lifetime(rd, doc)


async def set_timeout(mgr: SandboxManager, sandbox_id: str, seconds: float | None) -> float | None:
    """Move the deadline to ``seconds`` from now (None: no deadline); return it."""
    if seconds is not None and not 0 < seconds <= 366 * 86400:
        raise ConfigError("a timeout must be more than 0 and at most 366 days, in seconds")
    record = await mgr.get(sandbox_id)
    _must_live(record)
    rd = run_dir(mgr, record)
    deadline = time.time() + seconds if seconds is not None else None
    doc = read_lifetime(rd)
    if doc is None or not doc.get("watchdog"):  # none yet (a manual pause writes no watchdog)
        from ironclaw.spec import parse_spec

        spec = parse_spec(record.spec)
        spec = spec.model_copy(update={"lifetime": spec.lifetime.model_copy(
            update={"timeout_s": seconds})})  # fmt: skip
        await arm_lifetime(mgr, record, spec)
        if doc is not None and doc.get("paused"):
            await _mark_paused(mgr, record, True, record.reason or "paused")
    else:
        doc["deadline"] = deadline
        await asyncio.to_thread(write_lifetime, rd, doc)
    await record_async(mgr.settings, sandbox_id, "sandbox.set_timeout", seconds=seconds,
                       deadline=deadline)  # fmt: skip
    return deadline


def _must_live(record: SandboxRecord) -> None:
    if record.state not in ("running", "paused"):
        raise SandboxError(
            f"sandbox {record.id} is {record.state}"
            + (f" ({record.reason})" if record.reason else "")
        )


# -- pause / resume --------------------------------------------------------------------


async def _freeze(mgr: SandboxManager, record: SandboxRecord, frozen: bool) -> None:
    actions = _freezer_actions(mgr, record)
    pairs = actions.get("freeze") if frozen else actions.get("thaw")
    if not pairs:
        raise SandboxError(
            f"sandbox {record.id} has no freezer cgroup, so it cannot be paused "
            "(`ironclaw doctor` shows the cgroup controllers)"
        )
    path, value = pairs[0]
    await asyncio.to_thread(Path(path).write_text, value)
    if frozen and path.endswith("freezer.state"):
        for _ in range(500):  # v1 reports FREEZING until every task has stopped
            if Path(path).read_text().strip() == "FROZEN":
                return
            await asyncio.sleep(0.01)
        raise SandboxError(f"sandbox {record.id} did not freeze; try again")


async def thaw_for_teardown(mgr: SandboxManager, record: SandboxRecord) -> None:
    """A frozen task cannot die: thaw a paused sandbox before it is killed."""
    if not isinstance(mgr.backend(record.backend), Pausable):
        with contextlib.suppress(Exception):
            await _freeze(mgr, record, False)


async def pause(mgr: SandboxManager, sandbox_id: str) -> None:
    """Stop every CPU of the sandbox; memory and files are kept (see :func:`resume`)."""
    record = await mgr.get(sandbox_id)
    if record.state == "paused":
        return
    _must_live(record)
    backend = mgr.backend(record.backend)
    if isinstance(backend, Pausable):
        await backend.pause(backend.load_info(record.info))
    else:
        await _freeze(mgr, record, True)
    await _mark_paused(mgr, record, True, "paused")
    await record_async(mgr.settings, sandbox_id, "sandbox.pause")


async def resume(mgr: SandboxManager, sandbox_id: str, *, timeout: float | None = None) -> None:
    """Continue a paused sandbox; ``timeout`` sets a new deadline first.

    A sandbox paused by ``on_timeout: pause`` at its deadline needs a new ``timeout``
    (else it would be paused again at once).
    """
    record = await mgr.get(sandbox_id)
    if record.state != "paused":
        raise SandboxError(f"sandbox {sandbox_id} is {record.state}, not paused")
    rd = run_dir(mgr, record)
    doc = read_lifetime(rd) or {}
    deadline = doc.get("deadline")
    if timeout is not None:
        await set_timeout(mgr, sandbox_id, timeout)
    elif deadline is not None and deadline <= time.time():
        raise SandboxError(
            f"sandbox {sandbox_id} is past its deadline: resume it with a new timeout "
            "(`ironclaw sandbox resume ID --timeout SECONDS`)"
        )
    backend = mgr.backend(record.backend)
    froze = doc.get("paused_by") and (doc.get("pause") or {}).get("freeze")
    if froze or not isinstance(backend, Pausable):
        await _freeze(mgr, record, False)  # the watchdog pauses a VMM without QMP this way
    else:
        await backend.resume(backend.load_info(record.info))
    await asyncio.to_thread(touch_activity, rd)
    await _mark_paused(mgr, record, False, "")
    await record_async(mgr.settings, sandbox_id, "sandbox.resume", timeout=timeout)


async def _mark_paused(mgr: SandboxManager, record: SandboxRecord, paused: bool, why: str) -> None:
    rd = run_dir(mgr, record)
    doc = read_lifetime(rd)
    if doc is not None or paused:
        doc = doc or {}
        doc["paused"] = paused
        doc.pop("paused_by", None)
        await asyncio.to_thread(write_lifetime, rd, doc)
    await mgr.store.update(record.id, state="paused" if paused else "running", reason=why)


# -- snapshots -------------------------------------------------------------------------


async def snapshot(mgr: SandboxManager, sandbox_id: str, name: str) -> Snapshot:
    """Save the sandbox as snapshot ``name`` (atomically; see snapshots): a VM's memory,
    devices and disks where its backend can (:mod:`.vm_snapshots`), else /workspace."""
    from ironclaw.host.vm_snapshots import snapshot_vm, supports_vm_snapshots

    record = await mgr.get(sandbox_id)
    _must_live(record)
    if supports_vm_snapshots(mgr.backend(record.backend)):
        snap = await snapshot_vm(mgr, record, name)
    else:
        snap = await _snapshot_workspace(mgr, record, name)
    await record_async(mgr.settings, sandbox_id, "sandbox.snapshot", snapshot=name,
                       kind=snap.kind, sha256=snap.sha256)  # fmt: skip
    return snap


async def _snapshot_workspace(mgr: SandboxManager, record: SandboxRecord, name: str) -> Snapshot:
    from ironclaw.host.snapshots import ARCHIVE, SnapshotStore

    sandbox_id = record.id
    store = SnapshotStore(mgr.settings)
    tmp = await asyncio.to_thread(store.new_temp, name)
    try:
        with open(tmp / ARCHIVE, "wb") as out:

            def sink(chunk: bytes) -> None:
                out.write(chunk)

            result = await mgr.exec(
                sandbox_id,
                ["tar", "--numeric-owner", "-C", "/workspace", "-cf", "-", "."],
                on_stdout=sink,
                capture=False,
                capture_limit=4096,
            )
        if result.exit_code != 0:
            raise SandboxError(f"snapshot of {sandbox_id} failed (tar exited {result.exit_code})")
        spec = dict(record.spec)
        snap = await asyncio.to_thread(
            store.stamp, tmp, name=name, source=sandbox_id, backend=record.backend, spec=spec
        )
        return await asyncio.to_thread(store.commit, tmp, snap)
    except BaseException:
        await asyncio.to_thread(_rmtree, tmp)
        raise


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def restore(
    mgr: SandboxManager,
    snap: Snapshot | str,
    *,
    spec: SandboxSpec | dict[str, Any] | None = None,
    sandbox_id: str | None = None,
    ready_timeout: float = 20.0,
) -> SandboxRecord:
    """A new sandbox from the snapshot, with the snapshot's spec and ``spec`` on top
    (only the fields given in it: see :func:`~ironclaw.host.snapshots.restore_spec`).

    The snapshot is checked (hash, then every member) before anything is created. Until
    the workspace is in, the registry marks the sandbox as restoring, so if this process
    dies half-way ``gc`` removes it rather than leave a half-restored sandbox running.
    A VM snapshot is restored by its backend (:mod:`.vm_snapshots`).
    """
    from ironclaw.host.snapshots import SnapshotStore, restore_spec
    from ironclaw.host.vm_snapshots import restore_vm

    store = SnapshotStore(mgr.settings)
    if isinstance(snap, str):
        snap = await asyncio.to_thread(store.get, snap)
    final = restore_spec(snap.spec, spec)
    if snap.kind == "vm":
        record = await restore_vm(
            mgr, snap, final, sandbox_id=sandbox_id, ready_timeout=ready_timeout
        )
    else:
        record = await _restore_workspace(mgr, snap, final, sandbox_id, ready_timeout)
    await record_async(mgr.settings, record.id, "sandbox.restore", snapshot=snap.name,
                       source=snap.source, kind=snap.kind, sha256=snap.sha256)  # fmt: skip
    return record


async def _restore_workspace(
    mgr: SandboxManager,
    snap: Snapshot,
    final: SandboxSpec,
    sandbox_id: str | None,
    ready_timeout: float,
) -> SandboxRecord:
    from ironclaw.host.snapshots import SnapshotStore
    from ironclaw.host.vm_snapshots import finish_restore

    store = SnapshotStore(mgr.settings)
    max_bytes = final.limits.workspace_mib * MiB
    archive = await asyncio.to_thread(store.verified_archive, snap, max_bytes=max_bytes)
    data = await asyncio.to_thread(archive.read_bytes)
    record = await mgr.create(
        final, sandbox_id=sandbox_id, use_pool=False, restoring=True, ready_timeout=ready_timeout
    )

    async def unpack() -> None:
        result = await mgr.exec(
            record.id,
            ["tar", "--no-same-owner", "--same-permissions", "-C", "/workspace", "-xf", "-"],
            stdin=data,
        )
        if result.exit_code != 0:
            raise SandboxError(
                f"restoring snapshot {snap.name!r} failed: {result.stderr.decode()[-300:]}"
            )

    return await finish_restore(mgr, record, snap.name, unpack)


# -- live network policy ---------------------------------------------------------------


async def update_network(
    mgr: SandboxManager,
    sandbox_id: str,
    *,
    allow: list[str] | None = None,
    allow_domains: list[str] | None = None,
    deny: list[str] | None = None,
    deny_domains: list[str] | None = None,
) -> NetworkPolicy:
    """Change a running sandbox's egress: one firewall transaction, one proxy reload.

    ``allow``, ``allow_domains`` and ``deny_domains`` replace those lists when given;
    ``deny`` removes rules from the allow list. The change goes to the audit log.
    """
    from ironclaw.policy.network import AllowRule
    from ironclaw.spec import parse_spec

    record = await mgr.get(sandbox_id)
    _must_live(record)
    spec = parse_spec(record.spec)
    old = spec.network
    if not old.needs_network:
        raise ConfigError(
            f"sandbox {sandbox_id} was created without a network; its egress can change only "
            "if it was created with some --allow or --allow-domain"
        )
    try:
        rules = tuple(AllowRule.parse(a) for a in allow) if allow is not None else old.allow
        gone = {AllowRule.parse(d) for d in deny or ()}
    except ValueError as exc:
        raise ConfigError(f"network rule: {exc}") from None
    policy = parse_spec(
        {
            **spec.model_dump(mode="json"),
            "network": {
                "allow": [r.model_dump(mode="json") for r in rules if r not in gone],
                "allow_domains": list(
                    allow_domains if allow_domains is not None else old.allow_domains
                ),
                "deny_domains": list(
                    deny_domains if deny_domains is not None else old.deny_domains
                ),
            },
        }
    ).network
    if not policy.needs_network:
        raise ConfigError("the update leaves no egress at all; keep one rule or remove the sandbox")
    await mgr.net.update_policy(record.rid, policy, slot=record.slot)
    new_spec = spec.model_copy(update={"network": policy})
    await mgr.store.update(sandbox_id, spec=new_spec.model_dump(mode="json"))
    await record_async(
        mgr.settings, sandbox_id, "network.update",
        before=old.model_dump(mode="json"), after=policy.model_dump(mode="json"),
    )  # fmt: skip
    return policy


# -- the manager's methods -------------------------------------------------------------


class Controls:
    """The manager's methods for the functions above, mixed into
    :class:`~ironclaw.host.manager.SandboxManager` so it stays about the lifecycle."""

    def _mgr(self) -> SandboxManager:
        return cast("SandboxManager", self)

    async def set_timeout(self, sandbox_id: str, seconds: float | None) -> float | None:
        """End (or pause, per ``on_timeout``) the sandbox ``seconds`` from now."""
        return await set_timeout(self._mgr(), sandbox_id, seconds)

    async def pause(self, sandbox_id: str) -> None:
        await pause(self._mgr(), sandbox_id)

    async def resume(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        await resume(self._mgr(), sandbox_id, timeout=timeout)

    async def snapshot(self, sandbox_id: str, name: str) -> Snapshot:
        return await snapshot(self._mgr(), sandbox_id, name)

    async def fork(self, snap: Snapshot | str, count: int) -> list[SandboxRecord]:
        """``count`` new sandboxes, each with the snapshot's workspace."""
        if not 1 <= count <= 64:
            raise ConfigError("fork makes between 1 and 64 sandboxes")
        return [await self.restore(snap) for _ in range(count)]

    def snapshots(self) -> SnapshotStore:
        from ironclaw.host.snapshots import SnapshotStore

        return SnapshotStore(self._mgr().settings)

    async def select(
        self, *, labels: dict[str, str] | None = None, state: str | None = None
    ) -> list[SandboxRecord]:
        """Sandboxes that carry every label given and are in ``state`` (if given)."""
        return [r for r in await self._mgr().sandboxes() if matches(r, labels, state)]

    async def restore(self, snap: Snapshot | str, **opts: Unpack[RestoreOptions]) -> SandboxRecord:
        """A new sandbox from the snapshot (see :func:`restore`)."""
        return await restore(self._mgr(), snap, **opts)

    async def update_network(
        self, sandbox_id: str, **change: Unpack[NetworkChange]
    ) -> NetworkPolicy:
        """Change a running sandbox's egress (see :func:`update_network`)."""
        return await update_network(self._mgr(), sandbox_id, **change)
