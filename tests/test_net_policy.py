"""Pure policy parsing, validation and nft JSON compilation (no I/O)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ironclaw.errors import ConfigError
from ironclaw.policy.network import (
    AllowRule,
    NetworkPolicy,
    domain_allowed,
    sandbox_names,
)


@pytest.mark.parametrize(
    ("text", "net", "port", "proto"),
    [
        ("10.1.2.3", "10.1.2.3/32", None, None),
        ("10.1.2.0/24:443", "10.1.2.0/24", 443, None),
        ("10.1.2.3:53/udp", "10.1.2.3/32", 53, "udp"),
        ("2001:db8::/32", "2001:db8::/32", None, None),
        ("[2001:db8::1]:443/tcp", "2001:db8::1/128", 443, "tcp"),
    ],
)
def test_allow_rule_parse(text: str, net: str, port: int | None, proto: str | None) -> None:
    rule = AllowRule.parse(text)
    assert (str(rule.network), rule.port, rule.proto) == (net, port, proto)
    assert AllowRule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    "text",
    ["", "10.1.2.3/24", "10.1.2.3:0", "10.1.2.3:70000", "10.1.2.3:80/icmp", "host:80", "[::1"],
)
def test_allow_rule_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        AllowRule.parse(text)


@given(
    st.ip_addresses(v=4),
    st.integers(0, 32),
    st.none() | st.integers(1, 65535),
    st.sampled_from([None, "tcp", "udp"]),
)
def test_allow_rule_round_trip(
    addr: ipaddress.IPv4Address, plen: int, port: int | None, proto: str | None
) -> None:
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    text = str(net) + ("" if port is None else f":{port}" + (f"/{proto}" if proto else ""))
    rule = AllowRule.parse(text)
    assert rule.network == net
    assert rule.port == port
    assert rule.proto == (proto if port is not None else None)


@pytest.mark.parametrize(
    "pattern", ["*", "*.com", "com", "*.co.uk", "localhost", "bad_name.test", "*.*.x.y"]
)
def test_over_broad_or_bad_domains_refused(pattern: str) -> None:
    with pytest.raises(ValidationError):
        NetworkPolicy(allow_domains=(pattern,))


def test_policy_defaults_and_matching() -> None:
    assert not NetworkPolicy().needs_network
    pol = NetworkPolicy(
        allow=("10.0.0.1:80",),
        allow_domains=("Example.ORG.", "*.pkg.test"),
        deny_domains=("bad.pkg.test",),
    )
    assert pol.needs_network
    assert pol.needs_proxy
    assert pol.allow_domains == ("example.org", "*.pkg.test")
    assert domain_allowed("example.org", pol.allow_domains, pol.deny_domains)[0]
    assert not domain_allowed("www.example.org", pol.allow_domains, pol.deny_domains)[0]
    assert domain_allowed("a.pkg.test", pol.allow_domains, pol.deny_domains)[0]
    assert not domain_allowed("pkg.test", pol.allow_domains, pol.deny_domains)[0]
    assert not domain_allowed("xpkg.test", pol.allow_domains, pol.deny_domains)[0]
    ok, why = domain_allowed("bad.pkg.test", pol.allow_domains, pol.deny_domains)
    assert not ok
    assert "denied" in why
    with pytest.raises(ValidationError):
        NetworkPolicy.model_validate({"allow": [], "surprise": 1})


@pytest.mark.parametrize(
    ("a", "b"), [("task-1", "task1"), ("a-b1", "ab-1"), ("x" * 62 + "a", "x" * 62 + "b")]
)
def test_names_distinct_and_bounded(a: str, b: str) -> None:
    na, nb = sandbox_names(a), sandbox_names(b)
    for x, y in zip(vars(na).values(), vars(nb).values(), strict=True):
        assert x != y
    assert len(na.host_ifname) <= 15
    assert len(na.chain) - len("icc-") == 16
