"""The SQLite registry of sandboxes and of every resource made for them.

There is no daemon: many CLI processes may create and destroy sandboxes at once, so the
registry is the one source of truth they share. Two rules make it crash-safe:

* the *intent* to create a resource is recorded (and committed) before the resource is
  made, so a crash between the two leaves a row that reconcile can act on;
* slots (small integers that pick a sandbox's host uid and subnet) are allocated inside
  an ``IMMEDIATE`` transaction, so two processes never get the same one.

SQLite calls block, so each :class:`Store` runs them on one private worker thread; the
event loop never waits on the disk. A caller without an event loop (the one-shot CLI,
which cannot afford to import asyncio) uses :class:`BlockingStore`: the same steps, run
on its own thread.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ironclaw.errors import ConfigError, SandboxNotFound
from ironclaw.ids import validate_sandbox_id
from ironclaw.proto.lifecycle import AsyncResource
from ironclaw.resources.store_rows import (
    ResourceRow,
    SandboxRecord,
    SandboxState,
    TokenRow,
    record_from_row,
    token_from_row,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["Batch", "ResourceRow", "SandboxRecord", "SandboxState", "Store", "TokenRow"]

T = TypeVar("T")
P = ParamSpec("P")
M = TypeVar("M", bound=Callable[..., Any])
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id          TEXT PRIMARY KEY,
    slot        INTEGER NOT NULL UNIQUE,
    backend     TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    info        TEXT NOT NULL DEFAULT '{}',
    reason      TEXT,
    owner_pid   INTEGER,
    one_shot    INTEGER NOT NULL DEFAULT 0,
    pool_key    TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    sandbox_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (sandbox_id, kind, name)
);
"""

# The API service's tables (see ironclaw.api): bearer tokens, stored as SHA-256 hashes
# only, and which token owns which sandbox (kept apart from the sandbox row).
_API_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    hash            TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    max_sandboxes   INTEGER,
    max_memory_mib  INTEGER,
    created_at      REAL NOT NULL,
    revoked_at      REAL
);
CREATE TABLE IF NOT EXISTS api_owners (
    sandbox_id  TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL,
    memory_mib  INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL
);
"""


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``IMMEDIATE`` transaction: committed when the block ends, rolled back if it
    raises (so two processes never interleave their reads and writes)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _must_be_free(db: sqlite3.Connection, sandbox_id: str) -> None:
    if db.execute("SELECT 1 FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone():
        raise ConfigError(
            f"a sandbox named {sandbox_id!r} already exists; "
            "pick another id or remove it first (ironclaw sandbox rm)"
        )


class Batch:
    """Registry writes that go together: :meth:`Store.write` runs them in order, in one
    hop to the store's thread and one transaction (all or none). A batch still keeps the
    rule of the module: an intent goes in the batch written *before* its resource is
    made, never in one written after."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: list[Callable[[Store], object]] = []

    def intend(self, sandbox_id: str, kind: str, name: str) -> Batch:
        self.steps.append(lambda s: s._intend(sandbox_id, kind, name))
        return self

    def created(self, sandbox_id: str, kind: str, name: str) -> Batch:
        self.steps.append(lambda s: s._created(sandbox_id, kind, name))
        return self

    def removed(self, sandbox_id: str, kind: str, name: str) -> Batch:
        self.steps.append(lambda s: s._removed(sandbox_id, kind, name))
        return self

    def update(
        self,
        sandbox_id: str,
        *,
        state: SandboxState | None = None,
        info: dict[str, Any] | None = None,
    ) -> Batch:
        self.steps.append(lambda s: s._update(sandbox_id, state=state, info=info))
        return self

    def delete(self, sandbox_id: str) -> Batch:
        self.steps.append(lambda s: s._forget(sandbox_id))
        return self


def _threaded(
    fn: Callable[Concatenate[Store, P], T],
) -> Callable[Concatenate[Store, P], Coroutine[Any, Any, T]]:
    """The async method that runs ``fn`` (a blocking SQLite step) on the store's thread."""

    async def method(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(functools.partial(fn, self, *args, **kwargs))

    return _named_after(fn, method)


def _direct(
    fn: Callable[Concatenate[Store, P], T],
) -> Callable[Concatenate[BlockingStore, P], T]:
    """The :class:`BlockingStore` method that runs ``fn`` on the calling thread."""

    def method(self: BlockingStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return fn(self._store, *args, **kwargs)

    return _named_after(fn, method)


def _named_after(fn: Callable[..., Any], method: M) -> M:
    """``method`` as the public name of the step ``fn``, with its docstring."""
    method.__name__ = method.__qualname__ = fn.__name__.lstrip("_")
    method.__doc__ = fn.__doc__
    return method


def _use_wal(db: sqlite3.Connection, *, deadline: float) -> None:
    """Put the registry in write-ahead-log mode (once per file; later opens find it so).

    Processes that open a new registry at the same moment race for that switch, and
    SQLite answers the losers "database is locked" at once, without its busy handler:
    they retry until the busy timeout's deadline, by which time the winner has switched.
    """
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


class Store(AsyncResource):
    """Async facade over the registry file. Use as ``async with Store(path) as store``."""

    def __init__(self, path: Path, *, max_slots: int = 16384) -> None:
        self.path = path
        self.max_slots = max_slots
        self._pool: ThreadPoolExecutor | None = None  # made on first use (see _run)
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._run(self._open)

    async def aclose(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=30000")
        _use_wal(db, deadline=time.monotonic() + 30.0)
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        # Registries written before the warm pool existed lack its column.
        columns = {row[1] for row in db.execute("PRAGMA table_info(sandboxes)")}
        if "pool_key" not in columns:
            db.execute("ALTER TABLE sandboxes ADD COLUMN pool_key TEXT")
        # Registries written before the API service existed lack its tables.
        db.executescript(_API_SCHEMA)
        self._db = db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        import asyncio  # here, not at the top: BlockingStore's users do without it

        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironclaw-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    # -- sandboxes ---------------------------------------------------------------------

    def _reserve(
        self,
        sandbox_id: str,
        *,
        backend: str,
        spec: dict[str, Any],
        owner_pid: int | None,
        one_shot: bool,
        info: dict[str, Any] | None = None,
        pool_key: str | None = None,
    ) -> SandboxRecord:
        """Claim ``sandbox_id`` and a free slot atomically, in state ``creating``."""
        validate_sandbox_id(sandbox_id)
        now = time.time()
        with _immediate(self.db) as db:
            _must_be_free(db, sandbox_id)
            used = {r[0] for r in db.execute("SELECT slot FROM sandboxes")}
            slot = next((i for i in range(self.max_slots) if i not in used), None)
            if slot is None:
                raise ConfigError(f"all {self.max_slots} sandbox slots are in use")
            db.execute(
                "INSERT INTO sandboxes (id, slot, backend, state, spec, info, owner_pid, one_shot,"
                " pool_key, created_at, updated_at)"
                " VALUES (?, ?, ?, 'creating', ?, ?, ?, ?, ?, ?, ?)",
                (
                    sandbox_id,
                    slot,
                    backend,
                    json.dumps(spec),
                    json.dumps(info or {}),
                    owner_pid,
                    int(one_shot),
                    pool_key,
                    now,
                    now,
                ),
            )
        return self._get(sandbox_id)

    reserve = _threaded(_reserve)

    def _get(self, sandbox_id: str) -> SandboxRecord:
        validate_sandbox_id(sandbox_id)
        row = self.db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
        if row is None:
            raise SandboxNotFound(
                f"no sandbox named {sandbox_id!r}; `ironclaw sandbox ls` lists them"
            )
        return record_from_row(row)

    get = _threaded(_get)

    def _all(self) -> list[SandboxRecord]:
        rows = self.db.execute("SELECT * FROM sandboxes ORDER BY created_at").fetchall()
        return [record_from_row(r) for r in rows]

    all = _threaded(_all)

    def _update(
        self,
        sandbox_id: str,
        *,
        state: SandboxState | None = None,
        info: dict[str, Any] | None = None,
        reason: str | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        given = {
            "state = ?": state,
            "info = json_patch(info, ?)": None if info is None else json.dumps(info),
            "reason = ?": reason,
            "spec = ?": None if spec is None else json.dumps(spec),
        }
        sets = ["updated_at = ?", *(k for k, v in given.items() if v is not None)]
        args = [time.time(), *(v for v in given.values() if v is not None), sandbox_id]
        self.db.execute(f"UPDATE sandboxes SET {', '.join(sets)} WHERE id = ?", args)  # noqa: S608

    update = _threaded(_update)

    def _claim_pooled(
        self,
        pool_key: str,
        new_id: str,
        *,
        spec: dict[str, Any],
        one_shot: bool,
        owner_pid: int,
        owner: dict[str, Any],
    ) -> SandboxRecord | None:
        """Take one ready pooled sandbox for ``pool_key`` and give it ``new_id``, atomically.

        Its resources keep the names they were made under (``info['rid']``); every
        registry row moves to the new id in the same transaction, so no other process
        can take the same sandbox and none sees it half-renamed.
        """
        validate_sandbox_id(new_id)
        with _immediate(self.db) as db:
            _must_be_free(db, new_id)
            row = db.execute(
                "SELECT id, info FROM sandboxes WHERE state = 'pooled' AND pool_key = ?"
                " ORDER BY created_at LIMIT 1",
                (pool_key,),
            ).fetchone()
            if row is None:
                return None
            old = row["id"]
            info = {"rid": json.loads(row["info"]).get("rid", old), **owner}
            db.execute(
                "UPDATE sandboxes SET id = ?, state = 'running', pool_key = NULL, spec = ?,"
                " owner_pid = ?, one_shot = ?, info = json_patch(info, ?), updated_at = ?"
                " WHERE id = ?",
                (
                    new_id,
                    json.dumps(spec),
                    owner_pid,
                    int(one_shot),
                    json.dumps(info),
                    time.time(),
                    old,
                ),
            )
            db.execute("UPDATE resources SET sandbox_id = ? WHERE sandbox_id = ?", (new_id, old))
        return self._get(new_id)

    claim_pooled = _threaded(_claim_pooled)

    def _count_pooled(self, pool_key: str) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM sandboxes WHERE pool_key = ? AND state IN ('creating', 'pooled')",
            (pool_key,),
        ).fetchone()
        return int(row[0])

    count_pooled = _threaded(_count_pooled)

    def _delete(self, sandbox_id: str) -> None:
        """Forget a sandbox whose resources are all gone."""
        with _immediate(self.db):
            self._forget(sandbox_id)

    delete = _threaded(_delete)

    def _forget(self, sandbox_id: str) -> None:
        self.db.execute("DELETE FROM resources WHERE sandbox_id = ?", (sandbox_id,))
        self.db.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def _write(self, batch: Batch, then_get: str | None = None) -> SandboxRecord | None:
        with _immediate(self.db):
            for step in batch.steps:
                step(self)
        return self._get(then_get) if then_get is not None else None

    async def write(self, batch: Batch, *, then_get: str | None = None) -> SandboxRecord | None:
        """Run ``batch`` (one hop, one transaction); with ``then_get``, return that
        sandbox's record as it stands after it."""
        return await self._run(self._write, batch, then_get)

    def _begin_teardown(
        self, sandbox_id: str, reason: str
    ) -> tuple[SandboxRecord, list[ResourceRow]]:
        """Mark ``stopping``; the record and its resources as they then stand (one hop)."""
        self._update(sandbox_id, state="stopping", reason=reason)
        return self._get(sandbox_id), self._resources(sandbox_id)

    begin_teardown = _threaded(_begin_teardown)

    # -- resources ---------------------------------------------------------------------

    def _intend(self, sandbox_id: str, kind: str, name: str) -> None:
        """Record that ``kind``/``name`` is about to be created for ``sandbox_id``."""
        self.db.execute(
            "INSERT OR REPLACE INTO resources VALUES (?, ?, ?, 'intent', ?)",
            (sandbox_id, kind, name, time.time()),
        )

    intend = _threaded(_intend)

    def _created(self, sandbox_id: str, kind: str, name: str) -> None:
        self.db.execute(
            "UPDATE resources SET state = 'created' WHERE sandbox_id = ? AND kind = ? AND name = ?",
            (sandbox_id, kind, name),
        )

    created = _threaded(_created)

    def _removed(self, sandbox_id: str, kind: str, name: str) -> None:
        self.db.execute(
            "DELETE FROM resources WHERE sandbox_id = ? AND kind = ? AND name = ?",
            (sandbox_id, kind, name),
        )

    removed = _threaded(_removed)

    def _resources(self, sandbox_id: str | None = None) -> list[ResourceRow]:
        if sandbox_id is None:
            rows = self.db.execute("SELECT * FROM resources ORDER BY created_at").fetchall()
        else:
            rows = self.db.execute(
                "SELECT * FROM resources WHERE sandbox_id = ? ORDER BY created_at", (sandbox_id,)
            ).fetchall()
        return [ResourceRow(r["sandbox_id"], r["kind"], r["name"], r["state"]) for r in rows]

    resources = _threaded(_resources)

    # -- API tokens and sandbox owners -------------------------------------------------

    async def add_token(self, row: TokenRow) -> None:
        await self._run(
            self.db.execute,
            "INSERT INTO api_tokens VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            (row.id, row.name, row.hash, json.dumps(list(row.scopes)), row.max_sandboxes,
             row.max_memory_mib, row.created_at),
        )  # fmt: skip

    def _token(self, token_id: str) -> TokenRow | None:
        row = self.db.execute("SELECT * FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        return token_from_row(row) if row is not None else None

    token = _threaded(_token)

    def _tokens(self) -> list[TokenRow]:
        rows = self.db.execute("SELECT * FROM api_tokens ORDER BY created_at").fetchall()
        return [token_from_row(r) for r in rows]

    tokens = _threaded(_tokens)

    async def revoke_token(self, token_id: str) -> bool:
        """Mark a token revoked; False when no live token has that id."""
        cur = await self._run(
            self.db.execute,
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (time.time(), token_id),
        )
        return cur.rowcount > 0

    async def set_owner(self, sandbox_id: str, token_id: str, memory_mib: int) -> None:
        await self._run(
            self.db.execute,
            "INSERT OR REPLACE INTO api_owners VALUES (?, ?, ?, ?)",
            (sandbox_id, token_id, memory_mib, time.time()),
        )

    def _owners(self) -> dict[str, tuple[str, int]]:
        """sandbox id -> (owner token id, memory MiB it was charged)."""
        rows = self.db.execute("SELECT sandbox_id, token_id, memory_mib FROM api_owners")
        return {r[0]: (r[1], int(r[2])) for r in rows}

    owners = _threaded(_owners)

    async def drop_owner(self, sandbox_id: str) -> None:
        await self._run(
            self.db.execute, "DELETE FROM api_owners WHERE sandbox_id = ?", (sandbox_id,)
        )


class BlockingStore:
    """The registry's steps on the calling thread, for a process without an event loop.

    The one-shot CLI registers its sandbox with the very steps :class:`Store` runs
    (reserve, intents, batches, teardown), so a crash leaves exactly what reconcile
    already knows how to finish. :meth:`open` it; :meth:`close` is optional for a
    process about to exit (see there).
    """

    def __init__(self, path: Path) -> None:
        self._store = Store(path)

    def open(self) -> BlockingStore:
        self._store._open()
        return self

    def close(self) -> None:
        """Close the connection. A process that exits right after may skip this: every
        transaction is committed already, and closing the last connection checkpoints
        the write-ahead log (an fsync, and the next writer's first commit syncs a new
        log header: 10-25 ms here), which the next checkpoint does anyway."""
        if self._store._db is not None:
            self._store._db.close()
            self._store._db = None

    reserve = _direct(Store._reserve)
    write = _direct(Store._write)
    delete = _direct(Store._delete)

    def begin_teardown(
        self, sandbox_id: str, reason: str
    ) -> tuple[SandboxRecord, list[ResourceRow]]:
        with _immediate(self._store.db):
            return self._store._begin_teardown(sandbox_id, reason)

    def failed(self, sandbox_id: str, reason: str) -> None:
        """Mark a sandbox whose teardown left something (``gc`` retries it)."""
        self._store._update(sandbox_id, state="failed", reason=reason)

    def has_pooled(self) -> bool:
        """Whether any warm sandbox waits in the pool (of any template)."""
        row = self._store.db.execute("SELECT 1 FROM sandboxes WHERE state = 'pooled' LIMIT 1")
        return row.fetchone() is not None
