"""Jobs and the fair queue: enqueue, claim in fair order, record outcomes, positions.

Fair queue: a job is served by (1) highest ``priority``, then (2) round-robin
across members — the member served least recently goes first, tracked by a
monotonically increasing ``queue_users.last_served_seq`` (0 = never served) —
then (3) oldest first within a member. Triggers keep ``queue_users.queued``
equal to the member's number of queued jobs, so picking the next member only
visits members who are actually waiting.
"""

from __future__ import annotations

import heapq
import json
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import sqlite_utils

from bot.store.blobs import _index_blobs
from bot.store.core import TERMINAL, JobStatus, _decode, _new_id, _one, _rows, _update, _write
from bot.store.errors import JobNotFound, NotYours, QueueFull

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
    models: set[str] | None = None,
) -> list[dict]:
    """Claim the next job in fair order plus up to ``max_batch - 1`` batch mates.

    Batch mates are queued jobs with the same non-empty ``batch_key`` (any member,
    fair order). All are marked running in one transaction; [] when nothing waits.
    ``models``: only jobs whose spec names one of these models (the dispatcher's
    model affinity; batch mates share the model through their batch key).
    """
    with _write(db):
        first = _pick_next(db, kinds, models)
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


def peek_next(db: sqlite_utils.Database, *, kinds: set[str] | None = None) -> dict | None:
    """The job `claim_next` would claim first, left queued (None when nothing waits)."""
    first = _pick_next(db, kinds)
    return None if first is None else require_job(db, first["id"])


def _model_filter(models: set[str] | None, alias: str = "") -> tuple[str, list[str]]:
    if models is None:
        return "", []
    ordered = sorted(models)
    column = f"COALESCE(json_extract({alias}spec, '$.model'), 'default')"
    return f" AND {column} IN ({', '.join('?' * len(ordered))})", ordered


def _pick_next(
    db: sqlite_utils.Database, kinds: set[str] | None, models: set[str] | None = None
) -> dict | None:
    kind_sql, kind_params = _kind_filter(kinds)
    model_sql, model_params = _model_filter(models)
    kind_sql, kind_params = kind_sql + model_sql, kind_params + model_params
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
    job_kind_sql = _kind_filter(kinds, "j.")[0] + _model_filter(models, "j.")[0]
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


def queued_for_models(db: sqlite_utils.Database, models: set[str]) -> bool:
    """Is any job queued for one of `models` (as job specs name them)?"""
    where, params = _model_filter(models)
    row = db.execute(f"SELECT 1 FROM jobs WHERE status = 'queued'{where} LIMIT 1", params)
    return row.fetchone() is not None


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
