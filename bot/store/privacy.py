"""/forget: everything the store keeps about one member, found and deleted."""

from __future__ import annotations

import sqlite_utils

from bot.store.blobs import _unreferenced
from bot.store.core import _rows, _write

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


def posted_messages(db: sqlite_utils.Database, user_id: str) -> list[tuple[str, str]]:
    """(channel, message) ids of every progress and result message of the member's jobs."""
    rows = db.execute(
        "SELECT channel_id, message_id, progress_message_id FROM jobs "
        "WHERE user_id = ? AND channel_id IS NOT NULL",
        [str(user_id)],
    ).fetchall()
    # Only real ids: "" is a progress message already deleted, "refused" a result never posted.
    return [(c, m) for c, *ids in rows for m in ids if m and m.isdigit()]
