"""Sandbox ids and every name derived from them.

An id is validated before any use, and every kernel-visible name (cgroup, netns,
nft chain, interface) is derived from a hash of the *full* id, never from a lossy
sanitisation, so two distinct ids can never share a resource. Standard library only.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from ironclaw.errors import InvalidSandboxId

__all__ = ["ID_PATTERN", "derived_name", "id_digest", "new_sandbox_id", "validate_sandbox_id"]

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def validate_sandbox_id(value: object) -> str:
    """Return ``value`` if it is a valid sandbox id, else raise :class:`InvalidSandboxId`."""
    if not isinstance(value, str):
        raise InvalidSandboxId(f"sandbox id must be a string, got {type(value).__name__}")
    if ID_PATTERN.fullmatch(value) is None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidSandboxId(
            f"invalid sandbox id {shown!r}: use 1-63 characters from a-z, 0-9 and '-', "
            "starting with a letter or digit (e.g. 'build-42')"
        )
    return value


def new_sandbox_id(prefix: str = "sb") -> str:
    """A fresh random id such as ``sb-k3x9q2m7d1a0``."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    return validate_sandbox_id(f"{prefix}-{body}")


def id_digest(sandbox_id: str, nbytes: int = 8) -> str:
    """Hex digest (BLAKE2b) of the full, validated id: ``nbytes * 8`` bits of it."""
    validate_sandbox_id(sandbox_id)
    return hashlib.blake2b(
        sandbox_id.encode(), digest_size=nbytes, person=b"ironclaw-id"
    ).hexdigest()


def derived_name(kind: str, sandbox_id: str, *, max_len: int = 64) -> str:
    """A kernel-visible name ``ic<kind><64-bit hash>`` for one sandbox's resource.

    ``max_len`` caps the result (interface names allow 15 characters); the hash part is
    never shorter than 12 hex digits (48 bits) and 16 (64 bits) wherever the cap allows.
    """
    prefix = f"ic{kind}"
    room = max_len - len(prefix)
    if room < 12:
        raise ValueError(f"name for {kind!r} cannot hold a 48-bit hash in {max_len} chars")
    digest = id_digest(sandbox_id, 16)
    return prefix + digest[: min(room, 16)]
