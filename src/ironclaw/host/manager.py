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
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ironclaw.backends.base import (
    Backend,
    BackendInfo,
    BackendStatus,
    LaunchContext,
    process_start_time,
)
from ironclaw.config import DEFAULT_UID_BASE, Settings, ensure_private_dir
from ironclaw.errors import (
    BackendError,
    ConfigError,
    IronclawError,
    SandboxError,
    SandboxNotFound,
    SandboxTimeout,
)
from ironclaw.host import controls as _controls
from ironclaw.host import reconcile as _reconcile
from ironclaw.host.channel import Channel
from ironclaw.host.controls import Controls
from ironclaw.host.guest import GuestClient
from ironclaw.host.pool import acquire_pooled, pool_key
from ironclaw.host.reconcile import GcReport
from ironclaw.ids import new_sandbox_id, validate_sandbox_id
from ironclaw.proto.lifecycle import AsyncResource
from ironclaw.proto.surface import ExecResult, OutputSink
from ironclaw.resources.audit import record_async
from ironclaw.resources.lifetime import read_lifetime
from ironclaw.resources.store import Batch, SandboxRecord, Store
from ironclaw.rpc import Peer
from ironclaw.spec_light import LightSpec

if TYPE_CHECKING:
    # pydantic (spec, policy) and tarfile (snapshots) load on first use: a one-shot
    # `ironclaw exec` with the default spec needs neither.
    from ironclaw.resources.cgroups import CgroupManager
    from ironclaw.resources.net import NetworkManager
    from ironclaw.spec import SandboxSpec

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


def _parse(spec: SandboxSpec | LightSpec | dict[str, Any] | None) -> SandboxSpec:
    """The validated spec; :data:`~ironclaw.spec_light.DEFAULT_SPEC` passes as it is.

    The light record has every attribute and the JSON form of ``SandboxSpec()`` (tested
    field by field), which is all the create path reads, so the casts (here and in the
    one-shot CLI, which passes it to :meth:`SandboxManager.create`) are only for mypy.
    """
    if isinstance(spec, LightSpec):
        return cast("SandboxSpec", spec)
    from ironclaw.spec import parse_spec

    return parse_spec(spec if spec is not None else {})


class SandboxManager(Channel, Controls, AsyncResource):
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
        spec = _parse(spec)
        sid = validate_sandbox_id(sandbox_id) if sandbox_id is not None else new_sandbox_id()
        record = None
        if use_pool:
            record = await acquire_pooled(self, spec, sid, one_shot)
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
        # Each write records what was made and the next intent in one hop (still before it).
        made = Batch().created(sid, "runtime_dir", str(run_dir))

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

        await self.store.write(made.intend(sid, "cgroup", sid))
        ctx.cgroup = await self.cgroups.create(sid, spec.limits)
        made = Batch().created(sid, "cgroup", sid)

        if spec.network.needs_network:
            await self.store.write(made.intend(sid, "network", sid))
            ctx.network = await self.net.create(sid, spec.network, slot=record.slot)
            made = Batch().created(sid, "network", sid)
            made.update(sid, info={"network": dataclasses.asdict(ctx.network)})

        await self.store.write(made.intend(sid, "process", "supervisor"))
        info = await backend.start(ctx)
        await self.store.write(
            Batch()
            .update(sid, info={**info.to_json(), "host_uid": ctx.host_uid})
            .created(sid, "process", "supervisor")
        )

        peer = await self._wait_ready(sid, backend, info, ready_timeout)
        self._peers[sid] = peer
        done = Batch().update(sid, state="pooled" if pooled else "running")
        fresh = await self.store.write(done, then_get=sid)
        assert fresh is not None
        return fresh

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
        spec = _parse(spec)
        key = pool_key(spec)
        made = 0
        while await self.store.count_pooled(key) < size:
            await self._create_cold(
                spec, new_sandbox_id("pool"), one_shot=False, ready_timeout=20.0, pooled=key
            )
            made += 1
        return made

    async def warm(self, spec: SandboxSpec | dict[str, Any] | None = None) -> int:
        """How many ready sandboxes the pool holds for ``spec``'s template."""
        return await self.store.count_pooled(pool_key(_parse(spec or {})))

    # -- teardown ----------------------------------------------------------------------

    async def destroy(self, sandbox_id: str) -> None:
        """Stop the sandbox and remove every resource it had. Idempotent per id."""
        record = await self.store.get(validate_sandbox_id(sandbox_id))
        await self._teardown(record, reason="destroyed")
        await record_async(self.settings, record.id, "sandbox.destroy")

    async def _teardown(self, record: SandboxRecord, *, reason: str) -> None:
        sid = record.id
        try:
            fresh, rows = await self.store.begin_teardown(sid, reason)
        finally:
            if (peer := self._peers.pop(sid, None)) is not None:
                await peer.aclose()
        rid = fresh.rid
        if record.state == "paused":
            await _controls.thaw_for_teardown(self, fresh)
        errors: list[str] = []
        kinds = {r.kind for r in rows}
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
        ports_dir = self.settings.sandbox_runtime_dir(rid) / "ports"
        if "runtime_dir" in kinds and ports_dir.is_dir():  # forwarders, firewall admissions
            from ironclaw.host.ports import release  # only then: it costs ms to import

            try:
                await release(self, fresh)
            except Exception as exc:
                errors.append(f"ports: {exc}")
        if "network" in kinds:
            try:
                await self.net.destroy(rid, slot=fresh.slot)
                await self.store.removed(sid, "network", rid)
            except Exception as exc:
                errors.append(f"network: {exc}")
        if "runtime_dir" in kinds:
            run_dir = self.settings.sandbox_runtime_dir(rid)
            await asyncio.to_thread(shutil.rmtree, run_dir, True)
            if errors:
                await self.store.removed(sid, "runtime_dir", str(run_dir))
        self._owned.discard(sid)
        self._rids.pop(sid, None)
        if errors:
            await self.store.update(sid, state="failed", reason="; ".join(errors))
            raise SandboxError(
                f"sandbox {sid} was not fully removed ({'; '.join(errors)}); `ironclaw gc` retries"
            )
        await self.store.delete(sid)  # with its rows (the runtime directory's too)

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
