"""`/metrics` (Prometheus text format, `prometheus-client`) and `/healthz`, served by an
aiohttp listener inside the bot process when `[metrics] listen` is set (off by default).

Counts that live in SQLite (queue depth, jobs by outcome) are read at scrape time with
one GROUP BY, so they survive restarts and agree with /admin stats; what happens in
the process (waits, run times, NSFW blocks, Discord errors) is counted as it happens.
`/healthz` answers 200 when the gateway is connected, a worker is up and the database
takes a write lock, else 503 with the reasons, one per line; while workers are lost or
loading, the workers of each node follow ("workers: node 1a2b3c4d@10.0.0.5: 1 idle, 1 lost").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import discord
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from bot import store
from pipeline.contract.config import listen_address
from pipeline.contract.jobs import Cancelled, Done, Event, Failed, Paused, Started
from pipeline.contract.pool import LOST, STARTING, WorkerInfo, describe_nodes, workers_by_node

if TYPE_CHECKING:
    from bot.services import Services

log = logging.getLogger(__name__)

WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 900, 3600, 10800)
STATUSES = ("queued", "running", "done", "failed", "cancelled")
HEALTH_DB_TIMEOUT_S = 5.0


class Metrics:
    def __init__(self, client: discord.Client, services: Services) -> None:
        self.client = client  # the gateway connection, for /healthz
        self.services = services
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "sdbot_queue_depth", "Jobs waiting in the queue", ["kind"], registry=r
        )
        self.jobs = Gauge(
            "sdbot_jobs", "Jobs in the database by kind and status", ["kind", "status"], registry=r
        )
        self.outcomes = Counter(
            "sdbot_job_outcomes", "Jobs ended since start, by outcome", ["kind", "outcome"],
            registry=r,
        )  # fmt: skip
        self.wait = Histogram(
            "sdbot_job_wait_seconds", "Queued until started", ["kind"], buckets=WAIT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.run = Histogram(
            "sdbot_job_run_seconds", "Started until ended on a worker", ["kind"],
            buckets=RUN_BUCKETS, registry=r,
        )  # fmt: skip
        self.workers = Gauge("sdbot_workers", "Workers by state", ["state"], registry=r)
        self.node_workers = Gauge(
            "sdbot_node_workers", "Workers by node and state (idle, busy, starting, dead, lost)",
            ["node", "state"], registry=r,
        )  # fmt: skip
        self.worker_models = Gauge(
            "sdbot_worker_models", "Models a worker holds (1 per worker and model)",
            ["worker", "model"], registry=r,
        )  # fmt: skip
        self.model_plan = Gauge(
            "sdbot_worker_model_plan", "The memory plan each loaded model uses (1 per worker, "
            "model and plan: full, fp8, offload, fp8-offload, group, sequential; none)",
            ["worker", "model", "plan"], registry=r,
        )  # fmt: skip
        self.model_estimated = Gauge(
            "sdbot_worker_model_estimated_peak_bytes", "The memory plan's estimated peak of a "
            "loaded model", ["worker", "model"], registry=r,
        )  # fmt: skip
        self.model_peak = Gauge(
            "sdbot_worker_model_peak_bytes", "Peak memory measured over a loaded model's jobs: "
            "GPU allocated (measure=gpu) or the worker's peak RSS (measure=rss)",
            ["worker", "model", "measure"], registry=r,
        )  # fmt: skip
        self.placements = Gauge(
            "sdbot_batch_placements", "Batches handed to workers since start, by what their "
            "model cost: warm (loaded), room (a load), swap (a load that unloaded another)",
            ["placement"], registry=r,
        )  # fmt: skip
        self.gpu_memory = Gauge(
            "sdbot_worker_gpu_memory_bytes", "GPU memory a worker holds (last job)", ["worker"],
            registry=r,
        )  # fmt: skip
        self.nsfw_blocks = Counter(
            "sdbot_nsfw_blocks", "Images and input photos withheld by the NSFW policy",
            ["stage"], registry=r,
        )  # fmt: skip
        self.refusals = Counter(
            "sdbot_refusals", "Commands refused by rate limits and quotas", ["reason"], registry=r
        )
        self.discord_errors = Counter(
            "sdbot_discord_http_errors", "Discord API errors by HTTP status", ["status"],
            registry=r,
        )  # fmt: skip
        self._started: dict[str, float] = {}

    # -- counting as it happens ----------------------------------------------------------------

    def on_job_event(self, row: dict, event: Event) -> None:
        kind = row.get("kind", "generate")
        now = time.time()
        if isinstance(event, Started):
            self._started[event.job_id] = now
            self.wait.labels(kind).observe(max(0.0, now - float(row.get("created_at") or now)))
        elif isinstance(event, (Done, Failed, Cancelled, Paused)):
            started = self._started.pop(event.job_id, None)
            if started is not None:
                self.run.labels(kind).observe(max(0.0, now - started))
            if isinstance(event, Failed) and row.get("status") == "queued":
                return  # retried, not ended
            self.outcomes.labels(kind, event.type).inc()
            if isinstance(event, Done) and "gpu_memory_bytes" in event.info:
                worker = str(event.info.get("worker", "?"))
                self.gpu_memory.labels(worker).set(event.info["gpu_memory_bytes"])

    def safety_refusal(self, what: str, n: int = 1) -> None:
        if what in ("input", "result"):
            self.nsfw_blocks.labels(what).inc(n)
        else:
            self.refusals.labels(what).inc(n)

    def watch(self) -> None:
        """Hear every job event the dispatcher reports, and count Discord's error statuses
        (both by wrapping the one callable each goes through)."""
        dispatcher = self.services.dispatcher
        on_event = dispatcher.on_event

        async def counted_event(row: dict, event: Event) -> None:
            self.on_job_event(row, event)
            await on_event(row, event)

        dispatcher.on_event = counted_event
        http = self.client.http
        original = http.request

        async def request(route: Any, **kwargs: Any) -> Any:
            try:
                return await original(route, **kwargs)
            except discord.HTTPException as exc:
                self.discord_errors.labels(str(exc.status)).inc()
                raise

        http.request = request  # type: ignore[method-assign]

    # -- at scrape time -----------------------------------------------------------------------

    async def scrape(self) -> bytes:
        counts = await self.services.db.call(store.metrics_counts)
        self.jobs.clear()
        self.queue_depth.clear()
        for kind in ("generate", "train"):
            self.queue_depth.labels(kind).set(0)
            for status in STATUSES:
                self.jobs.labels(kind, status).set(0)
        for row in counts["jobs"]:
            self.jobs.labels(row["kind"], row["status"]).set(row["n"])
            if row["status"] == "queued":
                self.queue_depth.labels(row["kind"]).set(row["n"])
        self.workers.clear()
        states = {"idle": 0, "busy": 0, "starting": 0, "dead": 0}
        for _, state in self.services.pool.worker_states():
            states[state] = states.get(state, 0) + 1
        for state, n in states.items():
            self.workers.labels(state).set(n)
        self._scrape_nodes()
        return generate_latest(self.registry)

    def _scrape_nodes(self) -> None:
        pool = self.services.pool
        workers = pool.workers()
        self.node_workers.clear()
        for node, counts in workers_by_node(workers).items():
            for state, n in counts.items():
                self.node_workers.labels(node, state).set(n)
        self.worker_models.clear()
        for worker in workers:
            for model in worker.held:
                self.worker_models.labels(worker.name, model).set(1)
        self._scrape_memory(workers)
        for placement, n in getattr(pool, "placements", {}).items():
            self.placements.labels(placement or "unknown").set(n)

    def _scrape_memory(self, workers: list[WorkerInfo]) -> None:
        for gauge in (self.model_plan, self.model_estimated, self.model_peak):
            gauge.clear()
        for worker in workers:
            for model, memory in worker.memory.items():
                self.model_plan.labels(worker.name, model, memory.plan or "none").set(1)
                if memory.estimated_bytes:
                    self.model_estimated.labels(worker.name, model).set(memory.estimated_bytes)
                if memory.peak_bytes:
                    peak = self.model_peak.labels(worker.name, model, memory.measure)
                    peak.set(memory.peak_bytes)

    async def health(self) -> list[str]:
        """What is wrong (empty: healthy)."""
        problems = []
        bot = self.client
        ws = getattr(bot, "ws", None)
        socket = getattr(ws, "socket", None)
        if bot.is_closed() or not bot.is_ready() or socket is None or socket.closed:
            problems.append("gateway: not connected to Discord")
        states = [state for _, state in self.services.pool.worker_states()]
        if not any(state in ("idle", "busy") for state in states):
            described = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
            problems.append(f"workers: none ready ({described or 'no workers'})")
            problems += self.notes()
        try:
            await asyncio.wait_for(self.services.db.call(_write_check), HEALTH_DB_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            problems.append(f"database: not writable ({type(exc).__name__}: {exc})")
        return problems

    def notes(self) -> list[str]:
        """Workers per node, when some are lost or loading (shown by /healthz)."""
        workers = self.services.pool.workers()
        if not any(w.state in (LOST, STARTING) for w in workers):
            return []
        return [f"workers: {line}" for line in describe_nodes(workers)]


def _write_check(db: Any) -> None:
    db.conn.execute("BEGIN IMMEDIATE")
    db.conn.rollback()


class MetricsServer:
    """The aiohttp listener; `port` is the bound one (useful with port 0)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        address = listen_address(self.metrics.services.config)
        if address is None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address[0], address[1])
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("metrics on http://%s:%d/metrics and /healthz", address[0], self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        problems = await self.metrics.health()
        if problems:
            return web.Response(status=503, text="\n".join(problems) + "\n")
        return web.Response(text="".join(f"{line}\n" for line in ["ok", *self.metrics.notes()]))
