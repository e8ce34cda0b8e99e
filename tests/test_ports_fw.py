"""Port admissions against the real kernel, in a private table, in both deletion modes
(DESTROY messages, and the DEL fallback of kernels before 6.3)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from ironclaw.policy.network import NetworkPolicy, sandbox_names
from ironclaw.resources.firewall import Firewall
from nethelpers import sh

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

MODES = {"probed": None, "fallback": False}
UID = 1_500_000_003


@pytest.fixture(params=list(MODES))
async def fw(request: pytest.FixtureRequest) -> AsyncIterator[Firewall]:
    table = f"ictest_{secrets.token_hex(4)}"
    firewall = Firewall(table=table, destroy=MODES[request.param])
    yield firewall
    await sh("nft", "delete", "table", "inet", table, check=False)
    firewall.close()


async def test_admit_and_revoke_are_idempotent_and_exact(fw: Firewall) -> None:
    await fw.revoke_port("icv000000000001", 8000, UID)  # no table yet: nothing to do
    await fw.add_sandbox("adm-1", NetworkPolicy(allow=("10.9.0.0/16",)))
    veth = sandbox_names("adm-1").host_ifname
    for _ in range(2):
        await fw.admit_port(veth, 8000, UID)
    await fw.admit_port(veth, 8001, UID + 1)
    assert await fw.admitted_ports() == [(veth, 8000, UID), (veth, 8001, UID + 1)]
    # A live egress change keeps them: they are not part of the policy.
    await fw.update_sandbox("adm-1", NetworkPolicy(allow=("10.8.0.0/16",)))
    assert len(await fw.admitted_ports()) == 2
    for _ in range(2):
        await fw.revoke_port(veth, 8000, UID)
    await fw.revoke_port(veth, 8001, UID)  # another uid's admission: not this one
    assert await fw.admitted_ports() == [(veth, 8001, UID + 1)]
    await fw.revoke_port(veth, 8001, UID + 1)
    assert await fw.admitted_ports() == []
    await fw.remove_sandbox("adm-1")


async def test_the_table_shows_the_output_path(fw: Firewall) -> None:
    await fw.add_sandbox("adm-2", NetworkPolicy())
    veth = sandbox_names("adm-2").host_ifname
    await fw.admit_port(veth, 8000, UID)
    listing = await sh("nft", "list", "table", "inet", fw.table)
    assert "hook output" in listing
    assert f'elements = {{ "{veth}" }}' in listing  # in guard (and ifs)
    assert 'comment "ironclaw:expose"' in listing
    await fw.remove_sandbox("adm-2")
    # Tear-down leaves admissions to their owner (host.ports revokes them first).
    assert await fw.admitted_ports() == [(veth, 8000, UID)]
    await fw.revoke_port(veth, 8000, UID)
