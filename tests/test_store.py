"""bot.store against real SQLite: in-memory where one connection suffices, files otherwise."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import sqlite_utils
from hypothesis import given, settings
from hypothesis import strategies as st

from bot import store
from bot.store import JobStatus

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64


@pytest.fixture
def db() -> sqlite_utils.Database:
    database = sqlite_utils.Database(memory=True)
    store.migrate(database)
    return database


def add(db: sqlite_utils.Database, user: str, **kwargs) -> dict:
    fields = {"guild_id": "g1", "channel_id": "c1", "kind": "txt2img", "spec": {"prompt": user}}
    return store.enqueue(db, user_id=user, **{**fields, **kwargs})


def claim_users(db: sqlite_utils.Database, n: int) -> list[str]:
    served = []
    for _ in range(n):
        jobs = store.claim_next(db, worker="w")
        served += [job["user_id"] for job in jobs]
        for job in jobs:
            store.finish(db, job["id"], {})
    return served


def assert_queued_counters_match(db: sqlite_utils.Database) -> None:
    # The triggers must keep queue_users.queued equal to the real count.
    rows = db.execute(
        "SELECT u.user_id, u.queued, (SELECT COUNT(*) FROM jobs j WHERE j.user_id = u.user_id "
        "AND j.status = 'queued') FROM queue_users u"
    ).fetchall()
    assert all(counter == real for _, counter, real in rows), rows


# -- migrations ------------------------------------------------------------------------


def test_migrations_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    first = store.open_db(path)
    assert [r["name"] for r in first["_migrations"].rows] == ["m001_initial", "m002_guilds"]
    job = add(first, "alice")
    first.close()
    again = store.open_db(path)
    assert store.migrate(again) == []
    assert [r["name"] for r in again["_migrations"].rows] == ["m001_initial", "m002_guilds"]
    assert store.get_job(again, job["id"])["spec"] == {"prompt": "alice"}
    assert again.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again.execute("PRAGMA foreign_keys").fetchone()[0] == 1


# -- fairness and order ----------------------------------------------------------------------


def test_one_members_fifty_jobs_do_not_starve_anothers_one(db) -> None:
    for _ in range(50):
        add(db, "alice")
    add(db, "bob")
    assert "bob" in claim_users(db, 2)


def test_round_robin_across_members(db) -> None:
    for user in ["alice"] * 3 + ["bob"] * 3 + ["carol"] * 3:
        add(db, user)
    assert claim_users(db, 9) == ["alice", "bob", "carol"] * 3


def test_member_who_was_just_served_waits_their_turn(db) -> None:
    for _ in range(5):
        add(db, "alice")
    add(db, "bob")
    assert claim_users(db, 2) == ["alice", "bob"]
    add(db, "bob")  # bob was served last, so alice goes first
    assert claim_users(db, 3) == ["alice", "bob", "alice"]


def test_oldest_first_within_a_member(db) -> None:
    ids = [add(db, "alice", spec={"n": n})["id"] for n in range(5)]
    claimed = [store.claim_next(db, worker="w")[0]["id"] for _ in range(5)]
    assert claimed == ids


def test_priority_jumps_the_queue(db) -> None:
    for _ in range(3):
        add(db, "alice")
    urgent = add(db, "bob")
    low = add(db, "carol", priority=-1)
    store.set_priority(db, urgent["id"], 5)
    assert store.claim_next(db, worker="w")[0]["id"] == urgent["id"]
    assert claim_users(db, 4) == ["alice"] * 3 + ["carol"]
    assert store.get_job(db, low["id"])["status"] == "done"


def test_kinds_filter(db) -> None:
    add(db, "alice", kind="train")
    gen = add(db, "alice", kind="txt2img")
    assert store.claim_next(db, worker="w", kinds={"txt2img", "img2img"})[0]["id"] == gen["id"]
    assert store.claim_next(db, worker="w", kinds={"txt2img"}) == []


# -- batching ------------------------------------------------------------------------------


def test_batch_groups_same_key_up_to_max_and_never_mixes(db) -> None:
    add(db, "alice", batch_key="sd15:512x512")
    add(db, "alice", batch_key="sdxl:1024x1024")
    for user in ["alice", "bob", "bob", "carol"]:
        add(db, user, batch_key="sd15:512x512")
    batch = store.claim_next(db, worker="w", max_batch=3)
    assert len(batch) == 3
    assert {job["batch_key"] for job in batch} == {"sd15:512x512"}
    # Everyone's first job before anyone's second, even inside a batch.
    assert [job["user_id"] for job in batch] == ["alice", "bob", "carol"]
    assert all(job["status"] == "running" and job["worker"] == "w" for job in batch)
    # alice was served first in that batch, so her turn comes first again.
    assert [j["batch_key"] for j in store.claim_next(db, worker="w", max_batch=8)] == [
        "sdxl:1024x1024"
    ]
    rest = store.claim_next(db, worker="w", max_batch=8)
    assert [(j["user_id"], j["batch_key"]) for j in rest] == [
        ("bob", "sd15:512x512"),
        ("alice", "sd15:512x512"),
    ]


def test_empty_batch_key_is_never_batched(db) -> None:
    add(db, "alice")
    add(db, "bob")
    assert len(store.claim_next(db, worker="w", max_batch=4)) == 1


# -- caps, retries, cancel, crash recovery ------------------------------------------------------


def test_per_member_cap(db) -> None:
    for _ in range(5):
        add(db, "alice", max_queued_per_user=5)
    with pytest.raises(store.QueueFull, match=r"you already have 5 jobs queued \(the limit is 5\)"):
        add(db, "alice", max_queued_per_user=5)
    add(db, "bob", max_queued_per_user=5)
    job = store.claim_next(db, worker="w")[0]
    store.finish(db, job["id"], {})
    add(db, "alice", max_queued_per_user=5)  # a finished job frees a slot
    assert store.queued_count(db, "alice") == 5


def test_retry_until_max_attempts_then_failed(db) -> None:
    job = add(db, "alice", max_attempts=3)
    for attempt in range(1, 4):
        claimed = store.claim_next(db, worker="w")
        assert [j["id"] for j in claimed] == [job["id"]]
        after = store.fail(db, job["id"], "CUDA out of memory", retryable=True)
        assert after["attempts"] == attempt
    assert after["status"] == "failed" and after["error"] == "CUDA out of memory"
    assert store.claim_next(db, worker="w") == []


def test_non_retryable_failure_fails_at_once(db) -> None:
    job = add(db, "alice")
    store.claim_next(db, worker="w")
    assert store.fail(db, job["id"], "bad mask", retryable=False)["status"] == "failed"
    assert store.finish(db, job["id"], {"images": [SHA_A]})["status"] == "failed"


def test_cancel_queued_and_running(db) -> None:
    running = add(db, "alice")
    queued = add(db, "alice")
    store.claim_next(db, worker="w")
    with pytest.raises(store.NotYours):
        store.cancel(db, queued["id"], "mallory")
    assert store.cancel(db, queued["id"], "alice") is JobStatus.QUEUED
    assert store.get_job(db, queued["id"])["status"] == "cancelled"
    assert store.cancel(db, running["id"], "alice") == "running"
    assert store.get_job(db, running["id"])["cancel_requested"] == 1
    # A failure reported for a job its member cancelled is not retried.
    assert store.fail(db, running["id"], "stopped", retryable=True)["status"] == "cancelled"
    assert store.cancel(db, running["id"], "alice") is JobStatus.CANCELLED
    with pytest.raises(store.JobNotFound):
        store.cancel(db, "0000000000", "alice")
    assert store.claim_next(db, worker="w") == []
    assert_queued_counters_match(db)


def test_requeue_interrupted_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    db = store.open_db(path)
    fresh = add(db, "alice", max_attempts=3)
    last_try = add(db, "bob", max_attempts=1)
    waiting = add(db, "carol")
    store.claim_next(db, worker="gpu0")
    store.claim_next(db, worker="gpu0")
    db.close()  # the bot dies with two jobs running

    db = store.open_db(path)
    assert store.requeue_interrupted(db) == 2
    assert store.get_job(db, fresh["id"])["status"] == "queued"
    assert store.get_job(db, fresh["id"])["attempts"] == 1
    assert store.get_job(db, last_try["id"])["status"] == "failed"
    assert "worker stopped" in store.get_job(db, last_try["id"])["error"]
    assert store.get_job(db, waiting["id"])["status"] == "queued"
    assert store.requeue_interrupted(db) == 0
    assert_queued_counters_match(db)


def test_requeue_one_dead_worker(db) -> None:
    add(db, "alice")
    add(db, "bob")
    store.claim_next(db, worker="gpu0")
    store.claim_next(db, worker="gpu1")
    assert store.requeue_interrupted(db, worker="gpu1") == 1
    assert [j["status"] for j in store.user_jobs(db, "alice")] == ["running"]


# -- positions ---------------------------------------------------------------------------------


def test_queue_positions_follow_round_robin(db) -> None:
    a = [add(db, "alice")["id"] for _ in range(3)]
    b = add(db, "bob")["id"]
    assert store.queue_position(db, a[0]) == 1
    assert store.queue_position(db, b) == 2
    assert store.queue_position(db, a[2]) == 4
    store.claim_next(db, worker="w")
    assert store.queue_position(db, a[0]) is None
    assert store.queue_position(db, b) == 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from([0, 0, 0, 1])), max_size=25),
    st.lists(st.sampled_from("abcd"), max_size=4),
)
def test_positions_match_the_order_claims_serve(jobs, served_before) -> None:
    db = sqlite_utils.Database(memory=True)
    store.migrate(db)
    for user in served_before:  # give members different last-served turns
        add(db, user)
    claim_users(db, len(served_before))
    for user, priority in jobs:
        add(db, user, priority=priority)
    expected = store.queue_positions(db)
    order = [job["id"] for _ in range(len(jobs)) for job in store.claim_next(db, worker="w")]
    assert [expected[job_id] for job_id in order] == list(range(1, len(jobs) + 1))
    assert_queued_counters_match(db)


# -- concurrency -------------------------------------------------------------------------------


def _drain(path: Path, name: str, max_batch: int, start, out: Path) -> None:
    conn = store.open_db(path)  # each claimer has its own connection
    start.wait()
    claimed = []
    while jobs := store.claim_next(conn, worker=name, max_batch=max_batch):
        claimed += [job["id"] for job in jobs]
        time.sleep(0.001)  # the "work": lets the other claimer take the lock
        for job in jobs:
            store.finish(conn, job["id"], {"images": []})
    conn.close()
    out.write_text("\n".join(claimed))


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_two_claimers_never_claim_the_same_job(tmp_path: Path, how: str) -> None:
    path = tmp_path / "bot.db"
    db = store.open_db(path)
    all_ids = {add(db, f"u{n % 7}", batch_key=f"k{n % 3}")["id"] for n in range(300)}
    if how == "threads":
        start, spawn = threading.Barrier(2), threading.Thread
    else:
        ctx = multiprocessing.get_context("fork")
        start, spawn = ctx.Barrier(2), ctx.Process
    claimers = [
        spawn(target=_drain, args=(path, name, batch, start, tmp_path / name))
        for name, batch in (("one", 1), ("two", 4))
    ]
    for claimer in claimers:
        claimer.start()
    for claimer in claimers:
        claimer.join(timeout=60)
    claimed = {name: (tmp_path / name).read_text().split() for name in ("one", "two")}
    both = claimed["one"] + claimed["two"]
    assert len(both) == len(set(both)) == 300
    assert set(both) == all_ids
    assert claimed["one"] and claimed["two"]
    rows = db.execute("SELECT status, worker, COUNT(*) FROM jobs GROUP BY 1, 2").fetchall()
    assert sorted(rows) == sorted(
        [("done", "one", len(claimed["one"])), ("done", "two", len(claimed["two"]))]
    )


# -- member data ---------------------------------------------------------------------------------


def test_settings_merge_and_reset(db) -> None:
    assert store.get_settings(db, "alice") == {}
    store.update_settings(db, "alice", sampler="DPM++ 2M Karras", steps=30)
    assert store.update_settings(db, "alice", steps=None, cfg=6.5) == {
        "sampler": "DPM++ 2M Karras",
        "cfg": 6.5,
    }
    assert store.get_settings(db, "bob") == {}
    store.reset_settings(db, "alice")
    assert store.get_settings(db, "alice") == {}


def lora(db, owner: str | None, name: str, guild: str = "g1", **kwargs) -> dict:
    return store.add_lora(db, owner_id=owner, guild_id=guild, name=name, **kwargs)


def test_lora_resolution_order_and_privacy(db) -> None:
    server = lora(db, None, "style", sha256=SHA_A)
    bobs_shared = lora(db, "bob", "style", shared=True)
    alices = lora(db, "alice", "style")
    lora(db, "bob", "secret")
    find = store.find_lora
    assert find(db, "STYLE", user_id="alice", guild_id="g1")["id"] == alices["id"]
    assert find(db, "style", user_id="carol", guild_id="g1")["id"] == bobs_shared["id"]
    assert find(db, "style", user_id="carol", guild_id="g1")["scope"] == "shared"
    store.set_lora_shared(db, bobs_shared["id"], False, by_user="bob")
    assert find(db, "style", user_id="carol", guild_id="g1")["id"] == server["id"]
    with pytest.raises(store.LoraNotFound):
        find(db, "secret", user_id="alice", guild_id="g1")  # bob's private one
    with pytest.raises(store.LoraNotFound):
        find(db, "style", user_id="carol", guild_id="g2")  # another guild's library
    names = [(r["scope"], r["name"]) for r in store.list_loras(db, "alice", "g1")]
    assert names == [("own", "style"), ("server", "style")]


def test_lora_names_unique_per_owner(db) -> None:
    lora(db, "alice", "rex")
    with pytest.raises(store.DuplicateName, match="you already have a LoRA named 'Rex'"):
        lora(db, "alice", "Rex")
    lora(db, "bob", "rex")
    lora(db, None, "rex")
    with pytest.raises(store.DuplicateName, match="server library"):
        lora(db, None, "rex")
    lora(db, None, "rex", guild="g2")
    for bad in ["", "../x", "a:b", "a>b", "x" * 41, "-x"]:
        with pytest.raises(store.InvalidName):
            lora(db, "alice", bad)


def test_lora_rename_delete_share_permissions(db) -> None:
    rex = lora(db, "alice", "rex", sha256=SHA_A, size_bytes=1000)
    lora(db, "alice", "tom", sha256=SHA_B, size_bytes=500)
    lora(db, "bob", "rex2", sha256=SHA_A)  # same file as alice's rex
    assert store.lora_usage(db, "alice") == (2, 1500)
    with pytest.raises(store.NotYours):
        store.rename_lora(db, rex["id"], "max", by_user="bob")
    with pytest.raises(store.DuplicateName):
        store.rename_lora(db, rex["id"], "TOM", by_user="alice")
    assert store.rename_lora(db, rex["id"], "Rex", by_user="alice")["name"] == "Rex"
    with pytest.raises(store.NotYours):
        store.delete_lora(db, rex["id"], by_user="bob")
    deleted = store.delete_lora(db, rex["id"], by_user="alice")
    assert deleted["unused_blobs"] == []  # bob's rex2 still uses the file
    server = lora(db, None, "lib", path="/models/lib.safetensors")
    with pytest.raises(store.NotYours):
        store.delete_lora(db, server["id"], by_user="alice")
    deleted = store.delete_lora(db, server["id"], by_user="alice", admin=True)
    assert deleted["unused_paths"] == ["/models/lib.safetensors"]
    assert store.lora_usage(db, "alice") == (1, 500)


# -- /forget -----------------------------------------------------------------------------------


def test_forget_user_removes_everything(db) -> None:
    done = add(db, "alice", spec={"prompt": "x", "image": SHA_A, "mask": SHA_B})
    store.claim_next(db, worker="w")
    store.finish(db, done["id"], {"images": [SHA_C], "seed": 1})
    running = add(db, "alice", spec={"loras": [{"name": "rex", "sha256": "d" * 64}]})
    store.claim_next(db, worker="w")
    add(db, "alice")
    add(db, "bob", spec={"image": SHA_B})  # bob used the same input photo
    store.update_settings(db, "alice", steps=20)
    lora(db, "alice", "rex", sha256="d" * 64)
    lora(db, "alice", "old", path="/data/loras/old.safetensors")

    gone = store.forget_user(db, "alice")

    assert gone["jobs"] == 3 and gone["loras"] == 2
    assert gone["running"] == [running["id"]]
    assert gone["blobs"] == sorted([SHA_A, SHA_C, "d" * 64])
    assert gone["paths"] == ["/data/loras/old.safetensors"]
    for table in ("jobs", "settings", "loras", "queue_users"):
        column = "owner_id" if table == "loras" else "user_id"
        assert (
            db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = 'alice'").fetchone()[0] == 0
        )
    assert store.get_settings(db, "alice") == {}
    assert store.finish(db, running["id"], {"images": []}) is None  # worker reports late
    assert [j["user_id"] for j in store.claim_next(db, worker="w")] == ["bob"]


def test_blob_refs_convention() -> None:
    spec = {"image": SHA_A, "nested": {"photos": [SHA_B, "not-a-sha"]}, "seed": SHA_C}
    assert store.blob_refs(spec) == {SHA_A, SHA_B}


def test_user_jobs_and_messages(db) -> None:
    first = add(db, "alice")
    second = add(db, "alice")
    store.set_job_messages(db, first["id"], message_id="111", progress_message_id="222")
    jobs = store.user_jobs(db, "alice")
    assert [j["id"] for j in jobs] == [second["id"], first["id"]]
    assert jobs[1]["message_id"] == "111" and jobs[1]["progress_message_id"] == "222"
    assert store.user_jobs(db, "alice", statuses=["running"]) == []
    assert store.user_jobs(db, "alice", limit=1)[0]["id"] == second["id"]
