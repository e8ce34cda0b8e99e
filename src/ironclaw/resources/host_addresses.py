"""The host's own addresses, as the egress proxy must know them. Stdlib only.

An allowed name pointed at one of them would reach the host's own services, so the
proxy refuses them twice: against a list read at start (``local_networks``) and by
asking the kernel per address (``is_local_address``), which also sees addresses added
later. Both describe the network namespace the proxy runs in: the host's.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket

from ironclaw.policy.addresses import IPAddress, IPNetwork

__all__ = ["is_local_address", "local_networks", "nonlocal_bind"]


def local_networks() -> tuple[IPNetwork, ...]:
    """The host's own addresses and local routes (``127.0.0.0/8``, AnyIP ranges).

    Read from /proc, so it describes the network namespace the proxy runs in.
    """
    nets: set[IPNetwork] = set()
    with contextlib.suppress(OSError), open("/proc/net/fib_trie") as f:
        last = ""
        for line in f:
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif text.startswith("/") and text.endswith(("LOCAL", "BROADCAST")) and last:
                nets.add(ipaddress.ip_network(f"{last}{text.split()[0]}", strict=False))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as f:
        for line in f:
            word = line.split()[0]
            nets.add(ipaddress.ip_network(":".join(word[i : i + 4] for i in range(0, 32, 4))))
    return tuple(sorted(nets, key=lambda n: (n.version, n)))


def is_local_address(ip: IPAddress) -> bool:
    """True if the kernel lets us bind to ``ip``: it is delivered on this host, now.

    Exact and current (addresses added after start, AnyIP routes) where the list read at
    start is not. Any failure but "address not available" counts as local: fail closed.
    """
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.bind((str(ip), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


def nonlocal_bind() -> bool:
    """Whether the host lets any address be bound (then binding proves nothing)."""
    for path in ("/proc/sys/net/ipv4/ip_nonlocal_bind", "/proc/sys/net/ipv6/ip_nonlocal_bind"):
        with contextlib.suppress(OSError), open(path) as f:
            if f.read().strip() != "0":
                return True
    return False
