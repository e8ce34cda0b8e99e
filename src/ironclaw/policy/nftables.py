"""A sandbox's network policy compiled to nf_tables objects: pure data, no I/O.

Layout of the ``inet ironclaw`` table (see docs/NETWORK.md)::

    set ifs    { ifname }                 every sandbox's host veth (dispatch)
    map drops  { ifname : counter }       host veth -> counter icc-<hash> (its drops)
    set natifs { ifname }                 host veths whose allowed egress is masqueraded
    set rec    { ifname . index }         what each sandbox installed (comments)
    set proxy  { ifname . ipv4 }          the sandbox's own egress proxy address
    set guard  { ifname }                 host veths closed to the host's own connections
    set expose { ifname . proto . port . uid }  what a port forwarder may dial (host side)
    sets a4p a4t a4a a6p a6t a6a (x16)    allow ranges keyed (veth . proto . port . daddr)
    chain forward / input                 oifname @ifs: replies only; iifname @ifs goto egress
    chain egress                          established; proxy; allow shards; counted drop
    chain postrouting                     masquerade what the allow sets match, nothing else
    chain output / inbound                oifname @guard: replies, exposed ports, counted drop

A sandbox owns no chain and no rule, only set elements and one named counter, so its
set-up and tear-down cost the same with 1 or 10,000 others installed; every name and key
derives from a hash of the full id. :mod:`ironclaw.policy.netlink` encodes these objects
as netlink messages and :mod:`ironclaw.resources.firewall` sends them, so what ends up in
the kernel can be golden-tested here.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from ironclaw.errors import ConfigError
from ironclaw.policy.network import PROXY_PORT, NetworkPolicy, sandbox_names
from ironclaw.policy.nft_exprs import (
    BaseTable,
    Bitwise,
    ChainSpec,
    Cmp,
    Counter,
    CtState,
    Element,
    Expr,
    Lookup,
    Masquerade,
    Meta,
    ObjrefMap,
    Payload,
    RuleSpec,
    SetSpec,
    Verdict,
)

__all__ = [
    "ALLOW_SETS",
    "EXPOSE_SET",
    "FWD_MAP",
    "GUARD_SET",
    "IFNAMSIZ",
    "IFS_SET",
    "NAT_SET",
    "PROXY_SET",
    "REC_SET",
    "TYPE_IFNAME",
    "base_table",
    "expose_element",
    "fixed_elements",
    "ifname_key",
    "parse_expose_key",
    "parse_record",
    "record_count",
    "record_keys",
    "sandbox_elements",
]

# --- the table, as data ----------------------------------------------------------------
#
# Every sandbox is a handful of *set elements* in shared sets; no sandbox owns a chain or
# a rule. That keeps each transaction O(1) in the kernel too: adding a rule or a jump
# element makes nf_tables re-validate every chain reachable from the base chains at
# commit (about 20 ms at 10,000 sandboxes), while adding plain set elements does not.
# The rule shapes below are encoded as netlink by ``ironclaw.policy.netlink``.

IFNAMSIZ = 16
REG = 8  # NFT_REG32_00: keys are built in consecutive 32-bit registers from here
META_IIFNAME, META_OIFNAME, META_SKUID, META_NFPROTO, META_L4PROTO = 6, 7, 10, 15, 16
BASE_NETWORK, BASE_TRANSPORT = 1, 2
VERDICT_DROP, VERDICT_ACCEPT, VERDICT_GOTO = 0, 1, -4
HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT, HOOK_POSTROUTING = 1, 2, 3, 4
TYPE_INTEGER, TYPE_MARK, TYPE_IFNAME = 4, 19, 41  # nft datatypes, for listings only
CT_ESTABLISHED_RELATED = 0b110  # NF_CT_STATE_BIT(ESTABLISHED) | NF_CT_STATE_BIT(RELATED)

IFS_SET = "ifs"  # every sandbox's host veth; its comment counts the record chunks
FWD_MAP = "drops"  # host veth -> the sandbox's drop counter (object map)
NAT_SET = "natifs"  # host veths whose allowed egress is masqueraded
REC_SET = "rec"  # (veth, chunk) -> what the sandbox installed, so removal needs only the id
PROXY_SET = "proxy"  # (veth, proxy address): tcp/3128 to the sandbox's own egress proxy
GUARD_SET = "guard"  # host veths the host's own sockets may not open connections through
EXPOSE_SET = "expose"  # (veth, tcp, port, uid): a port forwarder's one admitted destination
EGRESS = "egress"
INBOUND = "inbound"  # the host's own new connections into a sandbox
EXPOSE_COMMENT = "ironclaw:expose"
EXPOSE_KEY_LEN = IFNAMSIZ + 12
DROP_COMMENT = "ironclaw:drop"
_REC_CHUNK = 190  # characters per record comment (element user data holds at most 255 bytes)


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


def _expose_match() -> tuple[Expr, ...]:
    """``oifname . meta l4proto . th dport . meta skuid @expose`` (key: see expose_element)."""
    return (
        Meta(META_OIFNAME, REG),
        Meta(META_L4PROTO, REG + 4),
        Payload(BASE_TRANSPORT, 2, 2, REG + 5),
        Meta(META_SKUID, REG + 6),
        Lookup(EXPOSE_SET, REG),
    )


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
        SetSpec(GUARD_SET, IFNAMSIZ, TYPE_IFNAME),
        SetSpec(EXPOSE_SET, EXPOSE_KEY_LEN, TYPE_INTEGER),
    )
    chains = (
        ChainSpec("forward", HOOK_FORWARD),
        ChainSpec("input", HOOK_INPUT),
        ChainSpec("postrouting", HOOK_POSTROUTING, 100, "nat"),
        ChainSpec(EGRESS),
        *(ChainSpec(f"{kind}_{shard}") for kind in ("allow", "masq") for shard in SHARDS),
        ChainSpec("output", HOOK_OUTPUT),
        ChainSpec(INBOUND),
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
        # The host's own sockets (the output hook: the forward chain never sees them):
        # replies, and the one port a forwarder was given, as the forwarder's uid.
        RuleSpec(
            "output",
            (Meta(META_OIFNAME, REG), Lookup(GUARD_SET, REG), Verdict(VERDICT_GOTO, INBOUND)),
        ),
        RuleSpec(INBOUND, (*_ct_ok(), accept)),
        RuleSpec(INBOUND, (*_expose_match(), accept), EXPOSE_COMMENT),
        RuleSpec(INBOUND, (Counter(), drop)),
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
        Element(GUARD_SET, head),
        *(Element(REC_SET, _rec_key(n.host_ifname, i), comment=c) for i, c in enumerate(chunks)),
        *varying,
    ]
    if policy.allow:
        out.insert(3, Element(NAT_SET, head))
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
        Element(GUARD_SET, head),
        Element(NAT_SET, head),
        *(Element(REC_SET, _rec_key(n.host_ifname, i)) for i in range(chunks)),
    ]


def expose_element(host_ifname: str, port: int, uid: int) -> Element:
    """The admission of one exposed port: tcp to ``port`` behind ``host_ifname``, from a
    socket of ``uid`` (the forwarder's) on the host. Nothing else of the host gets in."""
    if not 1 <= port <= 65535 or not 0 <= uid < 2**32:
        raise ConfigError(f"cannot admit port {port} for uid {uid}")
    key = _ifname_key(host_ifname) + _PROTO["tcp"].to_bytes(4, "little") + _port(port)
    return Element(EXPOSE_SET, key + uid.to_bytes(4, sys.byteorder), comment=EXPOSE_COMMENT)


def parse_expose_key(key: bytes) -> tuple[str, int, int]:
    """``(host_ifname, port, uid)`` of an ``expose`` key read back from the kernel."""
    if len(key) != EXPOSE_KEY_LEN:
        raise ConfigError(f"unreadable expose element {key.hex()}")
    ifname = key[:IFNAMSIZ].rstrip(b"\0").decode(errors="replace")
    port = int.from_bytes(key[IFNAMSIZ + 4 : IFNAMSIZ + 6], "big")
    return ifname, port, int.from_bytes(key[IFNAMSIZ + 8 :], sys.byteorder)


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
