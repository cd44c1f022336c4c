"""What the worker pools cost: per-job latency against a direct in-process call, and
what batching buys through the dispatcher. Runs on the tiny model (CPU or GPU).

    python bench/bench_pool.py [--repeats 20] [--jobs 16] [--batch 8] [--threads 1]

Latency: one 64×64, 4-step txt2img job, warm (model loaded, first runs discarded),
median of --repeats. "Fixed cost" = pool median - direct median: the pipes or Ray
calls, event streaming and PNG transfer, i.e. what every job pays on top of its
denoising. Throughput: --jobs compatible jobs from 4 members queued in SQLite, run
through the Dispatcher on a LocalPool with batch_size 1 and --batch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, here and in the workers (0: torch's default)",
    )
    parser.add_argument("--no-ray", action="store_true")
    return parser.parse_args()


def spec(seed: int = 1):
    from pipeline.contract.jobs import GenerateSpec

    return GenerateSpec(prompt="a photo of a cat", width=64, height=64, steps=4, seed=seed)


def config_for(model: Path, data: Path, batch_size: int = 1, backend: str = "local"):
    from pipeline.contract.config import config_from_dict

    return config_from_dict(
        {
            "models": {"tiny": {"source": str(model)}},
            "storage": {"data_dir": str(data)},
            "workers": {"backend": backend, "devices": ["auto"], "batch_size": batch_size},
        }
    )


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_direct(config, repeats: int) -> float:
    from pipeline.contract.blobs import BlobStore
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from pipeline.workers.local_pool import detect_devices

    model = ModelCache(config, detect_devices(("auto",))[0]).get("default")
    blobs = BlobStore(config.storage.blobs)
    samples = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        run_generation(model, [spec()], blobs=blobs, on_step=lambda *_: None)
        if i >= 3:
            samples.append(time.perf_counter() - start)
    return median_ms(samples)


async def bench_pool(pool, repeats: int) -> float:
    await pool.start()
    try:
        samples = []
        for i in range(repeats + 3):
            start = time.perf_counter()
            async for _ in pool.run([(f"j{i}", spec())]):
                pass
            if i >= 3:
                samples.append(time.perf_counter() - start)
        return median_ms(samples)
    finally:
        await pool.close()


async def bench_dispatcher(pool, config, root: Path, jobs: int) -> float:
    from bot import store
    from bot.services.dispatcher import Dispatcher
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.jobs import spec_to_dict

    async def ignore(row: dict, event: object) -> None:
        return None

    db = store.open_db(root / "bench.sqlite")
    for i in range(jobs):
        s = spec(seed=i)
        store.enqueue(
            db,
            user_id=f"member{i % 4}",
            guild_id="g",
            channel_id="c",
            kind=s.kind,
            spec=spec_to_dict(s),
            batch_key=s.batch_key(),
        )
    dispatcher = Dispatcher(
        root / "bench.sqlite", pool, BlobStore(root / "out"), config, on_event=ignore
    )
    start = time.perf_counter()
    await dispatcher.start()
    await dispatcher.wait_idle(600)
    elapsed = time.perf_counter() - start
    await dispatcher.stop()
    return elapsed


async def bench_batching(model: Path, root: Path, jobs: int, batch: int) -> dict[int, float]:
    from pipeline.workers.local_pool import LocalPool

    pool = LocalPool(config_for(model, root / "data"))
    await pool.start()
    try:
        results = {}
        for size in (1, batch):
            run_root = Path(tempfile.mkdtemp(dir=root))
            results[size] = await bench_dispatcher(
                pool, config_for(model, root / "data", size), run_root, jobs
            )
        return results
    finally:
        await pool.close()


def main() -> None:
    args = parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch, and for workers
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.workers.local_pool import LocalPool

    root = Path(tempfile.mkdtemp(prefix="sdbot-bench-"))
    model = write_tiny_model(root / "tiny")
    config = config_for(model, root / "data")
    rows = []
    direct = bench_direct(config, args.repeats)
    rows.append(("in-process `run_generation`", direct))
    rows.append(("LocalPool", asyncio.run(bench_pool(LocalPool(config), args.repeats))))
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            ray = None
        if ray is not None:
            from pipeline.workers.ray_pool import RayPool

            ray.init(include_dashboard=False, log_to_driver=False)
            rows.append(
                ("RayPool (local Ray)", asyncio.run(bench_pool(RayPool(config), args.repeats)))
            )
            ray.shutdown()
    batching = asyncio.run(bench_batching(model, root, args.jobs, args.batch))

    print(
        f"\n`python bench/bench_pool.py --repeats {args.repeats} --jobs {args.jobs} "
        f"--batch {args.batch} --threads {args.threads}`\n"
    )
    print("| path | median latency (ms) | × direct | fixed cost (ms) |")
    print("|---|---:|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / direct:.2f} | {ms - direct:+.1f} |")
    print(f"\n| {args.jobs} compatible jobs via Dispatcher + LocalPool | seconds | jobs/s |")
    print("|---|---:|---:|")
    for size, seconds in batching.items():
        label = "batching off (batch_size 1)" if size == 1 else f"batch_size {size}"
        print(f"| {label} | {seconds:.2f} | {args.jobs / seconds:.1f} |")


if __name__ == "__main__":
    main()
