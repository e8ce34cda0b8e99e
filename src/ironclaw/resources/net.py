"""Per-sandbox network: namespace, veth pair, addresses, firewall chain and egress proxy.

The namespace and veth pair are made by :mod:`ironclaw.resources.netns` (netlink on a
disposable thread); this module gives each sandbox its own /30 from the pool, so two
sandboxes never share a layer-2 segment, and adds the firewall chain and the proxy.

Everything is named from a hash of the full sandbox id (``icns-``, ``icv``, ``icc-``,
``icn-``) so :meth:`NetworkManager.list_resources` can find leftovers by scanning.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyroute2 import netns as pr_netns

from ironclaw.config import DEFAULT_UID_BASE, Settings, ensure_private_dir, safe_join
from ironclaw.errors import ConfigError, IronclawError, NetworkError
from ironclaw.ids import validate_sandbox_id
from ironclaw.policy.network import PROXY_PORT, TABLE, NetworkPolicy, sandbox_names
from ironclaw.resources.audit import append_line
from ironclaw.resources.firewall import Firewall
from ironclaw.resources.guest_bundle import GUEST_PYTHON, bundle_path
from ironclaw.resources.netns import (
    GUEST_IFNAME,
    NETNS_DIR,
    SandboxNetwork,
    build_netns,
    run_on_fresh_thread,
    scan_links,
    teardown_netns,
    write_sysctl,
)

__all__ = ["NETNS_DIR", "NetworkManager", "SandboxNetwork"]

_PROXY_READY_TIMEOUT = 15.0
_PROXY_BOOT = (
    "import sys; sys.path.insert(0, {zip!r}); "
    "from ironclaw.resources.proxy import main; sys.exit(main(sys.argv[1:]))"
)
_PROXY_STOP_TIMEOUT = 5.0


class NetworkManager:
    """Creates, changes and removes sandbox networks; holds no state beyond the system's."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: str = "10.250.0.0/16",
        table: str = TABLE,
        firewall: Firewall | None = None,
        proxy_hosts: Mapping[str, str] | None = None,
        proxy_uid: int | None = None,
        proxy_allow: tuple[str, ...] = (),
    ) -> None:
        try:
            self.pool = ipaddress.IPv4Network(pool, strict=True)
        except ValueError as exc:
            raise ConfigError(f"bad address pool {pool!r}: {exc}") from None
        if self.pool.prefixlen > 30:
            raise ConfigError(f"address pool {pool} is smaller than one /30")
        self.settings = settings
        self.firewall = firewall or Firewall(table=table)
        #: name -> address map the egress proxy consults before DNS (tests, air-gapped hosts).
        self.proxy_hosts = dict(proxy_hosts or {})
        #: Networks the egress proxy may reach although not global (an internal mirror):
        #: without an address rule it connects to global unicast addresses only.
        try:
            self.proxy_allow = tuple(str(ipaddress.ip_network(n)) for n in proxy_allow)
        except ValueError as exc:
            raise ConfigError(f"bad proxy address allow: {exc}") from None
        #: The egress proxies' own unprivileged uid: just below the sandboxes' range.
        self.proxy_uid = (
            proxy_uid
            if proxy_uid is not None
            else int(os.environ.get("IRONCLAW_UID_BASE", DEFAULT_UID_BASE)) - 1
        )
        self._forwarding_on = False

    @property
    def slots(self) -> int:
        return int(self.pool.num_addresses // 4)

    def describe(self, sandbox_id: str, slot: int, policy: NetworkPolicy) -> SandboxNetwork:
        """The addresses and names a sandbox gets, computed without touching the system."""
        validate_sandbox_id(sandbox_id)
        if not 0 <= slot < self.slots:
            raise ConfigError(f"slot {slot} is outside the pool {self.pool} (0..{self.slots - 1})")
        base = int(self.pool.network_address) + 4 * slot
        host_ip = str(ipaddress.IPv4Address(base + 1))
        names = sandbox_names(sandbox_id)
        env: dict[str, str] = {}
        if policy.needs_proxy:
            url = f"http://{host_ip}:{PROXY_PORT}"
            no_proxy = "localhost,127.0.0.1,::1"
            env = {
                "HTTP_PROXY": url,
                "HTTPS_PROXY": url,
                "http_proxy": url,
                "https_proxy": url,
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
            }
        return SandboxNetwork(
            sandbox_id=sandbox_id,
            slot=slot,
            netns_name=names.netns,
            netns_path=str(NETNS_DIR / names.netns),
            host_ifname=names.host_ifname,
            guest_ifname=GUEST_IFNAME,
            host_ip=host_ip,
            guest_ip=str(ipaddress.IPv4Address(base + 2)),
            prefixlen=30,
            env=env,
        )

    # --- lifecycle -----------------------------------------------------------------

    async def create(self, sandbox_id: str, policy: NetworkPolicy, *, slot: int) -> SandboxNetwork:
        """Build the sandbox's network; on any failure undo what was built and raise."""
        net = self.describe(sandbox_id, slot, policy)
        try:
            await self._ensure_forwarding()
            await self.firewall.ensure_base()
            await run_on_fresh_thread(lambda: build_netns(net))
        except IronclawError:
            raise
        except OSError as exc:
            raise NetworkError(f"network set-up for {sandbox_id} failed: {exc}") from exc
        except Exception as exc:  # pyroute2 raises its own NetlinkError and others
            raise NetworkError(f"network set-up for {sandbox_id} failed: {exc!r}") from exc
        try:
            await self.firewall.add_sandbox(sandbox_id, policy, proxy_addr=net.host_ip)
            pid = await self._start_proxy(net, policy) if policy.needs_proxy else None
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.destroy(sandbox_id)
            if isinstance(exc, IronclawError):
                raise
            raise NetworkError(f"network set-up for {sandbox_id} failed: {exc!r}") from exc
        return SandboxNetwork(**{**net.__dict__, "proxy_pid": pid})

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, *, slot: int) -> None:
        """Swap the sandbox's rules in one transaction and the proxy's allow-list with it.

        Order matters for never being more open than either policy: access to the proxy
        is granted only after it runs and revoked before it stops.
        """
        net = self.describe(sandbox_id, slot, policy)
        running = self._proxy_pid(sandbox_id)
        if policy.needs_proxy:
            if running is None:
                await self._start_proxy(net, policy)
            else:
                await asyncio.to_thread(self._write_proxy_config, sandbox_id, policy)
        await self.firewall.update_sandbox(sandbox_id, policy, proxy_addr=net.host_ip)
        if not policy.needs_proxy and running is not None:
            await self._stop_proxy(sandbox_id)

    async def destroy(self, sandbox_id: str, *, slot: int | None = None) -> None:
        """Remove everything of the sandbox that exists; calling it twice is fine."""
        del slot  # every name derives from the id
        names = sandbox_names(sandbox_id)
        errors: list[str] = []
        await self._audit_summary(sandbox_id)
        for step, action in (
            ("proxy", lambda: self._stop_proxy(sandbox_id)),
            ("firewall", lambda: self.firewall.remove_sandbox(sandbox_id)),
            (
                "netns",
                lambda: run_on_fresh_thread(lambda: teardown_netns(names.host_ifname, names.netns)),
            ),
        ):
            try:
                await action()
            except Exception as exc:
                errors.append(f"{step}: {exc}")
        if errors:
            raise NetworkError(f"tear-down of {sandbox_id} incomplete: " + "; ".join(errors))

    async def list_resources(self) -> dict[str, list[str]]:
        """IronClaw-owned network objects that exist now, found by scanning the system."""
        netns = sorted(n for n in pr_netns.listnetns() if n.startswith("icns-"))
        links = await asyncio.to_thread(scan_links)
        elements = await self.firewall.elements()
        return {
            "netns": netns,
            "links": links,
            "chains": await self.firewall.chains(),
            "map_elements": sorted(set(elements["fwd"]) | set(elements["nat"])),
            "set_elements": sorted(elements["ifs"]),
            "proxies": await asyncio.to_thread(self._scan_proxies),
        }

    async def drop_count(self, sandbox_id: str) -> int:
        """Packets dropped so far by the sandbox's final rule."""
        return await self.firewall.drop_count(sandbox_id)

    def audit_path(self, sandbox_id: str) -> Path:
        """The sandbox's audit log (JSON lines); the proxy appends every decision."""
        return safe_join(self.settings.sandbox_state_dir(sandbox_id), "audit.jsonl")

    def close(self) -> None:
        self.firewall.close()

    # --- internals -----------------------------------------------------------------

    async def _ensure_forwarding(self) -> None:
        if not self._forwarding_on:
            await asyncio.to_thread(write_sysctl, "/proc/sys/net/ipv4/ip_forward", "1")
            self._forwarding_on = True

    def _runtime_dir(self, sandbox_id: str) -> Path:
        path = self.settings.sandbox_runtime_dir(sandbox_id)
        ensure_private_dir(self.settings.runtime_dir)
        ensure_private_dir(path.parent)
        return ensure_private_dir(path)

    def _proxy_file(self, sandbox_id: str, name: str) -> Path:
        return safe_join(self.settings.sandbox_runtime_dir(sandbox_id), name)

    def _write_proxy_config(self, sandbox_id: str, policy: NetworkPolicy) -> Path:
        # In a directory of its own that only the proxy's uid may search: the proxy keeps a
        # descriptor to it and re-reads the policy from there after dropping root. That uid
        # may plant links in it, so root writes there only through _write_untrusted_dir.
        directory = safe_join(self._runtime_dir(sandbox_id), "proxy")
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        # Address rules the sandbox may use directly may also be reached through the proxy.
        rules: list[dict[str, Any]] = [
            {"network": str(r.network), "port": r.port}
            for r in policy.allow
            if r.proto in (None, "tcp")
        ]
        rules += [{"network": n, "port": None} for n in self.proxy_allow]
        doc = {
            "sandbox_id": sandbox_id,
            "allow_domains": list(policy.allow_domains),
            "deny_domains": list(policy.deny_domains),
            "hosts": self.proxy_hosts,
            "block": [str(self.pool)],
            "allow_addresses": rules,
        }
        _write_untrusted_dir(directory, "proxy.json", json.dumps(doc).encode(), self.proxy_uid)
        return safe_join(directory, "proxy.json")

    async def _start_proxy(self, net: SandboxNetwork, policy: NetworkPolicy) -> int:
        sid = net.sandbox_id
        config = await asyncio.to_thread(self._write_proxy_config, sid, policy)
        audit = self.audit_path(sid)
        await asyncio.to_thread(ensure_private_dir, audit.parent)
        log = self._proxy_file(sid, "proxy.log")
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            bundle = await asyncio.to_thread(bundle_path, self.settings.state_dir)
            proc = await asyncio.create_subprocess_exec(
                # The distribution's interpreter and IronClaw's stdlib-only bundle: both stay
                # readable after the proxy drops to its own uid.
                GUEST_PYTHON,
                "-I",
                "-S",
                "-B",
                "-c",
                _PROXY_BOOT.format(zip=str(bundle)),
                "--user",
                str(self.proxy_uid),
                "--listen",
                f"{net.host_ip}:{PROXY_PORT}",
                "--config",
                str(config),
                "--audit",
                str(audit),
                "--sandbox-id",
                sid,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_fd,
                start_new_session=True,
                cwd="/",
            )
        finally:
            os.close(log_fd)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(_PROXY_READY_TIMEOUT):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b""
        if line.strip() != b"READY":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise NetworkError(f"egress proxy for {sid} did not start; see {log}")
        pidfile = self._proxy_file(sid, "proxy.pid")
        await asyncio.to_thread(pidfile.write_text, f"{proc.pid}\n")
        return proc.pid

    def _proxy_pid(self, sandbox_id: str) -> int | None:
        """The proxy's pid if the pidfile names a live proxy of this very sandbox."""
        try:
            pid = int(self._proxy_file(sandbox_id, "proxy.pid").read_text().strip())
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        # The pid may have been reused since: check it is our proxy for this id.
        if b"ironclaw.resources.proxy" in raw and sandbox_id.encode() in raw.split(b"\0"):
            return pid
        return None

    async def _stop_proxy(self, sandbox_id: str) -> None:
        pid = self._proxy_pid(sandbox_id)
        if pid is not None:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                pidfd = -1
            if pidfd >= 0:
                try:
                    await self._signal_and_wait(pid, pidfd)
                finally:
                    os.close(pidfd)
        with contextlib.suppress(FileNotFoundError, ConfigError):
            self._proxy_file(sandbox_id, "proxy.pid").unlink()
        with contextlib.suppress(OSError, ConfigError):
            shutil.rmtree(self._proxy_file(sandbox_id, "proxy"))

    async def _signal_and_wait(self, pid: int, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            for sig, wait in ((signal.SIGTERM, _PROXY_STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
                signal.pidfd_send_signal(pidfd, sig)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await exited.wait()
                    return
            raise NetworkError(f"egress proxy {pid} did not exit")
        except ProcessLookupError:
            return
        finally:
            loop.remove_reader(pidfd)

    def _scan_proxies(self) -> list[str]:
        root = safe_join(self.settings.runtime_dir, "sandboxes")
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if self._proxy_pid(p.name) is not None)

    async def _audit_summary(self, sandbox_id: str) -> None:
        """Record the drop counter in the audit log before the chain (and count) go away."""
        try:
            dropped = await self.firewall.drop_count(sandbox_id)
        except IronclawError:
            return
        record: dict[str, Any] = {
            "event": "net.summary",
            "sandbox_id": sandbox_id,
            "dropped_packets": dropped,
        }
        path = self.audit_path(sandbox_id)
        await asyncio.to_thread(append_line, path, json.dumps(record))


def _write_untrusted_dir(directory: Path, name: str, data: bytes, owner: int) -> None:
    """Atomically replace ``directory/name`` as root, where ``owner`` may plant links.

    Nothing there is followed: the directory is opened with O_NOFOLLOW and chowned through
    that descriptor, the temporary file (an unguessable name) is created relative to it
    with O_CREAT|O_EXCL|O_NOFOLLOW, and the rename stays within it (a rename replaces a
    planted link, it never writes through one). The readers see the old or the new file.
    """
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open {directory} (it must be a real directory): {exc}") from exc
    tmp = f".{name}.{os.urandom(8).hex()}"
    try:
        os.fchown(dfd, owner, owner)
        os.fchmod(dfd, 0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise NetworkError(f"cannot write {name} in {directory}: {exc}") from exc
    finally:
        os.close(dfd)
