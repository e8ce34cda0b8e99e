"""IronClaw's own nftables table, driven over nf_tables netlink directly.

Each sandbox change is one netlink batch, which the kernel applies atomically. The
batches are built by hand rather than by libnftables because libnftables 1.0.6 first dumps
every chain, set and object of the ruleset (and every element of interval sets) into its
cache, which costs ~50 ms per transaction at 10,000 sandboxes; a hand-built batch names
its objects and needs no cache. A sandbox's state is set elements plus one named counter
(see :mod:`ironclaw.policy.nftables`), so the kernel side is O(1) as well. Here are the
transactions (read the sandbox's record, write one batch, retry on a rival's commit); the
messages are encoded by :mod:`ironclaw.policy.netlink` and sent by
:class:`~ironclaw.resources.nft_socket.NfTablesSocket`.

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
import errno
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypedDict, TypeVar

from ironclaw.errors import ConfigError, NetworkError
from ironclaw.policy import netlink as nl
from ironclaw.policy.netlink import (
    MSG_DELOBJ,
    MSG_DELSETELEM,
    MSG_DELTABLE,
    MSG_DESTROYOBJ,
    MSG_DESTROYSETELEM,
    MSG_GETOBJ,
    MSG_GETSET,
    MSG_GETSETELEM,
    MSG_GETTABLE,
    MSG_NEWOBJ,
    MSG_NEWSETELEM,
)
from ironclaw.policy.network import TABLE, NetworkPolicy, sandbox_names
from ironclaw.policy.nft_exprs import Element
from ironclaw.policy.nftables import (
    ALLOW_SETS,
    EXPOSE_SET,
    FWD_MAP,
    IFNAMSIZ,
    IFS_SET,
    NAT_SET,
    REC_SET,
    base_table,
    expose_element,
    fixed_elements,
    ifname_key,
    parse_expose_key,
    parse_record,
    record_count,
    record_keys,
    sandbox_elements,
)
from ironclaw.resources.nft_socket import (
    NO_DESTROY_ENV,
    BatchFailed,
    GenerationChanged,
    Missing,
    NfTablesSocket,
    check_nftables,
    destroy_supported,
    forced_fallback,
)

__all__ = ["NO_DESTROY_ENV", "Firewall", "NfTablesSocket", "check_nftables", "destroy_supported"]

_T = TypeVar("_T")


class InstalledRange(TypedDict):
    """One range a sandbox installed: its set, and first and last key in hex (no veth)."""

    set: str
    expr: list[str]


_OLD_DISPATCH = "fwd"  # the verdict map of the earlier layout
_ATTEMPTS = 8  # reads and writes of one change before giving up on a busy ruleset
_ALLOW_NAMES = frozenset(s.name for s in ALLOW_SETS)


class _Unreadable(NetworkError):
    """A sandbox's record could not be read whole: damaged, or changed between two gets."""


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
        self._destroy = False if destroy is None and forced_fallback() else destroy
        self._base_ready = False
        self._sock: NfTablesSocket | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironclaw-nft")

    async def _call(self, fn: Callable[[NfTablesSocket], _T]) -> _T:
        def work() -> _T:
            if self._sock is None:
                self._sock = NfTablesSocket()
            try:
                return fn(self._sock)
            except (BatchFailed, _Unreadable) as exc:  # callers see plain NetworkError
                raise NetworkError(str(exc)) from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _uses_destroy(self, sock: NfTablesSocket) -> bool:
        if self._destroy is None:
            self._destroy = destroy_supported(sock, self.table)
        return self._destroy

    async def deletion_mode(self) -> str:
        """``"destroy"`` (Linux 6.3+ DESTROY messages) or ``"delete"`` (the DEL fallback)."""
        return "destroy" if await self._call(self._uses_destroy) else "delete"

    # --- writes ------------------------------------------------------------------------

    async def ensure_base(self) -> None:
        """Create or repair the table, once per instance; safe to race from many processes.

        The base batch is idempotent (sets are only added; base chains are flushed and
        refilled in the same transaction), so existing sandboxes keep their elements.
        """
        if self._base_ready:
            return

        def work(sock: NfTablesSocket) -> None:
            msgs = nl.base_msgs(self.table, base_table())
            if self._old_layout(sock):
                msgs.insert(0, (MSG_DELTABLE, 0, nl.strz(1, self.table)))
            sock.transact(msgs, what=f"set-up of table inet {self.table}")

        await self._call(work)
        self._base_ready = True

    def _old_layout(self, sock: NfTablesSocket) -> bool:
        """True for an empty table of the earlier chain-per-sandbox layout (replaced)."""
        try:
            (reply,) = sock.request(MSG_GETSET, nl.strz(1, self.table) + nl.strz(2, _OLD_DISPATCH))
        except Missing:
            return False
        flags = struct.unpack(">I", nl.attr_map(reply[4:]).get(3, bytes(4)))[0]
        if not flags & nl.SET_F_MAP:
            return False
        replies = sock.request(
            MSG_GETSETELEM, nl.elements_query(self.table, _OLD_DISPATCH), dump=True
        )
        if any(True for r in replies for _ in nl.elements_of(r)):
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
        """Swap the sandbox's allows in one transaction: no packet sees a gap (its port
        admissions, :meth:`admit_port`, are not part of the policy and stay)."""
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
                except Missing:  # no table: nothing installed
                    if policy is None:
                        return
                    raise NetworkError(f"table inet {self.table} is missing") from None
                except _Unreadable:
                    if sock.generation() != genid:
                        continue  # our two gets straddled someone's commit
                    raise
                if destroy:
                    stale = [*fixed_elements(sandbox_id, record.chunks), *record.elements]
                    msgs = nl.elements_msgs(self.table, MSG_DESTROYSETELEM, stale)
                    drop_counter = [nl.counter_msg(self.table, names.chain, MSG_DESTROYOBJ)]
                else:
                    # Removal without a record looks for leftovers, as DESTROY would clear them.
                    look = verify or (policy is None and not record.present)
                    stale, counter = self._stale(sock, sandbox_id, record, verify=look)
                    msgs = nl.elements_msgs(self.table, MSG_DELSETELEM, stale)
                    drop_counter = []
                    if counter:
                        drop_counter.append(nl.counter_msg(self.table, names.chain, MSG_DELOBJ))
                if policy is None:
                    msgs += drop_counter
                else:
                    msgs.append(nl.counter_msg(self.table, names.chain, MSG_NEWOBJ))
                    msgs += nl.elements_msgs(self.table, MSG_NEWSETELEM, new)
                try:
                    sock.transact(msgs, what=what, genid=genid)
                    return
                except GenerationChanged:
                    continue
                except BatchFailed as exc:
                    if destroy or exc.code != errno.ENOENT:
                        raise
                    verify = True  # the record and the table disagree: look at each piece
            if policy is None and not destroy and not self._remains(sock, sandbox_id):
                return
            raise NetworkError(f"{what}: the ruleset kept changing under us")

        await self._call(work)

    def _dump(self, sock: NfTablesSocket, set_name: str) -> list[Element]:
        try:
            replies = sock.request(
                MSG_GETSETELEM, nl.elements_query(self.table, set_name), dump=True
            )
        except Missing:
            return []
        return [Element(set_name, nl.key_of(e)) for r in replies for e in nl.elements_of(r)]

    # --- exposed ports -----------------------------------------------------------------

    async def admit_port(self, host_ifname: str, port: int, uid: int) -> None:
        """Let sockets of ``uid`` on the host open tcp connections to ``port`` behind
        ``host_ifname`` (a port forwarder); idempotent. Not part of the sandbox's record:
        the caller keeps track (:mod:`ironclaw.host.ports` keeps one file per admitted
        port and revokes them before the sandbox's network goes), so set-up and tear-down
        stay free of dumps."""
        await self.ensure_base()
        elem = expose_element(host_ifname, port, uid)
        msgs = nl.elements_msgs(self.table, MSG_NEWSETELEM, [elem])
        what = f"admission of port {port} behind {host_ifname}"
        await self._call(lambda sock: sock.transact(msgs, what=what))

    async def revoke_port(self, host_ifname: str, port: int, uid: int) -> None:
        """Undo :meth:`admit_port`; idempotent (connections already open stay open)."""
        elem = expose_element(host_ifname, port, uid)
        what = f"revocation of port {port} behind {host_ifname}"

        def work(sock: NfTablesSocket) -> None:
            destroy = self._uses_destroy(sock)
            if not destroy and not self._has_element(sock, elem):
                return
            kind = MSG_DESTROYSETELEM if destroy else MSG_DELSETELEM
            try:
                sock.transact(nl.elements_msgs(self.table, kind, [elem]), what=what)
            except BatchFailed as exc:  # no table, or removed by someone else meanwhile
                if exc.code != errno.ENOENT:
                    raise

        await self._call(work)

    async def admitted_ports(self) -> list[tuple[str, int, int]]:
        """Every admitted ``(host_ifname, port, uid)`` (a dump: for gc and diagnostics)."""
        found = await self._call(lambda sock: self._dump(sock, EXPOSE_SET))
        return sorted(parse_expose_key(e.key) for e in found)

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
        except Missing:
            return False
        found, counter = self._stale(sock, sandbox_id, record, verify=True)
        return bool(found) or counter

    def _has_element(self, sock: NfTablesSocket, elem: Element) -> bool:
        try:
            sock.request(MSG_GETSETELEM, nl.elements_query(self.table, elem.set, elem.key))
        except Missing:
            return False
        return True

    def _has_counter(self, sock: NfTablesSocket, name: str) -> bool:
        try:
            sock.request(MSG_GETOBJ, nl.counter_msg(self.table, name, MSG_GETOBJ)[2])
        except Missing:
            return False
        return True

    def _installed(self, sock: NfTablesSocket, host_ifname: str) -> _Record:
        """The sandbox's record (two gets, one when it has none).

        Raises :class:`Missing` when the table itself does not exist, :class:`_Unreadable`
        when the record is damaged or a commit landed between the two gets.
        """
        sock.request(MSG_GETTABLE, nl.strz(1, self.table))
        try:
            (reply,) = sock.request(
                MSG_GETSETELEM, nl.elements_query(self.table, IFS_SET, ifname_key(host_ifname))
            )
        except Missing:
            return _Record(False, 0, [])
        (elem,) = nl.elements_of(reply)
        chunks = record_count(nl.comment(elem.get(6)))
        if not chunks:
            return _Record(True, 0, [])
        keys = record_keys(host_ifname, chunks)
        try:
            replies = sock.request(MSG_GETSETELEM, nl.elements_query(self.table, REC_SET, *keys))
        except Missing:
            raise _Unreadable(f"firewall record of {host_ifname} is incomplete") from None
        comments = [nl.comment(e.get(6)) or "" for r in replies for e in nl.elements_of(r)]
        try:
            return _Record(True, chunks, parse_record(host_ifname, comments))
        except ConfigError as exc:
            raise _Unreadable(f"firewall record of {host_ifname} is damaged: {exc}") from exc

    # --- reads -------------------------------------------------------------------------

    async def table_exists(self) -> bool:
        def work(sock: NfTablesSocket) -> bool:
            try:
                sock.request(MSG_GETTABLE, nl.strz(1, self.table))
            except Missing:
                return False
            return True

        return await self._call(work)

    async def chains(self) -> list[str]:
        """Names of the per-sandbox filter objects: each sandbox's counter ``icc-<hash>``.

        (The name is the per-sandbox chain of the earlier layout; a sandbox now owns no
        chain.) Lists every object of the table: for diagnostics, not for hot paths.
        """

        def work(sock: NfTablesSocket) -> list[str]:
            payload = nl.strz(1, self.table) + nl.u32(3, nl.OBJECT_COUNTER)
            try:
                replies = sock.request(MSG_GETOBJ, payload, dump=True)
            except Missing:
                return []
            names = (nl.cstr(nl.attr_map(r[4:]).get(2, b"")) for r in replies)
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
                    replies = sock.request(
                        MSG_GETSETELEM, nl.elements_query(self.table, name), dump=True
                    )
                except Missing:
                    replies = []
                keys = (nl.cstr(nl.key_of(e)) for r in replies for e in nl.elements_of(r))
                result[key] = sorted(keys)
            return result

        return await self._call(work)

    async def chain_rules(self, chain: str) -> list[InstalledRange]:
        """What the sandbox whose counter is ``chain`` has installed, one entry per range.

        Each entry is ``{"set": ..., "expr": [key, last]}`` with keys in hex (the veth name
        left out); an unknown sandbox has none.
        """
        host_ifname = "icv" + chain.removeprefix("icc-")[:12]

        def work(sock: NfTablesSocket) -> list[InstalledRange]:
            try:
                recorded = self._installed(sock, host_ifname).elements
            except Missing:
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
                (reply,) = sock.request(MSG_GETOBJ, nl.counter_msg(self.table, name, MSG_GETOBJ)[2])
            except Missing:
                raise NetworkError(f"no drop counter for sandbox {sandbox_id}") from None
            data = nl.attr_map(nl.attr_map(reply[4:]).get(4, b""))
            return int.from_bytes(data.get(2, bytes(8)), "big")

        return await self._call(work)

    def close(self) -> None:
        def free() -> None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

        self._pool.submit(free).result()
        self._pool.shutdown(wait=True)
