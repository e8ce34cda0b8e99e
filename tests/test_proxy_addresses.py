"""The proxy's address classifier: every refused IPv4 stays refused in every IPv6 form."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ironclaw.policy.addresses import (
    AddressRule,
    NetworkSet,
    egress_refusal,
    embedded_ipv4,
    is_ip_literal,
    non_global_reason,
)

REFUSED_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]  # fmt: skip


@st.composite
def refused_v4(draw: st.DrawFn) -> IPv4Address:
    net = IPv4Network(draw(st.sampled_from(REFUSED_V4)))
    return net[draw(st.integers(0, net.num_addresses - 1))]


@st.composite
def global_v4(draw: st.DrawFn) -> IPv4Address:
    ip = IPv4Address(draw(st.integers(0, 2**32 - 1)))
    if any(ip in IPv4Network(n) for n in (*REFUSED_V4, "192.88.99.0/24")):
        ip = IPv4Address("8.8.8.8")
    return ip


def forms(v4: IPv4Address, low: int) -> dict[str, IPv6Address]:
    """``v4`` in every IPv6 form that carries it; ``low`` fills the free bits."""
    n = int(v4)
    return {
        "mapped": IPv6Address((0xFFFF << 32) | n),
        "compat": IPv6Address(n),
        "nat64": IPv6Address((0x64FF9B << 96) | n),
        "6to4": IPv6Address((0x2002 << 112) | (n << 80) | (low & (2**80 - 1))),
        "teredo": IPv6Address((0x20010000 << 96) | ((low & 0xFFFFFFFF) << 32) | (~n & 0xFFFFFFFF)),
    }


@given(refused_v4(), st.integers(0, 2**80 - 1))
def test_every_form_of_a_refused_ipv4_is_refused(v4: IPv4Address, low: int) -> None:
    assert non_global_reason(v4) is not None
    for form, ip in forms(v4, low).items():
        why = non_global_reason(ip)
        assert why is not None, (form, ip)
        assert egress_refusal(ip, 443) is not None
        if not (form == "compat" and int(v4) <= 1):  # :: and ::1 are themselves
            assert embedded_ipv4(ip) is not None and embedded_ipv4(ip)[1] == v4  # type: ignore[index]


@given(global_v4(), st.integers(0, 2**80 - 1))
def test_global_ipv4_passes_in_the_forms_that_route_to_it(v4: IPv4Address, low: int) -> None:
    assert non_global_reason(v4) is None
    f = forms(v4, low)
    for form in ("mapped", "nat64", "6to4"):
        assert non_global_reason(f[form]) is None, (form, f[form])
    # Deprecated or tunnelled forms are never a global destination.
    assert non_global_reason(f["compat"]) is not None
    assert non_global_reason(f["teredo"]) is not None


@given(global_v4(), st.integers(0, 2**80 - 1))
def test_host_and_pool_addresses_are_refused_in_every_form(v4: IPv4Address, low: int) -> None:
    own = (ip_network(f"{v4}/32"),)
    for form in ("mapped", "nat64", "6to4"):
        ip = forms(v4, low)[form]
        assert egress_refusal(ip, 80, own=own) == f"{v4} is an address of this host"
        assert "blocked range" in str(egress_refusal(ip, 80, block=own))
        # A rule for the IPv4 address covers the mapped form (the kernel delivers that to
        # the IPv4 address) but not a translated form, which goes somewhere else first.
        lifted = egress_refusal(ip, 80, own=own, allow=[AddressRule(own[0])])
        assert (lifted is None) is (form == "mapped"), (form, lifted)
        assert egress_refusal(ip, 80, own=own, allow=[AddressRule(ip_network(ip))]) is None


@pytest.mark.parametrize(
    "text",
    [
        "::1", "::", "fe80::1", "fd12::1", "ff02::1", "2001:db8::1", "100::1", "64:ff9b:1::1",
        "fec0::1", "2001:2::1", "3fff::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
        "255.255.255.255", "192.88.99.1",
    ],
)  # fmt: skip
def test_not_global(text: str) -> None:
    assert non_global_reason(ip_address(text)) is not None


@pytest.mark.parametrize("text", ["8.8.8.8", "2606:4700::1111", "2a00:1450::1", "1.1.1.1"])
def test_global(text: str) -> None:
    assert non_global_reason(ip_address(text)) is None
    assert egress_refusal(ip_address(text), 443) is None


def test_address_rule_port_and_family() -> None:
    rule = AddressRule.from_json({"network": "10.1.0.0/16", "port": 443})
    assert egress_refusal(ip_address("10.1.2.3"), 443, allow=[rule]) is None
    assert egress_refusal(ip_address("::ffff:10.1.2.3"), 443, allow=[rule]) is None
    assert egress_refusal(ip_address("10.1.2.3"), 80, allow=[rule]) == "private"
    assert egress_refusal(ip_address("10.2.0.1"), 443, allow=[rule]) == "private"


@pytest.mark.parametrize(
    ("host", "literal"),
    [
        ("127.0.0.1", True), ("[::1]", True), ("::ffff:127.0.0.1", True), ("127.1", True),
        ("2130706433", True), ("0x7f000001", True), ("0177.0.0.1", True), ("a.b.0x1f", True),
        ("fe80::1%eth0", True), ("example.com", False), ("1.example.com", False),
        ("0x7f.example", False), ("example.123abc", False),
    ],
)  # fmt: skip
def test_ip_literals(host: str, literal: bool) -> None:
    assert is_ip_literal(host) is literal


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(24, 32)), max_size=30),
    st.integers(0, 2**32 - 1),
)
def test_network_set_agrees_with_a_linear_scan(nets: list[tuple[int, int]], probe: int) -> None:
    networks = [IPv4Network((value, plen), strict=False) for value, plen in nets]
    ip = IPv4Address(probe)
    every = [*networks, *(IPv4Network((IPv4Address(int(n.network_address)), 32)) for n in networks)]
    for candidate in (ip, every[0].network_address if every else ip):
        assert (candidate in NetworkSet(every)) is any(candidate in n for n in every)
    assert IPv6Address(f"::ffff:{ip}") not in NetworkSet(every)  # families never mix
