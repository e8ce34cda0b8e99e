"""Network policy of one sandbox: what it may reach, validated; and its kernel names.

Deny-all is the default: a sandbox reaches exactly what ``allow`` lists (by address) and
what ``allow_domains`` lists (by name, only through the host-side egress proxy). The
policy is compiled to nf_tables objects by :mod:`ironclaw.policy.nftables`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, field_validator

from ironclaw.errors import ConfigError
from ironclaw.ids import id_digest, validate_sandbox_id
from ironclaw.policy.domains import LABEL, domain_allowed

__all__ = [
    "FAMILY",
    "PROXY_PORT",
    "TABLE",
    "AllowRule",
    "NetworkChange",
    "NetworkPolicy",
    "SandboxNames",
    "domain_allowed",
    "sandbox_names",
]

TABLE = "ironclaw"
FAMILY = "inet"
PROXY_PORT = 3128

_LABEL = LABEL
# Suffixes under which unrelated parties register names: a wildcard directly below one
# of these is as broad as a TLD wildcard. Not a full public-suffix list, a guard rail.
_PUBLIC_SUFFIXES = frozenset(
    {
        "co.uk", "org.uk", "ac.uk", "gov.uk", "com.au", "net.au", "org.au", "co.jp",
        "ne.jp", "or.jp", "com.br", "com.cn", "net.cn", "org.cn", "co.nz", "co.in",
        "co.za", "com.mx", "com.tr", "com.tw", "com.hk", "com.sg", "co.kr", "github.io",
        "herokuapp.com", "appspot.com", "cloudfront.net", "amazonaws.com", "azurewebsites.net",
        "blogspot.com", "pages.dev", "workers.dev", "vercel.app", "netlify.app",
    }
)  # fmt: skip


class NetworkChange(TypedDict, total=False):
    """A change to a running sandbox's egress: each list given replaces the current one,
    except ``deny``, whose rules are taken out of the allow list."""

    allow: list[str] | None
    allow_domains: list[str] | None
    deny: list[str] | None
    deny_domains: list[str] | None


class AllowRule(BaseModel):
    """One address allow: a network, optionally narrowed to a port and a protocol."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: IPv4Network | IPv6Network
    port: int | None = None
    proto: Literal["tcp", "udp"] | None = None

    @field_validator("port")
    @classmethod
    def _port_range(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 65535:
            raise ValueError(f"port {value} is outside 1-65535")
        return value

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse ``CIDR[:PORT[/PROTO]]``; IPv6 with a port is written ``[2001:db8::/32]:443``."""
        raw = text.strip()
        port_part: str | None = None
        if raw.startswith("["):
            close = raw.find("]")
            if close < 0:
                raise ConfigError(f"bad allow rule {text!r}: missing ']'")
            net_part, rest = raw[1:close], raw[close + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ConfigError(f"bad allow rule {text!r}: expected ':PORT' after ']'")
                port_part = rest[1:]
        elif raw.count(":") == 1:
            net_part, port_part = raw.split(":")
        else:
            net_part = raw  # IPv4 without port, or bare IPv6
        try:
            network = ipaddress.ip_network(net_part, strict=True)
        except ValueError as exc:
            raise ConfigError(
                f"bad allow rule {text!r}: {exc} (expected CIDR[:PORT[/tcp|udp]], "
                "e.g. 10.1.2.0/24:443 or 10.1.2.3:53/udp)"
            ) from None
        port: int | None = None
        proto: str | None = None
        if port_part is not None:
            if "/" in port_part:
                port_part, proto = port_part.split("/", 1)
                if proto not in ("tcp", "udp"):
                    raise ConfigError(f"bad allow rule {text!r}: protocol must be tcp or udp")
            if not port_part.isdigit() or not 1 <= int(port_part) <= 65535:
                raise ConfigError(f"bad allow rule {text!r}: port must be a number in 1-65535")
            port = int(port_part)
        return cls.model_validate({"network": network, "port": port, "proto": proto})

    def __str__(self) -> str:
        net = str(self.network)
        if self.port is None:
            return net
        head = f"[{net}]" if self.network.version == 6 else net
        return f"{head}:{self.port}" + (f"/{self.proto}" if self.proto else "")


def _check_domain(pattern: str, *, for_allow: bool) -> str:
    name = pattern.strip().lower().rstrip(".")
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    labels = body.split(".") if body else []
    if not labels or not all(_LABEL.fullmatch(label) for label in labels) or len(body) > 253:
        raise ValueError(f"{pattern!r} is not a domain name or '*.suffix' pattern")
    if for_allow:
        if len(labels) < 2:
            raise ValueError(f"{pattern!r} is too broad: a bare top-level domain is refused")
        if wildcard and body in _PUBLIC_SUFFIXES:
            raise ValueError(f"{pattern!r} is too broad: {body} is a public suffix")
    return name


class NetworkPolicy(BaseModel):
    """Deny-all unless allowed; deny_domains wins over allow_domains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow: tuple[AllowRule, ...] = ()
    allow_domains: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()

    @field_validator("allow", mode="before")
    @classmethod
    def _parse_allow(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(AllowRule.parse(v) if isinstance(v, str) else v for v in value)
        return value

    @field_validator("allow_domains")
    @classmethod
    def _allow_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_check_domain(v, for_allow=True) for v in value))

    @field_validator("deny_domains")
    @classmethod
    def _deny_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_check_domain(v, for_allow=False) for v in value))

    @property
    def needs_network(self) -> bool:
        """False means loopback only: no veth, no chain, nothing to filter."""
        return bool(self.allow or self.allow_domains)

    @property
    def needs_proxy(self) -> bool:
        return bool(self.allow_domains)


# --- names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxNames:
    """Every kernel-visible name of one sandbox's network, all from a hash of the full id."""

    chain: str  # the sandbox's drop counter icc-<64-bit hash> (once its filter chain)
    nat_chain: str  # icn-<64-bit hash>: reserved (the earlier layout's nat chain)
    host_ifname: str  # host veth, icv<48-bit hash> (15 chars, the kernel's limit)
    netns: str  # icns-<64-bit hash>


def sandbox_names(sandbox_id: str) -> SandboxNames:
    validate_sandbox_id(sandbox_id)
    digest = id_digest(sandbox_id, 16)
    return SandboxNames(
        chain=f"icc-{digest[:16]}",
        nat_chain=f"icn-{digest[:16]}",
        host_ifname=f"icv{digest[:12]}",
        netns=f"icns-{digest[:16]}",
    )
