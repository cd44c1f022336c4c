"""What every section of the store shares: job statuses and the small SQL helpers
(one write transaction, rows as dicts, JSON columns decoded).

Transactions: every write runs in ``BEGIN IMMEDIATE`` (see :func:`_write`), so a
writer takes the lock before it reads and two processes can never both claim
the same job or deadlock upgrading a read lock.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import sqlite_utils

_JSON_COLUMNS = ("spec", "result", "metrics")


class JobStatus(str, Enum):
    QUEUED = "queued"  # waiting for a worker; claim_next picks these
    RUNNING = "running"  # claimed by a worker; `worker` and `started_at` are set
    DONE = "done"  # finished; `result` holds output blob shas and metadata
    FAILED = "failed"  # gave up: not retryable, or out of attempts; `error` says why
    CANCELLED = "cancelled"  # stopped by its member (or an admin) before finishing


TERMINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


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
