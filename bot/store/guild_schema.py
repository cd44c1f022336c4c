"""The schema of per-server state (settings, filters, role gates, quotas, audit, job
context): one migration, run by `bot.store.migrate` after the store's own. Kept free
of other bot imports so the store can import it."""

from __future__ import annotations

import sqlite_utils

_M002_SQL = """
CREATE TABLE guild_settings (
    guild_id TEXT PRIMARY KEY,
    data TEXT NOT NULL DEFAULT '{}',
    updated_at REAL
);

CREATE TABLE guild_filters (
    guild_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    pattern TEXT NOT NULL,
    added_by TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (guild_id, kind, pattern)
);

CREATE TABLE command_roles (
    guild_id TEXT NOT NULL,
    command TEXT NOT NULL,
    role_id TEXT NOT NULL,
    PRIMARY KEY (guild_id, command, role_id)
);

CREATE TABLE quotas (
    guild_id TEXT NOT NULL,
    target TEXT NOT NULL,
    images_per_day INTEGER,
    gpu_seconds_per_day INTEGER,
    trainings_per_week INTEGER,
    PRIMARY KEY (guild_id, target)
);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id TEXT,
    user_id TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);

CREATE INDEX audit_guild ON audit (guild_id, created_at);

CREATE TABLE job_context (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    nsfw_channel INTEGER NOT NULL DEFAULT 0,
    dm INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX jobs_guild_user_created ON jobs (guild_id, user_id, created_at)
"""


def m002_guilds(db: sqlite_utils.Database) -> None:
    for statement in _M002_SQL.split(";\n\n"):
        db.execute(statement)
