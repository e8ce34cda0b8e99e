"""Tokens in the registry: hashed, scoped, revocable; the tables migrate into old files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from ironclaw.api.auth import create_token, verify_token
from ironclaw.errors import AuthError, ConfigError, ScopeError
from ironclaw.resources.store import Store


async def test_tokens_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    async with Store(tmp_path / "r.sqlite3") as store:
        token, row = await create_token(store, ["read", "write"], name="ci", max_sandboxes=3)
        assert token.startswith(f"icw_{row.id}_") and row.scopes == ("read", "write")
        who = await verify_token(store, token)
        assert (who.token_id, who.name, who.max_sandboxes) == (row.id, "ci", 3)
        who.require("write")
        with pytest.raises(ScopeError, match="--scope approve"):
            who.require("approve")
        for bad in (None, "", "Bearer x", "icw_only", f"icw_{row.id}_wrong", token + "x"):
            with pytest.raises(AuthError):
                await verify_token(store, bad)
        assert await store.revoke_token(row.id)
        assert not await store.revoke_token(row.id)  # already revoked
        with pytest.raises(AuthError, match="revoked"):
            await verify_token(store, token)
        admin, _ = await create_token(store, ["admin"])
        (await verify_token(store, admin)).require("approve")  # admin implies every scope
        with pytest.raises(ConfigError, match="use one or more of"):
            await create_token(store, ["root"])
        with pytest.raises(ConfigError):
            await create_token(store, [])
    raw = (tmp_path / "r.sqlite3").read_bytes()
    assert token.encode() not in raw and token.split("_", 2)[2].encode() not in raw


async def test_owners_table_and_migration_of_an_older_registry(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sandboxes (id TEXT PRIMARY KEY, slot INTEGER NOT NULL UNIQUE,"
               " backend TEXT NOT NULL, state TEXT NOT NULL, spec TEXT NOT NULL,"
               " info TEXT NOT NULL DEFAULT '{}', reason TEXT, owner_pid INTEGER,"
               " one_shot INTEGER NOT NULL DEFAULT 0, pool_key TEXT, created_at REAL NOT NULL,"
               " updated_at REAL NOT NULL)")  # fmt: skip
    db.commit()
    db.close()
    async with Store(path) as store:
        await store.set_owner("sb-a", "t1", 256)
        await store.set_owner("sb-b", "t2", 128)
        assert await store.owners() == {"sb-a": ("t1", 256), "sb-b": ("t2", 128)}
        await store.drop_owner("sb-a")
        assert await store.owners() == {"sb-b": ("t2", 128)}
        assert await store.tokens() == []
