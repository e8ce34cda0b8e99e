"""Bearer tokens for the API: made by ``ironclaw token create``, stored hashed.

A token reads ``icw_<id>_<secret>``. The registry keeps the id and the SHA-256 of the
whole token (the secret is 32 random bytes, so a plain hash is enough; no password
stretching is needed) and never the token itself: it is shown once, when made.

Scopes: ``read`` (GET), ``write`` (create, exec, files, tasks, delete), ``approve``
(decide held RED calls) and ``admin`` (everything, every token's sandboxes, tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from ironclaw.errors import AuthError, ConfigError, ScopeError
from ironclaw.resources.store import Store, TokenRow

__all__ = ["SCOPES", "Principal", "create_token", "verify_token"]

SCOPES = ("read", "write", "approve", "admin")
PREFIX = "icw_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, scopes and quotas."""

    token_id: str
    name: str
    scopes: frozenset[str]
    max_sandboxes: int | None = None
    max_memory_mib: int | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def require(self, scope: str) -> None:
        if scope not in self.scopes and not self.admin:
            raise ScopeError(
                f"this token lacks the {scope!r} scope; create one with "
                f"`ironclaw token create --scope {scope}`"
            )


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(
    store: Store,
    scopes: list[str],
    *,
    name: str = "",
    max_sandboxes: int | None = None,
    max_memory_mib: int | None = None,
) -> tuple[str, TokenRow]:
    """Make a token; returns the secret (show it once) and the stored row."""
    bad = sorted(set(scopes) - set(SCOPES))
    if bad or not scopes:
        raise ConfigError(f"scopes {bad or scopes}: use one or more of {', '.join(SCOPES)}")
    for label, value in (("--max-sandboxes", max_sandboxes), ("--max-memory", max_memory_mib)):
        if value is not None and value < 0:
            raise ConfigError(f"{label} must be 0 or more")
    token_id = secrets.token_hex(6)
    token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    row = TokenRow(
        id=token_id,
        name=name or token_id,
        hash=_hash(token),
        scopes=tuple(sorted(set(scopes))),
        max_sandboxes=max_sandboxes,
        max_memory_mib=max_memory_mib,
        created_at=time.time(),
    )
    await store.add_token(row)
    return token, row


async def verify_token(store: Store, token: str | None) -> Principal:
    """The principal for a presented token, or :class:`AuthError`."""
    if not token:
        raise AuthError("authentication required: send `Authorization: Bearer <token>`")
    parts = token.removeprefix(PREFIX).split("_", 1)
    if not token.startswith(PREFIX) or len(parts) != 2:
        raise AuthError("malformed token: expected icw_<id>_<secret>")
    row = await store.token(parts[0])
    if row is None or not hmac.compare_digest(row.hash, _hash(token)):
        raise AuthError("unknown token")
    if row.revoked_at is not None:
        raise AuthError("this token was revoked; create a new one with `ironclaw token create`")
    return Principal(row.id, row.name, frozenset(row.scopes), row.max_sandboxes, row.max_memory_mib)
