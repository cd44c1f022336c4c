"""The LoRA registry: members' own LoRAs, shared ones, and each guild's library."""

from __future__ import annotations

import json
import re
import time

import sqlite_utils

from bot.store.blobs import _unreferenced
from bot.store.core import _decode, _new_id, _one, _rows, _update, _write
from bot.store.errors import DuplicateName, InvalidName, LoraNotFound, NotYours

_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


# -- LoRA registry -----------------------------------------------------------------------


def _check_lora_name(name: str) -> None:
    if not _LORA_NAME.fullmatch(name or ""):
        raise InvalidName(
            f"'{name}' can't be a LoRA name: use 1-40 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )


def _name_taken(
    db: sqlite_utils.Database,
    owner_id: str | None,
    guild_id: str | None,
    name: str,
    except_id: str = "",
) -> bool:
    if owner_id is None:
        where, params = "owner_id IS NULL AND COALESCE(guild_id, '') = ?", [guild_id or ""]
    else:
        where, params = "owner_id = ?", [owner_id]
    sql = f"SELECT 1 FROM loras WHERE {where} AND name = ? COLLATE NOCASE AND id != ?"
    return _one(db, sql, [*params, name, except_id]) is not None


def _duplicate(owner_id: str | None, name: str) -> DuplicateName:
    if owner_id is None:
        return DuplicateName(f"the server library already has a LoRA named '{name}'")
    return DuplicateName(
        f"you already have a LoRA named '{name}'; pick another name or /lora delete it first"
    )


def add_lora(
    db: sqlite_utils.Database,
    *,
    owner_id: str | None,
    guild_id: str | None,
    name: str,
    token: str | None = None,
    method: str = "lora",
    base_model: str | None = None,
    sha256: str | None = None,
    path: str | None = None,
    size_bytes: int = 0,
    metrics: dict | None = None,
    shared: bool = False,
    job_id: str | None = None,
) -> dict:
    """Register a member's LoRA (``owner_id``) or a server library one (``owner_id=None``).

    The file is either a blob (``sha256``) or a file on disk (``path``).
    Names are unique per owner (per guild for the library), ignoring case.
    """
    _check_lora_name(name)
    owner = None if owner_id is None else str(owner_id)
    with _write(db):
        if _name_taken(db, owner, guild_id, name):
            raise _duplicate(owner, name)
        lora_id = _new_id(db, "loras")
        db["loras"].insert(
            {
                "id": lora_id,
                "owner_id": owner,
                "guild_id": guild_id,
                "name": name,
                "token": token,
                "method": method,
                "base_model": base_model,
                "sha256": sha256,
                "path": path,
                "size_bytes": size_bytes,
                "metrics": json.dumps(metrics or {}),
                "shared": int(shared),
                "job_id": job_id,
                "created_at": time.time(),
            }
        )
    return get_lora(db, lora_id)  # type: ignore[return-value]


def get_lora(db: sqlite_utils.Database, lora_id: str) -> dict | None:
    return _decode(_one(db, "SELECT * FROM loras WHERE id = ?", [lora_id]))


# What a member may use, in the order a name is resolved: their own, then ones
# other members shared in this guild, then the guild's library. The `scope`
# column says which.
_USABLE_LORAS = """
    SELECT *, CASE WHEN owner_id = :user THEN 'own'
                   WHEN owner_id IS NULL THEN 'server' ELSE 'shared' END AS scope,
              CASE WHEN owner_id = :user THEN 0 WHEN owner_id IS NULL THEN 2 ELSE 1 END AS rank
    FROM loras
    WHERE owner_id = :user
       OR (guild_id = :guild AND (owner_id IS NULL OR shared = 1))
"""


def find_lora(db: sqlite_utils.Database, name: str, *, user_id: str, guild_id: str | None) -> dict:
    """Resolve ``<lora:name>`` for a member; another member's private LoRA is never found."""
    sql = (
        f"SELECT * FROM ({_USABLE_LORAS}) WHERE name = :name COLLATE NOCASE "
        "ORDER BY rank, created_at LIMIT 1"
    )
    row = _one(db, sql, {"user": str(user_id), "guild": guild_id, "name": name})
    if row is None:
        raise LoraNotFound(
            f"there is no LoRA named '{name}' that you can use; /lora list shows them"
        )
    row.pop("rank")
    return _decode(row)  # type: ignore[return-value]


def list_loras(db: sqlite_utils.Database, user_id: str, guild_id: str | None) -> list[dict]:
    """Every LoRA the member can use: own first, then shared, then the server library."""
    sql = f"SELECT * FROM ({_USABLE_LORAS}) ORDER BY rank, name COLLATE NOCASE"
    rows = [_decode(row) for row in _rows(db, sql, {"user": str(user_id), "guild": guild_id})]
    for row in rows:
        row.pop("rank")  # type: ignore[union-attr]
    return rows  # type: ignore[return-value]


def _require_lora_owner(db: sqlite_utils.Database, lora_id: str, by_user: str, admin: bool) -> dict:
    lora = get_lora(db, lora_id)
    if lora is None:
        raise LoraNotFound("that LoRA no longer exists")
    # Only a server admin may change the server library or another member's LoRA.
    if lora["owner_id"] != str(by_user) and not admin:
        raise NotYours(f"the LoRA '{lora['name']}' isn't yours, so you can't change it")
    return lora


def rename_lora(
    db: sqlite_utils.Database, lora_id: str, new_name: str, *, by_user: str, admin: bool = False
) -> dict:
    _check_lora_name(new_name)
    with _write(db):
        lora = _require_lora_owner(db, lora_id, by_user, admin)
        if _name_taken(db, lora["owner_id"], lora["guild_id"], new_name, except_id=lora_id):
            raise _duplicate(lora["owner_id"], new_name)
        _update(db, "loras", lora_id, {"name": new_name})
    return get_lora(db, lora_id)  # type: ignore[return-value]


def set_lora_shared(
    db: sqlite_utils.Database, lora_id: str, shared: bool, *, by_user: str, admin: bool = False
) -> dict:
    """Share a member's LoRA with the guild it was made in (or make it private again)."""
    with _write(db):
        _require_lora_owner(db, lora_id, by_user, admin)
        _update(db, "loras", lora_id, {"shared": int(shared)})
    return get_lora(db, lora_id)  # type: ignore[return-value]


def delete_lora(
    db: sqlite_utils.Database, lora_id: str, *, by_user: str, admin: bool = False
) -> dict:
    """Remove a LoRA from the registry; returns the row plus ``unused_blobs`` and
    ``unused_paths``: its files that nothing else references, for the caller to delete."""
    with _write(db):
        lora = _require_lora_owner(db, lora_id, by_user, admin)
        db.execute("DELETE FROM loras WHERE id = ?", [lora_id])
        blobs, paths = _unreferenced(db, {lora["sha256"]} - {None}, {lora["path"]} - {None})
    return {**lora, "unused_blobs": blobs, "unused_paths": paths}


def lora_usage(db: sqlite_utils.Database, user_id: str) -> tuple[int, int]:
    """How many LoRAs the member owns and their total size in bytes, for quotas."""
    row = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM loras WHERE owner_id = ?",
        [str(user_id)],
    ).fetchone()
    return int(row[0]), int(row[1])


def server_lora_by_sha(db: sqlite_utils.Database, guild_id: str, sha: str) -> dict | None:
    """The guild library's LoRA with these bytes, if it is registered."""
    return _decode(
        _one(
            db,
            "SELECT * FROM loras WHERE owner_id IS NULL AND guild_id = ? AND sha256 = ?",
            [guild_id, sha],
        )
    )


def lora_registered(db: sqlite_utils.Database, sha256: str) -> bool:
    """Whether any LoRA with these bytes is still registered (not deleted or forgotten)."""
    return _one(db, "SELECT 1 FROM loras WHERE sha256 = ? LIMIT 1", [sha256]) is not None


def lora_of_job(db: sqlite_utils.Database, job_id: str) -> dict | None:
    """The LoRA a training job registered, if it did."""
    return _decode(_one(db, "SELECT * FROM loras WHERE job_id = ?", [job_id]))
