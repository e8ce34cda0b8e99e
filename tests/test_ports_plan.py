"""What an exposed port computes, per backend: where the forwarder dials, what the
firewall admits (pure: no sandbox, no kernel).

Firecracker has no binary on the machines these tests run on, so this is its only test
of exposed ports: the plan comes from the registry record alone, and its record has the
same shape as QEMU's (``network``, ``tap``, ``host_uid``), which tests/test_ports_vm.py
drives end to end on a real QEMU VM.
"""

from __future__ import annotations

import sys

import pytest

from ironclaw.errors import ConfigError
from ironclaw.host.ports import forward_plan
from ironclaw.policy.network import NetworkPolicy, sandbox_names
from ironclaw.policy.nft_exprs import Counter, Lookup, Meta, Payload, Verdict
from ironclaw.policy.nftables import (
    EXPOSE_SET,
    GUARD_SET,
    IFNAMSIZ,
    base_table,
    expose_element,
    parse_expose_key,
    sandbox_elements,
)

UID = 2_000_000_007
NET = {"host_ifname": "icv0123456789ab", "guest_ip": "10.250.0.6", "host_ip": "10.250.0.5"}


def _info(**extra: object) -> dict[str, object]:
    return {"pid": 4242, "host_uid": UID, "tap": "tap0", "network": NET, **extra}


@pytest.mark.parametrize("backend", ["firecracker", "qemu"])
def test_a_vm_is_dialled_at_its_guest_address_through_an_admission(backend: str) -> None:
    plan = forward_plan("fc-1", backend, _info())
    assert plan.connect == "10.250.0.6"
    assert not plan.in_netns  # the namespace keeps no address once the tap is bridged
    assert plan.uid == UID
    assert plan.admit == ("icv0123456789ab", UID)


def test_a_namespace_sandbox_is_dialled_on_its_loopback_without_the_firewall() -> None:
    plan = forward_plan("ns-1", "namespace", {"pid": 1, "host_uid": UID})
    assert (plan.connect, plan.in_netns, plan.uid, plan.admit) == ("127.0.0.1", True, UID, None)


@pytest.mark.parametrize(
    "info",
    [
        {"pid": 1, "host_uid": UID, "tap": None, "network": None},  # no network policy
        {"pid": 1, "host_uid": UID},
    ],
)
def test_a_vm_without_a_network_says_how_to_get_one(info: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="--allow"):
        forward_plan("fc-2", "firecracker", info)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot expose ports"):
        forward_plan("x-1", "lxc", _info())


def test_the_admission_is_one_port_one_uid_one_veth() -> None:
    plan = forward_plan("fc-1", "firecracker", _info())
    assert plan.admit is not None
    elem = expose_element(plan.admit[0], 8000, plan.admit[1])
    assert elem.set == EXPOSE_SET and elem.last is None  # one key, never a range
    head = b"icv0123456789ab".ljust(IFNAMSIZ, b"\0")
    tcp, port = bytes([6, 0, 0, 0]), bytes([0x1F, 0x40, 0, 0])
    assert elem.key == head + tcp + port + UID.to_bytes(4, sys.byteorder)
    assert parse_expose_key(elem.key) == ("icv0123456789ab", 8000, UID)
    assert expose_element(plan.admit[0], 8001, plan.admit[1]).key != elem.key
    assert expose_element(plan.admit[0], 8000, UID + 1).key != elem.key
    for bad in (0, 65536):
        with pytest.raises(ConfigError):
            expose_element(plan.admit[0], bad, UID)
    with pytest.raises(ConfigError):
        parse_expose_key(elem.key[:-1])


def test_the_host_reaches_a_sandbox_only_through_an_admission() -> None:
    """The output hook sends the host's packets to any guarded veth to ``inbound``:
    replies pass, then the admission lookup keyed exactly like expose_element, then a
    counted drop. Every sandbox's set-up puts its veth in ``guard``."""
    table = base_table()
    output = [r for r in table.rules if r.chain == "output"]
    assert len(output) == 1
    assert Lookup(GUARD_SET, 8) in output[0].exprs and output[0].exprs[-1] == Verdict(-4, "inbound")
    ct_ok, admit, drop = (r.exprs for r in table.rules if r.chain == "inbound")
    assert ct_ok[-1] == Verdict(1) and admit[-1] == Verdict(1)
    assert admit[:-1] == (
        Meta(7, 8),  # oifname: 16 bytes
        Meta(16, 12),  # l4proto
        Payload(2, 2, 2, 13),  # th dport
        Meta(10, 14),  # skuid: the forwarder's uid
        Lookup(EXPOSE_SET, 8),
    )
    assert drop == (Counter(), Verdict(0))
    head = sandbox_names("guarded-1").host_ifname.encode().ljust(IFNAMSIZ, b"\0")
    for policy in (NetworkPolicy(), NetworkPolicy(allow=("10.0.0.0/8",))):
        elems = sandbox_elements("guarded-1", policy)
        assert [e.key for e in elems if e.set == GUARD_SET] == [head]
