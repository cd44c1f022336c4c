"""Which blob-store files the database still refers to.

Spec/result JSON names blob-store files by 64-hex sha256 strings stored under
one of :data:`BLOB_KEYS` (a string or a list of strings, at any depth). They are
indexed in ``job_blobs`` so /forget and /lora delete can tell which files no one
else still uses.
"""

from __future__ import annotations

import re
from typing import Any

import sqlite_utils

from bot.store.core import _one

BLOB_KEYS = frozenset(
    {"image", "images", "mask", "blob", "blobs", "sha256", "preview", "photos", "outputs"}
)
_SHA = re.compile(r"[0-9a-f]{64}")


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
