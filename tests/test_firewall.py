"""The firewall against the real kernel, in a private table per test, plus its compilers.

Kernel tests run twice: with the deletion path the kernel probe picks (DESTROY messages on
Linux 6.3+) and with the DEL fallback that kernels before 6.3 get, forced here.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ironclaw.config import Settings
from ironclaw.errors import NetworkError
from ironclaw.host.doctor import _nftables
from ironclaw.policy import netlink as nl
from ironclaw.policy.network import AllowRule, NetworkPolicy, sandbox_names
from ironclaw.policy.nft_exprs import Element, Lookup, Masquerade, ObjrefMap
from ironclaw.policy.nftables import (
    ALLOW_SETS,
    IFNAMSIZ,
    PROXY_SET,
    REC_SET,
    base_table,
    parse_record,
    record_count,
    sandbox_elements,
)
from ironclaw.resources import nft_socket as nfsock
from ironclaw.resources.firewall import NO_DESTROY_ENV, Firewall, NfTablesSocket
from ironclaw.resources.net import NetworkManager
from nethelpers import PeerHost, probe, sh

POLICY = NetworkPolicy(allow=("10.9.0.0/16:53", "10.1.2.3:443/tcp"))
EMPTY = {"fwd": [], "nat": [], "ifs": []}


MODES = {"probed": None, "fallback": False}  # Firewall(destroy=...) per test mode


def _kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


@pytest.fixture(params=list(MODES))
async def fw(request: pytest.FixtureRequest) -> AsyncIterator[Firewall]:
    table = f"ictest_{secrets.token_hex(4)}"
    firewall = Firewall(table=table, destroy=MODES[request.param])
    yield firewall
    await sh("nft", "delete", "table", "inet", table, check=False)
    firewall.close()


def _get(sock: NfTablesSocket, table: str, set_name: str, key: bytes) -> bool:
    """Whether ``key`` is in the set (for a range set: inside one of its ranges)."""
    payload = nl.strz(1, table) + nl.strz(2, set_name)
    payload += nl.nest(3, nl.nest(1, nl.data(1, key)))
    try:
        sock.request(nl.MSG_GETSETELEM, payload)
    except nfsock.Missing:
        return False
    return True


# --- against the kernel -------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_add_and_remove_round_trip(fw: Firewall) -> None:
    await fw.add_sandbox("fw-one", POLICY.model_copy(update={"allow_domains": ("a.test",)}),
                         proxy_addr="10.250.0.1")  # fmt: skip
    n = sandbox_names("fw-one")
    assert await fw.chains() == [n.chain]
    assert await fw.elements() == {"fwd": [n.host_ifname], "nat": [n.host_ifname],
                                   "ifs": [n.host_ifname]}  # fmt: skip
    assert await fw.drop_count("fw-one") == 0
    assert {r["set"][:3] for r in await fw.chain_rules(n.chain)} == {"a4p", PROXY_SET[:3]}
    await fw.remove_sandbox("fw-one")
    await fw.remove_sandbox("fw-one")  # idempotent
    assert await fw.chains() == []
    assert await fw.elements() == EMPTY
    listing = await sh("nft", "-j", "list", "table", "inet", fw.table)
    assert n.host_ifname not in listing
    assert n.chain not in listing
    with pytest.raises(NetworkError):
        await fw.drop_count("fw-one")


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_remove_without_table_is_a_no_op(fw: Firewall) -> None:
    await fw.remove_sandbox("never-there")
    assert not await fw.table_exists()


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_failed_transaction_leaves_nothing(fw: Firewall) -> None:
    await fw.ensure_base()
    elems = sandbox_elements("fw-atomic", POLICY)
    # The last message names a set that does not exist: the whole batch must fail.
    bad = [*elems, Element("no-such-set", b"x" * 4)]
    msgs = [nl.counter_msg(fw.table, sandbox_names("fw-atomic").chain, nl.MSG_NEWOBJ)]
    msgs += nl.elements_msgs(fw.table, nl.MSG_NEWSETELEM, bad)
    sock = NfTablesSocket()
    try:
        with pytest.raises(NetworkError, match="No such file"):
            sock.transact(msgs, what="test")
    finally:
        sock.close()
    assert await fw.chains() == []
    assert await fw.elements() == EMPTY


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_update_replaces_everything_at_once(fw: Firewall) -> None:
    await fw.add_sandbox("fw-upd", POLICY)
    chain = sandbox_names("fw-upd").chain
    await fw.update_sandbox("fw-upd", NetworkPolicy(allow=("192.0.2.7:22/tcp",)))
    text = json.dumps(await fw.chain_rules(chain))
    assert "c0000207" in text  # 192.0.2.7
    assert "0a09" not in text  # 10.9.0.0/16 is gone
    # Adding again is a replace, not a duplicate; going loopback-only drops the NAT entry.
    await fw.add_sandbox("fw-upd", NetworkPolicy(allow_domains=("a.test",)), proxy_addr="10.0.0.1")
    assert [r["set"] for r in await fw.chain_rules(chain)] == [PROXY_SET]
    assert (await fw.elements())["nat"] == []
    await fw.remove_sandbox("fw-upd")
    assert await fw.elements() == EMPTY
    assert await fw.chain_rules(chain) == []


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_ranges_match_inside_and_only_inside(fw: Firewall) -> None:
    policy = NetworkPolicy(
        allow=(
            "10.8.0.0/24:80",
            "10.8.1.0/24:80",
            "10.7.0.0/16",
            "[2001:db8::/32]:443/udp",
            "10.6.0.1/32",
        )
    )
    await fw.add_sandbox("fw-ranges", policy)
    ifname = sandbox_names("fw-ranges").host_ifname
    head = ifname.encode().ljust(IFNAMSIZ, b"\0")
    shard = ifname[3]
    tcp80 = bytes([6, 0, 0, 0]) + (80).to_bytes(2, "big") + b"\0\0"
    udp80 = bytes([17, 0, 0, 0]) + (80).to_bytes(2, "big") + b"\0\0"
    udp443 = bytes([17, 0, 0, 0]) + (443).to_bytes(2, "big") + b"\0\0"

    def v4(addr: str) -> bytes:
        return ipaddress.IPv4Address(addr).packed

    sock = NfTablesSocket()
    try:
        t, p = fw.table, f"a4p{shard}"
        assert _get(sock, t, p, head + tcp80 + v4("10.8.0.0"))
        assert _get(sock, t, p, head + udp80 + v4("10.8.1.255"))  # merged /24s, port-only
        assert not _get(sock, t, p, head + tcp80 + v4("10.8.2.0"))
        assert not _get(sock, t, p, head + tcp80[:4] + (81).to_bytes(2, "big") + b"\0\0"
                        + v4("10.8.0.9"))  # fmt: skip
        assert _get(sock, t, f"a4a{shard}", head + v4("10.7.200.1"))
        assert not _get(sock, t, f"a4a{shard}", head + v4("10.5.255.255"))
        assert _get(sock, t, f"a4a{shard}", head + v4("10.6.0.1"))
        assert not _get(sock, t, f"a4a{shard}", head + v4("10.6.0.2"))
        v6 = ipaddress.IPv6Address("2001:db8:ffff::1").packed
        assert _get(sock, t, f"a6p{shard}", head + udp443 + v6)
        other = "icv" + ("0" if shard != "0" else "1") + ifname[4:]
        other_head = other.encode().ljust(IFNAMSIZ, b"\0")
        assert not _get(sock, t, f"a4a{shard}", other_head + v4("10.7.200.1"))
    finally:
        sock.close()


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_large_policy_spans_record_chunks(fw: Firewall) -> None:
    allows = tuple(f"[2001:db8:{i:x}::/48]:{1000 + i}/tcp" for i in range(40))
    policy = NetworkPolicy(allow=allows)
    chunks = record_count(sandbox_elements("fw-big", policy)[0].comment)
    assert chunks > 5
    await fw.add_sandbox("fw-big", policy)
    assert len(await fw.chain_rules(sandbox_names("fw-big").chain)) == 40
    await fw.remove_sandbox("fw-big")
    assert await fw.elements() == EMPTY
    listing = await sh("nft", "-j", "list", "set", "inet", fw.table, REC_SET)
    assert "icv" not in listing


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_racing_base_creation_converges(fw: Firewall) -> None:
    others = [Firewall(table=fw.table) for _ in range(6)]
    try:
        await asyncio.gather(*(o.ensure_base() for o in others), fw.ensure_base())
        await fw.add_sandbox("fw-race", POLICY)
        for o in others:
            o._base_ready = False
        await asyncio.gather(*(o.ensure_base() for o in others))
    finally:
        for o in others:
            o.close()
    listing = json.loads(await sh("nft", "-j", "list", "chain", "inet", fw.table, "forward"))
    assert sum(1 for i in listing["nftables"] if "rule" in i) == 3
    assert (await fw.elements())["fwd"] == [sandbox_names("fw-race").host_ifname]


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_replaces_an_empty_table_of_the_old_layout(fw: Firewall) -> None:
    await _nft_json(_old_layout(fw.table))
    await fw.ensure_base()
    listing = await sh("nft", "-j", "list", "table", "inet", fw.table)
    assert '"name": "fwd"' not in listing  # the old map went with the old table
    await fw.add_sandbox("fw-new", POLICY)
    assert (await fw.elements())["fwd"] == [sandbox_names("fw-new").host_ifname]


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_refuses_an_old_layout_table_in_use(fw: Firewall) -> None:
    used = {"element": {"family": "inet", "table": fw.table, "name": "fwd",
                     "elem": [["icvx", {"jump": {"target": "icc-x"}}]]}}  # fmt: skip
    chain = {"chain": {"family": "inet", "table": fw.table, "name": "icc-x"}}
    await _nft_json([*_old_layout(fw.table), {"add": chain}, {"add": used}])
    with pytest.raises(NetworkError, match="live sandboxes"):
        await fw.ensure_base()


def _old_layout(table: str) -> list[dict[str, object]]:
    fwd = {"family": "inet", "table": table, "name": "fwd", "type": "ifname", "map": "verdict"}
    return [{"add": {"table": {"family": "inet", "name": table}}}, {"add": {"map": fwd}}]


async def _nft_json(cmds: list[dict[str, object]]) -> None:
    await _nft_f(json.dumps({"nftables": cmds}), "-j")


async def _nft_f(text: str, *flags: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nft", *flags, "-f", "-", stdin=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(20):
        await proc.communicate(text.encode())
    assert proc.returncode == 0


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_other_tables_untouched(fw: Firewall) -> None:
    foreign = f"foreign_{secrets.token_hex(3)}"
    await _nft_f(
        f"table ip {foreign} {{\n chain forward {{\n type filter hook forward priority 10;"
        f" policy accept;\n ip daddr 192.0.2.99 counter drop\n }}\n}}\n"
    )
    try:
        before = await sh("nft", "list", "table", "ip", foreign)
        await fw.add_sandbox("fw-coexist", POLICY)
        await fw.update_sandbox("fw-coexist", NetworkPolicy())
        await fw.remove_sandbox("fw-coexist")
        assert await sh("nft", "list", "table", "ip", foreign) == before
    finally:
        await sh("nft", "delete", "table", "ip", foreign, check=False)


class _Meter(NfTablesSocket):
    """A real socket that counts the work each call does: messages and bytes both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.work: list[tuple[str, int, int]] = []

    def transact(
        self, msgs: list[tuple[int, int, bytes]], *, what: str, genid: int | None = None
    ) -> None:
        self.work.append(("transact", len(msgs), sum(len(m[2]) for m in msgs)))
        super().transact(msgs, what=what, genid=genid)

    def request(self, kind: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        replies = super().request(kind, payload, dump=dump)
        self.work.append((f"request-{kind}-{dump}", len(replies), sum(map(len, replies))))
        return replies


async def _cycle_work(fw: Firewall, sandbox_id: str) -> list[tuple[str, int, int]]:
    meter = _Meter()
    old, fw._sock = fw._sock, meter
    try:
        await fw.add_sandbox(sandbox_id, POLICY)
        await fw.update_sandbox(sandbox_id, NetworkPolicy(allow=("192.0.2.0/24",)))
        await fw.remove_sandbox(sandbox_id)
    finally:
        fw._sock = old
        meter.close()
    return meter.work


@pytest.mark.root
@pytest.mark.timeout(120)
async def test_set_up_and_tear_down_do_the_same_work_with_5000_installed(fw: Firewall) -> None:
    """O(1) proven by counting, not timing: with 5,000 other sandboxes installed, a
    set-up / update / tear-down sends and reads exactly the same messages and bytes as on
    an empty table (no dump, no listing that grows with the table). The benchmark
    (benchmarks/firewall.py) measures the time."""
    await fw.ensure_base()
    await _cycle_work(fw, "cycle-w")  # one-time work (the deletion-mode probe) happens here
    before = await _cycle_work(fw, "cycle-a")
    ids = [f"filler-{i}" for i in range(5000)]
    sock = NfTablesSocket()
    try:
        for start in range(0, len(ids), 250):
            msgs = []
            elems: list[Element] = []
            for sid in ids[start : start + 250]:
                msgs.append(nl.counter_msg(fw.table, sandbox_names(sid).chain,
                                               nl.MSG_NEWOBJ))  # fmt: skip
                elems += sandbox_elements(sid, POLICY)
            msgs += nl.elements_msgs(fw.table, nl.MSG_NEWSETELEM, elems)
            sock.transact(msgs, what="fillers")
    finally:
        sock.close()
    after = await _cycle_work(fw, "cycle-b")
    assert before == after
    assert not any(kind.endswith("-True") for kind, _, _ in after), "a dump on the hot path"
    assert len((await fw.elements())["ifs"]) == 5000


# --- the two deletion paths ----------------------------------------------------------------


class _Recorder(NfTablesSocket):
    """A real socket that notes which message types it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: set[int] = set()

    def transact(
        self, msgs: list[tuple[int, int, bytes]], *, what: str, genid: int | None = None
    ) -> None:
        self.sent.update(kind for kind, _, _ in msgs)
        super().transact(msgs, what=what, genid=genid)


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_each_mode_sends_the_deletions_it_claims(fw: Firewall) -> None:
    recorder = _Recorder()
    fw._sock = recorder
    mode = await fw.deletion_mode()
    await fw.add_sandbox("fw-msgs", POLICY)
    await fw.update_sandbox("fw-msgs", NetworkPolicy(allow=("192.0.2.0/24",)))
    await fw.remove_sandbox("fw-msgs")
    await fw.remove_sandbox("fw-msgs")
    destroys = {nl.MSG_DESTROYSETELEM, nl.MSG_DESTROYOBJ}
    dels = {nl.MSG_DELSETELEM, nl.MSG_DELOBJ}
    if fw._destroy is False and mode == "delete":
        assert not recorder.sent & destroys
        assert dels <= recorder.sent
    else:
        assert mode == "destroy"
        assert destroys <= recorder.sent
    assert await fw.elements() == EMPTY


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_probe_tells_the_kernels_apart_and_changes_nothing(fw: Firewall) -> None:
    sock = NfTablesSocket()
    try:
        # No table yet: a kernel that knows DESTROY answers ENOENT, which still counts.
        known = nfsock.probe_destroy(sock, fw.table)
        assert known or not _kernel_at_least(6, 3)
        await fw.ensure_base()
        assert nfsock.probe_destroy(sock, fw.table) == known
        # A type no kernel has yet gets the answer a pre-6.3 kernel gives a DESTROY.
        assert nfsock.probe_destroy(sock, fw.table, msg_type=200) is False
        assert nfsock.destroy_supported(sock) == known
    finally:
        sock.close()
    assert await fw.elements() == EMPTY
    assert await fw.chains() == []


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_environment_forces_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    table = f"ictest_{secrets.token_hex(4)}"
    monkeypatch.setenv(NO_DESTROY_ENV, "1")
    forced = Firewall(table=table)
    monkeypatch.setenv(NO_DESTROY_ENV, "0")
    probed = Firewall(table=table)
    try:
        assert await forced.deletion_mode() == "delete"
        expected = "destroy" if _kernel_at_least(6, 3) else await probed.deletion_mode()
        assert await probed.deletion_mode() == expected
        await forced.add_sandbox("fw-env", POLICY)
        await forced.remove_sandbox("fw-env")
        assert await forced.elements() == EMPTY
    finally:
        await sh("nft", "delete", "table", "inet", table, check=False)
        forced.close()
        probed.close()


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_concurrent_removers_all_succeed(fw: Firewall) -> None:
    ids = [f"fw-conc-{i}" for i in range(4)]
    for sid in ids:
        await fw.add_sandbox(sid, POLICY)
    others = [Firewall(table=fw.table, destroy=fw._destroy) for _ in range(5)]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(o.remove_sandbox(s) for o in [fw, *others] for s in ids))
    finally:
        for o in others:
            o.close()
    assert await fw.chains() == []
    assert await fw.elements() == EMPTY


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_racing_updates_leave_exactly_one_policy(fw: Firewall) -> None:
    """Each racer's batch replaces what it read; a stale read must not leak elements."""
    await fw.add_sandbox("fw-upd-race", POLICY)
    policies = [NetworkPolicy(allow=(f"10.{i}.0.0/16:{100 + i}/tcp",)) for i in range(6)]
    others = [Firewall(table=fw.table, destroy=fw._destroy) for _ in policies]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(o.update_sandbox("fw-upd-race", p)
                                   for o, p in zip(others, policies, strict=True)))  # fmt: skip
    finally:
        for o in others:
            o.close()
    rules = await fw.chain_rules(sandbox_names("fw-upd-race").chain)
    assert len(rules) == 1
    await fw.remove_sandbox("fw-upd-race")
    assert await fw.elements() == EMPTY
    listing = await sh("nft", "-j", "list", "table", "inet", fw.table)
    assert sandbox_names("fw-upd-race").host_ifname not in listing


class _LosesTheRace(NfTablesSocket):
    """Lets a rival firewall remove the sandbox at a chosen moment of our change.

    ``batch``: between our reads and our first batch. With ``genid`` dropped the kernel
    cannot see that race, so the fallback meets the ENOENT a concurrent remover causes;
    with it the kernel refuses the stale batch. ``reads``: between the get of the
    sandbox's ``ifs`` entry and the get of its record, which then comes back missing.
    """

    def __init__(self, rival: Firewall, sandbox_id: str, moment: str, keep_genid: bool) -> None:
        super().__init__()
        self.rival: Firewall | None = rival
        self.sandbox_id = sandbox_id
        self.moment = moment
        self.keep_genid = keep_genid
        self.failures: list[int] = []

    def _let_rival_win(self) -> None:
        if self.rival is not None:
            rival, self.rival = self.rival, None
            asyncio.run(rival.remove_sandbox(self.sandbox_id))  # its own thread and socket

    def request(self, kind: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        replies = super().request(kind, payload, dump=dump)
        if self.moment == "reads" and nl.strz(2, "ifs") in payload and not dump:
            self._let_rival_win()
        return replies

    def transact(
        self, msgs: list[tuple[int, int, bytes]], *, what: str, genid: int | None = None
    ) -> None:
        if self.moment == "batch" and what.startswith(("removal", "set-up of sandbox")):
            self._let_rival_win()
        try:
            super().transact(msgs, what=what, genid=genid if self.keep_genid else None)
        except nfsock.BatchFailed as exc:
            self.failures.append(exc.code)
            raise


@pytest.mark.root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("moment", "keep_genid"),
    [("batch", True), ("batch", False), ("reads", True)],
    ids=["batch-genid", "batch-no-genid", "reads"],
)
@pytest.mark.parametrize("action", ["remove", "update"])
async def test_losing_a_race_to_a_remover_is_retried(
    fw: Firewall, action: str, moment: str, keep_genid: bool
) -> None:
    await fw.add_sandbox("fw-lost", POLICY)
    rival = Firewall(table=fw.table, destroy=fw._destroy)
    sock = _LosesTheRace(rival, "fw-lost", moment, keep_genid)
    fw._sock = sock
    try:
        if action == "remove":
            await fw.remove_sandbox("fw-lost")
        else:
            await fw.update_sandbox("fw-lost", NetworkPolicy(allow=("192.0.2.7:22/tcp",)))
    finally:
        rival.close()
    assert sock.rival is None  # the rival did run first
    destroy = await fw.deletion_mode() == "destroy"
    expected = [errno.ERESTART] if keep_genid else ([] if destroy else [errno.ENOENT])
    if moment == "reads":
        expected = []  # the torn read is redone before any batch is sent
    assert sock.failures == expected
    if action == "remove":
        assert await fw.elements() == EMPTY
        assert await fw.chains() == []
    else:
        rules = await fw.chain_rules(sandbox_names("fw-lost").chain)
        assert [r["set"][:3] for r in rules] == ["a4p"]
        assert "c0000207" in json.dumps(rules)
        await fw.remove_sandbox("fw-lost")
        assert await fw.elements() == EMPTY


async def _delete_by_hand(table: str, *elems: Element) -> None:
    sock = NfTablesSocket()
    try:
        sock.transact(nl.elements_msgs(table, nl.MSG_DELSETELEM, list(elems)), what="test")
    finally:
        sock.close()


@pytest.mark.root
@pytest.mark.timeout(60)
async def test_fallback_copes_when_the_record_and_the_table_disagree() -> None:
    """Elements gone behind the record's back: DEL would abort, so the pieces are looked up."""
    table = f"ictest_{secrets.token_hex(4)}"
    fw = Firewall(table=table, destroy=False)
    try:
        ifname = sandbox_names("fw-tamper").host_ifname
        head = ifname.encode().ljust(IFNAMSIZ, b"\0")
        elems = sandbox_elements("fw-tamper", POLICY)
        await fw.add_sandbox("fw-tamper", POLICY)
        await _delete_by_hand(table, Element("natifs", head), elems[-1])
        await fw.update_sandbox("fw-tamper", POLICY)  # puts back what was missing
        assert (await fw.elements())["nat"] == [ifname]
        await _delete_by_hand(table, elems[-1], elems[1])  # a range and the drops entry
        await fw.remove_sandbox("fw-tamper")
        assert await fw.elements() == EMPTY
        assert await fw.chains() == []
        assert ifname not in await sh("nft", "-j", "list", "table", "inet", table)
        # A counter whose elements are gone is still removed by the id alone.
        orphan = sandbox_names("fw-orphan").chain
        await sh("nft", "add", "counter", "inet", table, orphan)
        await fw.remove_sandbox("fw-orphan")
        assert await fw.chains() == []
        await fw.remove_sandbox("fw-never")  # nothing at all: no batch, no error
    finally:
        await sh("nft", "delete", "table", "inet", table, check=False)
        fw.close()


@pytest.mark.root
@pytest.mark.timeout(30)
async def test_doctor_reports_the_deletion_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_DESTROY_ENV, raising=False)
    check = _nftables()
    assert check.ok and check.required
    assert ("DESTROY messages" in check.detail) == nfsock._destroy_known
    assert "DESTROY" in check.detail or "DEL fallback" in check.detail
    monkeypatch.setenv(NO_DESTROY_ENV, "1")
    assert "DEL fallback" in _nftables().detail
    assert "ironclaw_probe_" not in await sh("nft", "list", "tables")


# --- pure compilers ------------------------------------------------------------------------


def test_elements_golden() -> None:
    n = sandbox_names("golden-1")
    shard = n.host_ifname[3]
    elems = sandbox_elements("golden-1", POLICY, proxy_addr="10.250.0.1")
    by_set = [e.set for e in elems]
    # no proxy element without a domain allow; port-only allows become tcp and udp ranges
    assert by_set == ["ifs", "drops", "guard", "natifs", "rec", f"a4p{shard}", f"a4p{shard}",
                      f"a4p{shard}"]  # fmt: skip
    assert elems[1].obj == n.chain
    head = n.host_ifname.encode().ljust(IFNAMSIZ, b"\0")
    assert all(e.key.startswith(head) for e in elems)
    https = elems[6]  # ranges sorted by key: tcp/53, tcp/443, udp/53
    assert https.key == head + bytes([6, 0, 0, 0, 1, 0xBB, 0, 0, 10, 1, 2, 3])
    assert https.last == https.key
    dns_udp = elems[7]
    assert dns_udp.last is not None
    assert dns_udp.last[-4:] == bytes([10, 9, 255, 255])
    assert parse_record(n.host_ifname, [elems[4].comment or ""]) == elems[5:]
    with_proxy = sandbox_elements(
        "golden-1", POLICY.model_copy(update={"allow_domains": ("a.test",)}), proxy_addr="10.0.0.1"
    )
    assert with_proxy[-1] == Element(PROXY_SET, head + bytes([10, 0, 0, 1]))
    loopback_only = sandbox_elements("golden-1", NetworkPolicy())
    assert [e.set for e in loopback_only] == ["ifs", "drops", "guard"]


def test_overlapping_allows_merge() -> None:
    elems = sandbox_elements("merge-1", NetworkPolicy(allow=("10.0.0.0/8", "10.1.0.0/16",
                                                             "11.0.0.0/8")))  # fmt: skip
    ranges = [e for e in elems if e.last is not None]
    assert len(ranges) == 1  # 10/8 swallows 10.1/16 and touches 11/8
    assert ranges[0].key[-4:] == bytes([10, 0, 0, 0])
    assert ranges[0].last is not None
    assert ranges[0].last[-4:] == bytes([11, 255, 255, 255])


def test_records_stay_within_element_user_data() -> None:
    allows = tuple(f"[2001:db8:{i:x}::/48]:{1000 + i}" for i in range(30))
    elems = sandbox_elements("rec-1", NetworkPolicy(allow=allows))
    comments = [e.comment for e in elems if e.set == REC_SET]
    assert len(comments) == record_count(elems[0].comment) > 1
    assert all(c and len(c) <= 190 for c in comments)
    host_ifname = sandbox_names("rec-1").host_ifname
    assert parse_record(host_ifname, [c or "" for c in comments]) == [
        e for e in elems if e.last is not None
    ]


def test_base_table_has_no_per_sandbox_objects() -> None:
    table = base_table()
    names = {s.name for s in table.sets}
    assert {s.name for s in ALLOW_SETS} <= names
    lookups = [e for r in table.rules for e in r.exprs if isinstance(e, Lookup | ObjrefMap)]
    assert all(e.set in names for e in lookups)
    masq_chains = {r.chain for r in table.rules if any(isinstance(e, Masquerade) for e in r.exprs)}
    assert all(c.startswith("masq_") for c in masq_chains)
    assert len(masq_chains) == 16
    # established traffic is accepted by the first egress rule, before any allow lookup
    egress = [r for r in table.rules if r.chain == "egress"]
    assert not any(isinstance(e, Lookup) for e in egress[0].exprs)
    assert egress[-2].comment == "ironclaw:drop"


# --- real packets through the protocol-only and any-port paths ------------------------------


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", list(MODES))
async def test_any_port_and_protocol_only_allows_carry_packets(tmp_path: Path, mode: str) -> None:
    """The tcp/port path is covered by test_net_isolation; these are the other two shapes."""
    settings = Settings.from_env({"IRONCLAW_HOME": str(tmp_path)})
    pool = os.environ.get("IRONCLAW_NET_POOL", "10.250.0.0/16")
    firewall = Firewall(table=f"ictest_{secrets.token_hex(4)}", destroy=MODES[mode])
    mgr = NetworkManager(settings, pool=pool, firewall=firewall)
    a = await PeerHost.start((8080, 8081))
    made: list[str] = []
    try:
        host = ipaddress.ip_network(f"{a.ip}/32")
        cases = {
            "pkt-any": NetworkPolicy(allow=(AllowRule(network=host),)),
            "pkt-tcp": NetworkPolicy(allow=(AllowRule(network=host, proto="tcp"),)),
            "pkt-udp": NetworkPolicy(allow=(AllowRule(network=host, proto="udp"),)),
        }
        nets = {}
        for slot, (sid, policy) in enumerate(cases.items(), start=60):
            made.append(sid)
            nets[sid] = await mgr.create(sid, policy, slot=slot)
        targets = [(a.ip, 8080), (a.ip, 8081)]
        replies = [a.reply(8080), a.reply(8081)]
        for sid in ("pkt-any", "pkt-tcp"):
            got = await probe(nets[sid].netns_name, targets)
            assert list(got.values()) == replies, (sid, got)
        got = await probe(nets["pkt-udp"].netns_name, targets)
        assert all(v.startswith("err:") for v in got.values()), got
        assert await mgr.drop_count("pkt-udp") >= 2
        assert await mgr.drop_count("pkt-any") == 0
        # A policy change takes effect for new flows: udp now allowed, tcp no longer.
        await mgr.firewall.update_sandbox("pkt-tcp", cases["pkt-udp"])
        got = await probe(nets["pkt-tcp"].netns_name, targets)
        assert all(v.startswith("err:") for v in got.values()), got
        for sid in made:
            await mgr.destroy(sid)
        made.clear()
        assert await mgr.firewall.elements() == EMPTY
    finally:
        for sid in made:
            await mgr.destroy(sid)
        await sh("nft", "delete", "table", "inet", mgr.firewall.table, check=False)
        mgr.close()
        await a.stop()
