"""Host-name matching for the egress proxy: standard library only.

The proxy runs on the distribution's interpreter with nothing but IronClaw's
stdlib-only modules (see :mod:`ironclaw.resources.guest_bundle`), after dropping privileges;
this is the part of the network policy it needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["LABEL", "domain_allowed", "matches"]

LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def matches(name: str, pattern: str) -> bool:
    """``pattern`` is an exact name or ``*.suffix`` (which never matches the suffix itself)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def domain_allowed(name: str, allow: Iterable[str], deny: Iterable[str]) -> tuple[bool, str]:
    """Decide one host name: (allowed, reason). Deny patterns win over allow patterns."""
    host = name.strip().lower().rstrip(".")
    if not host or not all(LABEL.fullmatch(label) for label in host.split(".")):
        return False, "not a valid host name"
    for pattern in deny:
        if matches(host, pattern):
            return False, f"denied by {pattern}"
    for pattern in allow:
        if matches(host, pattern):
            return True, f"allowed by {pattern}"
    return False, "not in allow list"
