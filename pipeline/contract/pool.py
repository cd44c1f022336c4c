"""The worker-pool interface: what the dispatcher (bot process) sees of any backend.

`WorkerPool` is implemented by `pipeline.workers.local_pool.LocalPool` (one spawned
process per device) and `pipeline.workers.ray_pool.RayPool` (Ray actors); both stream
each batch's events through a `BatchStream`. Torch-free: the bot process imports it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

from pipeline.contract.jobs import TERMINAL_EVENTS, Event, Failed, JobSpec

WORKER_DIED = "the worker stopped unexpectedly"
POOL_CLOSED = "the worker pool was shut down"
RAY_MISSING = "workers.backend is 'ray' but ray is not installed: pip install 'sdbot[ray]'"
Batch = list[tuple[str, JobSpec]]


class PoolError(Exception):
    """The pool cannot start or was misconfigured; the message says what to fix."""


class WorkerPool(ABC):
    """Runs job batches on workers and streams their events back."""

    capacity: int = 0  # how many batches can run at once (one per worker)

    @abstractmethod
    async def start(self) -> None:
        """Start the workers and wait until each has loaded the default model."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the workers; jobs still running are reported failed (retryable)."""

    @abstractmethod
    def free_workers(self) -> int:
        """Workers without a batch right now: how many `run` calls start at once."""

    @abstractmethod
    def run(self, batch: Batch) -> AsyncIterator[Event]:
        """Run the batch on one worker (waiting for a free one) and yield every event of
        its jobs; ends once each job has had a terminal event and the worker is free."""

    @abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Ask the worker running the job to stop it between two steps (Cancelled)."""

    @abstractmethod
    def request_yield(self, job_id: str) -> None:
        """Ask a running training job to pause at its next checkpoint (Paused)."""

    @abstractmethod
    async def worker_pid(self, job_id: str) -> int | None:
        """The OS process id running the job (diagnostics and tests), or None."""

    def worker_states(self) -> list[tuple[str, str]]:
        """(worker name, state) for /metrics and /healthz: idle | busy | starting | dead.
        Pools that cannot tell more report their free workers as idle, the rest busy."""
        free, capacity = self.free_workers(), getattr(self, "capacity", 0)
        return [(f"worker-{i}", "idle" if i < free else "busy") for i in range(capacity)]


# -- one batch's event stream, shared by both backends --------------------------------------


class BatchStream:
    """The events of one batch on their way to the `run` caller.

    Keeps track of which jobs still lack a terminal event, so a dead worker can
    report exactly those as failed, and stray events of other jobs are dropped.
    """

    def __init__(self, job_ids: Sequence[str]) -> None:
        self.pending: set[str] = set(job_ids)
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.ended = False

    def push(self, event: Event) -> None:
        if event.job_id not in self.pending:
            return
        if isinstance(event, TERMINAL_EVENTS):
            self.pending.discard(event.job_id)
        self._queue.put_nowait(event)

    def fail_pending(self, message: str, *, retryable: bool) -> None:
        for job_id in sorted(self.pending):
            self.push(Failed(job_id, message, retryable=retryable))

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(None)

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self._queue.get()) is not None:
            yield event
