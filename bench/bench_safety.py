"""What public-server safety costs: the NSFW detector per image and its share of a job,
and a /metrics scrape with 10,000 jobs in the database.

    OMP_NUM_THREADS=1 python bench/bench_safety.py [--repeats 20] [--jobs 10000]

- Detector: NudeNet (the wheel's 320n ONNX model, onnxruntime CPU, one thread) on a
  real photo (skimage's astronaut) at 512² and 1024², median of `--repeats` after a
  warm-up; this is what a worker adds to each image.
- Share of a job: the same tiny-model job (`Runner.run`, 512², `--steps` steps) with
  `[safety] detect` on and off, alternating, median of `--jobs-repeats` (the
  difference drowns in the job's own noise), and the detector timed alone on that
  job's output over the job's time. The tiny model is random weights: on a real
  SD 1.5 job the share is the detector time over that job's seconds (printed for 1.5 s).
- Scrape: `Metrics.scrape()` (the SQLite GROUP BY, worker states, text exposition) on a
  database holding `--jobs` finished jobs, median of `--repeats`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from bench.timing import timed  # noqa: E402
from bot import store  # noqa: E402
from bot.services.database import DbThread  # noqa: E402
from bot.services.metrics import Metrics  # noqa: E402
from pipeline.contract.blobs import BlobStore  # noqa: E402
from pipeline.contract.config import config_from_dict  # noqa: E402
from pipeline.contract.jobs import GenerateSpec  # noqa: E402
from pipeline.families.sd_tiny import write_tiny_model  # noqa: E402
from pipeline.safety.detector import detect_png  # noqa: E402
from pipeline.workers.local_pool import LocalPool  # noqa: E402
from pipeline.workers.runner import Runner  # noqa: E402


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def bench_detector(repeats: int) -> dict[int, float]:
    return {size: timed(lambda b=png(size): detect_png(b), repeats) for size in (512, 1024)}


def bench_job_share(model: Path, steps: int, repeats: int) -> tuple[float, float, float]:
    config = config_from_dict({"models": {"tiny": {"source": str(model)}}})
    blobs = BlobStore(Path(tempfile.mkdtemp()) / "blobs")
    runners = {}
    for detect in (True, False):
        cfg = dataclasses.replace(config, safety=dataclasses.replace(config.safety, detect=detect))
        runners[detect] = Runner(cfg, device="cpu", blobs=blobs, name=f"detect-{detect}")
        runners[detect].warm_up()
    spec = GenerateSpec("a lighthouse", steps=steps, width=512, height=512, sampler="Euler a")
    spec = spec.with_seed(1)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats + 1):
        for detect in (True, False):
            events = []
            start = time.perf_counter()
            runners[detect].run([(f"j{i}", spec)], events.append, lambda _: False)
            if i:  # the first round warms up
                times[detect].append(time.perf_counter() - start)
            assert events[-1].type == "done", events[-1]
    output = events[-1].images[0].png  # the job's own 512² result
    detect = timed(lambda: detect_png(output), repeats)
    return statistics.median(times[True]), statistics.median(times[False]), detect


def bench_scrape(jobs: int, repeats: int) -> float:
    folder = Path(tempfile.mkdtemp())
    db = store.open_db(folder / "sdbot.sqlite")
    now = time.time()
    with db.conn:
        db.conn.executemany(
            "INSERT INTO jobs (id, user_id, guild_id, channel_id, kind, status, spec, result, "
            "created_at, started_at, finished_at) VALUES (?, ?, '1', '2', ?, ?, ?, '{}', ?, ?, ?)",
            [
                (
                    f"{i:010x}",
                    str(i % 200),
                    "train" if i % 50 == 0 else "generate",
                    ("done", "failed", "cancelled")[i % 3] if i % 97 else "queued",
                    json.dumps({"prompt": "x", "count": 1}),
                    now - i,
                    now - i + 1,
                    now - i + 3,
                )
                for i in range(jobs)
            ],
        )
    config = config_from_dict(
        {"models": {"tiny": {"source": "x"}}, "storage": {"data_dir": str(folder)}}
    )
    # What a scrape uses of the services: the bot's database thread and the pool.
    services = SimpleNamespace(db=DbThread(db), pool=LocalPool(config, devices=["cpu"]))
    metrics = Metrics(None, services)  # type: ignore[arg-type]

    async def scrape_all() -> float:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            text = await metrics.scrape()
            times.append(time.perf_counter() - start)
        assert b'sdbot_jobs{kind="generate",status="done"}' in text
        return statistics.median(times[1:])

    return asyncio.run(scrape_all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Every option is a count: one table rather than a run of same-shaped calls.
    counts = {"--repeats": 20, "--jobs": 10_000, "--steps": 20, "--jobs-repeats": 5}
    for flag, default in counts.items():
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    detector = bench_detector(args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "sd1")
        with_detect, without, on_output = bench_job_share(model, args.steps, args.jobs_repeats)
    scrape = bench_scrape(args.jobs, args.repeats)
    print("| what | time |")
    print("|---|---|")
    for size, seconds in detector.items():
        print(f"| NudeNet, one {size}² image (1 thread) | {seconds * 1000:.1f} ms |")
    print(
        f"| tiny-model job 512², {args.steps} steps: detect on / off (alternating) | "
        f"{with_detect:.3f} s / {without:.3f} s |"
    )
    print(
        f"| NudeNet on that job's output / the job without it | {on_output * 1000:.1f} ms / "
        f"{without:.3f} s = {on_output / without:.1%} |"
    )
    print(f"| share of a 1.5 s SD 1.5 512² job (detector / 1.5 s) | {detector[512] / 1.5:.1%} |")
    print(f"| `/metrics` scrape, {args.jobs} jobs in SQLite | {scrape * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
