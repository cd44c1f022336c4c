"""RayPool on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
a head with no CPUs (it runs no worker) and 1-CPU worker nodes, each its own raylet.
Nodes join and leave for real (`add_node` / `remove_node` start and kill their raylets
and the actor processes on them); jobs run the tiny model through the real dispatcher.

The cluster is started once for the module (Ray is heavy on a small machine); each test
brings the cluster to the nodes it needs, so they hold in any order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.services.metrics import Metrics
from pipeline.contract.jobs import Done, Event, Failed, Started
from pipeline.contract.pool import IDLE, LOST
from tests.test_dispatcher import Harness
from tests.test_runner import (
    assert_streamed,
    make_config,
    one_cpu_thread_per_worker,
    small,
    tiny_models,
)

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sdbot[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.workers.doctor import check_ray  # noqa: E402
from pipeline.workers.ray_pool import RayNode, RayPool  # noqa: E402

module_loop = pytest.mark.asyncio(loop_scope="module")
STORE_BYTES = 80 * 2**20  # each node's object store: the tiny model's PNGs need little
WAIT_LIMIT_S = 90  # a safety net for waits on the cluster, never a measured time


class LoopbackCluster:
    """The Cluster plus the worker nodes it has now."""

    def __init__(self) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "object_store_memory": STORE_BYTES,
            },
        )
        self.nodes: list[Any] = []

    def add(self) -> str:
        """Start a 1-CPU worker node; its node id."""
        node = self.cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
        self.nodes.append(node)
        return node.node_id

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.nodes if n.node_id == node_id)
        self.nodes.remove(node)
        self.cluster.remove_node(node)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    cluster = LoopbackCluster()
    cluster.add()
    cluster.add()
    ray.init(address=cluster.cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(cluster: LoopbackCluster, tmp_path_factory: pytest.TempPathFactory):
    models = dict(tiny_models(tmp_path_factory.getbasetemp() / "models"))
    # A second model for affinity: the same weights under another name load apart.
    other = tmp_path_factory.getbasetemp() / "models" / "other"
    if not other.exists():
        shutil.copytree(models["tiny"], other)
    models["other"] = other
    data = tmp_path_factory.mktemp("data-cluster")
    config = make_config(models, data, backend="ray", devices=["cpu"], max_models=1)
    pool = RayPool(config, cache_dir=tmp_path_factory.mktemp("ray-cache"))
    with one_cpu_thread_per_worker():
        await pool.start()
        yield pool
        await pool.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT_LIMIT_S / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not after {WAIT_LIMIT_S} s")


def ready_nodes(pool: RayPool) -> list[str]:
    """Node labels of the workers that are ready and free."""
    return [w.node for w in pool.workers() if w.state == IDLE]


def label(node_id: str) -> str:
    return node_id[:8]


async def with_nodes(cluster: LoopbackCluster, pool: RayPool, n: int) -> None:
    while len(cluster.nodes) < n:
        cluster.add()
    await until(lambda: len(ready_nodes(pool)) == n, f"{n} ready workers")


async def collect(pool: RayPool, job_id: str, spec: Any) -> list[Event]:
    return [event async for event in pool.run([(job_id, spec)])]


def ran_on(events: list[Event]) -> str:
    return next(e.worker for e in events if isinstance(e, Started))


@module_loop
async def test_an_idle_node_lost_leaves_the_pool_at_once_and_burns_no_attempt(
    cluster: LoopbackCluster, pool: RayPool
) -> None:
    await with_nodes(cluster, pool, 2)
    gone = cluster.nodes[-1].node_id
    cluster.remove(gone)
    await until(lambda: pool.capacity == 1, "the lost node's worker out of the pool")
    assert pool.free_workers() == 1
    states = {w.node: w.state for w in pool.workers() if label(gone) in w.node}
    assert list(states.values()) == [LOST]
    # /metrics and /healthz show it: the bot's Metrics over this pool, parsed as Prometheus.
    metrics = Metrics(client=None, services=SimpleNamespace(pool=pool))  # type: ignore[arg-type]
    metrics._scrape_nodes()
    samples = {
        (s.labels["node"], s.labels["state"]): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name == "sdbot_node_workers"
    }
    (gone_node,) = states
    assert samples[(gone_node, "lost")] == 1
    assert sum(v for (node, state), v in samples.items() if state == "idle") == 1
    assert f"workers: node {gone_node}: 1 lost" in metrics.notes()
    events = await collect(pool, "after-loss", small())
    assert_streamed(events, "after-loss")  # Started, Progress…, Done: no Failed
    assert label(gone) not in ran_on(events)


@module_loop
async def test_a_node_that_joins_gets_a_worker_and_jobs_run_there(
    cluster: LoopbackCluster, pool: RayPool
) -> None:
    await until(lambda: len(ready_nodes(pool)) == len(cluster.nodes), "every node's worker")
    before = pool.capacity
    joined = cluster.add()
    await until(lambda: any(label(joined) in n for n in ready_nodes(pool)), "the new node's worker")
    assert pool.capacity == before + 1
    # Two batches at once: one of them can only run on the node that joined.
    first, second = await asyncio.gather(
        collect(pool, "join-1", small(seed=1)), collect(pool, "join-2", small(seed=2))
    )
    assert isinstance(first[-1], Done) and isinstance(second[-1], Done)
    assert label(joined) in ran_on(first) + ran_on(second)


@module_loop
async def test_model_affinity_sends_a_job_to_the_worker_that_holds_its_model(
    cluster: LoopbackCluster, pool: RayPool
) -> None:
    await with_nodes(cluster, pool, 2)
    # max_models = 1: a worker holds one model. Load "other" on one worker; the other
    # worker keeps the default model.
    swapped = ran_on(await collect(pool, "aff-1", small(model="other")))
    await until(lambda: pool.free_workers() == 2, "both workers free")
    held = {w.name: list(w.held) for w in pool.workers() if w.state == IDLE}
    assert held[swapped] == ["other"] and sorted(held.values()) == [["other"], ["tiny"]]
    before = dict(pool.placements)
    # Each job goes to the worker that holds its model, whichever comes first in order.
    assert ran_on(await collect(pool, "aff-2", small(model="tiny"))) != swapped
    assert ran_on(await collect(pool, "aff-3", small(model="other"))) == swapped
    assert pool.placements.get("warm", 0) - before.get("warm", 0) == 2
    assert pool.placements.get("swap", 0) == before.get("swap", 0)


@module_loop
async def test_a_busy_node_lost_its_job_is_done_elsewhere_exactly_once(
    cluster: LoopbackCluster, pool: RayPool, tmp_path: Path
) -> None:
    await with_nodes(cluster, pool, 2)
    harness = Harness(pool, tmp_path, batch_size=1)
    # Long enough that the node is gone before the job ends, however fast the machine.
    job = harness.enqueue("ann", small(width=320, height=320, steps=150))
    lost: list[str] = []

    async def lose_the_node_it_runs_on(row: dict, event: Event) -> None:
        if isinstance(event, Started) and not lost:
            (node,) = [n.node_id for n in cluster.nodes if label(n.node_id) in event.worker]
            lost.append(node)
            await asyncio.to_thread(cluster.remove, node)

    harness.on_event_hook = lose_the_node_it_runs_on
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(WAIT_LIMIT_S)
    finally:
        await dispatcher.stop()
    harness.check_hooks()
    assert harness.job(job)["status"] == "done"
    assert len(harness.heard_of(job, Done)) == 1  # not lost, not duplicated
    failed = harness.heard_of(job, Failed)
    assert [(f.message, f.retryable) for f in failed] == [("the worker stopped unexpectedly", True)]
    assert harness.job(job)["attempts"] == 1  # the one the lost node took
    first, again = harness.heard_of(job, Started)
    assert label(lost[0]) in first.worker and label(lost[0]) not in again.worker


@module_loop
async def test_auto_devices_on_a_cluster_without_gpus_says_what_it_found(
    cluster: LoopbackCluster, pool: RayPool, caplog: pytest.LogCaptureFixture
) -> None:
    workers = dataclasses.replace(pool.config.workers, devices=("auto",))
    auto = RayPool(dataclasses.replace(pool.config, workers=workers))
    nodes = [RayNode(entry) for entry in ray.nodes() if entry["Alive"]]
    with caplog.at_level(logging.WARNING, logger="pipeline.workers.ray_pool"):
        plan = auto._plan(nodes)
    cpus = len(cluster.nodes)  # one per worker node; the head has none
    assert [r.getMessage() for r in caplog.records] == [
        f"workers.devices = ['auto'] found no GPU on the Ray cluster ({len(nodes)} nodes, "
        f"{cpus} CPUs): one CPU worker per node until a GPU node joins; set devices = ['cpu'] "
        "to mean it"
    ]
    # A CPU worker on each worker node, none on the head (no CPU to give).
    assert sorted(plan.values()) == [[]] + [[("cpu", 0)]] * cpus


@module_loop
async def test_doctor_lists_the_nodes_their_gpus_and_the_workers(
    cluster: LoopbackCluster, pool: RayPool, capsys: pytest.CaptureFixture[str]
) -> None:
    await until(lambda: len(ready_nodes(pool)) == len(cluster.nodes), "every node's worker")
    config = dataclasses.replace(
        pool.config,
        workers=dataclasses.replace(pool.config.workers, ray_address=cluster.cluster.address),
    )
    assert await asyncio.to_thread(check_ray, config) == 0
    lines = capsys.readouterr().out.splitlines()
    alive = [node for node in ray.nodes() if node["Alive"]]
    assert lines[0].startswith(f"[ok  ] ray: cluster at '{cluster.cluster.address}', Ray ")
    assert f", {len(alive)} node(s) alive" in lines[0]
    by_node = {line.split(":")[0]: line for line in lines[1:]}
    for node in cluster.nodes:
        (line,) = [v for k, v in by_node.items() if label(node.node_id) in k]
        assert line.endswith(
            "0 GPU(s), 1 CPU(s); sdbot plans 1 worker(s) here (workers.devices = ['cpu']), "
            "1 running now"
        ), line
    (head,) = [
        v for k, v in by_node.items() if not any(label(n.node_id) in k for n in cluster.nodes)
    ]
    assert head.startswith("[warn]") and "sdbot plans 0 worker(s) here" in head
