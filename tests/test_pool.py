"""One contract for both worker pools, on the tiny model with real worker processes.

LocalPool runs spawned processes; RayPool runs Ray actors on a local Ray started here
on the CPU (skipped when ray is not installed). Killing a worker is a real SIGKILL.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from pipeline.contract.blobs import BlobStore
from pipeline.contract.jobs import Done, Event, Failed, Progress, Started
from pipeline.contract.pool import WorkerPool
from pipeline.workers.local_pool import LocalPool
from tests.test_runner import (
    assert_streamed,
    kinds,
    make_config,
    one_cpu_thread_per_worker,
    png_size,
    slow,
    small,
    tiny_models,
)

# One pool per backend for the whole module, so its event loop is the module's too.
module_loop = pytest.mark.asyncio(loop_scope="module")
REPO = Path(__file__).resolve().parent.parent


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["local", "ray"])
async def pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    models = tiny_models(tmp_path_factory.getbasetemp() / "models")
    config = make_config(models, tmp_path_factory.mktemp(f"data-{request.param}"))
    if request.param == "local":
        pool: WorkerPool = LocalPool(config)
    else:
        ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sdbot[ray]')")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        from pipeline.workers.ray_pool import RayPool

        pool = RayPool(config, cache_dir=tmp_path_factory.mktemp("ray-cache"))
    with one_cpu_thread_per_worker():
        await pool.start()
        yield pool
        await pool.close()
    if request.param == "ray":
        ray.shutdown()


async def collect(pool: WorkerPool, batch) -> list[Event]:
    return [event async for event in pool.run(batch)]


@module_loop
async def test_txt2img_streams_to_a_png_of_the_right_size(pool: WorkerPool) -> None:
    assert pool.capacity == 1 and pool.free_workers() == 1
    events = await collect(pool, [("t1", small(width=128, height=64))])
    assert_streamed(events, "t1")
    assert png_size(events[-1].images[0].png) == (128, 64)
    assert pool.free_workers() == 1


@module_loop
async def test_a_batch_of_two_compatible_jobs_gives_two_results(pool: WorkerPool) -> None:
    events = await collect(pool, [("b1", small(seed=1)), ("b2", small(seed=2, count=2))])
    done = {e.job_id: e for e in events if isinstance(e, Done)}
    assert [i.seed for i in done["b1"].images] == [1]
    assert [i.seed for i in done["b2"].images] == [2, 3]


@module_loop
async def test_the_worker_is_busy_while_it_runs_a_batch(pool: WorkerPool) -> None:
    free_while_running = []
    async for event in pool.run([("busy", slow())]):
        if isinstance(event, Started):  # a slow job: its end is far away
            free_while_running.append(pool.free_workers())
    assert free_while_running == [0]
    assert pool.free_workers() == 1


@module_loop
async def test_cancel_stops_a_running_job(pool: WorkerPool) -> None:
    events = []
    async for event in pool.run([("c1", slow())]):
        events.append(event)
        if isinstance(event, Progress):
            await pool.cancel("c1")
    assert_streamed(events, "c1", last="Cancelled")
    assert events[-1].job_id == "c1"


@module_loop
async def test_a_failing_job_fails_and_the_pool_keeps_serving(pool: WorkerPool) -> None:
    events = await collect(pool, [("bad", small(model="broken"))])
    assert kinds(events) == ["Started", "Failed"]
    assert "IndexError" in events[-1].message and not events[-1].retryable
    assert isinstance((await collect(pool, [("good", small())]))[-1], Done)


@module_loop
async def test_input_images_reach_the_worker(pool: WorkerPool, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 48), (200, 30, 30)).save(buffer, format="PNG")
    bot_blobs = BlobStore(pool.config.storage.blobs)
    sha = bot_blobs.put(buffer.getvalue(), ".png")
    spec = small(mode="img2img", image=sha, width=80, height=48, strength=0.5)
    events = await collect(pool, [("i2i", spec)])
    assert png_size(events[-1].images[0].png) == (80, 48)
    if hasattr(pool, "cache_dir"):  # Ray: the blob went through the object store
        assert BlobStore(pool.cache_dir).get(sha) == buffer.getvalue()


@module_loop
async def test_each_worker_reports_its_models_memory(pool: WorkerPool) -> None:
    """What /admin stats and /metrics show (issue 26): per loaded model, the memory plan it
    was loaded with, the plan's estimated peak and the peak measured over its jobs."""
    assert isinstance((await collect(pool, [("m1", small())]))[-1], Done)
    memory: dict = {}
    for _ in range(300):  # LocalPool: reported just after the batch's last event
        memory = {m: mem for w in pool.workers() for m, mem in w.memory.items()}
        if "tiny" in memory and memory["tiny"].peak_bytes:
            break
        await asyncio.sleep(0.1)
    tiny = memory["tiny"]
    assert tiny.plan == "full" and tiny.estimated_bytes > 0
    # On the CPU: the worker process's peak RSS, torch included (well over 100 MB).
    assert tiny.measure == "rss" and tiny.peak_bytes > 100 * 2**20


@module_loop
async def test_a_killed_worker_fails_its_job_retryably_and_comes_back(pool: WorkerPool) -> None:
    events = []
    pid = None
    async for event in pool.run([("k1", slow())]):
        events.append(event)
        if isinstance(event, Progress) and pid is None:
            pid = await pool.worker_pid("k1")
            os.kill(pid, signal.SIGKILL)
    assert events[-1] == Failed("k1", "the worker stopped unexpectedly", retryable=True)
    after = await collect(pool, [("k2", small())])
    assert_streamed(after, "k2")
    assert await pool.worker_pid("k2") is None  # finished: no longer on a worker


def test_importing_the_pool_does_not_import_torch() -> None:
    code = (
        "import sys, pipeline.workers.local_pool; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_ray_backend_without_ray_installed_says_how_to_get_it(tmp_path: Path) -> None:
    # sys.modules["ray"] = None makes `import ray` fail exactly as if it were absent.
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from pipeline.contract.config import config_from_dict\n"
        "from pipeline.workers.local_pool import PoolError, make_pool\n"
        "config = config_from_dict({'models': {'m': {'source': 'x'}},"
        " 'workers': {'backend': 'ray'}})\n"
        "try:\n    make_pool(config)\nexcept PoolError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert out == "workers.backend is 'ray' but ray is not installed: pip install 'sdbot[ray]'"


def test_auto_devices_without_a_gpu_is_one_cpu_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.workers.local_pool import detect_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU visible, whatever the machine
    assert detect_devices(("auto",)) == ["cpu"]
    assert detect_devices(("cuda:1", "cpu")) == ["cuda:1", "cpu"]
