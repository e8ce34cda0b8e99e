"""The head's placement registry on disk: sandbox id -> node, and the lost ones.

A small SQLite file in the service's state directory, written on every create, destroy
and loss, so a restarted service knows where each sandbox lives (the node actors are
detached and outlive it) and which ones a lost node took with it. Writes are short and
local; they run in the event loop's thread, as the registry is the head's own.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ironclaw.resources.store import SandboxRecord

__all__ = ["LostSandbox", "PlacementRow", "PlacementStore", "lost_sandbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS placements (
    sandbox_id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    lost_reason TEXT,
    updated_at REAL NOT NULL
)
"""


@dataclass
class LostSandbox:
    """A sandbox a lost node took with it: what every call on it is told."""

    node: str
    reason: str
    record: SandboxRecord


def lost_sandbox(sid: str, node: str, reason: str) -> LostSandbox:
    record = SandboxRecord(id=sid, slot=0, backend="?", state="lost", spec={}, reason=reason,
                           updated_at=time.time())  # fmt: skip
    return LostSandbox(node, reason, record)


@dataclass(frozen=True)
class PlacementRow:
    sandbox_id: str
    node: str
    lost_reason: str | None  # None: placed on a live node
    updated_at: float


class PlacementStore:
    """Placements that survive the service; ``None`` path keeps them in memory only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def open(self) -> list[PlacementRow]:
        """Open (creating) the file and return every row it holds."""
        target = ":memory:" if self.path is None else str(self.path)
        self._db = sqlite3.connect(target, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        rows = self._db.execute("SELECT sandbox_id, node, lost_reason, updated_at FROM placements")
        return [PlacementRow(*row) for row in rows]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _exec(self, sql: str, *args: object) -> None:
        if self._db is not None:
            self._db.execute(sql, args)

    def place(self, sandbox_id: str, node: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO placements VALUES (?, ?, NULL, ?)",
            sandbox_id,
            node,
            time.time(),
        )

    def lose(self, sandbox_id: str, node: str, reason: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?)",
            sandbox_id,
            node,
            reason,
            time.time(),
        )

    def forget(self, sandbox_id: str) -> None:
        self._exec("DELETE FROM placements WHERE sandbox_id = ?", sandbox_id)

    def clear(self) -> None:
        self._exec("DELETE FROM placements")
