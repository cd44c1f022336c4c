"""RayPool: the same Runner inside Ray actors, one per GPU of every live node of a Ray cluster.

Imported only when `workers.backend = "ray"` (see `pipeline.workers.local_pool.make_pool`).

- The pool follows the cluster: a watcher reads Ray's node table every `NODE_POLL_S` and
  keeps the planned actors on every live node (`workers.devices`, per node: "auto" = one
  per GPU). An actor is pinned to its node; a node that joins gets its actors within
  seconds, and a node that leaves takes its actors out of the pool at once: a batch
  running there is reported `Failed(retryable=True)` (the dispatcher runs it elsewhere).
- Each actor is restarted by Ray when its process dies (`max_restarts=-1`); the batch
  it was running is reported `Failed(retryable=True)` and the worker counts as starting
  until the restarted actor answers.
- Events stream back through a Ray streaming generator (`run`), pumped into a
  `BatchStream` by a task, so a lost node can end the stream without waiting for Ray.
- The actor is threaded (`max_concurrency`), so `cancel` and `request_yield` run while
  `run` is busy and flip flags the Runner checks between denoising steps.
- Input images and LoRA files travel through Ray's object store (`ray.put`) and are
  cached on the worker's machine by sha256 in a local BlobStore; the pool first asks
  the actor which blobs it lacks, so a LoRA crosses the network once per machine.
- Each actor reports the models (and LoRAs) it holds; `run` prefers a free actor that
  holds the batch's model (`pipeline.contract.pool.pick_worker`).
- Joining the cluster never blocks the event loop and has a time limit
  (`workers.ray_connect_timeout_s`): a bad address is one `PoolError` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import pipeline
from pipeline.contract.blobs import BlobStore, sha256_hex
from pipeline.contract.config import Config
from pipeline.contract.jobs import Event
from pipeline.contract.pool import (
    BUSY,
    IDLE,
    LOST,
    POOL_CLOSED,
    STARTING,
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
from pipeline.contract.version import sdbot_version

log = logging.getLogger(__name__)

ACTOR_CONCURRENCY = 4  # run + cancel/yield/pid calls arriving while it runs
NODE_POLL_S = 0.5  # how often the node table is read: a join or a loss is seen this fast
LOST_SHOWN_S = 600.0  # a lost worker stays in worker_states (as "lost") this long
GCS_PORT, CLIENT_PORT = 6379, 10001  # Ray's defaults: `ray start --head`, Ray Client
_CODE_ROOT = Path(pipeline.__file__).resolve().parent.parent
WORKER_BUG = "the worker hit an internal error; the job id is in the logs"


def default_cache_dir() -> Path:
    """Where a worker machine caches blobs it was sent (SDBOT_RAY_BLOB_CACHE overrides)."""
    return Path(
        os.environ.get("SDBOT_RAY_BLOB_CACHE") or Path(tempfile.gettempdir()) / "sdbot-blob-cache"
    )


def code_fingerprint(root: Path | None = None) -> str:
    """A hash of `pipeline/contract/`: the job specs and events both sides exchange. Two
    sdbot copies that agree on it can work together, whatever their version strings say."""
    contract = (root or Path(pipeline.__file__).resolve().parent) / "contract"
    digest = hashlib.sha256()
    for path in sorted(contract.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class RayWorker:
    """The actor: one Runner on one device. Wrapped with `ray.remote` by the pool."""

    def __init__(self, config: Config, device: str, cache_dir: str, name: str) -> None:
        from pipeline.workers.runner import Runner

        logging.basicConfig(level=logging.INFO)
        self.blobs = BlobStore(cache_dir)
        self.runner = Runner(config, device=device, blobs=self.blobs, name=name)
        self.cancelled: set[str] = set()
        self.keep_download: set[str] = set()  # cancelled, but others wait for the model
        self.yielding: set[str] = set()
        try:
            self.runner.warm_up()
        except Exception:  # noqa: BLE001 - keep serving: each job will report why
            log.exception("worker %s could not load the default model", name)

    def pid(self) -> int:
        return os.getpid()

    def hello(self) -> dict[str, Any]:
        """Who this actor is: answered once its model is loaded (the pool's "ready")."""
        return {
            "pid": os.getpid(),
            "version": sdbot_version(),
            "code": code_fingerprint(),
            **self.runner.report(),
        }

    def report(self) -> dict[str, Any]:
        return self.runner.report()

    def missing(self, shas: Sequence[str]) -> list[str]:
        return [sha for sha in shas if not self.blobs.exists(sha)]

    def put_blobs(self, names: Sequence[tuple[str, str]], *datas: bytes) -> None:
        """Cache blobs sent from the bot; `names` holds (sha256, suffix) per blob."""
        for (sha, suffix), data in zip(names, datas):
            if sha256_hex(data) != sha:
                raise ValueError(f"blob {sha[:12]}… arrived damaged")
            self.blobs.put(data, suffix)

    def cancel(self, job_id: str, keep_download: bool = False) -> None:
        if keep_download:  # before the cancel: the runner must never see one alone
            self.keep_download.add(job_id)
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
                    keeps_download=self.keep_download.__contains__,
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
        self.keep_download.difference_update(ids)
        self.yielding.difference_update(ids)


class _Handle:
    """The pool's view of one actor, pinned to one node."""

    def __init__(self, actor: Any, name: str, node: RayNode, device: str) -> None:
        self.actor = actor
        self.name = name
        self.node = node
        self.device = device
        self.state = STARTING  # until the actor answers `hello` (its model is loaded)
        self.pid: int | None = None
        self.held: dict[str, list[str]] = {}
        self.memory: dict[str, ModelMemory] = {}  # the held models' plans and measured peaks
        self.stream: BatchStream | None = None
        self.pump: asyncio.Task | None = None
        self.waiting: asyncio.Task | None = None  # the start or revival being awaited
        self.lost_at = 0.0
        self.retire = False  # no longer planned on its node: removed once free

    @property
    def is_free(self) -> bool:
        return self.state == IDLE and self.stream is None and not self.retire

    def info(self) -> WorkerInfo:
        state = BUSY if self.state == IDLE and self.stream is not None else self.state
        return WorkerInfo(self.name, state, self.node.label, dict(self.held), dict(self.memory))


class RayNode:
    """One live node of the cluster, as read from `ray.nodes()`."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.id: str = entry["NodeID"]
        self.address: str = entry.get("NodeManagerAddress", "?")
        resources = entry.get("Resources", {})
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = int(resources.get("CPU", 0))
        self.label = f"{self.id[:8]}@{self.address}"


class RayPool(WorkerPool):
    """Actors on every live node of the cluster; see the module docstring."""

    def __init__(
        self, config: Config, *, blobs: BlobStore | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.config = config
        self.blobs = blobs or BlobStore(config.storage.blobs)
        self.cache_dir = str(cache_dir or default_cache_dir())
        self._handles: list[_Handle] = []  # live (starting, idle, busy)
        self._lost: list[_Handle] = []  # lost with their node, shown for LOST_SHOWN_S
        self._bad_nodes: dict[str, str] = {}  # node id → why its actors are not used
        self._changed: asyncio.Event | None = None
        self._owns_ray = False
        self._closing = False
        self._remote: Any = None
        self._runtime_env: dict[str, Any] = {}
        self._watcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # starts and revivals in flight
        self._counter = 0
        self._warned_no_gpu = False
        self.placements: dict[str, int] = {}  # batches by model placement (warm/room/swap)

    @property
    def closing(self) -> bool:  # read by take_free_worker, as LocalPool.closing is
        return self._closing

    @property
    def capacity(self) -> int:  # type: ignore[override]
        """Live workers (loading ones included): batches that can run at once."""
        return len(self._handles)

    async def start(self) -> None:
        self._changed = asyncio.Event()
        workers = self.config.workers
        self._owns_ray = await connect(workers.ray_address, workers.ray_connect_timeout_s)
        self._remote = ray.remote(RayWorker)
        # When Ray was started by the caller (tests, a notebook), the code cannot be
        # shipped any more (Ray allows that only in ray.init): point the actors at this
        # checkout, which works on this machine; other machines need sdbot installed.
        if not self._owns_ray:
            self._runtime_env = {"env_vars": {"PYTHONPATH": str(_CODE_ROOT)}}
        await self._sync_nodes(first=True)
        if not self._handles:
            log.warning("the Ray cluster has no node for a worker yet: jobs wait until one joins")
        first = [h.waiting for h in self._handles if h.waiting is not None]
        try:
            await asyncio.gather(*first)
        except RayError as exc:
            await self.close()
            raise PoolError(f"a Ray worker could not start: {exc}") from exc
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for handle in self._handles:
            self._end_stream(handle, POOL_CLOSED)
            _kill(handle.actor)
        self._handles = []
        self._worker_changed()
        if self._owns_ray:
            ray.shutdown()

    def free_workers(self) -> int:
        return sum(1 for handle in self._handles if handle.is_free)

    def workers(self) -> list[WorkerInfo]:
        cutoff = time.monotonic() - LOST_SHOWN_S
        self._lost = [h for h in self._lost if h.lost_at > cutoff]
        return [h.info() for h in self._handles] + [h.info() for h in self._lost]

    async def run(self, batch: Batch) -> AsyncIterator[Event]:
        if not batch:
            return
        handle = await self._free_handle(batch_model(self.config, batch))
        stream = handle.stream = BatchStream([job_id for job_id, _ in batch])
        handle.pump = self._spawn(self._pump(handle, batch, stream))
        try:
            async for event in stream.events():
                yield event
        finally:
            handle.pump.cancel()
            if handle.state != LOST:
                for job_id in stream.pending:  # the caller stopped listening: stop the jobs
                    handle.actor.cancel.remote(job_id)
            handle.stream = handle.pump = None
            if handle.retire:
                self._remove(handle)
            self._worker_changed()

    async def cancel(self, job_id: str, *, keep_download: bool = False) -> None:
        handle = self._handle_of(job_id)
        if handle is not None:
            await handle.actor.cancel.remote(job_id, keep_download)

    def request_yield(self, job_id: str) -> None:
        handle = self._handle_of(job_id)
        if handle is not None:
            handle.actor.request_yield.remote(job_id)

    async def worker_pid(self, job_id: str) -> int | None:
        handle = self._handle_of(job_id)
        return None if handle is None else handle.pid

    # -- following the cluster --------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(NODE_POLL_S)
            try:
                await self._sync_nodes()
            except Exception:  # noqa: BLE001 - a GCS hiccup must not stop the watcher
                log.exception("could not read the Ray cluster's nodes; trying again")

    async def _sync_nodes(self, *, first: bool = False) -> None:
        """Lose the actors of nodes that left; start the planned ones on every live node."""
        entries = await asyncio.to_thread(ray.nodes)
        nodes = {n.id: n for n in (RayNode(e) for e in entries if e.get("Alive"))}
        for handle in list(self._handles):
            if handle.node.id not in nodes:
                self._lose(handle)
        self._bad_nodes = {k: v for k, v in self._bad_nodes.items() if k in nodes}
        plan = self._plan(list(nodes.values()))
        for node in nodes.values():
            if node.id in self._bad_nodes:
                continue
            wanted = plan.get(node.id, [])
            have = [h for h in self._handles if h.node.id == node.id]
            for handle in have[len(wanted) :]:
                handle.retire = True
                if handle.stream is None:
                    self._remove(handle)
            for device, gpus in wanted[len(have) :]:
                self._add(node, device, gpus, first=first)

    def _plan(self, nodes: list[RayNode]) -> dict[str, list[tuple[str, int]]]:
        """(device, GPUs to reserve) per actor, for each node. `workers.devices` describes
        each node: "auto" = one actor per GPU, "cuda[:N]" = one GPU actor each (up to the
        node's GPUs), "cpu" = one CPU actor each (up to the node's CPUs). Ray sets
        CUDA_VISIBLE_DEVICES for each actor, so its one GPU is always "cuda" inside it."""
        devices = self.config.workers.devices
        any_gpu = any(node.gpus for node in nodes)
        if "auto" in devices and not any_gpu and nodes and not self._warned_no_gpu:
            self._warned_no_gpu = True
            cpus = sum(node.cpus for node in nodes)
            log.warning(
                "workers.devices = ['auto'] found no GPU on the Ray cluster (%d nodes, %d CPUs): "
                "one CPU worker per node until a GPU node joins; set devices = ['cpu'] to mean it",
                len(nodes),
                cpus,
            )
        return plan_actors(devices, nodes)

    def _add(self, node: RayNode, device: str, gpus: int, *, first: bool = False) -> None:
        self._counter += 1
        name = f"ray-{self._counter}-{device}@{node.id[:8]}"
        actor = self._remote.options(
            num_cpus=1,
            num_gpus=gpus,
            max_restarts=-1,
            max_concurrency=ACTOR_CONCURRENCY,
            runtime_env=self._runtime_env,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
        ).remote(self.config, device, self.cache_dir, name)
        handle = _Handle(actor, name, node, device)
        self._handles.append(handle)
        handle.waiting = self._spawn(self._until_ready(handle, first=first))
        log.info("worker %s starting on node %s", name, node.label)
        self._worker_changed()

    def _lose(self, handle: _Handle) -> None:
        """Its node left: out of the pool now; a batch running there fails retryably."""
        log.warning("worker %s lost: node %s left the cluster", handle.name, handle.node.label)
        self._remove(handle)
        handle.state, handle.lost_at = LOST, time.monotonic()
        self._lost.append(handle)
        self._end_stream(handle, WORKER_DIED)

    def _remove(self, handle: _Handle) -> None:
        if handle in self._handles:
            self._handles.remove(handle)
        if handle.waiting is not None and handle.waiting is not asyncio.current_task():
            handle.waiting.cancel()  # (not when that wait itself removes it: it returns)
        _kill(handle.actor)
        self._worker_changed()

    def _end_stream(self, handle: _Handle, message: str) -> None:
        if handle.pump is not None:
            handle.pump.cancel()
        if handle.stream is not None:
            handle.stream.fail_pending(message, retryable=True)
            handle.stream.end()

    async def _until_ready(self, handle: _Handle, *, first: bool = False) -> None:
        """Wait until the actor answers (a new one has loaded its model; a restarted one
        is back): calls made while Ray restarts it fail at once and would burn attempts."""
        handle.state = STARTING
        while True:
            try:
                hello = await handle.actor.hello.remote()
                break
            except ActorDiedError as exc:  # for good: it cannot start there, or the node left
                if first:
                    raise
                alive = {e["NodeID"] for e in await asyncio.to_thread(ray.nodes) if e["Alive"]}
                if handle.node.id not in alive:
                    self._lose(handle)
                else:
                    self._refuse_node(handle.node, f"its worker cannot start: {_first_line(exc)}")
                return
            except RayError:  # restarting: calls fail at once until it is back
                await asyncio.sleep(0.5)
        handle.pid = hello["pid"]
        handle.held, handle.memory = dict(hello["held"]), dict(hello["memory"])
        if hello["code"] != code_fingerprint():
            self._refuse_node(handle.node, _version_mismatch(hello))
            return
        handle.state = IDLE
        log.info("worker %s ready on node %s (pid %s)", handle.name, handle.node.label, handle.pid)
        self._worker_changed()

    def _refuse_node(self, node: RayNode, reason: str) -> None:
        """Use no worker on this node while it stays in the cluster; say why once."""
        why = f"Ray node {node.label}: {reason}"
        if node.id not in self._bad_nodes:
            log.error("%s", why)
        self._bad_nodes[node.id] = why
        for handle in [h for h in self._handles if h.node.id == node.id]:
            self._remove(handle)

    # -- one batch ----------------------------------------------------------------------------

    async def _pump(self, handle: _Handle, batch: Batch, stream: BatchStream) -> None:
        """Move the actor's events into the batch's stream, then note what it holds."""
        try:
            await self._send_blobs(handle, batch)
            refs = handle.actor.run.options(num_returns="streaming").remote(batch)
            async for ref in refs:
                stream.push(await ref)
            report = await handle.actor.report.remote()
            handle.held, handle.memory = dict(report["held"]), dict(report["memory"])
        except RayTaskError as exc:  # the actor lived but the method raised: a bug
            log.error("worker %s failed a batch: %s", handle.name, exc)
            stream.fail_pending(WORKER_BUG, retryable=False)
        except RayError as exc:  # the actor died or is restarting (or its node left)
            log.warning("worker %s stopped during a batch: %r", handle.name, exc)
            if handle.state != LOST and handle in self._handles:
                handle.held, handle.memory = {}, {}
                handle.waiting = self._spawn(self._until_ready(handle))
            stream.fail_pending(WORKER_DIED, retryable=True)
        finally:
            stream.end()

    async def _send_blobs(self, handle: _Handle, batch: Batch) -> None:
        shas = sorted({sha for _, spec in batch for sha in spec.blob_refs()})
        if not shas:
            return
        wanted = [sha for sha in await handle.actor.missing.remote(shas) if self.blobs.exists(sha)]
        if wanted:  # one the bot lacks too is left for the Runner to report by name
            names = [(sha, self.blobs.path(sha).suffix) for sha in wanted]
            refs = [ray.put(self.blobs.get(sha)) for sha in wanted]
            await handle.actor.put_blobs.remote(names, *refs)

    async def _free_handle(self, model: str | None) -> _Handle:
        # With no free worker the pool waits, for a node that joins too.
        return await take_free_worker(self, lambda: [h for h in self._handles if h.is_free], model)

    def _handle_of(self, job_id: str) -> _Handle | None:
        return worker_running(self._handles, job_id)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _worker_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()


def plan_actors(
    devices: Sequence[str], nodes: Sequence[RayNode]
) -> dict[str, list[tuple[str, int]]]:
    """node id → (device, GPUs to reserve) per actor: see `RayPool._plan`."""
    any_gpu = any(node.gpus for node in nodes)
    plan: dict[str, list[tuple[str, int]]] = {}
    for node in nodes:
        gpu_entries = sum(1 for d in devices if d.startswith("cuda"))
        cpu_entries = sum(1 for d in devices if d == "cpu")
        if "auto" in devices:
            gpu_entries = node.gpus
            cpu_entries += 0 if any_gpu else 1
        actors = [("cuda", 1)] * min(gpu_entries, node.gpus)
        actors += [("cpu", 0)] * min(cpu_entries, node.cpus)
        plan[node.id] = actors
    return plan


def _version_mismatch(hello: dict[str, Any]) -> str:
    return (
        f"runs sdbot {hello['version']} (contract {hello['code']}), the bot runs sdbot "
        f"{sdbot_version()} (contract {code_fingerprint()}); its workers are not used: install "
        "the bot's sdbot there"
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayError, ValueError):
        pass  # already gone with its node


# -- joining the cluster ---------------------------------------------------------------------


async def connect(address: str, timeout_s: float) -> bool:
    """Join the Ray cluster at `address` ("local": start one on this machine), in a thread
    and within `timeout_s`. Returns True when this call started Ray (close() shuts it down)."""
    if ray.is_initialized():
        return False
    remote = address not in ("", "local", "auto")
    if remote:
        await asyncio.to_thread(probe_address, address, min(timeout_s, 10.0))
    try:
        await asyncio.wait_for(_in_daemon_thread(_init, address), timeout_s)
    except asyncio.TimeoutError:
        # The thread is left behind (ray.init cannot be interrupted); a daemon thread, so
        # the process can still exit.
        raise PoolError(
            f"no Ray cluster answered at workers.ray_address = {address!r} within {timeout_s:g} s"
            f" (workers.ray_connect_timeout_s); is `ray start --head` running there?"
        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise PoolError(
            f"cannot join the Ray cluster at workers.ray_address = {address!r}: {exc}"
        ) from exc
    return True


def _in_daemon_thread(fn: Any, *args: Any) -> asyncio.Future:
    """`fn(*args)` in a daemon thread: unlike asyncio.to_thread's executor, nothing waits
    for it at exit (asyncio.run joins its executor's threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(outcome: Any, failed: bool) -> None:
        if future.done():  # wait_for gave up on it
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            outcome, failed = fn(*args), False
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, outcome, failed)

    threading.Thread(target=work, name="ray-init", daemon=True).start()
    return future


def _init(address: str) -> None:
    # Ship `pipeline` with the job, so every machine runs the bot's version of it
    # (torch, diffusers etc. must be installed there).
    runtime_env = {"py_modules": [str(_CODE_ROOT / "pipeline")]}
    if address in ("", "local"):
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe_address(address: str, timeout_s: float) -> None:
    """A quick check before ray.init, which waits minutes on a wrong address: something
    must listen there and answer as Ray's head does (gRPC: an HTTP/2 SETTINGS frame)."""
    setting = f"workers.ray_address = {address!r}"
    client = address.startswith("ray://")
    target = address.removeprefix("ray://")
    host, _, port_text = target.rpartition(":") if ":" in target else (target, "", "")
    try:
        port = int(port_text) if port_text else (CLIENT_PORT if client else GCS_PORT)
    except ValueError:
        raise PoolError(
            f"{setting} is not host:port (e.g. 'head:6379' or 'ray://head:10001')"
        ) from None
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(HTTP2_PREFACE)
            reply = sock.recv(9)
    except socket.gaierror:
        raise PoolError(f"{setting}: no such host {host!r}") from None
    except TimeoutError:
        raise PoolError(f"{setting}: no answer from {host}:{port} within {timeout_s:g} s") from None
    except OSError as exc:
        raise PoolError(f"{setting}: cannot reach {host}:{port} ({exc.strerror or exc})") from None
    if len(reply) < 4 or reply[3] != 4:  # frame type 4: SETTINGS
        raise PoolError(
            f"{setting}: {host}:{port} answered, but not as a Ray cluster; give the head's "
            f"address (port {GCS_PORT} by default, or ray://head:{CLIENT_PORT} for Ray Client)"
        )
