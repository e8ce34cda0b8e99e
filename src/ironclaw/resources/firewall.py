"""IronClaw's own nftables table, driven over nf_tables netlink directly.

Each sandbox change is one netlink batch, which the kernel applies atomically. The
batches are built here rather than by libnftables because libnftables 1.0.6 first dumps
every chain, set and object of the ruleset (and every element of interval sets) into its
cache, which costs ~50 ms per transaction at 10,000 sandboxes; a hand-built batch names
its objects and needs no cache. A sandbox's state is set elements plus one named counter
(see :mod:`ironclaw.policy.network`), so the kernel side is O(1) as well.

Deletions use ``DESTROY`` messages where the kernel has them (Linux 6.3+): they succeed
whether or not the object exists. Older kernels (Debian 12 ships 6.1) only have ``DEL``
messages, which abort the batch on a missing object, so there the sandbox's record says
exactly what to delete; see :meth:`Firewall._stale`. Which one is used is probed once per
process (:func:`destroy_supported`); ``IRONCLAW_NFT_NO_DESTROY=1`` forces the fallback.

The socket is used from one dedicated worker thread: a netlink round trip must not block
the event loop. Only ``inet <table>`` is ever touched: other tables are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ironclaw.errors import ConfigError, NetworkError
from ironclaw.policy.network import (
    ALLOW_SETS,
    FWD_MAP,
    IFNAMSIZ,
    IFS_SET,
    NAT_SET,
    REC_SET,
    TABLE,
    TYPE_IFNAME,
    BaseTable,
    Bitwise,
    Cmp,
    Counter,
    CtState,
    Element,
    Expr,
    Lookup,
    Masquerade,
    Meta,
    NetworkPolicy,
    ObjrefMap,
    Payload,
    RuleSpec,
    SetSpec,
    Verdict,
    base_table,
    fixed_elements,
    ifname_key,
    parse_record,
    record_count,
    record_keys,
    sandbox_elements,
    sandbox_names,
)

__all__ = ["NO_DESTROY_ENV", "Firewall", "NfTablesSocket", "check_nftables", "destroy_supported"]

_T = TypeVar("_T")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_BATCH_GENID = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_EXCL, NLM_F_DUMP, NLM_F_CREATE, NLM_F_APPEND = 0x200, 0x300, 0x400, 0x800
NLA_F_NESTED = 0x8000
NFPROTO_INET = 1

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
_OLD_DISPATCH = "fwd"  # the verdict map of the earlier layout
_COMMENT = 0  # NFTNL_UDATA_*_COMMENT: what ``nft list`` prints as a comment
NO_DESTROY_ENV = "IRONCLAW_NFT_NO_DESTROY"
_PROBE_COUNTER = "icc-probe"  # never created: sandbox counters are icc-<16 hex digits>
# What nfnetlink answers for a message type its nf_tables does not know (EINVAL; the
# other is accepted in case a kernel ever says so more precisely).
_UNKNOWN_MESSAGE = frozenset({errno.EINVAL, errno.EOPNOTSUPP})
_ATTEMPTS = 8  # reads and writes of one change before giving up on a busy ruleset
_ALLOW_NAMES = frozenset(s.name for s in ALLOW_SETS)


# --- netlink encoding --------------------------------------------------------------------


def _attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value))


def _i32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">i", value))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _udata_comment(text: str) -> bytes:
    value = text.encode() + b"\0"
    if len(value) > 250:
        raise ConfigError(f"comment too long for nftables user data: {text[:40]!r}...")
    return bytes([_COMMENT, len(value)]) + value


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, _attr(1, value))  # NFTA_DATA_VALUE


def _expr(expr: Expr) -> bytes:
    name: str
    body: list[bytes]
    match expr:
        case Meta(key=key, dreg=dreg):
            name, body = "meta", [_u32(1, dreg), _u32(2, key)]
        case Payload(base=base, offset=offset, length=length, dreg=dreg):
            name, body = "payload", [_u32(1, dreg), _u32(2, base), _u32(3, offset), _u32(4, length)]
        case CtState(dreg=dreg):
            name, body = "ct", [_u32(1, dreg), _u32(2, 0)]  # NFT_CT_STATE
        case Bitwise(reg=reg, mask=mask):
            body = [_u32(1, reg), _u32(2, reg), _u32(3, len(mask))]
            name, body = "bitwise", [*body, _data(4, mask), _data(5, bytes(len(mask)))]
        case Cmp(reg=reg, data=data, negate=negate):
            name, body = "cmp", [_u32(1, reg), _u32(2, 1 if negate else 0), _data(3, data)]
        case Lookup(set=name_, sreg=sreg, invert=invert, verdict=verdict):
            body = [_str(1, name_), _u32(2, sreg), _u32(5, int(invert))]
            name, body = "lookup", body + ([_u32(3, 0)] if verdict else [])  # DREG verdict
        case ObjrefMap(set=name_, sreg=sreg):
            name, body = "objref", [_u32(3, sreg), _str(4, name_)]
        case Counter():
            name, body = "counter", []
        case Verdict(code=code, chain=chain):
            target = [_i32(1, code)] + ([_str(2, chain)] if chain else [])
            name, body = "immediate", [_u32(1, 0), _nest(2, _nest(2, *target))]
        case Masquerade():
            name, body = "masq", []
    return _nest(1, _str(1, name), *([_nest(2, *body)] if body else []))  # NFTA_LIST_ELEM


def _table_msg(table: str) -> tuple[int, int, bytes]:
    return MSG_NEWTABLE, NLM_F_CREATE, _str(1, table)


def _set_msg(table: str, spec: SetSpec, set_id: int) -> tuple[int, int, bytes]:
    flags = (SET_F_INTERVAL if spec.interval else 0) | (SET_F_OBJECT if spec.counter_map else 0)
    flags |= SET_F_MAP if spec.verdict_map else 0
    attrs = [_str(1, table), _str(2, spec.name), _u32(3, flags), _u32(10, set_id)]
    attrs += [_u32(4, spec.key_type), _u32(5, spec.key_len)]
    if spec.verdict_map:
        attrs.append(_u32(6, DATA_VERDICT))
    if spec.counter_map:
        attrs.append(_u32(15, OBJECT_COUNTER))
    if spec.key_type == TYPE_IFNAME:  # tells ``nft list`` the key is a string, not a number
        attrs.append(_attr(13, bytes([0, 4]) + struct.pack("=I", 1)))  # KEYBYTEORDER host
    return MSG_NEWSET, NLM_F_CREATE, b"".join(attrs)


def _rule_msg(table: str, rule: RuleSpec) -> tuple[int, int, bytes]:
    attrs = [_str(1, table), _str(2, rule.chain), _nest(4, *(_expr(e) for e in rule.exprs))]
    if rule.comment:
        attrs.append(_attr(7, _udata_comment(rule.comment)))
    return MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, b"".join(attrs)


def _base_msgs(table: str, spec: BaseTable) -> list[tuple[int, int, bytes]]:
    msgs = [_table_msg(table), *(_set_msg(table, s, i + 1) for i, s in enumerate(spec.sets))]
    for chain in spec.chains:
        attrs = [_str(1, table), _str(3, chain.name)]
        if chain.hook is not None:
            attrs += [_nest(4, _u32(1, chain.hook), _i32(2, chain.prio))]
            attrs += [_u32(5, 1), _str(7, chain.type)]  # policy accept
        msgs.append((MSG_NEWCHAIN, NLM_F_CREATE, b"".join(attrs)))
    for chain in spec.chains:  # flush, then refill, in the same batch
        msgs.append((MSG_DELRULE, 0, _str(1, table) + _str(2, chain.name)))
    msgs += [_rule_msg(table, r) for r in spec.rules]
    msgs += _elements_msgs(table, MSG_NEWSETELEM, list(spec.elements))
    return msgs


def _element(elem: Element, *, end: bool = False) -> bytes:
    if end:
        assert elem.last is not None
        bound = (int.from_bytes(elem.last) + 1).to_bytes(len(elem.last))
        return _nest(1, _data(1, bound), _u32(3, ELEM_F_INTERVAL_END))
    attrs = [_data(1, elem.key)]
    if elem.obj:
        attrs.append(_str(9, elem.obj))  # NFTA_SET_ELEM_OBJREF
    if elem.jump:
        verdict = _nest(2, _i32(1, VERDICT_JUMP), _str(2, elem.jump))
        attrs.append(_nest(2, verdict))  # NFTA_SET_ELEM_DATA
    if elem.comment:
        attrs.append(_attr(6, _udata_comment(elem.comment)))
    return _nest(1, *attrs)


def _elements_msgs(table: str, msg_type: int, elems: list[Element]) -> list[tuple[int, int, bytes]]:
    by_set: dict[str, list[bytes]] = {}
    for e in elems:
        by_set.setdefault(e.set, []).append(_element(e))
        if e.last is not None:  # a range: its start, then the first key after it
            by_set[e.set].append(_element(e, end=True))
    flags = NLM_F_CREATE if msg_type == MSG_NEWSETELEM else 0
    msgs: list[tuple[int, int, bytes]] = []
    for name, items in by_set.items():
        start, size = 0, 0
        for i, item in enumerate(items):  # an attribute holds at most 64 KiB: split there
            if size + len(item) > _MAX_NEST and i > start:
                msgs.append((msg_type, flags, _elem_list(table, name, items[start:i])))
                start, size = i, 0
            size += len(item)
        msgs.append((msg_type, flags, _elem_list(table, name, items[start:])))
    return msgs


_MAX_NEST = 60_000


def _elem_list(table: str, name: str, items: list[bytes]) -> bytes:
    return _str(1, table) + _str(2, name) + _nest(3, *items)


def _counter_msg(table: str, name: str, msg_type: int) -> tuple[int, int, bytes]:
    attrs = _str(1, table) + _str(2, name) + _u32(3, OBJECT_COUNTER)
    if msg_type == MSG_NEWOBJ:
        return msg_type, NLM_F_CREATE, attrs + _nest(4, struct.pack("=HH", 12, 2) + bytes(8))
    return msg_type, 0, attrs


# --- netlink decoding --------------------------------------------------------------------


def _attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, pos)
        if length < 4:
            break
        yield kind & 0x3FFF, buf[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def _attr_map(buf: bytes) -> dict[int, bytes]:
    return dict(_attrs(buf))


def _cstr(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def _comment(udata: bytes | None) -> str | None:
    pos = 0
    while udata and pos + 2 <= len(udata):
        kind, length = udata[pos], udata[pos + 1]
        if kind == _COMMENT:
            return _cstr(udata[pos + 2 : pos + 2 + length])
        pos += 2 + length
    return None


def _elements_of(payload: bytes) -> Iterator[dict[int, bytes]]:
    """Attributes of each element in a NEWSETELEM message (after its nfgenmsg)."""
    top = _attr_map(payload[4:])
    for _, item in _attrs(top.get(3, b"")):
        yield _attr_map(item)


def _key_of(elem: dict[int, bytes]) -> bytes:
    return _attr_map(elem.get(1, b"")).get(1, b"")


# --- the socket --------------------------------------------------------------------------


class NfTablesSocket:
    """A blocking nf_tables netlink socket: batches with acks, gets and dumps."""

    def __init__(self, timeout: float = 5.0) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            sock.bind((0, 0))
            for opt in (33, socket.SO_SNDBUF):  # SO_SNDBUFFORCE (root), else capped
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 1 << 23)
                    break
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        except OSError as exc:
            raise NetworkError(f"cannot open an nf_tables netlink socket: {exc}") from exc
        sock.settimeout(timeout)
        self._sock = sock
        self._seq = int.from_bytes(os.urandom(2)) << 8

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    @staticmethod
    def _header(msg_type: int, flags: int, seq: int, payload: bytes, *, res_id: int = 0) -> bytes:
        body = struct.pack(">BBH", NFPROTO_INET, 0, res_id) + payload
        return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise NetworkError(f"nf_tables netlink send failed: {exc}") from exc

    def _replies(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, flags, seq, payload) of every message received, forever."""
        while True:
            try:
                buf = self._sock.recv(1 << 20)
            except OSError as exc:  # includes the socket timeout
                raise NetworkError(f"nf_tables netlink receive failed: {exc!r}") from exc
            pos = 0
            while pos + 16 <= len(buf):
                length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", buf, pos)
                yield msg_type, flags, seq, buf[pos + 16 : pos + length]
                pos += (length + 3) & ~3

    def transact(
        self, msgs: list[tuple[int, int, bytes]], *, what: str, genid: int | None = None
    ) -> None:
        """Apply ``msgs`` as one kernel transaction; raise with the first failure."""
        if not msgs:
            return
        begin_seq = self._next_seq()
        genattr = _u32(NFNL_BATCH_GENID, genid) if genid is not None else b""
        parts = [self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, genattr,
                              res_id=NFNL_SUBSYS_NFTABLES)]  # fmt: skip
        pending: dict[int, int] = {}
        for index, (kind, flags, payload) in enumerate(msgs):
            seq = self._next_seq()
            pending[seq] = index
            msg_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
            parts.append(self._header(msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, seq, payload))
        end = self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next_seq(), b"",
                           res_id=NFNL_SUBSYS_NFTABLES)  # fmt: skip
        self._send(b"".join([*parts, end]))
        failure: tuple[int, int] | None = None
        for msg_type, _, seq, payload in self._replies():
            if msg_type != NLMSG_ERROR:
                continue
            code = -struct.unpack_from("=i", payload)[0]
            if seq == begin_seq and code:
                raise _error(what, code, None)
            if seq in pending:
                failed = pending.pop(seq)
                if code and failure is None:
                    failure = (code, failed)
            if not pending:
                break
        if failure is not None:
            raise _error(what, *failure)

    def request(self, kind: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        """One get (``ENOENT`` raises :class:`_Missing`) or dump: the reply payloads."""
        seq = self._next_seq()
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        self._send(self._header((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, payload))
        out: list[bytes] = []
        for msg_type, _, rseq, body in self._replies():
            if rseq != seq:
                continue
            if msg_type == NLMSG_DONE:
                break
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", body)[0]
                if code == errno.ENOENT:
                    raise _Missing
                if code:
                    raise _error(f"get {kind}", code, None)
                break
            out.append(body)
        return out

    def generation(self) -> int:
        (reply,) = self.request(MSG_GETGEN, b"")
        return int(struct.unpack(">I", _attr_map(reply[4:])[1])[0])


class _Missing(Exception):
    """A get found no such table, set, element or object."""


class _BatchFailed(NetworkError):
    """The kernel refused a batch; ``index`` is the first failing message (None: all)."""

    def __init__(self, text: str, code: int, index: int | None) -> None:
        super().__init__(text)
        self.code = code
        self.index = index


class _GenerationChanged(_BatchFailed):
    """Someone else committed between our read and our write: read again."""


class _Unreadable(NetworkError):
    """A sandbox's record could not be read whole: damaged, or changed between two gets."""


def _error(what: str, code: int, index: int | None) -> _BatchFailed:
    where = f" (message {index})" if index is not None else ""
    text = f"nftables {what} failed{where}: {os.strerror(code)}"
    if code == errno.ERESTART:
        return _GenerationChanged(text, code, index)
    return _BatchFailed(text, code, index)


# --- which deletions the kernel knows ------------------------------------------------------

_destroy_known: bool | None = None  # per process: the running kernel does not change


def _probe_destroy(sock: NfTablesSocket, table: str, *, msg_type: int = MSG_DESTROYOBJ) -> bool:
    """Send a ``DESTROY`` of a counter that never exists in ``table``; nothing can change.

    A kernel that knows the message answers success (or ENOENT while the table does not
    exist yet); one older than 6.3 answers EINVAL, as for any message type it lacks.
    ``msg_type`` lets a test send a type no kernel has yet, to see that answer here.
    """
    payload = _counter_msg(table, _PROBE_COUNTER, MSG_DESTROYOBJ)[2]
    try:
        sock.transact([(msg_type, 0, payload)], what="probe for DESTROY messages")
    except _BatchFailed as exc:
        if exc.code == errno.ENOENT:
            return True
        if exc.code in _UNKNOWN_MESSAGE:
            return False
        raise
    return True


def destroy_supported(sock: NfTablesSocket, table: str = TABLE) -> bool:
    """Whether this kernel has nf_tables ``DESTROY`` messages; probed once per process.

    A probe rather than the kernel version: distribution kernels backport nf_tables.
    """
    global _destroy_known
    if _destroy_known is None:
        _destroy_known = _probe_destroy(sock, table)
    return _destroy_known


def _forced_fallback() -> bool:
    return os.environ.get(NO_DESTROY_ENV, "") not in ("", "0")


def check_nftables(timeout: float = 2.0) -> tuple[bool, bool]:
    """For ``ironclaw doctor``: (DESTROY messages known, fallback forced by the environment).

    Proves nf_tables takes a transaction here by creating and deleting a private table
    inside one batch (so nothing is left and no other table is touched); the DESTROY probe
    targets a counter in that table. Raises :class:`NetworkError` when nf_tables is unusable.
    """
    global _destroy_known
    table = f"ironclaw_probe_{os.urandom(4).hex()}"
    create = (MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, _str(1, table))
    delete = (MSG_DELTABLE, 0, _str(1, table))
    sock = NfTablesSocket(timeout)
    try:
        probe = (MSG_DESTROYOBJ, 0, _counter_msg(table, _PROBE_COUNTER, MSG_DESTROYOBJ)[2])
        try:
            sock.transact([create, probe, delete], what="table create and delete")
            known = True
        except _BatchFailed as exc:
            if exc.index != 1 or exc.code not in _UNKNOWN_MESSAGE:
                raise NetworkError(str(exc)) from exc
            try:
                sock.transact([create, delete], what="table create and delete")
            except _BatchFailed as exc2:
                raise NetworkError(str(exc2)) from exc2
            known = False
    finally:
        sock.close()
    _destroy_known = known
    return known, _forced_fallback()


@dataclass(frozen=True)
class _Record:
    """What a sandbox's ``ifs`` element and ``rec`` chunks say it installed."""

    present: bool  # its ifs element exists (written in the same batch as everything else)
    chunks: int
    elements: list[Element]  # the policy-dependent elements the chunks list


# --- the table ---------------------------------------------------------------------------


class Firewall:
    """IronClaw's ``inet`` table: base objects once, then one batch per sandbox change."""

    backend_name = "nf_tables netlink"

    def __init__(self, *, table: str = TABLE, destroy: bool | None = None) -> None:
        """``destroy``: use DESTROY messages (True), the DEL fallback (False), or probe the
        kernel (None, unless ``IRONCLAW_NFT_NO_DESTROY=1`` selects the fallback)."""
        self.table = table
        self._destroy = False if destroy is None and _forced_fallback() else destroy
        self._base_ready = False
        self._sock: NfTablesSocket | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironclaw-nft")

    async def _call(self, fn: Callable[[NfTablesSocket], _T]) -> _T:
        def work() -> _T:
            if self._sock is None:
                self._sock = NfTablesSocket()
            try:
                return fn(self._sock)
            except (_BatchFailed, _Unreadable) as exc:  # private types stay in this module
                raise NetworkError(str(exc)) from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _uses_destroy(self, sock: NfTablesSocket) -> bool:
        if self._destroy is None:
            self._destroy = destroy_supported(sock, self.table)
        return self._destroy

    async def deletion_mode(self) -> str:
        """``"destroy"`` (Linux 6.3+ DESTROY messages) or ``"delete"`` (the DEL fallback)."""
        return "destroy" if await self._call(self._uses_destroy) else "delete"

    def _list_payload(self, set_name: str, *elems: bytes) -> bytes:
        items = _nest(3, *(_nest(1, _data(1, k)) for k in elems)) if elems else b""
        return _str(1, self.table) + _str(2, set_name) + items

    # --- writes ------------------------------------------------------------------------

    async def ensure_base(self) -> None:
        """Create or repair the table, once per instance; safe to race from many processes.

        The base batch is idempotent (sets are only added; base chains are flushed and
        refilled in the same transaction), so existing sandboxes keep their elements.
        """
        if self._base_ready:
            return

        def work(sock: NfTablesSocket) -> None:
            msgs = _base_msgs(self.table, base_table())
            if self._old_layout(sock):
                msgs.insert(0, (MSG_DELTABLE, 0, _str(1, self.table)))
            sock.transact(msgs, what=f"set-up of table inet {self.table}")

        await self._call(work)
        self._base_ready = True

    def _old_layout(self, sock: NfTablesSocket) -> bool:
        """True for an empty table of the earlier chain-per-sandbox layout (replaced)."""
        try:
            (reply,) = sock.request(MSG_GETSET, _str(1, self.table) + _str(2, _OLD_DISPATCH))
        except _Missing:
            return False
        flags = struct.unpack(">I", _attr_map(reply[4:]).get(3, bytes(4)))[0]
        if not flags & SET_F_MAP:
            return False
        replies = sock.request(MSG_GETSETELEM, self._list_payload(_OLD_DISPATCH), dump=True)
        if any(True for r in replies for _ in _elements_of(r)):
            raise NetworkError(
                f"table inet {self.table} has the earlier chain-per-sandbox layout and live "
                "sandboxes; remove them (or the table) with the IronClaw that created them"
            )
        return True

    async def add_sandbox(
        self, sandbox_id: str, policy: NetworkPolicy, *, proxy_addr: str | None = None
    ) -> None:
        """Install the sandbox; over an existing installation, replace it (same batch)."""
        await self.ensure_base()
        await self._replace(sandbox_id, policy, proxy_addr)

    async def update_sandbox(
        self, sandbox_id: str, policy: NetworkPolicy, *, proxy_addr: str | None = None
    ) -> None:
        """Swap the sandbox's allows in one transaction: no packet sees a gap."""
        await self.ensure_base()
        await self._replace(sandbox_id, policy, proxy_addr)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Idempotent: removes whatever of the sandbox exists, in one transaction."""
        await self._replace(sandbox_id, None, None)

    async def _replace(
        self, sandbox_id: str, policy: NetworkPolicy | None, proxy_addr: str | None
    ) -> None:
        names = sandbox_names(sandbox_id)
        new = [] if policy is None else sandbox_elements(sandbox_id, policy, proxy_addr=proxy_addr)
        what = f"{'removal' if policy is None else 'set-up'} of sandbox {sandbox_id}"

        def work(sock: NfTablesSocket) -> None:
            destroy = self._uses_destroy(sock)
            verify = False
            for _ in range(_ATTEMPTS):
                genid = sock.generation()
                try:
                    record = self._installed(sock, names.host_ifname)
                except _Missing:  # no table: nothing installed
                    if policy is None:
                        return
                    raise NetworkError(f"table inet {self.table} is missing") from None
                except _Unreadable:
                    if sock.generation() != genid:
                        continue  # our two gets straddled someone's commit
                    raise
                if destroy:
                    stale = [*fixed_elements(sandbox_id, record.chunks), *record.elements]
                    msgs = _elements_msgs(self.table, MSG_DESTROYSETELEM, stale)
                    drop_counter = [_counter_msg(self.table, names.chain, MSG_DESTROYOBJ)]
                else:
                    # Removal without a record looks for leftovers, as DESTROY would clear them.
                    look = verify or (policy is None and not record.present)
                    stale, counter = self._stale(sock, sandbox_id, record, verify=look)
                    msgs = _elements_msgs(self.table, MSG_DELSETELEM, stale)
                    drop_counter = []
                    if counter:
                        drop_counter.append(_counter_msg(self.table, names.chain, MSG_DELOBJ))
                if policy is None:
                    msgs += drop_counter
                else:
                    msgs.append(_counter_msg(self.table, names.chain, MSG_NEWOBJ))
                    msgs += _elements_msgs(self.table, MSG_NEWSETELEM, new)
                try:
                    sock.transact(msgs, what=what, genid=genid)
                    return
                except _GenerationChanged:
                    continue
                except _BatchFailed as exc:
                    if destroy or exc.code != errno.ENOENT:
                        raise
                    verify = True  # the record and the table disagree: look at each piece
            if policy is None and not destroy and not self._remains(sock, sandbox_id):
                return
            raise NetworkError(f"{what}: the ruleset kept changing under us")

        await self._call(work)

    def _stale(
        self, sock: NfTablesSocket, sandbox_id: str, record: _Record, *, verify: bool
    ) -> tuple[list[Element], bool]:
        """For the DEL fallback: the sandbox's elements that exist, and whether its counter does.

        A DEL of a missing object aborts the batch, so this must be exact. The record is:
        one atomic batch wrote it together with everything it lists and the counter (the
        ``natifs`` element exactly when there are address allows). With ``verify`` (no
        record on removal, or a DEL just failed) each piece is looked up instead.
        """
        fixed = fixed_elements(sandbox_id, record.chunks)
        if not verify:
            if not record.present:
                return [], False
            nat = any(e.set in _ALLOW_NAMES for e in record.elements)
            return [e for e in fixed if e.set != NAT_SET or nat] + record.elements, True
        candidates = [*fixed, *record.elements]
        found = [e for e in candidates if self._has_element(sock, e)]
        return found, self._has_counter(sock, sandbox_names(sandbox_id).chain)

    def _remains(self, sock: NfTablesSocket, sandbox_id: str) -> bool:
        """Whether any piece of the sandbox is still in the table (each one looked up)."""
        try:
            record = self._installed(sock, sandbox_names(sandbox_id).host_ifname)
        except _Missing:
            return False
        found, counter = self._stale(sock, sandbox_id, record, verify=True)
        return bool(found) or counter

    def _has_element(self, sock: NfTablesSocket, elem: Element) -> bool:
        try:
            sock.request(MSG_GETSETELEM, self._list_payload(elem.set, elem.key))
        except _Missing:
            return False
        return True

    def _has_counter(self, sock: NfTablesSocket, name: str) -> bool:
        try:
            sock.request(MSG_GETOBJ, _counter_msg(self.table, name, MSG_GETOBJ)[2])
        except _Missing:
            return False
        return True

    def _installed(self, sock: NfTablesSocket, host_ifname: str) -> _Record:
        """The sandbox's record (two gets, one when it has none).

        Raises :class:`_Missing` when the table itself does not exist, :class:`_Unreadable`
        when the record is damaged or a commit landed between the two gets.
        """
        sock.request(MSG_GETTABLE, _str(1, self.table))
        try:
            (reply,) = sock.request(
                MSG_GETSETELEM, self._list_payload(IFS_SET, ifname_key(host_ifname))
            )
        except _Missing:
            return _Record(False, 0, [])
        (elem,) = _elements_of(reply)
        chunks = record_count(_comment(elem.get(6)))
        if not chunks:
            return _Record(True, 0, [])
        keys = record_keys(host_ifname, chunks)
        try:
            replies = sock.request(MSG_GETSETELEM, self._list_payload(REC_SET, *keys))
        except _Missing:
            raise _Unreadable(f"firewall record of {host_ifname} is incomplete") from None
        comments = [_comment(e.get(6)) or "" for r in replies for e in _elements_of(r)]
        try:
            return _Record(True, chunks, parse_record(host_ifname, comments))
        except ConfigError as exc:
            raise _Unreadable(f"firewall record of {host_ifname} is damaged: {exc}") from exc

    # --- reads -------------------------------------------------------------------------

    async def table_exists(self) -> bool:
        def work(sock: NfTablesSocket) -> bool:
            try:
                sock.request(MSG_GETTABLE, _str(1, self.table))
            except _Missing:
                return False
            return True

        return await self._call(work)

    async def chains(self) -> list[str]:
        """Names of the per-sandbox filter objects: each sandbox's counter ``icc-<hash>``.

        (The name is the per-sandbox chain of the earlier layout; a sandbox now owns no
        chain.) Lists every object of the table: for diagnostics, not for hot paths.
        """

        def work(sock: NfTablesSocket) -> list[str]:
            payload = _str(1, self.table) + _u32(3, OBJECT_COUNTER)
            try:
                replies = sock.request(MSG_GETOBJ, payload, dump=True)
            except _Missing:
                return []
            names = (_cstr(_attr_map(r[4:]).get(2, b"")) for r in replies)
            return sorted(n for n in names if n.startswith("icc-"))

        return await self._call(work)

    async def elements(self) -> dict[str, list[str]]:
        """Host veth names per dispatch set, under the keys callers know them by.

        ``fwd``: the drop-counter map, ``nat``: the masquerade gate, ``ifs``: every sandbox
        veth. Dumps whole sets: for diagnostics, not for hot paths.
        """

        def work(sock: NfTablesSocket) -> dict[str, list[str]]:
            result: dict[str, list[str]] = {}
            for key, name in (("fwd", FWD_MAP), ("nat", NAT_SET), ("ifs", IFS_SET)):
                try:
                    replies = sock.request(MSG_GETSETELEM, self._list_payload(name), dump=True)
                except _Missing:
                    replies = []
                keys = (_cstr(_key_of(e)) for r in replies for e in _elements_of(r))
                result[key] = sorted(keys)
            return result

        return await self._call(work)

    async def chain_rules(self, chain: str) -> list[dict[str, Any]]:
        """What the sandbox whose counter is ``chain`` has installed, one entry per range.

        Each entry is ``{"set": ..., "expr": [key, last]}`` with keys in hex (the veth name
        left out); an unknown sandbox has none.
        """
        host_ifname = "icv" + chain.removeprefix("icc-")[:12]

        def work(sock: NfTablesSocket) -> list[dict[str, Any]]:
            try:
                recorded = self._installed(sock, host_ifname).elements
            except _Missing:
                return []
            return [
                {"set": e.set, "expr": [e.key[IFNAMSIZ:].hex(), (e.last or e.key)[IFNAMSIZ:].hex()]}
                for e in recorded
            ]

        return await self._call(work)

    async def drop_count(self, sandbox_id: str) -> int:
        """Packets the sandbox's egress drop has counted (one get, whatever the table size)."""
        name = sandbox_names(sandbox_id).chain

        def work(sock: NfTablesSocket) -> int:
            try:
                (reply,) = sock.request(MSG_GETOBJ, _counter_msg(self.table, name, MSG_GETOBJ)[2])
            except _Missing:
                raise NetworkError(f"no drop counter for sandbox {sandbox_id}") from None
            data = _attr_map(_attr_map(reply[4:]).get(4, b""))
            return int.from_bytes(data.get(2, bytes(8)), "big")

        return await self._call(work)

    def close(self) -> None:
        def free() -> None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

        self._pool.submit(free).result()
        self._pool.shutdown(wait=True)
