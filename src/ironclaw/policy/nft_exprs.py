"""The nf_tables objects a policy compiles to, as frozen data: expressions, sets, chains.

Kept apart from :mod:`ironclaw.policy.nftables` (which builds them from a policy) so the
netlink encoder and the golden tests can name the shapes without the compiler.

Each expression record is one kernel expression (``net/netfilter/nft_*.c``, named first
in its docstring); its fields are what :func:`ironclaw.policy.netlink.expr` sends. Registers
are ``NFT_REG32_*`` numbers (8 to 23, four bytes each): a key longer than four bytes
(an interface name, a concatenation) fills consecutive registers from the one given.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BaseTable",
    "Bitwise",
    "ChainSpec",
    "Cmp",
    "Counter",
    "CtState",
    "Element",
    "Expr",
    "Lookup",
    "Masquerade",
    "Meta",
    "ObjrefMap",
    "Payload",
    "RuleSpec",
    "SetSpec",
    "Verdict",
]


@dataclass(frozen=True)
class Meta:
    """``meta``: load the packet's ``NFT_META_*`` ``key`` (interface name, L4 protocol,
    socket uid...) into register ``dreg``."""

    key: int
    dreg: int


@dataclass(frozen=True)
class Payload:
    """``payload``: load ``length`` bytes at ``offset`` into the header ``base``
    (``NFT_PAYLOAD_*``: 1 network, 2 transport) into register ``dreg``."""

    base: int
    offset: int
    length: int
    dreg: int


@dataclass(frozen=True)
class CtState:
    """``ct`` with key ``NFT_CT_STATE``: the connection's state bits (new, established,
    related...) into register ``dreg``."""

    dreg: int


@dataclass(frozen=True)
class Bitwise:
    """``bitwise``: register ``reg`` AND ``mask``, in place (the XOR operand is zero)."""

    reg: int
    mask: bytes


@dataclass(frozen=True)
class Cmp:
    """``cmp``: the rule goes on only if register ``reg`` equals ``data`` (with
    ``negate``: differs from it)."""

    reg: int
    data: bytes
    negate: bool = False


@dataclass(frozen=True)
class Lookup:
    """``lookup``: the rule goes on only if the key from register ``sreg`` is in ``set``
    (with ``invert``: is not); with ``verdict`` the set is a verdict map and the matching
    element's verdict is applied (its data loaded into the verdict register)."""

    set: str
    sreg: int
    invert: bool = False
    verdict: bool = False


@dataclass(frozen=True)
class ObjrefMap:
    """``objref`` through a map: the key from register ``sreg`` picks, in the object map
    ``set``, the named counter the packet is counted in."""

    set: str
    sreg: int


@dataclass(frozen=True)
class Counter:
    """``counter``: the rule's own anonymous packet and byte count."""


@dataclass(frozen=True)
class Verdict:
    """``immediate`` into the verdict register: ``code`` is ``NF_DROP`` 0, ``NF_ACCEPT`` 1
    or ``NFT_JUMP``/``NFT_GOTO`` (-3/-4) to ``chain``."""

    code: int
    chain: str | None = None


@dataclass(frozen=True)
class Masquerade:
    """``masq``: source NAT to the address of the interface the packet leaves by."""


Expr = (
    Meta | Payload | CtState | Bitwise | Cmp | Lookup | ObjrefMap | Counter | Verdict | Masquerade
)


@dataclass(frozen=True)
class SetSpec:
    """One named set of the table: keys of ``key_len`` bytes and type ``key_type`` (what
    ``nft list`` shows); ``interval`` holds ranges, ``counter_map`` maps each key to a
    named counter, ``verdict_map`` to a verdict."""

    name: str
    key_len: int
    key_type: int
    interval: bool = False
    counter_map: bool = False
    verdict_map: bool = False


@dataclass(frozen=True)
class ChainSpec:
    """A chain; with a netfilter ``hook`` (and its priority ``prio``) a base chain the
    kernel sends packets to, with policy accept; without, one reached only by jump or goto."""

    name: str
    hook: int | None = None
    prio: int = 0
    type: str = "filter"


@dataclass(frozen=True)
class RuleSpec:
    """A rule appended to ``chain``: its expressions run in order, and the first that does
    not match ends it. ``comment`` is what ``nft list`` prints beside it."""

    chain: str
    exprs: tuple[Expr, ...]
    comment: str | None = None


@dataclass(frozen=True)
class BaseTable:
    """Everything the table holds before any sandbox; set up (or reset) in one transaction."""

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
