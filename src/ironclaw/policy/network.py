"""Network policy of one sandbox, and its pure compilation to nftables objects.

Deny-all is the default: a sandbox reaches exactly what ``allow`` lists (by address) and
what ``allow_domains`` lists (by name, only through the host-side egress proxy). The
compilers below do no I/O, so what ends up in the kernel can be golden-tested.

Layout of the ``inet ironclaw`` table (see docs/NETWORK.md)::

    set ifs    { ifname }                 every sandbox's host veth (dispatch)
    map fwd    { ifname : counter }       host veth -> counter icc-<hash> (its drops)
    set nat    { ifname }                 host veths whose allowed egress is masqueraded
    set rec    { ifname . index }         what each sandbox installed (comments)
    set proxy  { ifname . ipv4 }          the sandbox's own egress proxy address
    sets a4p a4t a4a a6p a6t a6a          allow ranges keyed (veth . proto . port . daddr)
    chain forward / input                 oifname @ifs: replies only; iifname @ifs goto egress
    chain egress                          established; proxy; allow sets; counted drop
    chain postrouting                     masquerade what the allow sets match, nothing else

A sandbox owns no chain and no rule, only set elements and one named counter, so its
set-up and tear-down cost the same with 1 or 10,000 others installed; every name and key
derives from a hash of the full id."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ironclaw.errors import ConfigError
from ironclaw.ids import id_digest, validate_sandbox_id
from ironclaw.policy.domains import LABEL, domain_allowed

__all__ = [
    "PROXY_PORT",
    "TABLE",
    "AllowRule",
    "BaseTable",
    "Element",
    "NetworkPolicy",
    "SandboxNames",
    "base_table",
    "domain_allowed",
    "fixed_elements",
    "ifname_key",
    "parse_record",
    "record_count",
    "record_keys",
    "sandbox_elements",
    "sandbox_names",
]

TABLE = "ironclaw"
FAMILY = "inet"
PROXY_PORT = 3128

_LABEL = LABEL
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


# --- names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxNames:
    """Every kernel-visible name of one sandbox's network, all from a hash of the full id."""

    chain: str  # the sandbox's drop counter icc-<64-bit hash> (once its filter chain)
    nat_chain: str  # icn-<64-bit hash>: reserved (the earlier layout's nat chain)
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


# --- the table, as data ----------------------------------------------------------------
#
# Every sandbox is a handful of *set elements* in shared sets; no sandbox owns a chain or
# a rule. That keeps each transaction O(1) in the kernel too: adding a rule or a jump
# element makes nf_tables re-validate every chain reachable from the base chains at
# commit (about 20 ms at 10,000 sandboxes), while adding plain set elements does not.
# The rule shapes below are compiled to netlink by ``ironclaw.resources.firewall``.

IFNAMSIZ = 16
REG = 8  # NFT_REG32_00: keys are built in consecutive 32-bit registers from here
META_IIFNAME, META_OIFNAME, META_NFPROTO, META_L4PROTO = 6, 7, 15, 16
BASE_NETWORK, BASE_TRANSPORT = 1, 2
VERDICT_DROP, VERDICT_ACCEPT, VERDICT_GOTO = 0, 1, -4
HOOK_INPUT, HOOK_FORWARD, HOOK_POSTROUTING = 1, 2, 4
TYPE_INTEGER, TYPE_MARK, TYPE_IFNAME = 4, 19, 41  # nft datatypes, for listings only
CT_ESTABLISHED_RELATED = 0b110  # NF_CT_STATE_BIT(ESTABLISHED) | NF_CT_STATE_BIT(RELATED)

IFS_SET = "ifs"  # every sandbox's host veth; its comment counts the record chunks
FWD_MAP = "drops"  # host veth -> the sandbox's drop counter (object map)
NAT_SET = "natifs"  # host veths whose allowed egress is masqueraded
REC_SET = "rec"  # (veth, chunk) -> what the sandbox installed, so removal needs only the id
PROXY_SET = "proxy"  # (veth, proxy address): tcp/3128 to the sandbox's own egress proxy
EGRESS = "egress"
DROP_COMMENT = "ironclaw:drop"
_REC_CHUNK = 190  # characters per record comment (element user data holds at most 255 bytes)


@dataclass(frozen=True)
class Meta:
    key: int
    dreg: int


@dataclass(frozen=True)
class Payload:
    base: int
    offset: int
    length: int
    dreg: int


@dataclass(frozen=True)
class CtState:
    dreg: int


@dataclass(frozen=True)
class Bitwise:
    reg: int
    mask: bytes


@dataclass(frozen=True)
class Cmp:
    reg: int
    data: bytes
    negate: bool = False


@dataclass(frozen=True)
class Lookup:
    set: str
    sreg: int
    invert: bool = False
    verdict: bool = False  # a verdict map: the element's verdict is applied


@dataclass(frozen=True)
class ObjrefMap:
    set: str
    sreg: int


@dataclass(frozen=True)
class Counter:
    pass


@dataclass(frozen=True)
class Verdict:
    code: int
    chain: str | None = None


@dataclass(frozen=True)
class Masquerade:
    pass


Expr = (
    Meta | Payload | CtState | Bitwise | Cmp | Lookup | ObjrefMap | Counter | Verdict | Masquerade
)


@dataclass(frozen=True)
class SetSpec:
    name: str
    key_len: int
    key_type: int
    interval: bool = False
    counter_map: bool = False  # an object map: key -> named counter
    verdict_map: bool = False


@dataclass(frozen=True)
class ChainSpec:
    name: str
    hook: int | None = None
    prio: int = 0
    type: str = "filter"


@dataclass(frozen=True)
class RuleSpec:
    chain: str
    exprs: tuple[Expr, ...]
    comment: str | None = None


@dataclass(frozen=True)
class BaseTable:
    sets: tuple[SetSpec, ...]
    chains: tuple[ChainSpec, ...]
    rules: tuple[RuleSpec, ...]
    elements: tuple[Element, ...]  # static: the shard verdict maps


@dataclass(frozen=True)
class Element:
    """One set element; ``last`` makes it the inclusive range ``key``..``last``."""

    set: str
    key: bytes
    last: bytes | None = None
    obj: str | None = None
    comment: str | None = None
    jump: str | None = None  # verdict map data


@dataclass(frozen=True)
class _AllowSet:
    name: str
    version: int
    with_proto: bool
    with_port: bool
    shard: str

    @property
    def addr_len(self) -> int:
        return 4 if self.version == 4 else 16

    @property
    def key_len(self) -> int:
        return IFNAMSIZ + 4 * self.with_proto + 4 * self.with_port + self.addr_len


# Allow ranges, keyed (veth . proto . port . daddr) with only the trailing address a range,
# which makes each key one interval in plain byte order: a red-black tree set, O(log n)
# per lookup (concatenated-range sets would pick pipapo, whose updates cost ~50 ms per
# delete at 20,000 elements). Since Linux 6.18 a commit that touches an rbtree set walks
# all of it (~0.1 ms per 1,000 ranges), so the ranges are spread over 16 shards, picked
# by the first hash digit of the veth name ("icv<digit>...") through a static verdict map.
SHARDS = "0123456789abcdef"
ALLOW_SETS = tuple(
    _AllowSet(f"a{v}{kind}{shard}", v, kind in "pt", kind == "p", shard)
    for shard in SHARDS
    for v in (4, 6)
    for kind in "pta"
)
_ALLOW = {s.name: s for s in ALLOW_SETS}
ALLOW_SHARDS = "allow_shards"  # "icv<digit>" -> jump allow_<digit>
NAT_SHARDS = "nat_shards"  # "icv<digit>" -> jump masq_<digit>


def _ifname_key(ifname: str) -> bytes:
    return ifname.encode().ljust(IFNAMSIZ, b"\0")


def _ct_ok() -> tuple[Expr, ...]:
    mask = CT_ESTABLISHED_RELATED.to_bytes(4, sys.byteorder)
    return (CtState(REG), Bitwise(REG, mask), Cmp(REG, bytes(4), negate=True))


def _nfproto(version: int) -> tuple[Expr, ...]:
    return (Meta(META_NFPROTO, REG), Cmp(REG, bytes([2 if version == 4 else 10])))


def _allow_match(spec: _AllowSet) -> tuple[Expr, ...]:
    exprs: list[Expr] = [*_nfproto(spec.version), Meta(META_IIFNAME, REG)]
    reg = REG + IFNAMSIZ // 4
    if spec.with_proto:
        exprs.append(Meta(META_L4PROTO, reg))
        reg += 1
    if spec.with_port:
        exprs.append(Payload(BASE_TRANSPORT, 2, 2, reg))
        reg += 1
    exprs.append(Payload(BASE_NETWORK, 16 if spec.version == 4 else 24, spec.addr_len, reg))
    exprs.append(Lookup(spec.name, REG))
    return tuple(exprs)


def base_table() -> BaseTable:
    """The shared table. Sandboxes only ever add and remove elements of its sets.

    Dispatch is one hash lookup keyed by the interface name (``ifs``), whatever the
    number of sandboxes; established traffic is accepted right after it.
    """
    ifname_sets = (IFS_SET, NAT_SET)
    sets = (
        *(SetSpec(name, IFNAMSIZ, TYPE_IFNAME) for name in ifname_sets),
        SetSpec(FWD_MAP, IFNAMSIZ, TYPE_IFNAME, counter_map=True),
        SetSpec(REC_SET, IFNAMSIZ + 4, (TYPE_IFNAME << 6) | TYPE_MARK),
        SetSpec(PROXY_SET, IFNAMSIZ + 4, TYPE_INTEGER),
        *(SetSpec(s.name, s.key_len, TYPE_INTEGER, interval=True) for s in ALLOW_SETS),
        *(SetSpec(m, 4, TYPE_INTEGER, verdict_map=True) for m in (ALLOW_SHARDS, NAT_SHARDS)),
    )
    chains = (
        ChainSpec("forward", HOOK_FORWARD),
        ChainSpec("input", HOOK_INPUT),
        ChainSpec("postrouting", HOOK_POSTROUTING, 100, "nat"),
        ChainSpec(EGRESS),
        *(ChainSpec(f"{kind}_{shard}") for kind in ("allow", "masq") for shard in SHARDS),
    )
    shard_of = (Meta(META_IIFNAME, REG),)
    to_sandbox = (Meta(META_OIFNAME, REG), Lookup(IFS_SET, REG))
    from_sandbox = (Meta(META_IIFNAME, REG), Lookup(IFS_SET, REG))
    accept, drop = Verdict(VERDICT_ACCEPT), Verdict(VERDICT_DROP)
    proxy = (
        *_nfproto(4),
        Meta(META_L4PROTO, REG),
        Cmp(REG, bytes([6])),
        Payload(BASE_TRANSPORT, 2, 2, REG),
        Cmp(REG, PROXY_PORT.to_bytes(2, "big")),
        Meta(META_IIFNAME, REG),
        Payload(BASE_NETWORK, 16, 4, REG + IFNAMSIZ // 4),
        Lookup(PROXY_SET, REG),
    )
    rules = (
        RuleSpec("forward", (*to_sandbox, *_ct_ok(), accept)),
        RuleSpec("forward", (*to_sandbox, Counter(), drop)),
        RuleSpec("forward", (*from_sandbox, Verdict(VERDICT_GOTO, EGRESS))),
        RuleSpec("input", (*from_sandbox, Verdict(VERDICT_GOTO, EGRESS))),
        RuleSpec(EGRESS, (*_ct_ok(), accept)),
        RuleSpec(EGRESS, (*proxy, accept), "ironclaw:proxy"),
        RuleSpec(EGRESS, (*shard_of, Lookup(ALLOW_SHARDS, REG, verdict=True))),
        RuleSpec(EGRESS, (Meta(META_IIFNAME, REG), ObjrefMap(FWD_MAP, REG), drop), DROP_COMMENT),
        RuleSpec(EGRESS, (drop,)),
        *(RuleSpec(f"allow_{s.shard}", (*_allow_match(s), accept)) for s in ALLOW_SETS),
        RuleSpec("postrouting", (Meta(META_IIFNAME, REG), Lookup(NAT_SET, REG, True), accept)),
        RuleSpec("postrouting", (*shard_of, Lookup(NAT_SHARDS, REG, verdict=True))),
        *(RuleSpec(f"masq_{s.shard}", (*_allow_match(s), Masquerade())) for s in ALLOW_SETS),
    )
    shard_elements = tuple(
        Element(vmap, f"icv{shard}".encode(), jump=f"{kind}_{shard}")
        for vmap, kind in ((ALLOW_SHARDS, "allow"), (NAT_SHARDS, "masq"))
        for shard in SHARDS
    )
    return BaseTable(sets, chains, rules, shard_elements)


def _allow_ranges(ifname: str, policy: NetworkPolicy) -> list[Element]:
    """Each allow as key ranges, merged per set so no two ranges overlap or touch."""
    head = _ifname_key(ifname)
    ranges: dict[str, list[tuple[int, int]]] = {}
    for rule in policy.allow:
        net = rule.network
        if rule.port is not None:
            protos = [rule.proto] if rule.proto else ["tcp", "udp"]
            kinds = [(b"p", _PROTO[p].to_bytes(4, "little") + _port(rule.port)) for p in protos]
        elif rule.proto is not None:
            kinds = [(b"t", _PROTO[rule.proto].to_bytes(4, "little"))]
        else:
            kinds = [(b"a", b"")]
        alen = 4 if net.version == 4 else 16
        for kind, mid in kinds:
            name = f"a{net.version}{kind.decode()}{ifname[3]}"
            first = head + mid + int(net.network_address).to_bytes(alen, "big")
            last = head + mid + int(net.broadcast_address).to_bytes(alen, "big")
            ranges.setdefault(name, []).append((int.from_bytes(first), int.from_bytes(last)))
    out: list[Element] = []
    for name in sorted(ranges):
        klen = _ALLOW[name].key_len
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges[name]):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        out += [Element(name, lo.to_bytes(klen), hi.to_bytes(klen)) for lo, hi in merged]
    return out


_PROTO = {"tcp": 6, "udp": 17}


def _port(port: int) -> bytes:
    return port.to_bytes(2, "big") + b"\0\0"


def _rec_key(ifname: str, index: int) -> bytes:
    return _ifname_key(ifname) + index.to_bytes(4, sys.byteorder)


def _record_chunks(entries: list[str]) -> list[str]:
    chunks: list[str] = []
    for entry in entries:
        if chunks and len(chunks[-1]) + 1 + len(entry) <= _REC_CHUNK:
            chunks[-1] += ";" + entry
        else:
            chunks.append(entry)
    return chunks


def sandbox_elements(
    sandbox_id: str, policy: NetworkPolicy, *, proxy_addr: str | None = None
) -> list[Element]:
    """Everything one sandbox adds to the table: its whole set-up is one batch of these.

    Elements that depend on the policy are also written down in ``rec`` (as comments),
    so that removal and updates can find them from the sandbox id alone.
    """
    n = sandbox_names(sandbox_id)
    head = _ifname_key(n.host_ifname)
    varying = _allow_ranges(n.host_ifname, policy)
    if proxy_addr is not None and policy.needs_proxy:
        addr = ipaddress.IPv4Address(proxy_addr)
        varying.append(Element(PROXY_SET, head + addr.packed))
    entries = [
        f"{e.set}:{e.key[IFNAMSIZ:].hex()}" + (f":{e.last[IFNAMSIZ:].hex()}" if e.last else "")
        for e in varying
    ]
    chunks = _record_chunks(entries)
    out = [
        Element(IFS_SET, head, comment=f"ironclaw:rec={len(chunks)}"),
        Element(FWD_MAP, head, obj=n.chain),
        *(Element(REC_SET, _rec_key(n.host_ifname, i), comment=c) for i, c in enumerate(chunks)),
        *varying,
    ]
    if policy.allow:
        out.insert(2, Element(NAT_SET, head))
    return out


def record_count(comment: str | None) -> int:
    """Chunks of record a sandbox's ``ifs`` comment announces (0 when unreadable)."""
    prefix = "ironclaw:rec="
    if comment and comment.startswith(prefix) and comment[len(prefix) :].isdigit():
        return int(comment[len(prefix) :])
    return 0


def fixed_elements(sandbox_id: str, chunks: int) -> list[Element]:
    """The elements whose keys follow from the id alone (and the record's length)."""
    n = sandbox_names(sandbox_id)
    head = _ifname_key(n.host_ifname)
    return [
        Element(IFS_SET, head),
        Element(FWD_MAP, head),
        Element(NAT_SET, head),
        *(Element(REC_SET, _rec_key(n.host_ifname, i)) for i in range(chunks)),
    ]


def record_keys(host_ifname: str, chunks: int) -> list[bytes]:
    """Keys of a sandbox's record chunks in ``rec``."""
    return [_rec_key(host_ifname, i) for i in range(chunks)]


def ifname_key(host_ifname: str) -> bytes:
    """An interface name as the kernel compares it: NUL-padded to IFNAMSIZ."""
    return _ifname_key(host_ifname)


def parse_record(host_ifname: str, comments: Iterable[str]) -> list[Element]:
    """The policy-dependent elements a sandbox's record lists; bad entries are refused."""
    head = _ifname_key(host_ifname)
    known = {s.name: s.key_len for s in ALLOW_SETS} | {PROXY_SET: IFNAMSIZ + 4}
    out: list[Element] = []
    for comment in comments:
        for entry in filter(None, comment.split(";")):
            name, _, rest = entry.partition(":")
            lo_hex, _, hi_hex = rest.partition(":")
            try:
                key = head + bytes.fromhex(lo_hex)
                last = head + bytes.fromhex(hi_hex) if hi_hex else None
            except ValueError:
                raise ConfigError(f"unreadable firewall record entry {entry!r}") from None
            if name not in known or len(key) != known[name] or (last and len(last) != len(key)):
                raise ConfigError(f"unreadable firewall record entry {entry!r}")
            out.append(Element(name, key, last))
    return out
