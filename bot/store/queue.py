"""The bot's durable state in SQLite: jobs and the fair queue, member settings, LoRAs.

Plain functions that take a ``sqlite_utils.Database`` and return dicts (JSON
columns decoded). SQLite is the single source of truth: a restart loses
nothing, and two processes may share one database file.

Transactions: every write runs in ``BEGIN IMMEDIATE`` (see :func:`_write`), so a
writer takes the lock before it reads and two processes can never both claim
the same job or deadlock upgrading a read lock.

Fair queue: a job is served by (1) highest ``priority``, then (2) round-robin
across members — the member served least recently goes first, tracked by a
monotonically increasing ``queue_users.last_served_seq`` (0 = never served) —
then (3) oldest first within a member. Triggers keep ``queue_users.queued``
equal to the member's number of queued jobs, so picking the next member only
visits members who are actually waiting.

Blob references: spec/result JSON names blob-store files by 64-hex sha256
strings stored under one of :data:`BLOB_KEYS` (a string or a list of strings,
at any depth). They are indexed in ``job_blobs`` so /forget can tell which
files no one else still uses.
"""

from __future__ import annotations

import heapq
import json
import re
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import sqlite_utils

BLOB_KEYS = frozenset(
    {"image", "images", "mask", "blob", "blobs", "sha256", "preview", "photos", "outputs"}
)
_SHA = re.compile(r"[0-9a-f]{64}")
_LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_JSON_COLUMNS = ("spec", "result", "metrics")


class JobStatus(str, Enum):
    QUEUED = "queued"  # waiting for a worker; claim_next picks these
    RUNNING = "running"  # claimed by a worker; `worker` and `started_at` are set
    DONE = "done"  # finished; `result` holds output blob shas and metadata
    FAILED = "failed"  # gave up: not retryable, or out of attempts; `error` says why
    CANCELLED = "cancelled"  # stopped by its member (or an admin) before finishing


TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


# -- errors: every message is written to be shown to the member as is ----------


class StoreError(Exception):
    """A problem with a member's request; the message will be displayed to the user."""


class QueueFull(StoreError):
    pass


class JobNotFound(StoreError):
    pass


class NotYours(StoreError):
    pass


class DuplicateName(StoreError):
    pass


class InvalidName(StoreError):
    pass


class LoraNotFound(StoreError):
    pass


# -- opening and migrations -----------------------------------------------------


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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [m001_initial]


@contextmanager
def _write(db: sqlite_utils.Database) -> Iterator[None]:
    """One write transaction, taking SQLite's write lock at BEGIN (nested: a savepoint)."""
    if db.conn.in_transaction:
        with db.atomic():
            yield
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.conn.rollback()
        raise
    db.conn.commit()


def _rows(db: sqlite_utils.Database, sql: str, params: list | dict | None = None) -> list[dict]:
    # Straight to the cursor: db.query() parses each statement first, which
    # doubled the cost of the small lookups a dispatch makes.
    cursor = db.conn.execute(sql, params or [])
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def _one(db: sqlite_utils.Database, sql: str, params: list | dict | None = None) -> dict | None:
    rows = _rows(db, sql, params)
    return rows[0] if rows else None


def _update(db: sqlite_utils.Database, table: str, row_id: str, changes: dict) -> None:
    # A plain UPDATE: Table.update() re-reads the schema and the row on every call,
    # which was most of the cost of a dispatch.
    assignments = ", ".join(f"{column} = ?" for column in changes)
    db.execute(f"UPDATE {table} SET {assignments} WHERE id = ?", [*changes.values(), row_id])


def _decode(row: dict | None) -> dict | None:
    if row is None:
        return None
    for column in _JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


def _new_id(db: sqlite_utils.Database, table: str) -> str:
    # 10 hex chars = 40 bits: short enough for a custom_id, collisions re-rolled.
    while True:
        candidate = secrets.token_hex(5)
        if _one(db, f"SELECT 1 FROM {table} WHERE id = ?", [candidate]) is None:
            return candidate


# -- blob references ----------------------------------------------------------


def blob_refs(value: Any) -> set[str]:
    """Every 64-hex string found under a :data:`BLOB_KEYS` key, at any depth."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in BLOB_KEYS:
                found |= _shas_in(item)
            found |= blob_refs(item)
    elif isinstance(value, list):
        for item in value:
            found |= blob_refs(item)
    return found


def _shas_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if _SHA.fullmatch(value) else set()
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str) and _SHA.fullmatch(v)}
    return set()


def _index_blobs(db: sqlite_utils.Database, job_id: str, payload: Any) -> None:
    for sha in blob_refs(payload):
        db.execute("INSERT OR IGNORE INTO job_blobs (job_id, sha256) VALUES (?, ?)", [job_id, sha])


# -- jobs: enqueue and lookups ---------------------------------------------------


def enqueue(
    db: sqlite_utils.Database,
    *,
    user_id: str,
    guild_id: str | None,
    channel_id: str | None,
    kind: str,
    spec: dict,
    batch_key: str = "",
    priority: int = 0,
    max_attempts: int = 3,
    max_queued_per_user: int | None = None,
) -> dict:
    """Add a job; raises QueueFull when the member already has the maximum in the queue."""
    with _write(db):
        if max_queued_per_user is not None:
            _check_cap(db, user_id, max_queued_per_user)
        job_id = _new_id(db, "jobs")
        db["jobs"].insert(
            {
                "id": job_id,
                "user_id": str(user_id),
                "guild_id": guild_id,
                "channel_id": channel_id,
                "kind": kind,
                "status": JobStatus.QUEUED.value,
                "priority": priority,
                "max_attempts": max(1, max_attempts),
                "batch_key": batch_key or "",
                "spec": json.dumps(spec),
                "created_at": time.time(),
            }
        )
        _index_blobs(db, job_id, spec)
    return get_job(db, job_id)  # type: ignore[return-value]


def _check_cap(db: sqlite_utils.Database, user_id: str, cap: int) -> None:
    count = queued_count(db, user_id)
    if count >= cap:
        raise QueueFull(
            f"you already have {count} jobs queued (the limit is {cap}); "
            "wait for one to finish or /cancel one"
        )


def get_job(db: sqlite_utils.Database, job_id: str) -> dict | None:
    return _decode(_one(db, "SELECT * FROM jobs WHERE id = ?", [job_id]))


def require_job(db: sqlite_utils.Database, job_id: str) -> dict:
    job = get_job(db, job_id)
    if job is None:
        raise JobNotFound(f"there is no job `{job_id}` (it may have been deleted)")
    return job


def queued_count(db: sqlite_utils.Database, user_id: str) -> int:
    """The member's jobs still in the queue: waiting or running (what the cap counts)."""
    row = db.execute(
        "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND status IN ('queued', 'running')",
        [str(user_id)],
    ).fetchone()
    return int(row[0])


def user_jobs(
    db: sqlite_utils.Database,
    user_id: str,
    *,
    limit: int = 20,
    statuses: Iterable[str] | None = None,
) -> list[dict]:
    """The member's jobs, newest first, optionally only those in ``statuses``."""
    where, params = "user_id = ?", [str(user_id)]
    if statuses is not None:
        wanted = [JobStatus(s).value for s in statuses]
        where += f" AND status IN ({', '.join('?' * len(wanted))})"
        params += wanted
    sql = f"SELECT * FROM jobs WHERE {where} ORDER BY created_at DESC, rowid DESC LIMIT ?"
    return [_decode(row) for row in _rows(db, sql, [*params, limit])]  # type: ignore[misc]


def set_job_messages(
    db: sqlite_utils.Database,
    job_id: str,
    *,
    message_id: str | None = None,
    progress_message_id: str | None = None,
) -> None:
    """Remember the Discord messages posted for a job, so a restart keeps editing them."""
    changes = {
        key: value
        for key, value in (("message_id", message_id), ("progress_message_id", progress_message_id))
        if value is not None
    }
    if changes:
        with _write(db):
            _update(db, "jobs", job_id, changes)


def set_priority(db: sqlite_utils.Database, job_id: str, priority: int) -> dict:
    with _write(db):
        require_job(db, job_id)
        _update(db, "jobs", job_id, {"priority": priority})
    return require_job(db, job_id)


# -- jobs: claiming, in fair order --------------------------------------------------


def claim_next(
    db: sqlite_utils.Database,
    *,
    worker: str,
    max_batch: int = 1,
    kinds: set[str] | None = None,
) -> list[dict]:
    """Claim the next job in fair order plus up to ``max_batch - 1`` batch mates.

    Batch mates are queued jobs with the same non-empty ``batch_key`` (any member,
    fair order). All are marked running in one transaction; [] when nothing waits.
    """
    with _write(db):
        first = _pick_next(db, kinds)
        if first is None:
            return []
        picked = [first]
        if max_batch > 1 and first["batch_key"]:
            picked += _batch_mates(db, first, kinds, max_batch - 1)
        ids = [job["id"] for job in picked]
        _mark_running(db, ids, worker)
        _mark_served(db, [job["user_id"] for job in picked])
        return [require_job(db, job_id) for job_id in ids]


def _kind_filter(kinds: set[str] | None, alias: str = "") -> tuple[str, list[str]]:
    if kinds is None:
        return "", []
    ordered = sorted(kinds)
    return f" AND {alias}kind IN ({', '.join('?' * len(ordered))})", ordered


def _pick_next(db: sqlite_utils.Database, kinds: set[str] | None) -> dict | None:
    kind_sql, kind_params = _kind_filter(kinds)
    top = _one(
        db,
        f"SELECT priority FROM jobs WHERE status = 'queued'{kind_sql} "
        "ORDER BY priority DESC LIMIT 1",
        kind_params,
    )
    if top is None:
        return None
    # Walk waiting members from least recently served; the first one with a job
    # at the top priority is served, with their oldest such job.
    job_kind_sql, _ = _kind_filter(kinds, "j.")
    sql = f"""
        SELECT * FROM (
            SELECT u.user_id, u.last_served_seq, u.rowid AS user_order,
                (SELECT j.id FROM jobs j
                 WHERE j.user_id = u.user_id AND j.status = 'queued'
                   AND j.priority = ?{job_kind_sql}
                 ORDER BY j.created_at, j.rowid LIMIT 1) AS job_id
            FROM queue_users u WHERE u.queued > 0
        ) WHERE job_id IS NOT NULL
        ORDER BY last_served_seq, user_order LIMIT 1
    """
    row = _one(db, sql, [top["priority"], *kind_params])
    if row is None:
        return None
    return _one(db, "SELECT id, user_id, batch_key FROM jobs WHERE id = ?", [row["job_id"]])


def _batch_mates(
    db: sqlite_utils.Database, first: dict, kinds: set[str] | None, limit: int
) -> list[dict]:
    # Round-robin inside the batch too: everyone's 1st job before anyone's 2nd;
    # the member just served counts as the most recently served.
    kind_sql, kind_params = _kind_filter(kinds)
    sql = f"""
        SELECT j.id, j.user_id FROM (
            SELECT id, user_id, priority,
                ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY created_at, rowid) AS turn
            FROM jobs
            WHERE batch_key = ? AND status = 'queued' AND id != ?{kind_sql}
        ) j JOIN queue_users u ON u.user_id = j.user_id
        ORDER BY j.priority DESC, j.turn, j.user_id = ?, u.last_served_seq, u.rowid
        LIMIT ?
    """
    params = [first["batch_key"], first["id"], *kind_params, first["user_id"], limit]
    return _rows(db, sql, params)


def _mark_running(db: sqlite_utils.Database, ids: list[str], worker: str) -> None:
    now = time.time()
    db.conn.executemany(
        "UPDATE jobs SET status = 'running', started_at = ?, worker = ? WHERE id = ?",
        [(now, worker, job_id) for job_id in ids],
    )


def _mark_served(db: sqlite_utils.Database, user_ids: list[str]) -> None:
    seq = db.execute("SELECT COALESCE(MAX(last_served_seq), 0) FROM queue_users").fetchone()[0]
    now = time.time()
    for user_id in dict.fromkeys(user_ids):  # first-served member gets the lower number
        seq += 1
        db.execute(
            "UPDATE queue_users SET last_served_seq = ?, last_served_at = ? WHERE user_id = ?",
            [seq, now, user_id],
        )


# -- jobs: outcomes -------------------------------------------------------------------


def finish(db: sqlite_utils.Database, job_id: str, result: dict) -> dict | None:
    """Record a job's result; None when the job was deleted meanwhile (/forget).

    The first outcome wins: a job already done, failed or cancelled is left as
    it is, since a job may run twice (arq's "pessimistic execution").
    """
    with _write(db):
        job = get_job(db, job_id)
        if job is not None and JobStatus(job["status"]) not in TERMINAL:
            changes = {"status": JobStatus.DONE.value, "result": json.dumps(result)}
            _update(db, "jobs", job_id, {**changes, "finished_at": time.time(), "error": None})
            _index_blobs(db, job_id, result)
    return get_job(db, job_id)


def fail(db: sqlite_utils.Database, job_id: str, message: str, retryable: bool) -> dict | None:
    """Record a failed run of a running job; None when the job was deleted meanwhile.

    A job runs at most ``max_attempts`` times: a retryable failure before that
    puts it back in the queue (same place: its age is kept); a job whose member
    asked to cancel ends cancelled instead of being retried.
    """
    with _write(db):
        job = get_job(db, job_id)
        if job is not None and job["status"] == JobStatus.RUNNING.value:
            _update(db, "jobs", job_id, _after_failed_run(job, message, retryable))
    return get_job(db, job_id)


def _after_failed_run(job: dict, message: str, retryable: bool) -> dict:
    attempts = job["attempts"] + 1
    base = {"attempts": attempts, "error": message, "worker": None}
    if job["cancel_requested"]:
        return {**base, "status": JobStatus.CANCELLED.value, "finished_at": time.time()}
    if retryable and attempts < job["max_attempts"]:
        return {**base, "status": JobStatus.QUEUED.value, "started_at": None}
    return {**base, "status": JobStatus.FAILED.value, "finished_at": time.time()}


def cancel(
    db: sqlite_utils.Database, job_id: str, by_user: str, *, admin: bool = False
) -> JobStatus:
    """Cancel a job for its member (or an admin); returns the status it had.

    queued → cancelled at once; running → ``cancel_requested`` is set and RUNNING
    returned, so the dispatcher stops it on its worker and calls
    :func:`mark_cancelled`; a finished job is left alone.
    """
    with _write(db):
        job = require_job(db, job_id)
        if job["user_id"] != str(by_user) and not admin:
            raise NotYours(f"job `{job_id}` belongs to another member; you can only cancel yours")
        previous = JobStatus(job["status"])
        if previous is JobStatus.QUEUED:
            _update(
                db,
                "jobs",
                job_id,
                {"status": JobStatus.CANCELLED.value, "finished_at": time.time()},
            )
        elif previous is JobStatus.RUNNING:
            _update(db, "jobs", job_id, {"cancel_requested": 1})
    return previous


def mark_cancelled(db: sqlite_utils.Database, job_id: str) -> dict | None:
    """The worker stopped a job after a cancel request; None when it was deleted."""
    with _write(db):
        job = get_job(db, job_id)
        if job is not None and JobStatus(job["status"]) not in TERMINAL:
            _update(
                db,
                "jobs",
                job_id,
                {"status": JobStatus.CANCELLED.value, "finished_at": time.time()},
            )
    return get_job(db, job_id)


def requeue_interrupted(db: sqlite_utils.Database, *, worker: str | None = None) -> int:
    """Put jobs left running (by a crash, or by one dead ``worker``) back in the queue.

    Each counts as a used attempt; out of attempts it fails, and one whose
    member asked to cancel ends cancelled. Returns how many jobs were touched.
    """
    where = "status = 'running'" + (" AND worker = ?" if worker is not None else "")
    with _write(db):
        stuck = list(
            db.query(f"SELECT * FROM jobs WHERE {where}", [] if worker is None else [worker])
        )
        for job in stuck:
            tries = job["attempts"] + 1
            message = f"the worker stopped while running this job (tried {tries} times)"
            _update(db, "jobs", job["id"], _after_failed_run(job, message, retryable=True))
    return len(stuck)


# -- queue positions -------------------------------------------------------------------


def queue_positions(db: sqlite_utils.Database) -> dict[str, int]:
    """1-based position of every queued job in the order claim_next serves them.

    Simulates single-job claims by every worker. Exact for priority and
    round-robin order; batching can start a job sooner, and a worker's
    ``kinds`` filter can make a job of another kind wait longer.
    """
    rows = _rows(
        db,
        "SELECT j.id, j.user_id, j.priority, u.last_served_seq, u.rowid AS user_order "
        "FROM jobs j JOIN queue_users u ON u.user_id = j.user_id "
        "WHERE j.status = 'queued' ORDER BY j.priority DESC, j.created_at, j.rowid",
    )
    pending: dict[str, deque[dict]] = {}
    for row in rows:
        pending.setdefault(row["user_id"], deque()).append(row)
    # Each member's own jobs are already in serving order (highest priority,
    # then oldest); the heap picks which member goes next.
    heap = [
        (-jobs[0]["priority"], jobs[0]["last_served_seq"], jobs[0]["user_order"], user)
        for user, jobs in pending.items()
    ]
    heapq.heapify(heap)
    next_seq = 1 + max((entry[1] for entry in heap), default=0)
    positions: dict[str, int] = {}
    while heap:
        _, _, order, user = heapq.heappop(heap)
        job = pending[user].popleft()
        positions[job["id"]] = len(positions) + 1
        if pending[user]:
            heapq.heappush(heap, (-pending[user][0]["priority"], next_seq, order, user))
            next_seq += 1
    return positions


def queue_position(db: sqlite_utils.Database, job_id: str) -> int | None:
    """The job's 1-based place in the queue, or None when it is not waiting."""
    return queue_positions(db).get(job_id)


# -- member settings -----------------------------------------------------------------


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


def _unreferenced(
    db: sqlite_utils.Database, shas: set[str], paths: set[str]
) -> tuple[list[str], list[str]]:
    """Of these blobs and files, the ones no remaining job or LoRA refers to."""
    free_shas = [
        sha
        for sha in sorted(shas)
        if _one(
            db,
            "SELECT 1 FROM job_blobs WHERE sha256 = ? "
            "UNION ALL SELECT 1 FROM loras WHERE sha256 = ? LIMIT 1",
            [sha, sha],
        )
        is None
    ]
    free_paths = [
        path
        for path in sorted(paths)
        if _one(db, "SELECT 1 FROM loras WHERE path = ? LIMIT 1", [path]) is None
    ]
    return free_shas, free_paths


# -- /forget ----------------------------------------------------------------------------


def forget_user(db: sqlite_utils.Database, user_id: str) -> dict:
    """Delete every row about the member; returns what the caller must delete elsewhere.

    Keys: ``jobs`` and ``loras`` (counts deleted), ``running`` (job ids to stop
    on their workers), ``blobs`` (shas in the blob store) and ``paths`` (LoRA
    files) that no other member's job or LoRA still references.
    """
    uid = str(user_id)
    with _write(db):
        shas = {
            r[0]
            for r in db.execute(
                "SELECT DISTINCT b.sha256 FROM job_blobs b JOIN jobs j ON j.id = b.job_id "
                "WHERE j.user_id = ?",
                [uid],
            )
        }
        running = [
            r[0]
            for r in db.execute(
                "SELECT id FROM jobs WHERE user_id = ? AND status = 'running'", [uid]
            )
        ]
        loras = _rows(db, "SELECT sha256, path FROM loras WHERE owner_id = ?", [uid])
        # Explicit rather than ON DELETE CASCADE: foreign_keys may be off on a
        # connection someone else opened.
        db.execute(
            "DELETE FROM job_blobs WHERE job_id IN (SELECT id FROM jobs WHERE user_id = ?)", [uid]
        )
        n_jobs = db.execute("DELETE FROM jobs WHERE user_id = ?", [uid]).rowcount
        db.execute("DELETE FROM loras WHERE owner_id = ?", [uid])
        db.execute("DELETE FROM settings WHERE user_id = ?", [uid])
        db.execute("DELETE FROM queue_users WHERE user_id = ?", [uid])
        shas |= {lora["sha256"] for lora in loras if lora["sha256"]}
        blobs, paths = _unreferenced(db, shas, {lora["path"] for lora in loras if lora["path"]})
    return {"jobs": n_jobs, "loras": len(loras), "running": running, "blobs": blobs, "paths": paths}


# -- small queries for the dispatcher and the bot --------------------------------------------


def pause(db: sqlite_utils.Database, job_id: str) -> dict | None:
    """A paused training job goes back to the queue without using up an attempt."""
    with _write(db):
        db.execute(
            "UPDATE jobs SET status = 'queued', worker = NULL, started_at = NULL "
            "WHERE id = ? AND status = 'running'",
            [job_id],
        )
    return get_job(db, job_id)


def generation_waiting(db: sqlite_utils.Database) -> bool:
    """Is any image job queued? (Then a running training job should yield.)"""
    row = db.execute(
        "SELECT 1 FROM jobs WHERE status = 'queued' AND kind = 'generate' LIMIT 1"
    ).fetchone()
    return row is not None


def busy_count(db: sqlite_utils.Database) -> int:
    """Jobs queued or running, all members together."""
    row = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
    return int(row[0])


def unposted_results(db: sqlite_utils.Database, since: float, kind: str = "generate") -> list[dict]:
    """Jobs finished since ``since`` whose result message was never posted (bot was down)."""
    ids = [
        r[0]
        for r in db.execute(
            "SELECT id FROM jobs WHERE status = 'done' AND kind = ? "
            "AND message_id IS NULL AND channel_id IS NOT NULL AND finished_at >= ? "
            "ORDER BY finished_at",
            [kind, since],
        )
    ]
    return [job for job in (get_job(db, job_id) for job_id in ids) if job is not None]


def posted_messages(db: sqlite_utils.Database, user_id: str) -> list[tuple[str, str]]:
    """(channel, message) ids of every progress and result message of the member's jobs."""
    rows = db.execute(
        "SELECT channel_id, message_id, progress_message_id FROM jobs "
        "WHERE user_id = ? AND channel_id IS NOT NULL",
        [str(user_id)],
    ).fetchall()
    return [(c, m) for c, *ids in rows for m in ids if m]


def server_lora_by_sha(db: sqlite_utils.Database, guild_id: str, sha: str) -> dict | None:
    """The guild library's LoRA with these bytes, if it is registered."""
    return _decode(
        _one(
            db,
            "SELECT * FROM loras WHERE owner_id IS NULL AND guild_id = ? AND sha256 = ?",
            [guild_id, sha],
        )
    )


def lora_of_job(db: sqlite_utils.Database, job_id: str) -> dict | None:
    """The LoRA a training job registered, if it did."""
    return _decode(_one(db, "SELECT * FROM loras WHERE job_id = ?", [job_id]))


def job_stats(db: sqlite_utils.Database, since: float) -> dict[str, Any]:
    """Counts for the admin's /admin stats: jobs by status (all time and since ``since``),
    members with jobs, and LoRAs by kind."""
    by_status = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    recent = dict(
        db.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE created_at >= ? GROUP BY status", [since]
        ).fetchall()
    )
    members = db.execute("SELECT COUNT(DISTINCT user_id) FROM jobs").fetchone()[0]
    personal, library = db.execute(
        "SELECT COALESCE(SUM(owner_id IS NOT NULL), 0), COALESCE(SUM(owner_id IS NULL), 0) "
        "FROM loras"
    ).fetchone()
    return {
        "by_status": by_status,
        "recent": recent,
        "members": int(members),
        "personal_loras": int(personal),
        "library_loras": int(library),
    }
