"""Each member's saved defaults for the generation commands."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

from bot.store.core import _one, _write


def get_settings(db: sqlite_utils.Database, user_id: str) -> dict:
    """The member's saved defaults (sampler, steps, cfg, width, height, negative, …)."""
    row = _one(db, "SELECT data FROM settings WHERE user_id = ?", [str(user_id)])
    return json.loads(row["data"]) if row else {}


def update_settings(db: sqlite_utils.Database, user_id: str, **changes: Any) -> dict:
    """Merge ``changes`` into the member's defaults; a value of None forgets that key.

    Values are validated by the caller (the settings cog), which knows the limits.
    """
    with _write(db):
        data = get_settings(db, user_id)
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        db["settings"].upsert(
            {"user_id": str(user_id), "data": json.dumps(data), "updated_at": time.time()},
            pk="user_id",
        )
    return data


def reset_settings(db: sqlite_utils.Database, user_id: str) -> None:
    with _write(db):
        db.execute("DELETE FROM settings WHERE user_id = ?", [str(user_id)])
