"""Opening the database file and its numbered migrations.

A migration is a function ``mNNN_name(db)`` appended to :data:`MIGRATIONS`; each
runs once per database, inside the write transaction that records it in
``_migrations``. Never edit one that has shipped: add the next number.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from bot.store.core import _write


def open_db(path: str | Path, *, busy_timeout_s: float = 30.0) -> sqlite_utils.Database:
    """Open (creating if needed) the database file and bring its schema up to date."""
    # check_same_thread=False: the bot may run store calls in asyncio.to_thread;
    # callers must still use one connection from one thread at a time.
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    if str(path) != ":memory:":
        db.enable_wal()
        # NORMAL is corruption-safe in WAL mode and skips an fsync per commit;
        # only a power cut (not a process crash) can lose the last commits.
        db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    migrate(db)
    return db


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations this database has not seen yet; returns their names."""
    db.execute("PRAGMA foreign_keys = ON")
    applied = []
    with _write(db):
        db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)"
        )
        done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
        for fn in MIGRATIONS:
            if fn.__name__ not in done:
                fn(db)
                db["_migrations"].insert({"name": fn.__name__, "applied_at": time.time()})
                applied.append(fn.__name__)
    return applied


def m001_initial(db: sqlite_utils.Database) -> None:
    for statement in _M001_SQL.split(";\n\n"):
        db.execute(statement)


# executescript() would COMMIT the surrounding transaction, so statements are
# run one by one; they are separated by a blank line after the semicolon.
_M001_SQL = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    guild_id TEXT,
    channel_id TEXT,
    kind TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 3,
    batch_key TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    worker TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    message_id TEXT,
    progress_message_id TEXT
);

CREATE INDEX jobs_user_queue ON jobs (user_id, status, priority, created_at);

CREATE INDEX jobs_status_priority ON jobs (status, priority, kind);

CREATE INDEX jobs_batch ON jobs (batch_key, status);

CREATE INDEX jobs_user_created ON jobs (user_id, created_at);

CREATE TABLE queue_users (
    user_id TEXT PRIMARY KEY,
    queued INTEGER NOT NULL DEFAULT 0,
    last_served_seq INTEGER NOT NULL DEFAULT 0,
    last_served_at REAL
);

CREATE INDEX queue_users_waiting ON queue_users (last_served_seq) WHERE queued > 0;

CREATE INDEX queue_users_seq ON queue_users (last_served_seq);

CREATE TRIGGER jobs_queued_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued'
BEGIN
    INSERT INTO queue_users (user_id) SELECT NEW.user_id
        WHERE NOT EXISTS (SELECT 1 FROM queue_users WHERE user_id = NEW.user_id);
    UPDATE queue_users SET queued = queued + 1 WHERE user_id = NEW.user_id;
END;

CREATE TRIGGER jobs_queued_update AFTER UPDATE OF status ON jobs
WHEN (OLD.status = 'queued') != (NEW.status = 'queued')
BEGIN
    INSERT INTO queue_users (user_id) SELECT NEW.user_id
        WHERE NOT EXISTS (SELECT 1 FROM queue_users WHERE user_id = NEW.user_id);
    UPDATE queue_users
        SET queued = queued + (CASE WHEN NEW.status = 'queued' THEN 1 ELSE -1 END)
        WHERE user_id = NEW.user_id;
END;

CREATE TRIGGER jobs_queued_delete AFTER DELETE ON jobs WHEN OLD.status = 'queued'
BEGIN
    UPDATE queue_users SET queued = queued - 1 WHERE user_id = OLD.user_id;
END;

CREATE TABLE job_blobs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (job_id, sha256)
);

CREATE INDEX job_blobs_sha ON job_blobs (sha256);

CREATE TABLE settings (
    user_id TEXT PRIMARY KEY,
    data TEXT NOT NULL DEFAULT '{}',
    updated_at REAL
);

CREATE TABLE loras (
    id TEXT PRIMARY KEY,
    owner_id TEXT,
    guild_id TEXT,
    name TEXT NOT NULL,
    token TEXT,
    method TEXT NOT NULL DEFAULT 'lora',
    base_model TEXT,
    sha256 TEXT,
    path TEXT,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    shared INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    created_at REAL NOT NULL
);

CREATE UNIQUE INDEX loras_owner_name
    ON loras (COALESCE(owner_id, 'server:' || COALESCE(guild_id, '')), name COLLATE NOCASE);

CREATE INDEX loras_guild ON loras (guild_id, shared)
"""


def m002_guilds(db: sqlite_utils.Database) -> None:
    """Per-server state: settings, prompt filters, role gates, quotas, the audit log and
    each job's channel context (queried in `bot.store.guild`)."""
    for statement in _M002_SQL.split(";\n\n"):
        db.execute(statement)


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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [m001_initial, m002_guilds]
