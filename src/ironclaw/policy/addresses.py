"""Which addresses the egress proxy may connect to: global unicast only. Stdlib only.

``ipaddress``'s own flags are not enough (on 3.11 ``::ffff:127.0.0.1`` is neither
loopback nor private), so the rules are spelled out here: IPv4 embedded in an IPv6
address (mapped, compatible, 6to4, NAT64, Teredo) is unwrapped and judged as IPv4,
and IPv6 outside 2000::/3 is refused outright. On top of that the proxy refuses the
sandbox pool and the host's own addresses, unless an explicit address rule allows the
destination: an allow rule is the operator saying "this internal address is meant".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TypeVar

__all__ = [
    "AddressRule",
    "IPAddress",
    "IPNetwork",
    "NetworkSet",
    "egress_refusal",
    "embedded_ipv4",
    "forms",
    "is_ip_literal",
    "non_global_reason",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
N = TypeVar("N", IPv4Network, IPv6Network)


def _table(make: Callable[[str], N], *rows: tuple[str, str]) -> tuple[tuple[N, str], ...]:
    """``(network, why it is not global)`` rows."""
    return tuple((make(net), why) for net, why in rows)


_V4 = _table(
    IPv4Network,
    ("0.0.0.0/8", "'this network'"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_GLOBAL = IPv6Network("2000::/3")
_V6_OUTSIDE = _table(
    IPv6Network,
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("fc00::/7", "unique local (private)"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
)
_V6_INSIDE = _table(
    IPv6Network,
    ("2001::/32", "Teredo"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
)
_MAPPED = IPv6Network("::ffff:0:0/96")
_COMPAT = IPv6Network("::/96")
_NAT64 = IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")


@dataclass(frozen=True)
class AddressRule:
    """An explicit allow: ``network``, on ``port`` or any port when None."""

    network: IPNetwork
    port: int | None = None

    @classmethod
    def from_json(cls, doc: dict[str, object] | str) -> AddressRule:
        if isinstance(doc, str):
            return cls(ip_network(doc))
        port = doc.get("port")
        return cls(ip_network(str(doc["network"])), int(str(port)) if port is not None else None)

    def covers(self, ip: IPAddress, port: int) -> bool:
        """The rule covers ``ip`` itself or, for ``::ffff:a.b.c.d``, the IPv4 address the
        kernel delivers to; never an address merely embedded in a translated form."""
        if self.port is not None and self.port != port:
            return False
        seen: tuple[IPAddress, ...] = (ip,)
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            seen = (ip, ip.ipv4_mapped)
        return any(a.version == self.network.version and a in self.network for a in seen)


class NetworkSet:
    """Networks with constant-time lookup of single addresses: a host with 10,000
    sandboxes has 10,000 /32s of its own, and every request is checked against them."""

    def __init__(self, nets: Iterable[IPNetwork] = ()) -> None:
        nets = tuple(nets)
        self.hosts = frozenset(n.network_address for n in nets if n.num_addresses == 1)
        self.prefixes = tuple(n for n in nets if n.num_addresses > 1)

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, IPv4Address | IPv6Address):
            return False
        return ip in self.hosts or any(ip.version == n.version and ip in n for n in self.prefixes)

    def __len__(self) -> int:
        return len(self.hosts) + len(self.prefixes)


def embedded_ipv4(ip: IPv6Address) -> tuple[str, IPv4Address] | None:
    """The IPv4 address an IPv6 address carries and the form it is in, if any.

    Teredo yields the client (the real peer; its bits are stored inverted).
    """
    value = int(ip)
    if ip in _MAPPED:
        return "IPv4-mapped", IPv4Address(value & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", IPv4Address(value & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return "6to4", IPv4Address((value >> 80) & 0xFFFFFFFF)
    if ip in _TEREDO:
        return "Teredo", IPv4Address(~value & 0xFFFFFFFF)
    if ip in _COMPAT and value > 1:
        return "IPv4-compatible", IPv4Address(value & 0xFFFFFFFF)
    return None


def forms(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The address itself and, for IPv6 carrying IPv4, that IPv4 address."""
    if isinstance(ip, IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return ip, inner[1]
    return (ip,)


def _v4_reason(ip: IPv4Address) -> str | None:
    for net, why in _V4:
        if ip in net:
            return why
    return None


def non_global_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a global unicast destination, or None if it is one."""
    if isinstance(ip, IPv4Address):
        return _v4_reason(ip)
    inner = embedded_ipv4(ip)
    if inner is not None:
        form, v4 = inner
        why = _v4_reason(v4)
        if why is not None:
            return f"{form} form of {v4} ({why})"
        if form == "IPv4-compatible":
            return f"deprecated IPv4-compatible form of {v4}"
        if form == "Teredo":
            return f"Teredo tunnel to {v4}"
        return None  # mapped, NAT64 or 6to4 form of a global IPv4 address
    if ip not in _V6_GLOBAL:
        for net, why in _V6_OUTSIDE:
            if ip in net:
                return why
        return "reserved (outside 2000::/3)"
    for net, why in _V6_INSIDE:
        if ip in net:
            return why
    return None


def egress_refusal(
    ip: IPAddress,
    port: int,
    *,
    allow: Iterable[AddressRule] = (),
    block: Iterable[IPNetwork] = (),
    own: NetworkSet | Iterable[IPNetwork] = (),
) -> str | None:
    """Why the proxy must not connect to ``ip:port``, or None when it may.

    ``allow`` (explicit address rules) wins; otherwise the address must be global
    unicast in every form it takes, outside ``block`` (the sandbox pool) and none of
    ``own`` (the host's local addresses and local routes).
    """
    if any(rule.covers(ip, port) for rule in allow):
        return None
    why = non_global_reason(ip)
    if why is not None:
        return why
    own_set = own if isinstance(own, NetworkSet) else NetworkSet(own)
    for form in forms(ip):
        if form in own_set:
            return f"{form} is an address of this host"
        for net in block:
            if form.version == net.version and form in net:
                return f"{form} is inside the blocked range {net}"
    return None


def is_ip_literal(host: str) -> bool:
    """True if a resolver would read ``host`` as an address rather than a name.

    Besides what ``ipaddress`` parses this covers the forms ``inet_aton`` accepts
    (``127.1``, ``0x7f000001``, ``2130706433``, ``0177.0.0.1``): a host whose last label
    is a number, as the WHATWG URL standard decides it.
    """
    text = host.strip().strip("[]").rstrip(".")
    try:
        ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    else:
        return True
    last = text.rsplit(".", 1)[-1].lower()
    if last.isdigit():
        return True
    return last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])
