"""nftables transactions against the real kernel, in a private table per test."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import pytest

from ironclaw.errors import NetworkError
from ironclaw.host.firewall import Firewall, NftCli, NftLib
from ironclaw.policy.network import NetworkPolicy, base_ruleset, sandbox_names, sandbox_ruleset
from nethelpers import sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

POLICY = NetworkPolicy(allow=("10.9.0.0/16:53", "10.1.2.3:443/tcp"))


@pytest.fixture(params=["lib", "cli"])
async def fw(request: pytest.FixtureRequest) -> AsyncIterator[Firewall]:
    table = f"ictest_{secrets.token_hex(4)}"
    backend = NftLib() if request.param == "lib" else NftCli()
    firewall = Firewall(backend, table=table)
    yield firewall
    await sh("nft", "delete", "table", "inet", table, check=False)
    firewall.close()


async def test_add_and_remove_round_trip(fw: Firewall) -> None:
    await fw.add_sandbox("fw-one", POLICY, proxy_addr="10.250.0.1")
    n = sandbox_names("fw-one")
    assert await fw.chains() == sorted([n.chain, n.nat_chain])
    assert (await fw.elements())["fwd"] == [n.host_ifname]
    assert await fw.drop_count("fw-one") == 0
    await fw.remove_sandbox("fw-one")
    await fw.remove_sandbox("fw-one")
    assert await fw.chains() == []
    assert await fw.elements() == {"fwd": [], "nat": [], "ifs": []}


async def test_failed_transaction_leaves_nothing(fw: Firewall) -> None:
    await fw.ensure_base()
    cmds = sandbox_ruleset("fw-atomic", POLICY, table=fw.table)
    # The last command jumps to a chain that does not exist: the whole batch must fail.
    bad = {"add": {"rule": {"family": "inet", "table": fw.table, "chain": "forward",
                            "expr": [{"jump": {"target": "no-such-chain"}}]}}}  # fmt: skip
    with pytest.raises(NetworkError):
        await fw.run([*cmds, bad])
    assert await fw.chains() == []
    assert await fw.elements() == {"fwd": [], "nat": [], "ifs": []}


async def test_update_replaces_rules_atomically(fw: Firewall) -> None:
    await fw.add_sandbox("fw-upd", POLICY)
    chain = sandbox_names("fw-upd").chain
    await fw.update_sandbox("fw-upd", NetworkPolicy(allow=("192.0.2.7:22/tcp",)))
    text = json.dumps(await fw.chain_rules(chain))
    assert "192.0.2.7" in text
    assert "10.9.0.0" not in text


async def test_racing_base_creation_converges(fw: Firewall) -> None:
    others = [Firewall(NftCli(), table=fw.table) for _ in range(6)]
    await asyncio.gather(*(o.ensure_base() for o in others), fw.ensure_base())
    await fw.add_sandbox("fw-race", POLICY)
    await asyncio.gather(*(o.run(base_ruleset(fw.table)) for o in others))
    rules = await fw.chain_rules("forward")
    assert len(rules) == 3
    assert (await fw.elements())["fwd"] == [sandbox_names("fw-race").host_ifname]


async def test_other_tables_untouched(fw: Firewall) -> None:
    foreign = f"foreign_{secrets.token_hex(3)}"
    setup = (
        f"table ip {foreign} {{\n chain forward {{\n type filter hook forward priority 10;"
        f" policy accept;\n ip daddr 192.0.2.99 counter drop\n }}\n}}\n"
    )
    proc = await asyncio.create_subprocess_exec("nft", "-f", "-", stdin=asyncio.subprocess.PIPE)
    await proc.communicate(setup.encode())
    assert proc.returncode == 0
    try:
        before = await sh("nft", "list", "table", "ip", foreign)
        await fw.add_sandbox("fw-coexist", POLICY)
        await fw.update_sandbox("fw-coexist", NetworkPolicy())
        await fw.remove_sandbox("fw-coexist")
        assert await sh("nft", "list", "table", "ip", foreign) == before
    finally:
        await sh("nft", "delete", "table", "ip", foreign, check=False)
