"""The nf_tables objects a policy compiles to, as frozen data: expressions, sets, chains.

Kept apart from :mod:`ironclaw.policy.nftables` (which builds them from a policy) so the
netlink encoder and the golden tests can name the shapes without the compiler.
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
