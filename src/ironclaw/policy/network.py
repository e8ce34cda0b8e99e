"""Network policy of one sandbox, and its pure compilation to nftables JSON.

Deny-all is the default: a sandbox reaches exactly what ``allow`` lists (by address) and
what ``allow_domains`` lists (by name, only through the host-side egress proxy). The
compilers below do no I/O, so the rules that end up in the kernel can be golden-tested.

Layout of the ``inet ironclaw`` table (see docs/NETWORK.md)::

    map fwd   { type ifname : verdict }   host veth name -> jump icc-<hash>
    map nat   { type ifname : verdict }   host veth name -> jump icn-<hash>
    set ifs   { type ifname }             every sandbox's host veth
    chain forward     (hook forward)      nothing new enters a sandbox; vmap @fwd
    chain input       (hook input)        vmap @fwd: the host is just another destination
    chain postrouting (hook postrouting)  vmap @nat: masquerade allowed egress only

Dispatch is one hash lookup per packet however many sandboxes exist, and each
per-sandbox chain name carries 64 bits of a hash of the full id, so no two ids share it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ironclaw.errors import ConfigError
from ironclaw.ids import id_digest, validate_sandbox_id

__all__ = [
    "PROXY_PORT",
    "TABLE",
    "AllowRule",
    "NetworkPolicy",
    "SandboxNames",
    "base_ruleset",
    "domain_allowed",
    "sandbox_delete_ruleset",
    "sandbox_names",
    "sandbox_ruleset",
    "sandbox_update_ruleset",
]

TABLE = "ironclaw"
FAMILY = "inet"
PROXY_PORT = 3128
FWD_MAP = "fwd"
NAT_MAP = "nat"
IFS_SET = "ifs"
DROP_COMMENT = "ironclaw:drop"

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Suffixes under which unrelated parties register names: a wildcard directly below one
# of these is as broad as a TLD wildcard. Not a full public-suffix list, a guard rail.
_PUBLIC_SUFFIXES = frozenset(
    {
        "co.uk", "org.uk", "ac.uk", "gov.uk", "com.au", "net.au", "org.au", "co.jp",
        "ne.jp", "or.jp", "com.br", "com.cn", "net.cn", "org.cn", "co.nz", "co.in",
        "co.za", "com.mx", "com.tr", "com.tw", "com.hk", "com.sg", "co.kr", "github.io",
        "herokuapp.com", "appspot.com", "cloudfront.net", "amazonaws.com", "azurewebsites.net",
        "blogspot.com", "pages.dev", "workers.dev", "vercel.app", "netlify.app",
    }
)  # fmt: skip


class AllowRule(BaseModel):
    """One address allow: a network, optionally narrowed to a port and a protocol."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: IPv4Network | IPv6Network
    port: int | None = None
    proto: Literal["tcp", "udp"] | None = None

    @field_validator("port")
    @classmethod
    def _port_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65535:
            raise ValueError(f"port {value} is outside 1-65535")
        return value

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse ``CIDR[:PORT[/PROTO]]``; IPv6 with a port is written ``[2001:db8::/32]:443``."""
        raw = text.strip()
        port_part: str | None = None
        if raw.startswith("["):
            close = raw.find("]")
            if close < 0:
                raise ConfigError(f"bad allow rule {text!r}: missing ']'")
            net_part, rest = raw[1:close], raw[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"bad allow rule {text!r}: expected ':PORT' after ']'")
                port_part = rest[1:]
        elif raw.count(":") == 1:
            net_part, port_part = raw.split(":")
        else:
            net_part = raw  # IPv4 without port, or bare IPv6
        try:
            network = ipaddress.ip_network(net_part, strict=True)
        except ValueError as exc:
            raise ConfigError(
                f"bad allow rule {text!r}: {exc} (expected CIDR[:PORT[/tcp|udp]], "
                "e.g. 10.1.2.0/24:443 or 10.1.2.3:53/udp)"
            ) from None
        port: int | None = None
        proto: str | None = None
        if port_part is not None:
            if "/" in port_part:
                port_part, proto = port_part.split("/", 1)
                if proto not in ("tcp", "udp"):
                    raise ConfigError(f"bad allow rule {text!r}: protocol must be tcp or udp")
            if not port_part.isdigit() or not 1 <= int(port_part) <= 65535:
                raise ConfigError(f"bad allow rule {text!r}: port must be a number in 1-65535")
            port = int(port_part)
        return cls.model_validate({"network": network, "port": port, "proto": proto})

    def __str__(self) -> str:
        net = str(self.network)
        if self.port is None:
            return net
        head = f"[{net}]" if self.network.version == 6 else net
        return f"{head}:{self.port}" + (f"/{self.proto}" if self.proto else "")


def _check_domain(pattern: str, *, for_allow: bool) -> str:
    name = pattern.strip().lower().rstrip(".")
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    labels = body.split(".") if body else []
    if not labels or not all(_LABEL.fullmatch(label) for label in labels) or len(body) > 253:
        raise ValueError(f"{pattern!r} is not a domain name or '*.suffix' pattern")
    if for_allow:
        if len(labels) < 2:
            raise ValueError(f"{pattern!r} is too broad: a bare top-level domain is refused")
        if wildcard and body in _PUBLIC_SUFFIXES:
            raise ValueError(f"{pattern!r} is too broad: {body} is a public suffix")
    return name


class NetworkPolicy(BaseModel):
    """Deny-all unless allowed; deny_domains wins over allow_domains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: tuple[AllowRule, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()

    @field_validator("allow", mode="before")
    @classmethod
    def _parse_allow(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(AllowRule.parse(v) if isinstance(v, str) else v for v in value)
        return value

    @field_validator("allow_domains")
    @classmethod
    def _allow_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_check_domain(v, for_allow=True) for v in value))

    @field_validator("deny_domains")
    @classmethod
    def _deny_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_check_domain(v, for_allow=False) for v in value))

    @property
    def needs_network(self) -> bool:
        """False means loopback only: no veth, no chain, nothing to filter."""
        return bool(self.allow or self.allow_domains)

    @property
    def needs_proxy(self) -> bool:
        return bool(self.allow_domains)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def domain_allowed(name: str, allow: Iterable[str], deny: Iterable[str]) -> tuple[bool, str]:
    """Decide one host name: (allowed, reason). Deny patterns win over allow patterns."""
    host = name.strip().lower().rstrip(".")
    if not host or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return False, "not a valid host name"
    for pattern in deny:
        if _matches(host, pattern):
            return False, f"denied by {pattern}"
    for pattern in allow:
        if _matches(host, pattern):
            return True, f"allowed by {pattern}"
    return False, "not in allow list"


# --- names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxNames:
    """Every kernel-visible name of one sandbox's network, all from a hash of the full id."""

    chain: str  # filter chain, icc-<64-bit hash>
    nat_chain: str  # nat chain, icn-<64-bit hash>
    host_ifname: str  # host veth, icv<48-bit hash> (15 chars, the kernel's limit)
    netns: str  # icns-<64-bit hash>


def sandbox_names(sandbox_id: str) -> SandboxNames:
    validate_sandbox_id(sandbox_id)
    digest = id_digest(sandbox_id, 16)
    return SandboxNames(
        chain=f"icc-{digest[:16]}",
        nat_chain=f"icn-{digest[:16]}",
        host_ifname=f"icv{digest[:12]}",
        netns=f"icns-{digest[:16]}",
    )


# --- nft JSON compilers ----------------------------------------------------------------


def _obj(kind: str, table: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": FAMILY, "table": table, **fields}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _eq(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _rule(table: str, chain: str, expr: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"add": _obj("rule", table, chain=chain, expr=expr, **extra)}


_CT_OK = _eq({"ct": {"key": "state"}}, ["established", "related"], op="in")


def base_ruleset(table: str = TABLE) -> list[dict[str, Any]]:
    """The shared table: idempotent, so racing creators converge on the same state.

    Base chains are flushed and refilled inside the same transaction; maps and sets are
    only added (never flushed), so existing sandboxes keep their dispatch entries.
    """
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": FAMILY, "name": table}}},
        {"add": _obj("map", table, name=FWD_MAP, type="ifname", map="verdict")},
        {"add": _obj("map", table, name=NAT_MAP, type="ifname", map="verdict")},
        {"add": _obj("set", table, name=IFS_SET, type="ifname")},
    ]
    hooks = (
        ("forward", "filter", "forward", 0),
        ("input", "filter", "input", 0),
        ("postrouting", "nat", "postrouting", 100),
    )
    for name, ctype, hook, prio in hooks:
        chain = _obj("chain", table, name=name, type=ctype, hook=hook, prio=prio, policy="accept")
        cmds.append({"add": chain})
        cmds.append({"flush": _obj("chain", table, name=name)})
    to_sandbox = _eq(_meta("oifname"), f"@{IFS_SET}")
    cmds += [
        _rule(table, "forward", [to_sandbox, _CT_OK, {"accept": None}]),
        _rule(table, "forward", [to_sandbox, {"counter": None}, {"drop": None}]),
        _rule(table, "forward", [{"vmap": {"key": _meta("iifname"), "data": f"@{FWD_MAP}"}}]),
        _rule(table, "input", [{"vmap": {"key": _meta("iifname"), "data": f"@{FWD_MAP}"}}]),
        _rule(table, "postrouting", [{"vmap": {"key": _meta("iifname"), "data": f"@{NAT_MAP}"}}]),
    ]
    return cmds


def _daddr(network: IPv4Network | IPv6Network) -> dict[str, Any]:
    proto = "ip" if network.version == 4 else "ip6"
    single = network.prefixlen == network.max_prefixlen
    right: Any = (
        str(network.network_address)
        if single
        else {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}
    )
    return _eq({"payload": {"protocol": proto, "field": "daddr"}}, right)


def _l4(rule: AllowRule) -> list[dict[str, Any]]:
    if rule.proto is not None and rule.port is not None:
        return [_eq({"payload": {"protocol": rule.proto, "field": "dport"}}, rule.port)]
    if rule.proto is not None:
        return [_eq(_meta("l4proto"), rule.proto)]
    if rule.port is not None:
        return [
            _eq(_meta("l4proto"), {"set": ["tcp", "udp"]}),
            _eq({"payload": {"protocol": "th", "field": "dport"}}, rule.port),
        ]
    return []


def _filter_rules(
    table: str, chain: str, policy: NetworkPolicy, proxy_addr: str | None
) -> list[dict[str, Any]]:
    cmds = [_rule(table, chain, [_CT_OK, {"accept": None}])]
    if proxy_addr is not None and policy.needs_proxy:
        proxy = [
            _daddr(ipaddress.ip_network(proxy_addr)),
            _eq({"payload": {"protocol": "tcp", "field": "dport"}}, PROXY_PORT),
            {"counter": None},
            {"accept": None},
        ]
        cmds.append(_rule(table, chain, proxy, comment="ironclaw:proxy"))
    for allow in policy.allow:
        expr = [_daddr(allow.network), *_l4(allow), {"counter": None}, {"accept": None}]
        cmds.append(_rule(table, chain, expr, comment=f"allow {allow}"))
    cmds.append(_rule(table, chain, [{"counter": None}, {"drop": None}], comment=DROP_COMMENT))
    return cmds


def _nat_rules(table: str, chain: str, policy: NetworkPolicy) -> list[dict[str, Any]]:
    return [
        _rule(table, chain, [_daddr(a.network), *_l4(a), {"masquerade": None}])
        for a in policy.allow
    ]


def sandbox_ruleset(
    sandbox_id: str,
    policy: NetworkPolicy,
    *,
    proxy_addr: str | None = None,
    table: str = TABLE,
) -> list[dict[str, Any]]:
    """One transaction that installs a sandbox: its chains, then its dispatch entries.

    ``add`` + ``flush`` makes it repeatable over a half-cleaned earlier attempt.
    """
    n = sandbox_names(sandbox_id)
    cmds: list[dict[str, Any]] = []
    for chain in (n.chain, n.nat_chain):
        cmds.append({"add": _obj("chain", table, name=chain)})
        cmds.append({"flush": _obj("chain", table, name=chain)})
    cmds += _filter_rules(table, n.chain, policy, proxy_addr)
    cmds += _nat_rules(table, n.nat_chain, policy)
    cmds += [
        {"add": _obj("element", table, name=FWD_MAP, elem=[[n.host_ifname, _jump(n.chain)]])},
        {"add": _obj("element", table, name=NAT_MAP, elem=[[n.host_ifname, _jump(n.nat_chain)]])},
        {"add": _obj("element", table, name=IFS_SET, elem=[n.host_ifname])},
    ]
    return cmds


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def sandbox_update_ruleset(
    sandbox_id: str,
    policy: NetworkPolicy,
    *,
    proxy_addr: str | None = None,
    table: str = TABLE,
) -> list[dict[str, Any]]:
    """Replace a live sandbox's rules in one transaction: no packet sees a gap."""
    n = sandbox_names(sandbox_id)
    return [
        {"flush": _obj("chain", table, name=n.chain)},
        *_filter_rules(table, n.chain, policy, proxy_addr),
        {"flush": _obj("chain", table, name=n.nat_chain)},
        *_nat_rules(table, n.nat_chain, policy),
    ]


def sandbox_delete_ruleset(sandbox_id: str, *, table: str = TABLE) -> list[dict[str, Any]]:
    """Remove everything of one sandbox; succeeds whether or not any of it exists.

    Each object is first added (a no-op when present) and then deleted, because
    nft 1.0.6 has no ``destroy`` and a failed delete would abort the whole batch.
    """
    n = sandbox_names(sandbox_id)
    fwd = _obj("element", table, name=FWD_MAP, elem=[[n.host_ifname, _jump(n.chain)]])
    nat = _obj("element", table, name=NAT_MAP, elem=[[n.host_ifname, _jump(n.nat_chain)]])
    ifs = _obj("element", table, name=IFS_SET, elem=[n.host_ifname])
    cmds: list[dict[str, Any]] = [
        {"add": _obj("chain", table, name=n.chain)},
        {"add": _obj("chain", table, name=n.nat_chain)},
        {"add": fwd},
        {"add": nat},
        {"add": ifs},
        {"delete": fwd},
        {"delete": nat},
        {"delete": ifs},
    ]
    for chain in (n.chain, n.nat_chain):
        cmds.append({"flush": _obj("chain", table, name=chain)})
        cmds.append({"delete": _obj("chain", table, name=chain)})
    return cmds
