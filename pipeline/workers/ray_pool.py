"""RayPool: the same Runner inside Ray actors, one per GPU, anywhere on a Ray cluster.

Imported only when `workers.backend = "ray"` (see `pipeline.workers.local_pool.make_pool`).

- Each actor is restarted by Ray when its process dies (`max_restarts=-1`); the batch
  it was running is reported `Failed(retryable=True)` and the dispatcher requeues it.
- Events stream back through a Ray streaming generator (`run`), awaited from asyncio.
- The actor is threaded (`max_concurrency`), so `cancel` and `request_yield` run while
  `run` is busy and flip flags the Runner checks between denoising steps.
- Input images and LoRA files travel through Ray's object store (`ray.put`) and are
  cached on the worker's machine by sha256 in a local BlobStore; the pool first asks
  the actor which blobs it lacks, so a LoRA crosses the network once per machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

import pipeline
from pipeline.contract.blobs import BlobStore, sha256_hex
from pipeline.contract.config import Config
from pipeline.contract.jobs import TERMINAL_EVENTS, Event, Failed
from pipeline.contract.pool import WORKER_DIED, Batch, BatchStream, PoolError, WorkerPool

log = logging.getLogger(__name__)

ACTOR_CONCURRENCY = 4  # run + cancel/yield/pid calls arriving while it runs
_CODE_ROOT = Path(pipeline.__file__).resolve().parent.parent
WORKER_BUG = "the worker hit an internal error; the job id is in the logs"


def default_cache_dir() -> Path:
    """Where a worker machine caches blobs it was sent (SDBOT_RAY_BLOB_CACHE overrides)."""
    return Path(
        os.environ.get("SDBOT_RAY_BLOB_CACHE") or Path(tempfile.gettempdir()) / "sdbot-blob-cache"
    )


class RayWorker:
    """The actor: one Runner on one device. Wrapped with `ray.remote` by the pool."""

    def __init__(self, config: Config, device: str, cache_dir: str, name: str) -> None:
        from pipeline.workers.runner import Runner

        logging.basicConfig(level=logging.INFO)
        self.blobs = BlobStore(cache_dir)
        self.runner = Runner(config, device=device, blobs=self.blobs, name=name)
        self.cancelled: set[str] = set()
        self.yielding: set[str] = set()
        try:
            self.runner.warm_up()
        except Exception:  # noqa: BLE001 - keep serving: each job will report why
            log.exception("worker %s could not load the default model", name)

    def pid(self) -> int:
        return os.getpid()

    def missing(self, shas: Sequence[str]) -> list[str]:
        return [sha for sha in shas if not self.blobs.exists(sha)]

    def put_blobs(self, names: Sequence[tuple[str, str]], *datas: bytes) -> None:
        """Cache blobs sent from the bot; `names` holds (sha256, suffix) per blob."""
        for (sha, suffix), data in zip(names, datas):
            if sha256_hex(data) != sha:
                raise ValueError(f"blob {sha[:12]}… arrived damaged")
            self.blobs.put(data, suffix)

    def cancel(self, job_id: str) -> None:
        self.cancelled.add(job_id)

    def request_yield(self, job_id: str) -> None:
        self.yielding.add(job_id)

    def run(self, batch: Batch) -> Iterator[Event]:
        """Stream the batch's events. The Runner reports through a callback, so it runs
        in its own thread and this generator hands its events to Ray as they come."""
        ids = [job_id for job_id, _ in batch]
        events: queue.Queue[Event | None] = queue.Queue()

        def work() -> None:
            try:
                self.runner.run(
                    batch,
                    events.put,
                    self.cancelled.__contains__,
                    lambda: any(job_id in self.yielding for job_id in ids),
                )
            finally:
                events.put(None)

        threading.Thread(target=work, name="runner", daemon=True).start()
        while (event := events.get()) is not None:
            yield event
        if self.runner.broken:  # a CUDA device-side error: Ray restarts the actor afresh
            log.error("actor exits after a device error (%s)", self.runner.broken)
            os._exit(70)
        self.cancelled.difference_update(ids)
        self.yielding.difference_update(ids)


class _Handle:
    """The pool's view of one actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name
        self.stream: BatchStream | None = None
        self.reviving = False  # Ray is restarting the actor; not free until it answers

    @property
    def is_free(self) -> bool:
        return self.stream is None and not self.reviving


class RayPool(WorkerPool):
    """One RayWorker actor per GPU of the cluster (one CPU actor when it has none)."""

    def __init__(
        self, config: Config, *, blobs: BlobStore | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.config = config
        self.blobs = blobs or BlobStore(config.storage.blobs)
        self.cache_dir = str(cache_dir or default_cache_dir())
        self._handles: list[_Handle] = []
        self._changed: asyncio.Event | None = None
        self._owns_ray = False
        self._tasks: set[asyncio.Task] = set()  # revivals in flight (kept from the GC)

    async def start(self) -> None:
        self._changed = asyncio.Event()
        self._owns_ray = connect(self.config.workers.ray_address)
        remote = ray.remote(RayWorker)
        # When Ray was started by the caller (tests, a notebook), the code cannot be
        # shipped any more (Ray allows that only in ray.init): point the actors at this
        # checkout, which works on this machine; other machines need sdbot installed.
        runtime_env = {} if self._owns_ray else {"env_vars": {"PYTHONPATH": str(_CODE_ROOT)}}
        for index, (device, gpus) in enumerate(self._plan()):
            name = f"ray-{index}-{device}"
            actor = remote.options(
                num_cpus=1,
                num_gpus=gpus,
                max_restarts=-1,
                max_concurrency=ACTOR_CONCURRENCY,
                runtime_env=runtime_env,
            ).remote(self.config, device, self.cache_dir, name)
            self._handles.append(_Handle(actor, name))
        self.capacity = len(self._handles)
        try:
            await asyncio.gather(*(h.actor.pid.remote() for h in self._handles))
        except RayError as exc:
            raise PoolError(f"a Ray worker could not start: {exc}") from exc

    async def close(self) -> None:
        # A batch still streaming ends with Failed(retryable) when its actor dies.
        for handle in self._handles:
            ray.kill(handle.actor, no_restart=True)
        self._handles = []
        if self._owns_ray:
            ray.shutdown()

    def free_workers(self) -> int:
        return sum(1 for handle in self._handles if handle.is_free)

    async def run(self, batch: Batch) -> AsyncIterator[Event]:
        if not batch:
            return
        handle = await self._free_handle()
        stream = handle.stream = BatchStream([job_id for job_id, _ in batch])
        try:
            async for event in self._events(handle, batch, stream):
                yield event
        finally:
            for job_id in stream.pending:  # the caller stopped listening: stop the jobs
                handle.actor.cancel.remote(job_id)
            handle.stream = None
            self._worker_changed()

    async def cancel(self, job_id: str) -> None:
        handle = self._handle_of(job_id)
        if handle is not None:
            await handle.actor.cancel.remote(job_id)

    def request_yield(self, job_id: str) -> None:
        handle = self._handle_of(job_id)
        if handle is not None:
            handle.actor.request_yield.remote(job_id)

    async def worker_pid(self, job_id: str) -> int | None:
        handle = self._handle_of(job_id)
        return None if handle is None else await handle.actor.pid.remote()

    # -- internals ------------------------------------------------------------------------

    async def _events(
        self, handle: _Handle, batch: Batch, stream: BatchStream
    ) -> AsyncIterator[Event]:
        try:
            await self._send_blobs(handle, batch)
            refs = handle.actor.run.options(num_returns="streaming").remote(batch)
            async for ref in refs:
                event = await ref
                if event.job_id in stream.pending:
                    if isinstance(event, TERMINAL_EVENTS):
                        stream.pending.discard(event.job_id)
                    yield event
        except RayTaskError as exc:  # the actor lived but the method raised: a bug
            log.error("worker %s failed a batch: %s", handle.name, exc)
            for event in _fail_all(stream, WORKER_BUG, retryable=False):
                yield event
        except RayError as exc:  # the actor died or is restarting
            log.warning("worker %s stopped during a batch: %r", handle.name, exc)
            handle.reviving = True
            task = asyncio.get_running_loop().create_task(self._revive(handle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            for event in _fail_all(stream, WORKER_DIED, retryable=True):
                yield event

    async def _revive(self, handle: _Handle, timeout_s: float = 600.0) -> None:
        """Wait until Ray has restarted the actor (and it has loaded its model): calls
        made while it restarts fail at once, which would burn the jobs' attempts."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                await handle.actor.pid.remote()
                break
            except RayError:
                await asyncio.sleep(0.5)
        else:
            log.error("worker %s did not come back within %.0f s", handle.name, timeout_s)
        handle.reviving = False
        self._worker_changed()

    async def _send_blobs(self, handle: _Handle, batch: Batch) -> None:
        shas = sorted({sha for _, spec in batch for sha in spec.blob_refs()})
        if not shas:
            return
        wanted = [sha for sha in await handle.actor.missing.remote(shas) if self.blobs.exists(sha)]
        if wanted:  # one the bot lacks too is left for the Runner to report by name
            names = [(sha, self.blobs.path(sha).suffix) for sha in wanted]
            refs = [ray.put(self.blobs.get(sha)) for sha in wanted]
            await handle.actor.put_blobs.remote(names, *refs)

    def _plan(self) -> list[tuple[str, int]]:
        """(device, GPUs to reserve) per actor. Ray sets CUDA_VISIBLE_DEVICES for each
        actor, so its one GPU is always "cuda" inside it."""
        plan: list[tuple[str, int]] = []
        for device in self.config.workers.devices:
            if device == "auto":
                gpus = int(ray.cluster_resources().get("GPU", 0))
                plan += [("cuda", 1)] * gpus or [("cpu", 0)]
            elif device.startswith("cuda"):
                plan.append(("cuda", 1))
            else:
                plan.append((device, 0))
        return plan or [("cpu", 0)]

    async def _free_handle(self) -> _Handle:
        if self._changed is None:
            raise PoolError("RayPool.start() was not awaited")
        while True:
            for handle in self._handles:
                if handle.is_free:
                    return handle
            if not self._handles:
                raise PoolError("the worker pool was shut down")
            self._changed.clear()
            await self._changed.wait()

    def _handle_of(self, job_id: str) -> _Handle | None:
        for handle in self._handles:
            if handle.stream is not None and job_id in handle.stream.pending:
                return handle
        return None

    def _worker_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()


def _fail_all(stream: BatchStream, message: str, *, retryable: bool) -> list[Event]:
    failed: list[Event] = [
        Failed(job_id, message, retryable=retryable) for job_id in sorted(stream.pending)
    ]
    stream.pending.clear()
    return failed


def connect(address: str) -> bool:
    """Join the Ray cluster at `address` ("local": start one on this machine).
    Returns True when this call started Ray (so close() shuts it down)."""
    if ray.is_initialized():
        return False
    # Ship `pipeline` with the job, so every machine runs the bot's version of it
    # (torch, diffusers etc. must be installed there).
    runtime_env = {"py_modules": [str(_CODE_ROOT / "pipeline")]}
    if address in ("", "local"):
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    else:
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError) as exc:
            raise PoolError(
                f"cannot reach the Ray cluster at workers.ray_address = {address!r}: {exc}"
            ) from exc
    return True
