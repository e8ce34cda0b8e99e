"""The VM's network: a tap device bridged to the sandbox's veth, inside its namespace.

The network manager gives every sandbox a namespace whose veth end (``eth0``) holds the
sandbox address, routed and firewalled on the host. A VM must own that address itself,
so inside the namespace the address moves off the veth, and the veth and a new tap are
joined by a bridge: the guest's frames leave through the same veth with the same source
address, and the host-side firewall and proxy apply unchanged. The tap is owned by the
VM's uid so the jailed, unprivileged Firecracker may attach to it. Netlink work runs on a
fresh thread that enters the namespace and is discarded afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
from collections.abc import Callable
from typing import NotRequired, TypedDict, TypeVar, Unpack

from pyroute2 import IPRoute

from ironclaw.errors import NetworkError

__all__ = ["BRIDGE", "TAP", "TapArgs", "attach_tap", "attach_tap_sync"]

TAP = "tap0"
BRIDGE = "br0"
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(netns_path: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` inside ``netns_path``; only ever call this on a disposable thread."""
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns_path}) failed")
        try:
            return fn()
        finally:
            if _libc.setns(orig, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the host namespace failed")
    finally:
        os.close(target)
        os.close(orig)


class TapArgs(TypedDict):
    """Where the tap goes: the namespace's veth (``guest_ifname``, holding ``guest_ip``/
    ``prefixlen`` until bridged), the owner of the tap (``uid``/``gid``), its name."""

    uid: int
    gid: int
    guest_ifname: str
    guest_ip: str
    prefixlen: int
    tap: NotRequired[str]


def attach_tap_sync(netns_path: str, **args: Unpack[TapArgs]) -> None:
    """Blocking: create ``tap`` and the bridge in the namespace; see the module doc."""

    tap, guest_ip, prefixlen = args.get("tap", TAP), args["guest_ip"], args["prefixlen"]

    def work() -> None:
        with IPRoute() as ipr:
            (veth,) = ipr.link_lookup(ifname=args["guest_ifname"])
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap", uid=args["uid"], gid=args["gid"])
            (tapi,) = ipr.link_lookup(ifname=tap)
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            (br,) = ipr.link_lookup(ifname=BRIDGE)
            with contextlib.suppress(Exception):
                ipr.route("del", dst="0.0.0.0", dst_len=0)  # noqa: S104 default route
            with contextlib.suppress(Exception):
                ipr.addr("del", index=veth, address=guest_ip, prefixlen=prefixlen)
            ipr.link("set", index=veth, master=br)
            ipr.link("set", index=tapi, master=br)
            for idx in (br, veth, tapi):
                ipr.link("set", index=idx, state="up")

    _in_netns(netns_path, work)


async def attach_tap(netns_path: str, **args: Unpack[TapArgs]) -> None:
    """Async wrapper of :func:`attach_tap_sync`; netlink errors become NetworkError."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    def body() -> None:
        try:
            attach_tap_sync(netns_path, **args)
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, exc)
        else:
            loop.call_soon_threadsafe(settle, None)

    threading.Thread(target=body, name="ironclaw-fc-tap", daemon=True).start()
    try:
        await fut
    except Exception as exc:  # OSError, pyroute2's NetlinkError, a missing link
        raise NetworkError(f"cannot give the VM a tap device in {netns_path}: {exc}") from exc
