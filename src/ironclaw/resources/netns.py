"""A sandbox's network namespace and veth pair, made and removed with netlink.

Netlink work runs on a short-lived dedicated thread, never on the event loop: the thread
unshares a fresh network namespace for itself (no fork, unlike ``ip netns add``), binds
it under ``/run/netns``, creates the veth from inside with its host end placed straight
into the original namespace, configures both ends, then returns to the original
namespace. If that return ever failed the thread would be left in the wrong namespace,
which is why it is never reused. IPv6 is disabled inside (the inet chain would filter it
with the same policy anyway). :mod:`ironclaw.resources.net` puts the firewall and the
egress proxy around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

__all__ = [
    "GUEST_IFNAME",
    "NETNS_DIR",
    "SandboxNetwork",
    "build_netns",
    "run_on_fresh_thread",
    "scan_links",
    "teardown_netns",
    "write_sysctl",
]

NETNS_DIR = Path("/run/netns")
GUEST_IFNAME = "eth0"
_CLONE_NEWNET = 0x40000000
_MNT_DETACH = 2
_T = TypeVar("_T")

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class SandboxNetwork:
    """What the launcher needs: the namespace to join and the environment to set."""

    sandbox_id: str
    slot: int
    netns_name: str
    netns_path: str
    host_ifname: str
    guest_ifname: str
    host_ip: str
    guest_ip: str
    prefixlen: int
    env: dict[str, str] = field(default_factory=dict)
    proxy_pid: int | None = None


def run_on_fresh_thread(fn: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run ``fn`` on a new thread that may change its own namespace and is then discarded."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="ironclaw-netns", daemon=True).start()
    return fut


def write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _remove_netns(name: str) -> None:
    path = str(NETNS_DIR / name)
    _libc.umount2(path.encode(), _MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _delete_link(ifname: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            with contextlib.suppress(Exception):
                ipr.link("del", index=idx[0])


def build_netns(net: SandboxNetwork) -> None:
    """Blocking netlink set-up; must run on a disposable thread (it calls unshare)."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    made = False
    try:
        try:
            if _libc.unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
            NETNS_DIR.mkdir(parents=True, exist_ok=True)
            if os.path.exists(net.netns_path):
                raise OSError(errno.EEXIST, f"{net.netns_path} already exists")
            pr_netns.attach(net.netns_name, "thread-self")
            made = True
            for knob in ("all", "default"):
                write_sysctl(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "1")
            with IPRoute() as ipr:
                ipr.link(
                    "add",
                    ifname=net.guest_ifname,
                    kind="veth",
                    peer={"ifname": net.host_ifname, "net_ns_fd": orig},
                )
                (lo,) = ipr.link_lookup(ifname="lo")
                (eth,) = ipr.link_lookup(ifname=net.guest_ifname)
                ipr.link("set", index=lo, state="up")
                ipr.addr("add", index=eth, address=net.guest_ip, prefixlen=net.prefixlen)
                ipr.link("set", index=eth, state="up")
                ipr.route("add", dst="0.0.0.0", dst_len=0, gateway=net.host_ip)  # noqa: S104 default route
        finally:
            if _libc.setns(orig, _CLONE_NEWNET) != 0:
                # The thread is discarded after this call; never run more work on it.
                raise OSError(ctypes.get_errno(), "setns back to the host namespace failed")
        write_sysctl(f"/proc/sys/net/ipv6/conf/{net.host_ifname}/disable_ipv6", "1")
        with IPRoute() as ipr:
            (host,) = ipr.link_lookup(ifname=net.host_ifname)
            ipr.addr("add", index=host, address=net.host_ip, prefixlen=net.prefixlen)
            ipr.link("set", index=host, state="up")
    except BaseException:
        if made:
            with contextlib.suppress(Exception):
                _delete_link(net.host_ifname)
            with contextlib.suppress(Exception):
                _remove_netns(net.netns_name)
        raise
    finally:
        os.close(orig)


def teardown_netns(host_ifname: str, netns_name: str) -> None:
    # Deleting the link first removes both ends at once; removing only the namespace
    # would leave the host end alive until the kernel's asynchronous netns cleanup.
    _delete_link(host_ifname)
    _remove_netns(netns_name)


def scan_links() -> list[str]:
    with IPRoute() as ipr:
        names = [str(link.get("ifname")) for link in ipr.link("dump")]
    return sorted(n for n in names if n.startswith("icv"))
