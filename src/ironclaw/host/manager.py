"""The host manager: create → start → channel → stop → destroy, for every backend.

There is no daemon (as with podman): each CLI invocation, SDK user or API server builds
a :class:`SandboxManager` over the shared registry. Every resource a sandbox gets is
recorded as an intent before it is made, and torn down in reverse order; a failure at
any step of ``create`` undoes the steps before it, so bad input or a failed launch
changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ironclaw.backends.base import (
    Backend,
    BackendInfo,
    BackendStatus,
    LaunchContext,
    process_start_time,
)
from ironclaw.config import DEFAULT_UID_BASE, Settings, ensure_private_dir, safe_join
from ironclaw.errors import (
    BackendError,
    ChannelClosed,
    ConfigError,
    IronclawError,
    SandboxError,
    SandboxNotFound,
    SandboxTimeout,
)
from ironclaw.host import controls as _controls
from ironclaw.host import reconcile as _reconcile
from ironclaw.host.guest import (
    DEFAULT_CAPTURE_LIMIT,
    DEFAULT_READ_LIMIT,
    ExecResult,
    GuestClient,
    OutputSink,
)
from ironclaw.host.reconcile import GcReport
from ironclaw.host.snapshots import Snapshot, SnapshotStore
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.policy.network import NetworkPolicy
from ironclaw.resources.audit import append_line, record_async
from ironclaw.resources.lifetime import read_lifetime, touch_activity
from ironclaw.resources.store import SandboxRecord, Store
from ironclaw.rpc import HOST_LIMITS, Peer
from ironclaw.spec import SandboxSpec, parse_spec
from ironclaw.transport import Connection

if TYPE_CHECKING:
    from ironclaw.resources.cgroups import Cgroup, CgroupManager
    from ironclaw.resources.net import NetworkManager

__all__ = [
    "DEFAULT_UID_BASE",
    "ExecResult",
    "GcReport",
    "GuestClient",
    "OutputSink",
    "SandboxManager",
    "pool_key",
]

MAX_UID = 2**31 - 1


def _make_run_dir(run_dir: Path) -> None:
    ensure_private_dir(run_dir.parent)
    if run_dir.exists():
        raise SandboxError(f"runtime directory {run_dir} already exists; run `ironclaw gc`")
    run_dir.mkdir(mode=0o700)


def _backend(name: str) -> Backend[Any]:
    """The one place that maps a backend's name to its class."""
    if name == "namespace":
        from ironclaw.backends.namespace import NamespaceBackend

        return NamespaceBackend()
    if name == "firecracker":
        from ironclaw.backends.firecracker import FirecrackerBackend

        return FirecrackerBackend()
    if name == "qemu":
        from ironclaw.backends.qemu.backend import QemuBackend

        return QemuBackend()
    raise ConfigError(
        f"unknown backend {name!r}: use namespace, qemu or firecracker "
        "(`ironclaw doctor` lists what this host supports)"
    )


def pool_key(spec: SandboxSpec) -> str:
    """What a warm sandbox must share with a request to serve it.

    Everything fixed at launch (backend, image, seccomp, mounts, env, hostname, whether
    there is a network at all, tmpfs sizes, the wall-time supervisor) is in the key;
    memory, pids, cpu and the egress rules are applied on acquire.
    """
    lim = spec.limits
    fixed = {
        "backend": spec.backend,
        "image": spec.image,
        "seccomp": spec.seccomp,
        "mounts": [m.model_dump() for m in spec.mounts],
        "env": spec.env,
        "hostname": spec.hostname,
        "network": spec.network.needs_network,
        "proxy": bool(spec.network.allow_domains),
        "workspace_mib": lim.workspace_mib,
        "tmp_mib": lim.tmp_mib,
        "wall_time_s": lim.wall_time_s,
        "nofile": lim.nofile,
        "fsize_mib": lim.fsize_mib,
    }
    blob = json.dumps(fixed, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


class SandboxManager:
    """Owns sandboxes through the registry. Use as ``async with SandboxManager() as m``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        uid_base: int | None = None,
        cgroup_root: str | None = None,
        reconcile_on_open: bool = True,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.uid_base = uid_base or int(os.environ.get("IRONCLAW_UID_BASE", DEFAULT_UID_BASE))
        if not 65536 <= self.uid_base <= MAX_UID - 16384:
            # bubblewrap (and user namespaces) refuse uid maps past 2^31 - 1.
            raise ConfigError(
                f"uid base {self.uid_base} must lie between 65536 and {MAX_UID - 16384}"
            )
        self._cgroup_root = cgroup_root or os.environ.get("IRONCLAW_CGROUP_ROOT", "ironclaw")
        self.store = Store(self.settings.registry_path)
        self._reconcile_on_open = reconcile_on_open
        self._backends: dict[str, Backend[Any]] = {}
        self._peers: dict[str, Peer] = {}
        self._background: set[asyncio.Future[None]] = set()  # audit writes in flight
        self._cgroups: CgroupManager | None = None
        self._net: NetworkManager | None = None
        self._owned: set[str] = set()
        self._rids: dict[str, str] = {}  # sandbox id -> resource id, for pooled ones
        self._me = {"owner_start": process_start_time(os.getpid())}

    async def __aenter__(self) -> SandboxManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the registry and finish what crashed processes left half done."""
        self.settings.ensure()
        await self.store.open()
        if self._reconcile_on_open:
            await self.reconcile(scan=False)

    async def aclose(self, *, destroy_owned: bool = False) -> None:
        """Close channels; with ``destroy_owned`` also remove the sandboxes made here."""
        if destroy_owned:
            await self.destroy_owned()
        for peer in list(self._peers.values()):
            await peer.aclose()
        self._peers.clear()
        if self._net is not None:
            self._net.close()
        await self.store.aclose()

    async def destroy_owned(self) -> None:
        """Remove every sandbox this manager created (graceful shutdown of a service)."""
        for sid in sorted(self._owned):
            with contextlib.suppress(SandboxNotFound):
                await self.destroy(sid)

    # -- parts -------------------------------------------------------------------------

    def backend(self, name: str) -> Backend[Any]:
        if name not in self._backends:
            self._backends[name] = _backend(name)
        return self._backends[name]

    @property
    def cgroups(self) -> CgroupManager:
        if self._cgroups is None:
            from ironclaw.resources.cgroups import CgroupManager

            self._cgroups = CgroupManager(self._cgroup_root)
        return self._cgroups

    @property
    def net(self) -> NetworkManager:
        if self._net is None:
            from ironclaw.resources.net import NetworkManager

            pool = os.environ.get("IRONCLAW_NET_POOL", "10.250.0.0/16")
            self._net = NetworkManager(self.settings, pool=pool, proxy_uid=self.uid_base - 1)
        return self._net

    # -- lifecycle ---------------------------------------------------------------------

    async def create(
        self,
        spec: SandboxSpec | dict[str, Any] | None = None,
        *,
        sandbox_id: str | None = None,
        one_shot: bool = False,
        ready_timeout: float = 20.0,
        use_pool: bool = True,
        restoring: bool = False,
    ) -> SandboxRecord:
        """Create and start a sandbox; return its record once the agent answers.

        A warm sandbox of the same template (see :func:`pool_key`) is taken when one is
        ready, and given this request's id, limits and egress rules. ``restoring`` marks
        it as being filled from a snapshot (``gc`` removes it if its creator dies first).
        """
        spec = parse_spec(spec if spec is not None else {})
        sid = validate_sandbox_id(sandbox_id) if sandbox_id is not None else new_sandbox_id()
        record = None
        if use_pool:
            record = await self._acquire(spec, sid, one_shot)
        if record is None:
            record = await self._create_cold(
                spec, sid, one_shot=one_shot, ready_timeout=ready_timeout, restoring=restoring
            )
        if spec.lifetime.active:
            try:
                await _controls.arm_lifetime(self, record, spec)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._teardown(record, reason="lifetime failed"))
                raise
        await record_async(self.settings, record.id, "sandbox.create", backend=spec.backend)
        return record

    async def _create_cold(
        self,
        spec: SandboxSpec,
        sid: str,
        *,
        one_shot: bool,
        ready_timeout: float,
        pooled: str | None = None,
        restoring: bool = False,
    ) -> SandboxRecord:
        backend = self.backend(spec.backend)
        record = await self.store.reserve(
            sid,
            backend=spec.backend,
            spec=spec.model_dump(mode="json"),
            owner_pid=os.getpid(),
            one_shot=one_shot,
            info={**self._me, **({"restoring": True} if restoring else {})},
            pool_key=pooled,
        )
        self._owned.add(sid)
        try:
            return await self._start(record, spec, backend, one_shot, ready_timeout, pooled)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown(record, reason=f"failed: {exc}"))
            if isinstance(exc, IronclawError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise BackendError(f"creating sandbox {sid} failed: {exc}") from exc

    async def _start(
        self,
        record: SandboxRecord,
        spec: SandboxSpec,
        backend: Backend[Any],
        one_shot: bool,
        ready_timeout: float,
        pooled: str | None,
    ) -> SandboxRecord:
        sid = record.id
        run_dir = self.settings.sandbox_runtime_dir(sid)
        await self.store.intend(sid, "runtime_dir", str(run_dir))
        await asyncio.to_thread(_make_run_dir, run_dir)
        await self.store.created(sid, "runtime_dir", str(run_dir))

        ctx = LaunchContext(
            sandbox_id=sid,
            slot=record.slot,
            spec=spec,
            settings=self.settings,
            run_dir=run_dir,
            host_uid=self.uid_base + record.slot,
            one_shot=one_shot,
        )
        await backend.prepare(ctx)

        await self.store.intend(sid, "cgroup", sid)
        ctx.cgroup = await self.cgroups.create(sid, spec.limits)
        await self.store.created(sid, "cgroup", sid)

        if spec.network.needs_network:
            await self.store.intend(sid, "network", sid)
            ctx.network = await self.net.create(sid, spec.network, slot=record.slot)
            await self.store.created(sid, "network", sid)
            await self.store.update(sid, info={"network": dataclasses.asdict(ctx.network)})

        await self.store.intend(sid, "process", "supervisor")
        info = await backend.start(ctx)
        await self.store.update(sid, info={**info.to_json(), "host_uid": ctx.host_uid})
        await self.store.created(sid, "process", "supervisor")

        peer = await self._wait_ready(sid, backend, info, ready_timeout)
        self._peers[sid] = peer
        await self.store.update(sid, state="pooled" if pooled else "running")
        return await self.store.get(sid)

    async def _wait_ready(
        self, sid: str, backend: Backend[Any], info: BackendInfo, timeout: float
    ) -> Peer:
        async def ping() -> Peer:
            conn = await backend.open_channel(info, timeout=timeout)
            peer = self._host_peer(sid, conn)
            await peer.start()
            try:
                await GuestClient(peer, sid).ping(timeout=timeout)
            except BaseException:
                await peer.aclose()
                raise
            return peer

        pinging = asyncio.ensure_future(ping())
        exited = asyncio.ensure_future(backend.wait_exited(info))
        try:
            done, _ = await asyncio.wait(
                {pinging, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if pinging in done and pinging.exception() is None:
                return pinging.result()
            if pinging in done:
                # A refused connection usually means the sandbox died at start: say why.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), 1.0)
                if not exited.done():
                    return pinging.result()
            if exited.done():
                raise await backend.start_failure(info)
            raise SandboxTimeout(f"the sandbox's agent did not answer within {timeout:.0f}s")
        finally:
            exited.cancel()
            if not pinging.done():
                pinging.cancel()
                with contextlib.suppress(BaseException):
                    await pinging

    # -- warm pool ---------------------------------------------------------------------

    async def fill_pool(
        self, spec: SandboxSpec | dict[str, Any] | None = None, *, size: int
    ) -> int:
        """Top the pool for ``spec``'s template up to ``size`` ready sandboxes."""
        spec = parse_spec(spec if spec is not None else {})
        key = pool_key(spec)
        made = 0
        while await self.store.count_pooled(key) < size:
            await self._create_cold(
                spec, new_sandbox_id("pool"), one_shot=False, ready_timeout=20.0, pooled=key
            )
            made += 1
        return made

    async def _acquire(self, spec: SandboxSpec, sid: str, one_shot: bool) -> SandboxRecord | None:
        """Give a pooled sandbox its final id, limits and egress rules, or return None."""
        key = pool_key(spec)
        record = await self.store.claim_pooled(
            key,
            sid,
            spec=spec.model_dump(mode="json"),
            owner=dict(self._me),
            owner_pid=os.getpid(),
            one_shot=one_shot,
        )
        if record is None:
            return None
        self._owned.add(sid)
        self._rids[sid] = record.rid
        try:
            rid = record.rid
            peer = self._peers.pop(rid, None)
            if peer is not None:
                self._peers[sid] = peer
            await self.cgroups.update(rid, spec.limits)
            if spec.network.needs_network:
                await self.net.update_policy(rid, spec.network, slot=record.slot)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown(record, reason=f"failed: {exc}"))
            raise
        return record

    async def warm(self, spec: SandboxSpec | dict[str, Any] | None = None) -> int:
        """How many ready sandboxes the pool holds for ``spec``'s template."""
        return await self.store.count_pooled(pool_key(parse_spec(spec or {})))

    # -- teardown ----------------------------------------------------------------------

    async def destroy(self, sandbox_id: str) -> None:
        """Stop the sandbox and remove every resource it had. Idempotent per id."""
        record = await self.store.get(validate_sandbox_id(sandbox_id))
        await self._teardown(record, reason="destroyed")
        await record_async(self.settings, record.id, "sandbox.destroy")

    async def _teardown(self, record: SandboxRecord, *, reason: str) -> None:
        sid = record.id
        with contextlib.suppress(SandboxNotFound):
            await self.store.update(sid, state="stopping", reason=reason)
        peer = self._peers.pop(sid, None)
        if peer is not None:
            await peer.aclose()
        fresh = await self.store.get(sid)
        rid = fresh.rid
        if record.state == "paused":
            await _controls.thaw_for_teardown(self, fresh)
        errors: list[str] = []
        kinds = {r.kind for r in await self.store.resources(sid)}
        if "process" in kinds:
            try:
                await self._stop_process(fresh)
                await self.store.removed(sid, "process", "supervisor")
            except Exception as exc:
                errors.append(f"stop: {exc}")
        if "cgroup" in kinds:
            try:
                await self.cgroups.destroy(rid)
                await self.store.removed(sid, "cgroup", rid)
            except Exception as exc:
                errors.append(f"cgroup: {exc}")
        if "network" in kinds:
            try:
                await self.net.destroy(rid, slot=fresh.slot)
                await self.store.removed(sid, "network", rid)
            except Exception as exc:
                errors.append(f"network: {exc}")
        if "runtime_dir" in kinds:
            run_dir = self.settings.sandbox_runtime_dir(rid)
            await asyncio.to_thread(shutil.rmtree, run_dir, True)
            await self.store.removed(sid, "runtime_dir", str(run_dir))
        self._owned.discard(sid)
        self._rids.pop(sid, None)
        if errors:
            await self.store.update(sid, state="failed", reason="; ".join(errors))
            raise SandboxError(
                f"sandbox {sid} was not fully removed ({'; '.join(errors)}); `ironclaw gc` retries"
            )
        await self.store.delete(sid)

    async def _stop_process(self, record: SandboxRecord) -> None:
        backend = self.backend(record.backend)
        try:
            info = backend.load_info(record.info)
        except BackendError:
            # The launch never returned, so nothing was recorded to stop; a process it
            # left runs under the sandbox's uid, and the reconcile scan removes it.
            return
        await backend.stop(info)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self._refresh(await self.store.get(validate_sandbox_id(sandbox_id)))

    async def sandboxes(self) -> list[SandboxRecord]:
        """Every sandbox in the registry, with dead ones marked as such."""
        return [await self._refresh(r) for r in await self.store.all()]

    async def _refresh(self, record: SandboxRecord) -> SandboxRecord:
        """Mark a running sandbox whose processes died as dead, with the reason, and one
        its lifetime watchdog paused as paused."""
        if record.state not in ("running", "pooled", "paused"):
            return record
        backend = self.backend(record.backend)
        try:
            status = await backend.inspect(backend.load_info(record.info))
        except BackendError as exc:
            status = BackendStatus(alive=False, reason=str(exc))
        life = read_lifetime(self.settings.sandbox_runtime_dir(record.rid))
        if status.alive:
            if record.state == "running" and life and life.get("paused"):
                why = str(life.get("paused_by") or "paused")
                await self.store.update(record.id, state="paused", reason=why)
                return await self.store.get(record.id)
            return record
        reason = (life or {}).get("ended") or status.reason
        await self.store.update(record.id, state="dead", reason=reason)
        return await self.store.get(record.id)

    async def select(
        self, *, labels: dict[str, str] | None = None, state: str | None = None
    ) -> list[SandboxRecord]:
        """Sandboxes that carry every label given and are in ``state`` (if given)."""
        return [r for r in await self.sandboxes() if _controls.matches(r, labels, state)]

    # -- lifetimes, pause, snapshots, network (see ironclaw.host.controls) --------------

    async def set_timeout(self, sandbox_id: str, seconds: float | None) -> float | None:
        """End (or pause, per ``on_timeout``) the sandbox ``seconds`` from now."""
        return await _controls.set_timeout(self, sandbox_id, seconds)

    async def pause(self, sandbox_id: str) -> None:
        await _controls.pause(self, sandbox_id)

    async def resume(self, sandbox_id: str, *, timeout: float | None = None) -> None:
        await _controls.resume(self, sandbox_id, timeout=timeout)

    async def snapshot(self, sandbox_id: str, name: str) -> Snapshot:
        return await _controls.snapshot(self, sandbox_id, name)

    async def restore(
        self,
        snap: Snapshot | str,
        *,
        spec: SandboxSpec | dict[str, Any] | None = None,
        sandbox_id: str | None = None,
        ready_timeout: float = 20.0,
    ) -> SandboxRecord:
        return await _controls.restore(
            self, snap, spec=spec, sandbox_id=sandbox_id, ready_timeout=ready_timeout
        )

    async def fork(self, snap: Snapshot | str, count: int) -> list[SandboxRecord]:
        """``count`` new sandboxes, each with the snapshot's workspace."""
        if not 1 <= count <= 64:
            raise ConfigError("fork makes between 1 and 64 sandboxes")
        made: list[SandboxRecord] = []
        for _ in range(count):
            made.append(await self.restore(snap))
        return made

    def snapshots(self) -> SnapshotStore:
        return SnapshotStore(self.settings)

    async def update_network(
        self,
        sandbox_id: str,
        *,
        allow: list[str] | None = None,
        allow_domains: list[str] | None = None,
        deny: list[str] | None = None,
        deny_domains: list[str] | None = None,
    ) -> NetworkPolicy:
        return await _controls.update_network(
            self, sandbox_id, allow=allow, allow_domains=allow_domains, deny=deny,
            deny_domains=deny_domains,
        )  # fmt: skip

    # -- reconcile ---------------------------------------------------------------------

    async def reconcile(self, *, dry_run: bool = False, scan: bool = True) -> GcReport:
        """Make the system agree with the registry.

        From the registry: sandboxes whose creator died mid-way, one-shot sandboxes whose
        owner died, and dead sandboxes are torn down (every recorded resource, in
        reverse order). With ``scan``: cgroups, runtime directories and processes of this
        installation that no registry row accounts for are removed as well. The system is
        scanned *before* the registry is read, so a sandbox being created concurrently
        (its intent is committed before its resources exist) is never mistaken for an
        orphan. Nothing outside IronClaw's own names, uids and directories is touched.
        """
        return await _reconcile.reconcile(self, dry_run=dry_run, scan=scan)

    # -- channel -----------------------------------------------------------------------

    async def peer(self, sandbox_id: str) -> Peer:
        """A connected peer to the sandbox's agent (cached per manager)."""
        peer = self._peers.get(sandbox_id)
        if peer is not None and not peer.closed:
            return peer
        record = await self.get(sandbox_id)
        if record.state != "running":
            raise SandboxError(
                f"sandbox {sandbox_id} is {record.state}"
                + (f" ({record.reason})" if record.reason else "")
                + "; remove it with `ironclaw sandbox rm`"
            )
        conn = await self.backend(record.backend).open_channel(record.info)
        peer = self._host_peer(sandbox_id, conn)
        await peer.start()
        self._peers[sandbox_id] = peer
        return peer

    def _host_peer(self, sid: str, conn: Connection) -> Peer:
        """The host's end of a sandbox's channel: strict limits, violations audited.

        A guest that breaks a rule of the channel loses that channel (the peer closes
        it); the violation goes into the sandbox's audit log, which a task's trace
        merges, so a person can see why.
        """

        def record(peer: Peer, error: BaseException) -> None:
            doc = {"event": "channel.violation", "sandbox_id": sid, "ts": time.time(),
                   "error": f"{type(error).__name__}: {error}"}  # fmt: skip
            line = json.dumps(doc)
            path = safe_join(self.settings.sandbox_state_dir(sid), "audit.jsonl")
            task = asyncio.ensure_future(asyncio.to_thread(append_line, path, line))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return Peer(conn, name=f"host:{sid}", limits=HOST_LIMITS, on_protocol_error=record)

    async def guest(self, sandbox_id: str) -> GuestClient:
        """A typed client of the sandbox's agent, over the cached connection.

        Every call through it is activity for the idle timer (connecting is not).
        """
        run_dir = self.settings.sandbox_runtime_dir(await self._rid(sandbox_id))
        life = read_lifetime(run_dir)
        if life is not None:
            if life.get("paused"):
                raise SandboxError(
                    f"sandbox {sandbox_id} is paused; `ironclaw sandbox resume {sandbox_id}`"
                )
            touch_activity(run_dir)
        return GuestClient(await self.peer(sandbox_id), sandbox_id)

    async def exec(
        self,
        sandbox_id: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputSink | None = None,
        on_stderr: OutputSink | None = None,
        capture: bool = True,
        keep_background: bool = False,
        capture_limit: int = DEFAULT_CAPTURE_LIMIT,
    ) -> ExecResult:
        """Run ``argv`` in the sandbox, streaming output to the sinks as it comes.

        With ``capture=False`` output is only streamed, so memory stays bounded however
        much a command prints; captured output keeps ``capture_limit`` bytes per stream
        and says ``truncated`` past that. Processes the command leaves in the background are
        killed when it exits unless ``keep_background``. A command stopped by one of the
        sandbox's cgroup limits says so in ``status``.
        """
        if not argv:
            raise ConfigError("nothing to run: give a command")
        guest = await self.guest(sandbox_id)
        cg = self._cgroup_or_none(await self._rid(sandbox_id))
        before = cg.limit_hits() if cg is not None else None
        try:
            result = await guest.exec(
                argv,
                env=env,
                cwd=cwd,
                timeout=timeout,
                stdin=stdin,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                capture=capture,
                keep_background=keep_background,
                capture_limit=capture_limit,
            )
        except ChannelClosed:
            record = await self.get(sandbox_id)
            raise SandboxError(
                f"sandbox {sandbox_id} went away during the command"
                + (f": {record.reason}" if record.reason else "")
            ) from None
        if cg is not None and before is not None:
            oom, pids = cg.limit_hits()
            if oom > before[0]:
                result.status = "memory limit exceeded"
            elif pids > before[1]:
                result.status = "pids limit"
        return result

    async def _rid(self, sandbox_id: str) -> str:
        rid = self._rids.get(sandbox_id)
        if rid is None:
            rid = self._rids[sandbox_id] = (await self.store.get(sandbox_id)).rid
        return rid

    def _cgroup_or_none(self, sandbox_id: str) -> Cgroup | None:
        """The sandbox's cgroup, or None where it has none (its limits then go unnamed)."""
        try:
            return self.cgroups.open(sandbox_id)
        except IronclawError:
            return None

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | AsyncIterator[bytes], *, mode: int = 0o644
    ) -> int:
        return await (await self.guest(sandbox_id)).write_file(path, data, mode=mode)

    async def read_file(
        self,
        sandbox_id: str,
        path: str,
        sink: OutputSink | None = None,
        *,
        limit: int | None = DEFAULT_READ_LIMIT,
    ) -> bytes:
        return await (await self.guest(sandbox_id)).read_file(path, sink, limit=limit)
