"""The dispatcher: hands queued jobs to free workers and records what comes back.

SQLite is the source of truth (see `bot.store`): a job is claimed (marked running) in
one transaction before it is sent to a worker, and its outcome is written when the
worker reports it. Execution is pessimistic, as in arq: a job may run twice (its
worker died after finishing, the bot was killed mid-queue), so results are
content-addressed blobs and `store.finish` keeps the first outcome.

Runs in the bot's event loop and never imports torch. SQLite calls run on one
dedicated thread, in order, so a slow disk never stalls Discord's heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from bot import store
from bot.services.admission import still_runnable
from pipeline.contract.blobs import BlobError, BlobStore
from pipeline.contract.config import Config, ConfigError
from pipeline.contract.jobs import (
    Cancelled,
    Done,
    Event,
    Failed,
    JobError,
    JobSpec,
    Paused,
    Progress,
    Started,
    spec_from_dict,
)
from pipeline.contract.pool import BUSY, IDLE, STARTING, WORKER_DIED, WorkerPool, pick_worker

log = logging.getLogger(__name__)

OnEvent = Callable[[dict, Event], Awaitable[None]]
T = TypeVar("T")
SAFETY_POLL_S = 2.0  # a missed wake() (a worker restarted, another process enqueued) waits this
# Model affinity: the next job may wait this long for a busy worker that holds its model
# while free workers take jobs for the models they hold; after it, a free worker loads it.
AFFINITY_WAIT_S = 30.0
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,12}")


class Dispatcher:
    """Feeds the pool from the fair queue; `on_event(job_row, event)` hears everything."""

    def __init__(
        self,
        db: sqlite_utils.Database | str | Path,
        pool: WorkerPool,
        blobs: BlobStore,
        config: Config,
        *,
        on_event: OnEvent,
        name: str = "dispatcher",
    ) -> None:
        # Pass a path: the dispatcher then has its own connection, used only from its
        # own thread. A Database object must not be used by anyone else meanwhile.
        self._db_source = db
        self.db: sqlite_utils.Database | None = None if isinstance(db, (str, Path)) else db
        self.pool = pool
        self.blobs = blobs
        self.config = config
        self.on_event = on_event
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdbot-db")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._starting = 0  # batches claimed but not yet on a worker
        self._claimed: list[str | None] = []  # their models (model affinity counts them)
        self._running: dict[str, dict] = {}  # job id → row, for jobs on a worker
        self._stepping: set[str] = set()  # running jobs past their model's download/load
        self._ended: set[str] = set()  # cancelled before their first step: events ignored
        self._yield_asked: set[str] = set()
        self._prefer_generation = False  # after a training job paused for them

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, requeue jobs a previous run left running, start serving."""
        if self.db is None:
            self.db = await self._call(store.open_db, self._db_source)
        requeued = await self._call(store.requeue_interrupted, self.db)
        if requeued:
            log.info("requeued %d job(s) left running by a previous run", requeued)
        self._task = asyncio.create_task(self._serve(), name="sdbot-dispatcher")

    async def stop(self) -> None:
        """Stop claiming and drop running batches (their jobs stay `running` in the
        database and are requeued by the next start, like after a crash)."""
        tasks = [t for t in (self._task, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(self._db_source, (str, Path)) and self.db is not None:
            await self._call(self.db.close)
        self._executor.shutdown(wait=True)

    def wake(self) -> None:
        """Call after enqueueing: the queue is looked at now, not at the next poll."""
        self._wakeup.set()

    async def cancel(
        self, job_id: str, by_user: str | None = None, *, admin: bool = False
    ) -> store.JobStatus:
        """Cancel for a member (None: the bot itself). A queued job ends at once; so does
        an image job whose worker still fetches or loads its model (`_end_before_steps`);
        a running one is stopped on its worker and ends when the worker says so.
        Raises store.NotYours / store.JobNotFound (messages for the member)."""
        previous = await self._call(
            store.cancel, self.db, job_id, str(by_user or ""), admin=admin or by_user is None
        )
        row = self._running.get(job_id)
        if previous is store.JobStatus.RUNNING and row is not None and self._before_steps(row):
            await self._end_before_steps(row)
        elif previous is store.JobStatus.RUNNING:
            await self.pool.cancel(job_id)
        elif previous is store.JobStatus.QUEUED:
            row = await self._call(store.get_job, self.db, job_id)
            await self._notify(row, Cancelled(job_id))
        return previous

    def _before_steps(self, row: dict) -> bool:
        """An image job on its way to a worker or there before its first step: the
        worker is fetching or loading the model, which can take many minutes."""
        return row["kind"] == "generate" and row["id"] not in self._stepping

    async def _end_before_steps(self, row: dict) -> None:
        """End a cancelled job now, not when its worker gets to its first step (after a
        30 GB download): the member is told at once. The worker is told too; it goes on
        fetching the model only if another queued job waits for it (docs/DECISIONS.md,
        "#26 (stop 29)"), and stops the job before its first step; whatever it reports
        of the job from now on is not recorded."""
        job_id = row["id"]
        model = self._model_of(row)
        names = {model} if model is not None else set()
        if model is not None and model == self.config.model("default").name:
            names.add("default")
        waiting = bool(names) and await self._call(store.queued_for_models, self.db, names)
        self._ended.add(job_id)
        self._running.pop(job_id, None)
        await self.pool.cancel(job_id, keep_download=waiting)
        ended = await self._call(store.mark_cancelled, self.db, job_id)
        await self._notify(ended, Cancelled(job_id))

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Wait until nothing is queued or running (tests, benchmarks, shutdown)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while await self._call(store.busy_count, self.db):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"jobs still queued or running after {timeout_s:g} s")
            await asyncio.sleep(0.05)

    # -- the loop ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            try:
                await self._fill()
            except Exception:  # noqa: BLE001 - a locked db or a bug must not stop the queue
                log.exception("dispatcher: could not hand out jobs; trying again")
            # Not asyncio.wait_for: before Python 3.12 it swallows a cancel that arrives as
            # the event is set, and stop() then waits on a loop that never ends.
            waiter = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({waiter}, timeout=SAFETY_POLL_S)
            finally:
                waiter.cancel()
            self._wakeup.clear()

    async def _fill(self) -> None:
        """Claim one fair batch per free worker."""
        while self.pool.free_workers() - self._starting > 0:
            rows = await self._claim()
            if not rows:
                break
            self._starting += 1
            self._claimed.append(self._model_of(rows[0]))
            task = asyncio.create_task(self._run_batch(rows), name=f"sdbot-batch-{rows[0]['id']}")
            self._batches.add(task)
            task.add_done_callback(self._batch_ended)
        await self._ask_training_to_yield()

    async def _claim(self) -> list[dict]:
        size = max(1, self.config.workers.batch_size)
        claim = partial(store.claim_next, self.db, worker=self.name, max_batch=size)
        if self._prefer_generation:
            rows = await self._call(claim, kinds={"generate"})
            if rows:
                return rows
            self._prefer_generation = False  # no generation waiting: training may resume
        warm = await self._warm_models()
        if warm is not None:  # none of them queued: the next job waits for its worker
            return await self._call(claim, models=warm) if warm else []
        return await self._call(claim)

    async def _warm_models(self) -> set[str] | None:
        """Model affinity: when the next job's model is held only by busy workers (and it
        has waited less than AFFINITY_WAIT_S), the models free workers hold, as job specs
        name them: a free worker takes a job it runs without loading a model, or nothing,
        and the next job waits for its warm worker. None: claim in fair order (the pool
        then picks the free worker that holds the model, see `pick_worker`)."""
        if not self.config.workers.affinity:
            return None
        workers = self.pool.workers()
        idle = [w for w in workers if w.state == IDLE]
        busy = {model for w in workers if w.state in (BUSY, STARTING) for model in w.held}
        for claimed in self._claimed:  # each batch on its way takes the worker it will get
            if idle:
                worker, _ = pick_worker(idle, claimed, self.config.workers.max_models)
                idle.remove(worker)
                busy.add(claimed or "")
        free = {model for w in idle for model in w.held}
        if not free or not busy - free:
            return None
        row = await self._call(store.peek_next, self.db)
        if row is None or time.time() - float(row["created_at"]) >= AFFINITY_WAIT_S:
            return None
        model = self._model_of(row)
        if model is None or model in free or model not in busy:
            return None  # a free worker holds it, or nobody does (a load is due anyway)
        default = self.config.model("default").name
        return free | ({"default"} if default in free else set())

    def _batch_ended(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dispatcher: a batch failed", exc_info=task.exception())
        self.wake()

    async def _ask_training_to_yield(self) -> None:
        """A training job holds a worker for minutes: when generation jobs wait and no
        worker is free, ask it to pause at its next checkpoint (it is requeued)."""
        training = [
            job_id
            for job_id, row in self._running.items()
            if row["kind"] == "train" and job_id not in self._yield_asked
        ]
        if not training or self.pool.free_workers() > 0:
            return
        if await self._call(store.generation_waiting, self.db):
            for job_id in training:
                self.pool.request_yield(job_id)
                self._yield_asked.add(job_id)

    # -- one batch ----------------------------------------------------------------------------

    async def _run_batch(self, rows: list[dict]) -> None:
        jobs = {row["id"]: row for row in rows}
        on_worker = False
        try:
            runnable = await self._checked(rows)
            self._running.update({job_id: jobs[job_id] for job_id, _ in runnable})
            async for event in self.pool.run(runnable):
                if not on_worker:
                    on_worker = True
                    self._starting -= 1
                    self._claimed.remove(self._model_of(rows[0]))
                    self.wake()  # the pool's free count is now accurate again
                    await self._pass_on_early_cancels(runnable)
                if event.job_id not in self._ended:
                    await self._record(jobs[event.job_id], event)
            # A pool that ended a batch without an outcome for a job broke its contract;
            # the job must not stay `running` forever.
            for job_id in [j for j, _ in runnable if j in self._running]:
                await self._record(jobs[job_id], Failed(job_id, WORKER_DIED, retryable=True))
        finally:
            if not on_worker:
                self._starting -= 1
                self._claimed.remove(self._model_of(rows[0]))
            for job_id in jobs:
                self._running.pop(job_id, None)
                self._yield_asked.discard(job_id)
                self._stepping.discard(job_id)
                self._ended.discard(job_id)

    async def _pass_on_early_cancels(self, runnable: list[tuple[str, JobSpec]]) -> None:
        """A job is `running` from its claim but on a worker only from its first event: a
        cancel in between set `cancel_requested` and found no worker to tell (a training
        job resuming after it yielded to generation). Tell the worker now; a cancel after
        this point finds it through the pool."""
        for job_id, _ in runnable:
            row = await self._call(store.get_job, self.db, job_id)
            if row is not None and row["cancel_requested"]:
                await self.pool.cancel(job_id)

    async def _checked(self, rows: list[dict]) -> list[tuple[str, JobSpec]]:
        """The specs still runnable; the others fail now, never reaching a worker (what can
        change while a job waits: `bot.services.admission.still_runnable`)."""
        runnable = []
        for row in rows:
            try:
                spec = spec_from_dict(row["spec"])
                await self._call(still_runnable, self.db, self.config, row, spec)
            except JobError as exc:
                await self._record(row, Failed(row["id"], str(exc)))
            except (TypeError, ValueError) as exc:
                message = f"this job's saved settings cannot be read ({type(exc).__name__})"
                await self._record(row, Failed(row["id"], message))
            else:
                runnable.append((row["id"], spec))
        return runnable

    async def _record(self, row: dict, event: Event) -> None:
        """Write the event's outcome to the database, then tell the Discord layer."""
        job_id = row["id"]
        if isinstance(event, (Started, Progress)):
            if isinstance(event, Progress) and event.total:  # a step, not the download's
                self._stepping.add(job_id)
            await self._notify(row, event)
            return
        self._running.pop(job_id, None)
        if isinstance(event, Done):
            try:
                result = await asyncio.to_thread(self._save_outputs, event)
            except BlobError as exc:
                event = Failed(job_id, str(exc), retryable=False)
            else:
                row = await self._call(store.finish, self.db, job_id, result)
        if isinstance(event, Failed):
            row = await self._call(store.fail, self.db, job_id, event.message, event.retryable)
        elif isinstance(event, Cancelled):
            row = await self._call(store.mark_cancelled, self.db, job_id)
        elif isinstance(event, Paused):
            row = await self._call(store.pause, self.db, job_id)
            self._prefer_generation = True
        if row["status"] == store.JobStatus.QUEUED.value:
            self.wake()  # retried or paused: back in the queue
        await self._notify(row, event)

    def _save_outputs(self, done: Done) -> dict[str, Any]:
        """Store a job's images and files as blobs; the result row refers to them by sha256."""
        images = [
            {
                "sha256": self.blobs.put(image.png, ".png"),
                "seed": image.seed,
                "infotext": image.infotext,
                "notices": list(image.notices),
                "nsfw": image.nsfw,
                "identity": image.identity,
                "tries": image.tries,
                "input_face": image.input_face,
            }
            for image in done.images
        ]
        files = [
            {"name": name, "sha256": self.blobs.put(data, _suffix(name)), "size": len(data)}
            for name, data in done.files
        ]
        return {"images": images, "files": files, "info": dict(done.info)}

    async def _notify(self, row: dict | None, event: Event) -> None:
        if row is None:
            return
        try:
            await self.on_event(row, event)
        except Exception:  # noqa: BLE001 - a Discord hiccup must not lose the queue
            log.exception("on_event failed for job %s (%s)", row.get("id"), event.type)

    def _model_of(self, row: dict) -> str | None:
        """The configured name of the model a job row runs (None: not configured)."""
        spec = row.get("spec")
        try:
            return self.config.model(spec.get("model", "default")).name  # type: ignore[union-attr]
        except (ConfigError, AttributeError, TypeError):  # a spec that cannot be read
            return None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))


def _suffix(name: str) -> str:
    suffix = Path(name).suffix
    return suffix if _SUFFIX.fullmatch(suffix) else ""
