"""Per-server state: settings, prompt filters, role gates, quotas, the audit log, and
what the bot must remember about a job's channel (tables: `m002_guilds` in
`bot.store.schema`).

Plain functions on a ``sqlite_utils.Database``, like the other sections. Quota usage is
counted from the jobs table itself, so a restart changes nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

from bot.store.core import _one, _rows, _write
from bot.store.errors import StoreError

DAY_S = 24 * 3600
WEEK_S = 7 * DAY_S
QUOTA_KEYS = ("images_per_day", "gpu_seconds_per_day", "trainings_per_week")


def _guild(guild_id: str | int | None) -> str:
    return str(guild_id) if guild_id else ""  # "" = direct messages


# -- settings ---------------------------------------------------------------------------


def guild_settings(db: sqlite_utils.Database, guild_id: str | int | None) -> dict[str, Any]:
    """The server's overrides, ``{"safety.policy": "spoiler", …}`` (empty: all defaults)."""
    row = _one(db, "SELECT data FROM guild_settings WHERE guild_id = ?", [_guild(guild_id)])
    return json.loads(row["data"]) if row else {}


def set_guild_setting(
    db: sqlite_utils.Database, guild_id: str | int | None, key: str, value: Any
) -> dict[str, Any]:
    """Set one override (None: back to the default); returns all overrides."""
    with _write(db):
        data = guild_settings(db, guild_id)
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
        db.execute(
            "INSERT INTO guild_settings (guild_id, data, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (guild_id) DO UPDATE SET data = excluded.data, "
            "updated_at = excluded.updated_at",
            [_guild(guild_id), json.dumps(data, sort_keys=True), time.time()],
        )
    return data


# -- prompt filters ---------------------------------------------------------------------


def filters(db: sqlite_utils.Database, guild_id: str | int | None) -> list[dict]:
    return _rows(
        db,
        "SELECT kind, pattern, added_by, created_at FROM guild_filters WHERE guild_id = ? "
        "ORDER BY kind, pattern",
        [_guild(guild_id)],
    )


def add_filter(
    db: sqlite_utils.Database, guild_id: str | int | None, kind: str, pattern: str, by: str
) -> None:
    with _write(db):
        if _one(
            db,
            "SELECT 1 FROM guild_filters WHERE guild_id = ? AND kind = ? AND pattern = ?",
            [_guild(guild_id), kind, pattern],
        ):
            raise StoreError(f"that {kind} filter is already on the list")
        db.execute(
            "INSERT INTO guild_filters (guild_id, kind, pattern, added_by, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [_guild(guild_id), kind, pattern, by, time.time()],
        )


def remove_filter(
    db: sqlite_utils.Database, guild_id: str | int | None, kind: str, pattern: str
) -> None:
    with _write(db):
        cursor = db.execute(
            "DELETE FROM guild_filters WHERE guild_id = ? AND kind = ? AND pattern = ?",
            [_guild(guild_id), kind, pattern],
        )
    if cursor.rowcount == 0:
        raise StoreError(f"no {kind} filter {pattern!r}; /admin filter list shows them")


# -- role gates ---------------------------------------------------------------------------


def command_roles(db: sqlite_utils.Database, guild_id: str | int | None) -> dict[str, set[str]]:
    """Command name → the role ids allowed to use it (commands not listed: everyone)."""
    gates: dict[str, set[str]] = {}
    for row in _rows(
        db, "SELECT command, role_id FROM command_roles WHERE guild_id = ?", [_guild(guild_id)]
    ):
        gates.setdefault(row["command"], set()).add(row["role_id"])
    return gates


def allow_role(
    db: sqlite_utils.Database, guild_id: str | int | None, command: str, role_id: str, on: bool
) -> set[str]:
    with _write(db):
        if on:
            db.execute(
                "INSERT OR IGNORE INTO command_roles (guild_id, command, role_id) VALUES (?, ?, ?)",
                [_guild(guild_id), command, role_id],
            )
        else:
            db.execute(
                "DELETE FROM command_roles WHERE guild_id = ? AND command = ? AND role_id = ?",
                [_guild(guild_id), command, role_id],
            )
    return command_roles(db, guild_id).get(command, set())


# -- quotas -------------------------------------------------------------------------------


def quotas(db: sqlite_utils.Database, guild_id: str | int | None) -> dict[str, dict]:
    """Target ("member:ID" or "role:ID") → its limits (None: not set)."""
    rows = _rows(db, "SELECT * FROM quotas WHERE guild_id = ?", [_guild(guild_id)])
    return {row["target"]: {k: row[k] for k in QUOTA_KEYS} for row in rows}


def set_quota(
    db: sqlite_utils.Database, guild_id: str | int | None, target: str, limits: dict[str, Any]
) -> dict:
    """Set (None values: unset) a member's or role's limits; an all-None row is removed."""
    with _write(db):
        current = quotas(db, guild_id).get(target, dict.fromkeys(QUOTA_KEYS))
        current.update({k: v for k, v in limits.items() if k in QUOTA_KEYS})
        if all(v is None for v in current.values()):
            db.execute(
                "DELETE FROM quotas WHERE guild_id = ? AND target = ?", [_guild(guild_id), target]
            )
        else:
            db.execute(
                "INSERT INTO quotas (guild_id, target, images_per_day, gpu_seconds_per_day, "
                "trainings_per_week) VALUES (?, ?, ?, ?, ?) ON CONFLICT (guild_id, target) "
                "DO UPDATE SET images_per_day = excluded.images_per_day, "
                "gpu_seconds_per_day = excluded.gpu_seconds_per_day, "
                "trainings_per_week = excluded.trainings_per_week",
                [_guild(guild_id), target, *(current[k] for k in QUOTA_KEYS)],
            )
    return current


def usage(
    db: sqlite_utils.Database, guild_id: str | int | None, user_id: str, now: float | None = None
) -> dict[str, float]:
    """What the member used in this server: images and GPU-seconds in the last 24 h,
    trainings in the last 7 days. Cancelled and failed jobs count only for GPU time."""
    now = time.time() if now is None else now
    guild = str(guild_id) if guild_id else None
    row = _one(
        db,
        """
        SELECT
          COALESCE(SUM(CASE WHEN kind = 'generate' AND created_at >= :day
                            AND status NOT IN ('cancelled', 'failed')
                       THEN COALESCE(json_extract(spec, '$.count'), 1) END), 0) AS images,
          COALESCE(SUM(CASE WHEN started_at IS NOT NULL AND started_at >= :day
                       THEN COALESCE(finished_at, :now) - started_at END), 0) AS gpu_seconds,
          COALESCE(SUM(CASE WHEN kind = 'train' AND status NOT IN ('cancelled', 'failed')
                       THEN 1 END), 0) AS trainings
        FROM jobs
        WHERE user_id = :user AND guild_id IS :guild AND created_at >= :week
        """,
        {"day": now - DAY_S, "week": now - WEEK_S, "now": now, "user": user_id, "guild": guild},
    )
    assert row is not None
    return {
        "images_per_day": row["images"],
        "gpu_seconds_per_day": round(row["gpu_seconds"], 1),
        "trainings_per_week": row["trainings"],
    }


# -- audit ---------------------------------------------------------------------------------


def audit(
    db: sqlite_utils.Database, guild_id: str | int | None, user_id: str, action: str, detail: str
) -> None:
    with _write(db):
        db.execute(
            "INSERT INTO audit (guild_id, user_id, action, detail, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [_guild(guild_id), str(user_id), action, detail, time.time()],
        )


def audit_log(db: sqlite_utils.Database, guild_id: str | int | None, limit: int = 20) -> list:
    return _rows(
        db,
        "SELECT * FROM audit WHERE guild_id = ? ORDER BY id DESC LIMIT ?",
        [_guild(guild_id), limit],
    )


# -- where a job was asked for --------------------------------------------------------------


def set_job_context(db: sqlite_utils.Database, job_id: str, *, nsfw_channel: bool, dm: bool):
    with _write(db):
        db.execute(
            "INSERT OR REPLACE INTO job_context (job_id, nsfw_channel, dm) VALUES (?, ?, ?)",
            [job_id, int(nsfw_channel), int(dm)],
        )


def job_context(db: sqlite_utils.Database, job_id: str) -> dict:
    row = _one(db, "SELECT nsfw_channel, dm FROM job_context WHERE job_id = ?", [job_id])
    return {"nsfw_channel": bool(row["nsfw_channel"]), "dm": bool(row["dm"])} if row else {}


# -- metrics --------------------------------------------------------------------------------


def metrics_counts(db: sqlite_utils.Database) -> dict[str, list[dict]]:
    """Jobs by kind and status (one indexed scan), for /metrics."""
    return {
        "jobs": _rows(db, "SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status"),
    }
