"""Worker pools: where job batches run, and how their events come back to the bot.

`WorkerPool` is the interface the dispatcher uses. Two backends implement it:

- `LocalPool` (default): one spawned process per device on this machine. Batches go
  in and events come out over pipes; the event loop watches each pipe and each
  process sentinel with `add_reader`, so no thread polls and a dead worker (SIGKILL,
  OOM killer, segfault) is noticed at once: its jobs are reported
  `Failed(retryable=True)` and a fresh process takes its place.
- `RayPool` (`pipeline.workers.ray_pool`): the same Runner inside Ray actors, for GPUs on
  other machines. Ray is imported only when configured.

The bot process imports this module, so it must not import torch or diffusers: the
worker side (`pipeline.workers.runner`) is imported only inside the worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pipeline.contract.config import Config
from pipeline.contract.devices import DeviceError, check_devices
from pipeline.contract.jobs import Event
from pipeline.contract.pool import (
    POOL_CLOSED,
    RAY_MISSING,
    WORKER_DIED,
    Batch,
    BatchStream,
    ModelMemory,
    PoolError,
    WorkerInfo,
    WorkerPool,
    batch_model,
    take_free_worker,
    worker_running,
)

log = logging.getLogger(__name__)

EXIT_DEVICE_FAULT = 70  # a worker's exit code after a CUDA device-side error


def make_pool(config: Config) -> WorkerPool:
    """The pool that config.workers.backend names (not started yet)."""
    backend = config.workers.backend
    if backend == "local":
        return LocalPool(config)
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise PoolError(RAY_MISSING) from None
        from pipeline.workers.ray_pool import RayPool

        return RayPool(config)
    raise PoolError(f"workers.backend must be 'local' or 'ray', not {backend!r}")


# -- devices ------------------------------------------------------------------------------


def detect_devices(devices: Sequence[str]) -> list[str]:
    """Expand "auto" to every CUDA GPU (cuda:0, cuda:1, …), or one CPU worker without."""
    found: list[str] = []
    for device in devices:
        if device == "auto":
            found += [f"cuda:{i}" for i in range(count_cuda_gpus())] or ["cpu"]
        else:
            found.append(device)
    return found or ["cpu"]


def count_cuda_gpus() -> int:
    """GPUs a worker will see, asked of nvidia-smi: importing torch here would cost the
    bot process seconds and hundreds of MB."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    allowed: int | None = None
    if visible is not None:
        # CUDA stops at the first invalid entry: "0,-1,2" shows one GPU, "" or "-1" none.
        entries = [v.strip() for v in visible.split(",")]
        allowed = next(
            (i for i, v in enumerate(entries) if not v or v.startswith("-")), len(entries)
        )
        if allowed == 0:
            return 0
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if listing.returncode != 0:
        return 0
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    return count if allowed is None else min(count, allowed)


def check_gpus(devices: Sequence[str]) -> None:
    """PoolError naming a configured cuda:N that nvidia-smi does not list."""
    if not any(device.startswith("cuda") for device in devices):
        return
    if shutil.which("nvidia-smi") is None:
        how = "nvidia-smi not found"
    elif (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        how = f"CUDA_VISIBLE_DEVICES={visible!r}"
    else:
        how = "nvidia-smi -L"
    try:
        check_devices(devices, count_cuda_gpus(), how=how)
    except DeviceError as exc:
        raise PoolError(str(exc)) from None


# -- LocalPool ------------------------------------------------------------------------------


class LocalPool(WorkerPool):
    """One spawned worker process per device; see the module docstring."""

    def __init__(self, config: Config, *, devices: Sequence[str] | None = None) -> None:
        self.config = config
        if devices is None:
            devices = detect_devices(config.workers.devices)
            check_gpus(devices)  # before a worker starts or a job is claimed
        self.devices = list(devices)
        self.capacity = len(self.devices)
        self._workers = [_LocalWorker(self, i, d) for i, d in enumerate(self.devices)]
        self._changed: asyncio.Event | None = None  # set whenever a worker may be free
        self.closing = False
        self.placements: dict[str, int] = {}  # batches by model placement (warm/room/swap)

    async def start(self) -> None:
        self._changed = asyncio.Event()
        for worker in self._workers:
            worker.spawn()
        for worker in self._workers:
            await worker.wait_ready()

    async def close(self) -> None:
        self.closing = True
        await asyncio.gather(*(worker.stop() for worker in self._workers))

    def free_workers(self) -> int:
        return sum(1 for worker in self._workers if worker.is_free)

    async def run(self, batch: Batch) -> AsyncIterator[Event]:
        if not batch:
            return
        worker = await self._free_worker(batch_model(self.config, batch))
        stream = BatchStream([job_id for job_id, _ in batch])
        worker.assign(stream, batch)
        try:
            async for event in stream.events():
                yield event
        finally:
            # The caller stopped listening (its task was cancelled): stop the jobs too,
            # so the worker frees up instead of finishing work nobody will record.
            for job_id in stream.pending:
                worker.send(("cancel", job_id))

    async def cancel(self, job_id: str, *, keep_download: bool = False) -> None:
        worker = self._worker_of(job_id)
        if worker is not None:
            if keep_download:  # before the cancel: the worker must never see one alone
                worker.send(("keep_download", job_id))
            worker.send(("cancel", job_id))

    def request_yield(self, job_id: str) -> None:
        worker = self._worker_of(job_id)
        if worker is not None:
            worker.send(("yield", job_id))

    async def worker_pid(self, job_id: str) -> int | None:
        worker = self._worker_of(job_id)
        return worker.pid if worker is not None else None

    def workers(self) -> list[WorkerInfo]:
        return [
            WorkerInfo(w.name, w.state, "local", dict(w.held), dict(w.memory))
            for w in self._workers
        ]

    def worker_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _free_worker(self, model: str | None) -> _LocalWorker:
        return await take_free_worker(self, lambda: [w for w in self._workers if w.is_free], model)

    def _worker_of(self, job_id: str) -> _LocalWorker | None:
        return worker_running(self._workers, job_id)


class _LocalWorker:
    """The bot-side handle of one worker process: pipes, sentinel, current batch."""

    RESTART_BACKOFF_S = (0.0, 1.0, 5.0, 30.0)  # by consecutive deaths before ready

    def __init__(self, pool: LocalPool, index: int, device: str) -> None:
        self.pool = pool
        self.device = device
        self.name = f"local-{index}-{device}"
        self.process: Any = None
        self.pid: int | None = None
        self.stream: BatchStream | None = None
        self._commands: Connection | None = None
        self._events: Connection | None = None
        self._ready: asyncio.Future[None] | None = None
        self._early_deaths = 0  # deaths before "ready", in a row: a crash loop backs off
        self._fatal = ""  # the worker cannot run on this machine: no restart
        self.held: dict[str, list[str]] = {}  # models (and their LoRAs) it reported loaded
        self.memory: dict[str, ModelMemory] = {}  # those models' plans and measured peaks

    @property
    def is_free(self) -> bool:
        # A worker still loading its model counts as free: the batch waits in its pipe.
        alive = self.process is not None and self._events is not None
        return alive and self.stream is None and not self.pool.closing and not self._fatal

    @property
    def state(self) -> str:
        """idle | busy | starting (loading its model) | dead (waiting to be restarted)."""
        if self.process is None or self._events is None:
            return "dead"
        if self._ready is None or not self._ready.done():
            return "starting"  # even with a batch waiting in its pipe
        return "busy" if self.stream is not None else "idle"

    def spawn(self) -> None:
        context = multiprocessing.get_context("spawn")
        command_out, command_in = context.Pipe(duplex=False)
        event_out, event_in = context.Pipe(duplex=False)
        blobs = str(Path(self.pool.config.storage.blobs).resolve())
        # daemon: if the bot exits without close(), multiprocessing ends the worker.
        self.process = context.Process(
            target=worker_main,
            args=(self.pool.config, self.device, blobs, self.name, command_out, event_in),
            name=f"sdbot-{self.name}",
            daemon=True,
        )
        self.process.start()
        self.held, self.memory = {}, {}
        # Keep only our ends, so each side sees EOF when the other one goes away.
        command_out.close()
        event_in.close()
        self._commands, self._events = command_in, event_out
        self.pid = self.process.pid
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(event_out.fileno(), self._read_events)
        loop.add_reader(self.process.sentinel, self._exited)
        self.pool.worker_changed()

    async def wait_ready(self) -> None:
        assert self._ready is not None
        await asyncio.shield(self._ready)

    def assign(self, stream: BatchStream, batch: Batch) -> None:
        self.stream = stream
        self.send(("run", batch))

    def send(self, message: tuple) -> None:
        if self._commands is None:
            return  # dead: its exit handler reports the batch
        try:
            self._commands.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError):
            log.warning("%s: could not send %s; it is exiting", self.name, message[0])

    def _read_events(self) -> None:
        events = self._events
        try:
            while events is not None and events.poll():
                kind, payload = events.recv()
                self._handle(kind, payload)
        except (EOFError, OSError):
            pass  # the process is gone; _exited reports its jobs

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "event" and self.stream is not None:
            self.stream.push(payload)
        elif kind == "idle" and self.stream is not None:
            stream, self.stream = self.stream, None
            stream.fail_pending(WORKER_DIED, retryable=True)  # never expected: a runner bug
            stream.end()
            self.pool.worker_changed()
        elif kind == "fatal":
            self._fatal = str(payload)
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(PoolError(self._fatal))
        elif kind == "held":
            self.held, self.memory = dict(payload["held"]), dict(payload["memory"])
        elif kind == "ready":
            self._early_deaths = 0
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    def _exited(self) -> None:
        self._read_events()  # what it sent before dying still counts
        code = self._detach()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.fail_pending(POOL_CLOSED if self.pool.closing else WORKER_DIED, retryable=True)
            stream.end()
        if self.pool.closing or self._fatal:
            return
        log.warning(
            "worker %s (pid %s) stopped with exit code %s; restarting it", self.name, self.pid, code
        )
        if self._ready is not None and not self._ready.done():
            self._early_deaths += 1
            if self._early_deaths >= len(self.RESTART_BACKOFF_S):
                self._ready.set_exception(
                    PoolError(
                        f"worker {self.name} stopped while loading (exit code {code}) "
                        f"{self._early_deaths} times in a row; see its log above"
                    )
                )
        delay = self.RESTART_BACKOFF_S[min(self._early_deaths, len(self.RESTART_BACKOFF_S) - 1)]
        asyncio.get_running_loop().call_later(delay, self._respawn)

    def _respawn(self) -> None:
        if not self.pool.closing and self.process is None:
            ready = self._ready
            self.spawn()
            if ready is not None and not ready.done():
                # Whoever awaits the first start keeps waiting on the new process.
                self._ready.add_done_callback(lambda f: _copy_outcome(f, ready))

    def _detach(self) -> int | None:
        loop = asyncio.get_running_loop()
        code = None
        if self.process is not None:
            loop.remove_reader(self.process.sentinel)
            self.process.join(timeout=1)
            code = self.process.exitcode
        if self._events is not None:
            loop.remove_reader(self._events.fileno())
        for connection in (self._events, self._commands):
            if connection is not None:
                connection.close()
        self.process, self._events, self._commands = None, None, None
        self.pool.worker_changed()
        return code

    async def stop(self, timeout_s: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        self.send(("stop", None))
        deadline = time.monotonic() + timeout_s
        while process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if process.is_alive():
            process.kill()
        await asyncio.sleep(0)  # let the sentinel callback run
        if self.process is process:
            self._exited()


def _copy_outcome(source: asyncio.Future, target: asyncio.Future) -> None:
    if target.done():
        return
    if source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(None)


# -- the worker process -------------------------------------------------------------------------


class _Control:
    """Worker-side state the bot can change while a batch runs: a thread reads the
    command pipe so cancel/yield requests land between two denoising steps."""

    def __init__(self, events: Connection) -> None:
        self.events = events
        self.batches: queue.Queue[Batch | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.keep_download: set[str] = set()  # cancelled, but others wait for the model
        self.yielding: set[str] = set()
        self.stopping = False
        self._send_lock = threading.Lock()

    def listen(self, commands: Connection) -> None:
        while True:
            try:
                kind, payload = commands.recv()
            except (EOFError, OSError):
                # The bot is gone (killed, crashed): nobody will read our results.
                os._exit(0)
            if kind == "run":
                self.batches.put(payload)
            elif kind == "cancel":
                self.cancelled.add(payload)
            elif kind == "keep_download":
                self.keep_download.add(payload)
            elif kind == "yield":
                self.yielding.add(payload)
            elif kind == "stop":
                self.stopping = True
                self.batches.put(None)
                return

    def send(self, kind: str, payload: Any = None) -> None:
        with self._send_lock:
            self.events.send((kind, payload))

    def emit(self, event: Event) -> None:
        self.send("event", event)

    def is_cancelled(self, job_id: str) -> bool:
        return self.stopping or job_id in self.cancelled

    def should_yield(self, job_ids: Sequence[str]) -> Callable[[], bool]:
        return lambda: self.stopping or any(job_id in self.yielding for job_id in job_ids)

    def forget(self, job_ids: Sequence[str]) -> None:
        self.cancelled.difference_update(job_ids)
        self.keep_download.difference_update(job_ids)
        self.yielding.difference_update(job_ids)


def worker_main(
    config: Config,
    device: str,
    blobs_root: str,
    name: str,
    commands: Connection,
    events: Connection,
) -> None:
    """The worker process: load the default model, then run batches until told to stop."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
        )
    from pipeline.contract.blobs import BlobStore
    from pipeline.workers.runner import Runner

    control = _Control(events)
    threading.Thread(target=control.listen, args=(commands,), name="commands", daemon=True).start()
    runner = Runner(config, device=device, blobs=BlobStore(blobs_root), name=name)
    try:
        runner.warm_up()
    except DeviceError as exc:  # this worker can never run here: say so and stop
        log.error("worker %s: %s", name, exc)
        control.send("fatal", str(exc))
        return
    except Exception:  # noqa: BLE001 - keep serving: each job will report why it can't run
        log.exception("worker %s could not load the default model", name)
    control.send("held", runner.report())
    control.send("ready", os.getpid())
    while (batch := control.batches.get()) is not None:
        ids = [job_id for job_id, _ in batch]
        runner.run(
            batch,
            control.emit,
            control.is_cancelled,
            control.should_yield(ids),
            keeps_download=control.keep_download.__contains__,
        )
        if runner.broken:
            # A CUDA device-side error leaves this process's CUDA context unusable: end it
            # (its jobs were reported retryable); the pool starts a fresh worker.
            log.error("worker %s exits after a device error (%s)", name, runner.broken)
            os._exit(EXIT_DEVICE_FAULT)
        control.forget(ids)
        control.send("held", runner.report())
        control.send("idle")
    with contextlib.suppress(OSError):
        events.close()
