"""The rows the sandbox registry hands out: frozen records, built from SQLite rows.

Named tuples rather than dataclasses: a dataclass costs about a millisecond to define
(its methods are generated with exec) and loads ``inspect``, which the one-shot CLI's
start-up cannot afford; these records only need fields, equality and a repr.

Split from :mod:`ironclaw.resources.store` so readers of a record (the API, the cluster,
the CLI) see its fields without the store's transactions.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Literal, NamedTuple

__all__ = [
    "ResourceRow",
    "SandboxRecord",
    "SandboxState",
    "TokenRow",
    "record_from_row",
    "token_from_row",
]

#: ``lost``: its node (a cluster node) was lost; only the cluster head marks it.
SandboxState = Literal[
    "creating", "pooled", "running", "paused", "stopping", "dead", "failed", "lost"
]


class SandboxRecord(NamedTuple):
    """One sandbox as the registry holds it: its spec, its backend's ``info``, its
    ``state`` and why it is in it (``reason``: who paused it, what it died of...)."""

    id: str
    slot: int
    backend: str
    state: SandboxState
    spec: dict[str, Any]
    info: dict[str, Any] = {}  # shared default: records are read, never changed
    reason: str | None = None
    owner_pid: int | None = None
    one_shot: bool = False
    pool_key: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def rid(self) -> str:
        """The id its kernel resources are named after (differs once a pooled one is taken)."""
        return str(self.info.get("rid", self.id))


class TokenRow(NamedTuple):
    """An API token as stored: never the secret, only its hash."""

    id: str
    name: str
    hash: str
    scopes: tuple[str, ...]
    max_sandboxes: int | None
    max_memory_mib: int | None
    created_at: float
    revoked_at: float | None = None


class ResourceRow(NamedTuple):
    """One resource made for a sandbox (a cgroup, its network, its runtime directory, its
    supervisor process): ``intent`` until it is known to exist, so reconcile finds and
    removes what a crash left half-made."""

    sandbox_id: str
    kind: str
    name: str
    state: Literal["intent", "created"]


def record_from_row(row: sqlite3.Row) -> SandboxRecord:
    return SandboxRecord(
        id=row["id"],
        slot=row["slot"],
        backend=row["backend"],
        state=row["state"],
        spec=json.loads(row["spec"]),
        info=json.loads(row["info"]),
        reason=row["reason"],
        owner_pid=row["owner_pid"],
        one_shot=bool(row["one_shot"]),
        pool_key=row["pool_key"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def token_from_row(row: sqlite3.Row) -> TokenRow:
    return TokenRow(
        id=row["id"],
        name=row["name"],
        hash=row["hash"],
        scopes=tuple(json.loads(row["scopes"])),
        max_sandboxes=row["max_sandboxes"],
        max_memory_mib=row["max_memory_mib"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
