"""Dispatch throughput and fairness of the SQLite job queue (bot.store), no GPU involved.

Run: python bench/bench_queue.py [--jobs 5000]

Uses a file-backed WAL database in a temp dir, as the bot does, and a no-op
runner: claim_next → finish as fast as possible, so the figure is the queue's
own ceiling on dispatch rate. Target: at least 1000 jobs/s.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot import store  # noqa: E402

USERS = 20


def enqueue_many(db, n: int, *, users: int = USERS) -> float:
    """Enqueue n jobs spread over ``users`` members; returns seconds taken."""
    start = time.perf_counter()
    for i in range(n):
        store.enqueue(
            db,
            user_id=f"user{i % users}",
            guild_id="g",
            channel_id="c",
            kind="txt2img",
            spec={"prompt": f"a cat #{i}", "steps": 20},
            batch_key=f"sd15:512x512:{i % 4}",
            max_queued_per_user=n,
        )
    return time.perf_counter() - start


def drain(db, *, max_batch: int) -> tuple[int, float]:
    """Claim and finish everything; returns (jobs, seconds)."""
    done = 0
    start = time.perf_counter()
    while jobs := store.claim_next(db, worker="bench", max_batch=max_batch):
        for job in jobs:
            store.finish(db, job["id"], {"images": [], "seed": 1})
        done += len(jobs)
    return done, time.perf_counter() - start


def throughput(n: int, max_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db = store.open_db(Path(tmp) / "bench.db")
        enqueue_s = enqueue_many(db, n)
        jobs, drain_s = drain(db, max_batch=max_batch)
        db.close()
    assert jobs == n, (jobs, n)
    return {"enqueue_per_s": n / enqueue_s, "dispatch_per_s": n / drain_s, "seconds": drain_s}


def fairness() -> int:
    """Alice queues 50, then Bob 1: at which dispatch (1-based) does Bob's job start?"""
    with tempfile.TemporaryDirectory() as tmp:
        db = store.open_db(Path(tmp) / "fair.db")
        for _ in range(50):
            store.enqueue(
                db,
                user_id="alice",
                guild_id="g",
                channel_id="c",
                kind="txt2img",
                spec={},
                batch_key="",
            )
        store.enqueue(
            db, user_id="bob", guild_id="g", channel_id="c", kind="txt2img", spec={}, batch_key=""
        )
        for dispatch in range(1, 52):
            job = store.claim_next(db, worker="bench")[0]
            store.finish(db, job["id"], {})
            if job["user_id"] == "bob":
                return dispatch
    raise AssertionError("bob was never served")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    single = throughput(args.jobs, max_batch=1)
    batched = throughput(args.jobs, max_batch=4)
    bob_at = fairness()
    print(f"command: python bench/bench_queue.py --jobs {args.jobs}")
    print(f"SQLite {sqlite3.sqlite_version}, file-backed WAL db, {USERS} members\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| enqueue rate | {single['enqueue_per_s']:.0f} jobs/s |")
    print(f"| dispatch, claim_next(max_batch=1) → finish | {single['dispatch_per_s']:.0f} jobs/s |")
    print(
        f"| dispatch, claim_next(max_batch=4) → finish | {batched['dispatch_per_s']:.0f} jobs/s |"
    )
    print(f"| fairness: alice 50 then bob 1, bob starts at dispatch | #{bob_at} |")
    ok = single["dispatch_per_s"] >= 1000 and bob_at <= 2
    print(f"\ntarget (≥ 1000 jobs/s, bob within 2 dispatches): {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
