"""The dispatcher with a real LocalPool, the tiny model and a real SQLite file.

Jobs are enqueued through their own connection, as the bot's commands do; the
dispatcher has its own. Worker deaths are real SIGKILLs, a full disk is a real tmpfs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot import store
from bot.services.dispatcher import Dispatcher
from pipeline.contract.blobs import BlobStore
from pipeline.contract.jobs import (
    Done,
    Event,
    Failed,
    GenerateSpec,
    Progress,
    Started,
    spec_to_dict,
)
from pipeline.workers.local_pool import LocalPool
from tests.test_runner import (
    make_config,
    one_cpu_thread_per_worker,
    png_size,
    small,
    tiny_models,
)

module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(tmp_path_factory: pytest.TempPathFactory):
    models = tiny_models(tmp_path_factory.getbasetemp() / "models")
    pool = LocalPool(make_config(models, tmp_path_factory.mktemp("data")))
    with one_cpu_thread_per_worker():
        await pool.start()
        yield pool
        await pool.close()


class Harness:
    """A database file, a blob store, and the events the Discord layer would hear."""

    def __init__(self, pool: LocalPool, root: Path, **workers: object) -> None:
        self.pool = pool
        self.path = root / "sdbot.sqlite"
        self.db = store.open_db(self.path)  # the bot's side: enqueue, read results
        self.blobs = BlobStore(root / "blobs")
        self.config = dataclasses.replace(
            pool.config,
            storage=dataclasses.replace(pool.config.storage, data_dir=str(root)),
            workers=dataclasses.replace(pool.config.workers, **workers),
        )
        self.heard: list[tuple[str, Event]] = []
        self.on_event_hook = None
        # The dispatcher catches and logs what on_event raises (a Discord hiccup must not
        # lose the queue), so a failing check in a hook is kept here and re-raised by the
        # `harness` fixture at teardown: an assertion in a hook can fail the test.
        self.hook_failures: list[BaseException] = []

    async def on_event(self, row: dict, event: Event) -> None:
        self.heard.append((row["id"], event))
        if self.on_event_hook is not None:
            try:
                await self.on_event_hook(row, event)
            except Exception as exc:
                self.hook_failures.append(exc)
                raise

    def check_hooks(self) -> None:
        if self.hook_failures:
            raise self.hook_failures[0]

    async def dispatcher(self, blobs: BlobStore | None = None) -> Dispatcher:
        dispatcher = Dispatcher(
            self.path, self.pool, blobs or self.blobs, self.config, on_event=self.on_event
        )
        await dispatcher.start()
        return dispatcher

    def enqueue(self, user: str, spec: GenerateSpec) -> str:
        row = store.enqueue(
            self.db,
            user_id=user,
            guild_id="g",
            channel_id="c",
            kind=spec.kind,
            spec=spec_to_dict(spec),
            batch_key=spec.batch_key(),
            max_attempts=3,
        )
        return row["id"]

    def job(self, job_id: str) -> dict:
        return store.get_job(self.db, job_id)

    def heard_of(self, job_id: str, kind: type) -> list[Event]:
        return [e for j, e in self.heard if j == job_id and isinstance(e, kind)]


@pytest.fixture
def harness(pool: LocalPool, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(pool, tmp_path, batch_size=1)
    yield harness
    harness.check_hooks()


def assert_done_with_image(h: Harness, job_id: str, size: tuple[int, int] = (64, 64)) -> None:
    job = h.job(job_id)
    assert job["status"] == "done", job
    (image,) = job["result"]["images"]
    assert png_size(h.blobs.get(image["sha256"])) == size
    assert len(h.heard_of(job_id, Done)) == 1


@module_loop
async def test_two_members_are_served_in_turn_and_every_job_completes(harness: Harness) -> None:
    alice = [harness.enqueue("alice", small(seed=i)) for i in range(4)]
    bob = [harness.enqueue("bob", small(seed=10 + i)) for i in range(2)]
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(120)
    finally:
        await dispatcher.stop()
    for job_id in alice + bob:
        assert_done_with_image(harness, job_id)
    started = [job_id for job_id, event in harness.heard if isinstance(event, Started)]
    assert started == [alice[0], bob[0], alice[1], bob[1], alice[2], alice[3]]


@module_loop
async def test_compatible_jobs_run_as_one_batch(pool: LocalPool, tmp_path: Path) -> None:
    harness = Harness(pool, tmp_path, batch_size=4)
    jobs = [harness.enqueue(user, small(seed=i)) for i, user in enumerate("abcab")]
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(120)
    finally:
        await dispatcher.stop()
    for job_id in jobs:
        assert_done_with_image(harness, job_id)
    workers_at_start = {harness.job(j)["started_at"] for j in jobs}
    assert len(workers_at_start) == 2  # a batch of four, then the fifth alone


@module_loop
async def test_a_killed_worker_means_a_retry_and_exactly_one_result(harness: Harness) -> None:
    job_id = harness.enqueue("alice", small(width=256, height=256, steps=120))
    killed: list[int] = []

    async def kill_once(row: dict, event: Event) -> None:
        if isinstance(event, Progress) and not killed:
            killed.append(await harness.pool.worker_pid(row["id"]))
            os.kill(killed[0], signal.SIGKILL)

    harness.on_event_hook = kill_once
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(180)
    finally:
        await dispatcher.stop()
    assert killed
    assert_done_with_image(harness, job_id, size=(256, 256))
    assert harness.job(job_id)["attempts"] == 1
    failed = harness.heard_of(job_id, Failed)
    assert failed == [Failed(job_id, "the worker stopped unexpectedly", retryable=True)]


@module_loop
async def test_a_new_dispatcher_finishes_what_a_killed_bot_left(harness: Harness) -> None:
    jobs = [
        harness.enqueue(user, small(width=192, height=192, steps=60, seed=i))
        for i, user in enumerate(["alice", "bob", "alice"])
    ]
    first_started = asyncio.Event()

    async def note_start(row: dict, event: Event) -> None:
        if isinstance(event, Started):
            first_started.set()

    harness.on_event_hook = note_start
    dispatcher = await harness.dispatcher()
    await asyncio.wait_for(first_started.wait(), 60)
    await dispatcher.stop()  # the bot dies: tasks gone, its connection closed
    statuses = sorted(harness.job(j)["status"] for j in jobs)
    assert statuses == ["queued", "queued", "running"]

    harness.on_event_hook = None
    dispatcher = await harness.dispatcher()  # the bot restarts on the same database
    try:
        await dispatcher.wait_idle(180)
    finally:
        await dispatcher.stop()
    for job_id in jobs:
        assert_done_with_image(harness, job_id, size=(192, 192))


@module_loop
async def test_invalid_specs_never_reach_a_worker(harness: Harness) -> None:
    too_many = harness.enqueue("alice", small(steps=500))  # the limit is 150
    fine = harness.enqueue("alice", small())
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(60)
    finally:
        await dispatcher.stop()
    job = harness.job(too_many)
    assert job["status"] == "failed"
    assert job["error"] == "steps must be between 1 and 150, but is 500"
    assert not harness.heard_of(too_many, Started)
    assert_done_with_image(harness, fine)


@module_loop
async def test_cancel_a_queued_and_a_running_job(harness: Harness) -> None:
    running = harness.enqueue("alice", small(width=256, height=256, steps=150))
    queued = harness.enqueue("alice", small())
    dispatcher = await harness.dispatcher()

    answers: list[store.JobStatus] = []

    async def cancel_on_progress(row: dict, event: Event) -> None:
        if isinstance(event, Progress) and row["id"] == running and not answers:
            answers.append(await dispatcher.cancel(queued, "alice"))
            answers.append(await dispatcher.cancel(running, "alice"))

    harness.on_event_hook = cancel_on_progress
    try:
        await dispatcher.wait_idle(60)
    finally:
        await dispatcher.stop()
    # Checked here, not in the hook: the dispatcher swallows what on_event raises.
    assert answers == [store.JobStatus.QUEUED, store.JobStatus.RUNNING]
    assert harness.job(queued)["status"] == "cancelled"
    assert harness.job(running)["status"] == "cancelled"


@module_loop
async def test_a_cancel_between_claim_and_worker_still_stops_the_job(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job is `running` from its claim, but reaches a worker only after its spec is
    re-checked and a worker is free. A cancel in that window (a training job resuming
    after it yielded to generation) found no worker to tell; the job then ran to its end."""
    job = harness.enqueue("alice", small(width=256, height=256, steps=150))
    checked = Dispatcher._checked

    async def cancel_once_claimed(self: Dispatcher, rows: list[dict]):
        runnable = await checked(self, rows)
        assert harness.job(job)["status"] == "running"
        assert await self.cancel(job, "alice") is store.JobStatus.RUNNING
        return runnable

    monkeypatch.setattr(Dispatcher, "_checked", cancel_once_claimed)
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(60)
    finally:
        await dispatcher.stop()
    assert harness.job(job)["status"] == "cancelled"
    assert not harness.heard_of(job, Done)


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 256 KiB tmpfs filled to the brim; yields (mount point, filler file)."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    filler = mount / "filler"
    try:
        with filler.open("wb") as f:
            f.write(b"\0" * (512 * 1024))
    except OSError:
        pass  # full: that was the point
    try:
        yield mount, filler
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@module_loop
async def test_a_full_disk_fails_the_job_clearly_and_the_queue_goes_on(
    harness: Harness, full_disk: tuple[Path, Path]
) -> None:
    mount, filler = full_disk
    blobs = BlobStore(mount / "blobs")
    first = harness.enqueue("alice", small())
    dispatcher = await harness.dispatcher(blobs)
    try:
        await dispatcher.wait_idle(60)
        job = harness.job(first)
        assert job["status"] == "failed"
        assert job["error"] == f"could not save the image: the disk is full ({mount / 'blobs'})"
        filler.unlink()  # the admin frees some space
        second = harness.enqueue("alice", small())
        dispatcher.wake()
        await dispatcher.wait_idle(60)
    finally:
        await dispatcher.stop()
    assert harness.job(second)["status"] == "done"
    image = harness.job(second)["result"]["images"][0]
    assert png_size(blobs.get(image["sha256"])) == (64, 64)
