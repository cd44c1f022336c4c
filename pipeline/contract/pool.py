"""The worker-pool interface: what the dispatcher (bot process) sees of any backend.

`WorkerPool` is implemented by `pipeline.workers.local_pool.LocalPool` (one spawned
process per device) and `pipeline.workers.ray_pool.RayPool` (Ray actors); both stream
each batch's events through a `BatchStream`. Torch-free: the bot process imports it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pipeline.contract.config import Config, ConfigError
from pipeline.contract.jobs import TERMINAL_EVENTS, Event, Failed, JobSpec

WORKER_DIED = "the worker stopped unexpectedly"
POOL_CLOSED = "the worker pool was shut down"
RAY_MISSING = "workers.backend is 'ray' but ray is not installed: pip install 'sdbot[ray]'"
Batch = list[tuple[str, JobSpec]]
W = TypeVar("W")


class PoolError(Exception):
    """The pool cannot start or was misconfigured; the message says what to fix."""


# A worker's states, as /metrics and /healthz show them.
IDLE = "idle"  # ready, no batch
BUSY = "busy"  # running a batch
STARTING = "starting"  # loading its model (a new worker, or one restarted after a crash)
DEAD = "dead"  # its process ended; the pool restarts it
LOST = "lost"  # its machine left the cluster (Ray); shown for a while, never used again
READY_STATES = (IDLE, BUSY)


@dataclass(frozen=True)
class ModelMemory:
    """What one loaded model costs its worker: the memory plan it was loaded with
    (`pipeline.contract.memory_plan`), the plan's estimated peak, and the peak measured over
    its jobs since it was loaded (on a GPU `torch.cuda.max_memory_allocated`, "gpu"; on the
    CPU the worker process's peak RSS, "rss", which also counts torch and other models)."""

    plan: str = ""  # the plan's mode (full, fp8, offload…); "" when loaded without a plan
    estimated_bytes: int = 0  # the plan's estimated peak; 0 without a plan
    peak_bytes: int = 0  # measured; 0 until a job has run
    measure: str = "rss"  # "gpu" | "rss": what peak_bytes is


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as the pool sees it: for /metrics, /healthz and model affinity."""

    name: str
    state: str  # IDLE | BUSY | STARTING | DEAD | LOST
    node: str = "local"  # the machine (Ray: node id and address)
    # model name → LoRA adapters loaded beside it, least recently used model first
    held: Mapping[str, Sequence[str]] = field(default_factory=dict)
    memory: Mapping[str, ModelMemory] = field(default_factory=dict)  # model name → its memory


def placement(held: Mapping[str, Sequence[str]], model: str, max_models: int) -> str:
    """What running `model` costs a worker holding `held`: "warm" (loaded), "room" (a load,
    nothing unloaded) or "swap" (a load that unloads another model)."""
    if model in held:
        return "warm"
    return "room" if len(held) < max_models else "swap"


PLACEMENT_ORDER = ("warm", "room", "swap")  # model affinity: best first


def workers_by_node(workers: Sequence[WorkerInfo]) -> dict[str, dict[str, int]]:
    """{node: {state: how many}} in the order nodes first appear."""
    nodes: dict[str, dict[str, int]] = {}
    for worker in workers:
        states = nodes.setdefault(worker.node, {})
        states[worker.state] = states.get(worker.state, 0) + 1
    return nodes


def describe_nodes(workers: Sequence[WorkerInfo]) -> list[str]:
    """One line per node: "node 1a2b3c4d@10.0.0.5: 1 busy, 1 lost"."""
    return [
        f"node {node}: " + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        for node, states in workers_by_node(workers).items()
    ]


MEASURES = {"gpu": "GPU allocated", "rss": "worker RSS"}


def describe_memory(workers: Sequence[WorkerInfo]) -> list[str]:
    """One line per loaded model of each worker: its memory plan, the plan's estimated
    peak and the measured one ("local-0-cpu: sd15 plan full, est. peak 2.4 GB, measured
    3.1 GB (worker RSS)")."""
    from pipeline.contract.memory_plan import size_text

    lines = []
    for worker in workers:
        for model, memory in worker.memory.items():
            plan = f"plan {memory.plan}, est. peak {size_text(memory.estimated_bytes)}"
            measured = (
                f"measured {size_text(memory.peak_bytes)} ({MEASURES[memory.measure]})"
                if memory.peak_bytes
                else "no job measured yet"
            )
            lines.append(f"{worker.name}: {model} {plan if memory.plan else 'no plan'}, {measured}")
    return lines


def batch_model(config: Config, batch: Batch) -> str | None:
    """The configured name of the model a batch runs (one per batch: batch mates share
    their batch key, which holds the model), or None when no such model is configured."""
    try:
        return config.model(batch[0][1].model).name if batch else None
    except ConfigError:
        return None  # the worker reports the unknown model to the member


def pick_worker(
    free: Sequence[W], model: str | None, max_models: int, *, affinity: bool = True
) -> tuple[W, str]:
    """Model affinity: the free worker that already holds `model`, else one with room for
    it, else one that must unload a model (first in order among equals). Returns the
    worker and its placement ("warm", "room" or "swap"; "" when the model is unknown).
    Workers have a `held` mapping: model name → its LoRA adapters."""
    costs = [placement(w.held, model, max_models) if model else "" for w in free]  # type: ignore[attr-defined]
    if not affinity or not model:
        return free[0], costs[0]
    best = min(range(len(free)), key=lambda i: PLACEMENT_ORDER.index(costs[i]))
    return free[best], costs[best]


class ListedWorkers(Protocol):
    """What `take_free_worker` reads of a pool that keeps a list of worker handles
    (LocalPool, RayPool): both pick and count workers the same way."""

    config: Config
    placements: dict[str, int]
    _changed: asyncio.Event | None

    @property
    def closing(self) -> bool: ...


async def take_free_worker(
    pool: ListedWorkers, free: Callable[[], Sequence[W]], model: str | None
) -> W:
    """Wait until a worker is free (`pool._changed` is set whenever one may be), then take
    the best one for `model` (`pick_worker`) and count its placement in `pool.placements`."""
    if pool._changed is None:
        raise PoolError(f"{type(pool).__name__}.start() was not awaited")
    workers = pool.config.workers
    while True:
        candidates = free()
        if candidates:
            worker, cost = pick_worker(
                candidates, model, workers.max_models, affinity=workers.affinity
            )
            pool.placements[cost] = pool.placements.get(cost, 0) + 1
            return worker
        if pool.closing:
            raise PoolError(POOL_CLOSED)
        pool._changed.clear()
        await pool._changed.wait()


def worker_running(workers: Iterable[W], job_id: str) -> W | None:
    """The worker whose current batch still waits on `job_id`, if any (each handle has a
    `stream`: its `BatchStream`, or None while idle)."""
    for worker in workers:
        stream = worker.stream  # type: ignore[attr-defined]
        if stream is not None and job_id in stream.pending:
            return worker
    return None


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
    async def cancel(self, job_id: str, *, keep_download: bool = False) -> None:
        """Ask the worker running the job to stop it between two steps (Cancelled). A
        download of the job's model stops too once every job of its batch is cancelled,
        unless `keep_download` (another job waits for that model): the worker then
        fetches and loads it, and stops the job before its first step."""

    @abstractmethod
    def request_yield(self, job_id: str) -> None:
        """Ask a running training job to pause at its next checkpoint (Paused)."""

    @abstractmethod
    async def worker_pid(self, job_id: str) -> int | None:
        """The OS process id running the job (diagnostics and tests), or None."""

    def worker_states(self) -> list[tuple[str, str]]:
        """(worker name, state) for /metrics and /healthz: idle | busy | starting | dead | lost."""
        return [(worker.name, worker.state) for worker in self.workers()]

    def workers(self) -> list[WorkerInfo]:
        """Every worker, with its node and the models it holds. Pools that cannot tell
        more report their free workers as idle, the rest busy."""
        free, capacity = self.free_workers(), getattr(self, "capacity", 0)
        return [WorkerInfo(f"worker-{i}", IDLE if i < free else BUSY) for i in range(capacity)]

    def free_models(self) -> set[str]:
        """Models held by a free worker: a job for one of them starts without a load."""
        return {model for w in self.workers() if w.state == IDLE for model in w.held}


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
