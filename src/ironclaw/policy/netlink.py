"""nf_tables netlink messages, encoded and decoded: pure functions, bytes in and out.

:mod:`ironclaw.policy.nftables` says *what* the table holds; this module says how the
kernel is told, message by message, and :mod:`ironclaw.resources.firewall` owns the
socket that sends them. Nothing here does I/O, so every message can be checked against
fixed bytes. A message is a :data:`Msg`: (nf_tables message type, extra netlink flags,
payload after the nfgenmsg header); :func:`encode_batch` frames a list of them as one
kernel transaction.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ironclaw.errors import ConfigError
from ironclaw.policy import nft_exprs as nx
from ironclaw.policy.nftables import TYPE_IFNAME

__all__ = [
    "Msg",
    "attr",
    "attr_map",
    "attrs",
    "base_msgs",
    "comment",
    "counter_msg",
    "cstr",
    "data",
    "elements_msgs",
    "elements_of",
    "elements_query",
    "encode_batch",
    "encode_request",
    "error_code",
    "expr",
    "header",
    "i32",
    "key_of",
    "messages",
    "nest",
    "strz",
    "u32",
]

Msg = tuple[int, int, bytes]

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_BATCH_GENID = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_EXCL, NLM_F_DUMP, NLM_F_CREATE, NLM_F_APPEND = 0x200, 0x300, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET = 1
SEQ_MASK = 0x7FFFFFFF  # sequence numbers stay positive

MSG_NEWTABLE, MSG_GETTABLE, MSG_DELTABLE = 0, 1, 2
MSG_NEWCHAIN, MSG_NEWRULE, MSG_DELRULE = 3, 6, 8
MSG_NEWSET, MSG_GETSET = 9, 10
MSG_NEWSETELEM, MSG_GETSETELEM, MSG_DELSETELEM = 12, 13, 14
MSG_GETGEN, MSG_NEWOBJ, MSG_GETOBJ, MSG_DELOBJ = 16, 18, 19, 20
MSG_DESTROYSETELEM, MSG_DESTROYOBJ = 30, 31  # Linux 6.3+

SET_F_INTERVAL, SET_F_MAP, SET_F_OBJECT = 0x4, 0x8, 0x40
ELEM_F_INTERVAL_END = 0x1
OBJECT_COUNTER = 1
DATA_VERDICT = 0xFFFFFF00
VERDICT_JUMP = -3
COMMENT = 0  # NFTNL_UDATA_*_COMMENT: what ``nft list`` prints as a comment
MAX_NEST = 60_000  # an attribute holds at most 64 KiB: element lists are split below it


# --- attributes ----------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def nest(kind: int, *items: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(items))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value))


def i32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">i", value))


def strz(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute (names of tables, sets, chains, objects)."""
    return attr(kind, value.encode() + b"\0")


def udata_comment(text: str) -> bytes:
    value = text.encode() + b"\0"
    if len(value) > 250:
        raise ConfigError(f"comment too long for nftables user data: {text[:40]!r}...")
    return bytes([COMMENT, len(value)]) + value


def data(kind: int, value: bytes) -> bytes:
    return nest(kind, attr(1, value))  # NFTA_DATA_VALUE


# --- messages ------------------------------------------------------------------------------


def expr(item: nx.Expr) -> bytes:
    """One rule expression as an ``NFTA_LIST_ELEM``."""
    name: str
    body: list[bytes]
    match item:
        case nx.Meta(key=key, dreg=dreg):
            name, body = "meta", [u32(1, dreg), u32(2, key)]
        case nx.Payload(base=base, offset=offset, length=length, dreg=dreg):
            name, body = "payload", [u32(1, dreg), u32(2, base), u32(3, offset), u32(4, length)]
        case nx.CtState(dreg=dreg):
            name, body = "ct", [u32(1, dreg), u32(2, 0)]  # NFT_CT_STATE
        case nx.Bitwise(reg=reg, mask=mask):
            body = [u32(1, reg), u32(2, reg), u32(3, len(mask))]
            name, body = "bitwise", [*body, data(4, mask), data(5, bytes(len(mask)))]
        case nx.Cmp(reg=reg, data=value, negate=negate):
            name, body = "cmp", [u32(1, reg), u32(2, 1 if negate else 0), data(3, value)]
        case nx.Lookup(set=name_, sreg=sreg, invert=invert, verdict=verdict):
            body = [strz(1, name_), u32(2, sreg), u32(5, int(invert))]
            name, body = "lookup", body + ([u32(3, 0)] if verdict else [])  # DREG verdict
        case nx.ObjrefMap(set=name_, sreg=sreg):
            name, body = "objref", [u32(3, sreg), strz(4, name_)]
        case nx.Counter():
            name, body = "counter", []
        case nx.Verdict(code=code, chain=chain):
            target = [i32(1, code)] + ([strz(2, chain)] if chain else [])
            name, body = "immediate", [u32(1, 0), nest(2, nest(2, *target))]
        case nx.Masquerade():
            name, body = "masq", []
    return nest(1, strz(1, name), *([nest(2, *body)] if body else []))  # NFTA_LIST_ELEM


def table_msg(table: str) -> Msg:
    return MSG_NEWTABLE, NLM_F_CREATE, strz(1, table)


def set_msg(table: str, spec: nx.SetSpec, set_id: int) -> Msg:
    flags = (SET_F_INTERVAL if spec.interval else 0) | (SET_F_OBJECT if spec.counter_map else 0)
    flags |= SET_F_MAP if spec.verdict_map else 0
    attrs = [strz(1, table), strz(2, spec.name), u32(3, flags), u32(10, set_id)]
    attrs += [u32(4, spec.key_type), u32(5, spec.key_len)]
    if spec.verdict_map:
        attrs.append(u32(6, DATA_VERDICT))
    if spec.counter_map:
        attrs.append(u32(15, OBJECT_COUNTER))
    if spec.key_type == TYPE_IFNAME:  # tells ``nft list`` the key is a string, not a number
        attrs.append(attr(13, bytes([0, 4]) + struct.pack("=I", 1)))  # KEYBYTEORDER host
    return MSG_NEWSET, NLM_F_CREATE, b"".join(attrs)


def rule_msg(table: str, rule: nx.RuleSpec) -> Msg:
    attrs = [strz(1, table), strz(2, rule.chain), nest(4, *(expr(e) for e in rule.exprs))]
    if rule.comment:
        attrs.append(attr(7, udata_comment(rule.comment)))
    return MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, b"".join(attrs)


def base_msgs(table: str, spec: nx.BaseTable) -> list[Msg]:
    """The idempotent set-up of the whole table: create, flush base rules, refill."""
    msgs = [table_msg(table), *(set_msg(table, s, i + 1) for i, s in enumerate(spec.sets))]
    for chain in spec.chains:
        attrs = [strz(1, table), strz(3, chain.name)]
        if chain.hook is not None:
            attrs += [nest(4, u32(1, chain.hook), i32(2, chain.prio))]
            attrs += [u32(5, 1), strz(7, chain.type)]  # policy accept
        msgs.append((MSG_NEWCHAIN, NLM_F_CREATE, b"".join(attrs)))
    for chain in spec.chains:  # flush, then refill, in the same batch
        msgs.append((MSG_DELRULE, 0, strz(1, table) + strz(2, chain.name)))
    msgs += [rule_msg(table, r) for r in spec.rules]
    msgs += elements_msgs(table, MSG_NEWSETELEM, list(spec.elements))
    return msgs


def element(elem: nx.Element, *, end: bool = False) -> bytes:
    if end:
        assert elem.last is not None
        bound = (int.from_bytes(elem.last) + 1).to_bytes(len(elem.last))
        return nest(1, data(1, bound), u32(3, ELEM_F_INTERVAL_END))
    attrs = [data(1, elem.key)]
    if elem.obj:
        attrs.append(strz(9, elem.obj))  # NFTA_SET_ELEM_OBJREF
    if elem.jump:
        verdict = nest(2, i32(1, VERDICT_JUMP), strz(2, elem.jump))
        attrs.append(nest(2, verdict))  # NFTA_SET_ELEM_DATA
    if elem.comment:
        attrs.append(attr(6, udata_comment(elem.comment)))
    return nest(1, *attrs)


def elements_msgs(table: str, msg_type: int, elems: list[nx.Element]) -> list[Msg]:
    """Add (NEW), delete (DEL) or destroy (DESTROY) elements: one message per set and 60 KB."""
    by_set: dict[str, list[bytes]] = {}
    for e in elems:
        by_set.setdefault(e.set, []).append(element(e))
        if e.last is not None:  # a range: its start, then the first key after it
            by_set[e.set].append(element(e, end=True))
    flags = NLM_F_CREATE if msg_type == MSG_NEWSETELEM else 0
    msgs: list[Msg] = []
    for name, items in by_set.items():
        start, size = 0, 0
        for i, item in enumerate(items):  # an attribute holds at most 64 KiB: split there
            if size + len(item) > MAX_NEST and i > start:
                msgs.append((msg_type, flags, elem_list(table, name, items[start:i])))
                start, size = i, 0
            size += len(item)
        msgs.append((msg_type, flags, elem_list(table, name, items[start:])))
    return msgs


def elem_list(table: str, name: str, items: list[bytes]) -> bytes:
    return strz(1, table) + strz(2, name) + nest(3, *items)


def counter_msg(table: str, name: str, msg_type: int) -> Msg:
    """A named counter object: NEW (zeroed), GET, DEL or DESTROY."""
    attrs = strz(1, table) + strz(2, name) + u32(3, OBJECT_COUNTER)
    if msg_type == MSG_NEWOBJ:
        return msg_type, NLM_F_CREATE, attrs + nest(4, struct.pack("=HH", 12, 2) + bytes(8))
    return msg_type, 0, attrs


def elements_query(table: str, set_name: str, *keys: bytes) -> bytes:
    """Payload of a GETSETELEM: the given keys, or (none given) the whole set for a dump."""
    items = nest(3, *(nest(1, data(1, k)) for k in keys)) if keys else b""
    return strz(1, table) + strz(2, set_name) + items


# --- framing -------------------------------------------------------------------------------


def header(msg_type: int, flags: int, seq: int, payload: bytes, *, res_id: int = 0) -> bytes:
    """One netlink message: nlmsghdr, nfgenmsg (family inet), payload."""
    body = struct.pack(">BBH", NFPROTO_INET, 0, res_id) + payload
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def encode_batch(msgs: list[Msg], first_seq: int, *, genid: int | None = None) -> bytes:
    """``msgs`` framed as one transaction: BEGIN, each message with an ack, END.

    Sequence numbers run from ``first_seq`` (BEGIN) through ``first_seq + len(msgs) + 1``
    (END), modulo :data:`SEQ_MASK`; message ``i`` has ``first_seq + 1 + i``. With
    ``genid`` the kernel refuses the batch (ERESTART) if the ruleset changed since.
    """
    genattr = u32(NFNL_BATCH_GENID, genid) if genid is not None else b""
    parts = [header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq & SEQ_MASK, genattr,
                    res_id=NFNL_SUBSYS_NFTABLES)]  # fmt: skip
    for index, (kind, flags, payload) in enumerate(msgs):
        seq = (first_seq + 1 + index) & SEQ_MASK
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
        parts.append(header(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, seq, payload))
    end_seq = (first_seq + 1 + len(msgs)) & SEQ_MASK
    parts.append(header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end_seq, b"",
                        res_id=NFNL_SUBSYS_NFTABLES))  # fmt: skip
    return b"".join(parts)


def encode_request(kind: int, payload: bytes, seq: int, *, dump: bool = False) -> bytes:
    """A get (acked) or a dump of nf_tables message type ``kind``."""
    flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
    return header((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, payload)


def messages(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each netlink message in one received buffer."""
    pos = 0
    while pos + 16 <= len(buf):
        length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", buf, pos)
        yield msg_type, flags, seq, buf[pos + 16 : pos + length]
        pos += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR payload (0: an ack)."""
    return -int(struct.unpack_from("=i", payload)[0])


# --- decoding --------------------------------------------------------------------------------


def attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, pos)
        if length < 4:
            break
        yield kind & 0x3FFF, buf[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def attr_map(buf: bytes) -> dict[int, bytes]:
    return dict(attrs(buf))


def cstr(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def comment(udata: bytes | None) -> str | None:
    pos = 0
    while udata and pos + 2 <= len(udata):
        kind, length = udata[pos], udata[pos + 1]
        if kind == COMMENT:
            return cstr(udata[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return None


def elements_of(payload: bytes) -> Iterator[dict[int, bytes]]:
    """Attributes of each element in a NEWSETELEM message (after its nfgenmsg)."""
    top = attr_map(payload[4:])
    for _, item in attrs(top.get(3, b"")):
        yield attr_map(item)


def key_of(elem: dict[int, bytes]) -> bytes:
    return attr_map(elem.get(1, b"")).get(1, b"")
