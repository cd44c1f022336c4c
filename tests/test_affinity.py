"""Model affinity through the real dispatcher and a LocalPool of two CPU workers, each
holding one model (`workers.max_models = 1`): a mixed queue runs without a model load,
and a batch never mixes models. The workers report what they hold; nothing is faked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from pipeline.contract.jobs import Done, Started
from pipeline.contract.pool import IDLE
from pipeline.workers.local_pool import LocalPool
from tests.test_dispatcher import Harness
from tests.test_runner import make_config, one_cpu_thread_per_worker, small, tiny_models

module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(tmp_path_factory: pytest.TempPathFactory):
    models = dict(tiny_models(tmp_path_factory.getbasetemp() / "models"))
    other = tmp_path_factory.getbasetemp() / "models" / "other"
    if not other.exists():  # the same weights under another name: loaded apart
        shutil.copytree(models["tiny"], other)
    config = make_config(
        {"tiny": models["tiny"], "other": other},
        tmp_path_factory.mktemp("data"),
        devices=["cpu", "cpu"],
        max_models=1,
    )
    pool = LocalPool(config)
    with one_cpu_thread_per_worker():
        await pool.start()
        yield pool
        await pool.close()


def held(pool: LocalPool) -> dict[str, list[str]]:
    return {w.name: list(w.held) for w in pool.workers()}


@module_loop
async def test_a_mixed_queue_runs_on_the_workers_that_hold_each_model(
    pool: LocalPool, tmp_path: Path
) -> None:
    # Both workers start with the default model; one job for "other" moves one of them.
    assert sorted(held(pool).values()) == [["tiny"], ["tiny"]]
    events = [event async for event in pool.run([("setup", small(model="other"))])]
    assert isinstance(events[-1], Done)
    holders = {models[0]: name for name, models in held(pool).items()}
    assert set(holders) == {"tiny", "other"}
    assert all(w.state == IDLE for w in pool.workers())

    harness = Harness(pool, tmp_path, batch_size=2)
    before = dict(pool.placements)
    models = ["tiny", "other", "other", "tiny", "other", "tiny", "tiny", "other"]
    jobs = {
        harness.enqueue(member, small(model=model, seed=i)): model
        for i, (member, model) in enumerate(zip("abcdabcd", models))
    }
    dispatcher = await harness.dispatcher()
    try:
        await dispatcher.wait_idle(120)
    finally:
        await dispatcher.stop()
    for job_id, model in jobs.items():
        assert harness.job(job_id)["status"] == "done"
        (started,) = harness.heard_of(job_id, Started)
        assert started.worker == holders[model], (model, started.worker)
    # Every batch ran on a worker that held its model: no load, no swap.
    assert pool.placements.get("swap", 0) == before.get("swap", 0)
    assert pool.placements.get("room", 0) == before.get("room", 0)
    assert sorted(held(pool).values()) == [["other"], ["tiny"]]
