"""The pool following the cluster, and model affinity. Runs on the tiny model, on the CPU.

    python bench/bench_cluster.py [--rounds 3] [--jobs 24] [--no-ray]

Elasticity (Ray): a real multi-node `ray.cluster_utils.Cluster` on this machine (a head
without CPUs, 1-CPU worker nodes, each its own raylet), the real dispatcher and SQLite.
Each round queues --jobs jobs from 3 members on one node; after the first result a second
node joins (timed from `add_node` to the first job Started on it); after that node has
run a job, it is removed while it runs one (timed from `remove_node` to that job Started
on the other node). Every job's Done events are counted: lost = none, duplicated = more
than one.

Affinity: a LocalPool of three CPU workers, two models (the tiny model under two names)
and `workers.max_models = 1`, so a worker holds one model at a time as a 12–20 B model's
GPU does. --jobs jobs, models drawn 50/50 (seeded), from 4 members, batch_size 1, run
through the dispatcher with `workers.affinity` off and on, side by side in one run:
the share of jobs whose worker had to load its model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STORE_BYTES = 80 * 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="elasticity rounds (Ray)")
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--no-ray", action="store_true")
    return parser.parse_args()


def config_for(models: dict[str, Path], data: Path, **workers):
    from pipeline.contract.config import config_from_dict

    return config_from_dict(
        {
            "models": {name: {"source": str(path)} for name, path in models.items()},
            "storage": {"data_dir": str(data)},
            "workers": {"devices": ["cpu"], "batch_size": 1, **workers},
        }
    )


def spec(seed: int, model: str = "default", size: int = 128, steps: int = 12):
    from pipeline.contract.jobs import GenerateSpec

    return GenerateSpec(
        prompt="a lighthouse", model=model, width=size, height=size, steps=steps, seed=seed
    )


class Run:
    """A database with queued jobs, a dispatcher over `pool`, and every event heard."""

    def __init__(self, pool, config, root: Path) -> None:
        from bot import store

        self.pool, self.config, self.root = pool, config, root
        self.db = store.open_db(root / "sdbot.sqlite")
        self.heard: list[tuple[float, str, object]] = []  # (time, job id, event)
        self.hook = None

    def enqueue(self, user: str, job_spec) -> str:
        from bot import store
        from pipeline.contract.jobs import spec_to_dict

        return store.enqueue(
            self.db,
            user_id=user,
            guild_id="g",
            channel_id="c",
            kind=job_spec.kind,
            spec=spec_to_dict(job_spec),
            batch_key=job_spec.batch_key(),
            max_attempts=3,
        )["id"]

    async def on_event(self, row: dict, event) -> None:
        self.heard.append((time.perf_counter(), row["id"], event))
        if self.hook is not None:
            await self.hook(row, event)

    async def drain(self, timeout_s: float = 900) -> float:
        from bot.services.dispatcher import Dispatcher
        from pipeline.contract.blobs import BlobStore

        dispatcher = Dispatcher(
            self.root / "sdbot.sqlite",
            self.pool,
            BlobStore(self.root / "out"),
            self.config,
            on_event=self.on_event,
        )
        start = time.perf_counter()
        await dispatcher.start()
        try:
            await dispatcher.wait_idle(timeout_s)
        finally:
            await dispatcher.stop()
        return time.perf_counter() - start

    def count(self, job_ids: list[str], kind: type) -> dict[str, int]:
        return {
            j: sum(1 for _, i, e in self.heard if i == j and isinstance(e, kind)) for j in job_ids
        }


# -- elasticity on a Ray cluster -------------------------------------------------------------


async def elasticity_round(models: dict[str, Path], root: Path, jobs: int) -> dict[str, float]:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.contract.jobs import Done, Failed, Started
    from pipeline.workers.ray_pool import RayPool

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": STORE_BYTES,
        },
    )
    cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)
    ray.init(address=cluster.address, log_to_driver=False)
    config = config_for(models, root / "data", backend="ray")
    pool = RayPool(config, cache_dir=root / "cache")
    await pool.start()
    run = Run(pool, config, root)
    # About a second each on a quiet CPU: the node is removed while one runs.
    ids = [run.enqueue(f"member{i % 3}", spec(i, size=256, steps=100)) for i in range(jobs)]
    marks: dict[str, float] = {}
    joined: list = []
    lost_job: list[str] = []

    async def scenario(row: dict, event) -> None:
        now = time.perf_counter()
        if isinstance(event, Failed) and lost_job == [row["id"]] and "requeued" not in marks:
            marks["requeued"] = now
        if isinstance(event, Done) and not joined:
            marks["join"] = now
            # Ray starts a node's processes from the main thread only; the loop waits.
            joined.append(cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES))
        elif isinstance(event, Started) and joined:
            on_new = joined[0].node_id[:8] in event.worker
            if on_new and "first_job" not in marks:
                marks["first_job"] = now
            elif on_new and "loss" not in marks:  # its second job: lose the node under it
                marks["loss"], lost_job[:] = now, [row["id"]]
                await asyncio.to_thread(cluster.remove_node, joined[0])
            elif not on_new and lost_job == [row["id"]] and "elsewhere" not in marks:
                marks["elsewhere"] = now

    run.hook = scenario
    try:
        await run.drain()
    finally:
        await pool.close()
        ray.shutdown()
        cluster.shutdown()
    done = run.count(ids, Done)
    return {
        "join_to_first_job_s": marks["first_job"] - marks["join"],
        "loss_to_requeued_s": marks["requeued"] - marks["loss"],
        "loss_to_elsewhere_s": marks["elsewhere"] - marks["loss"],
        "failed_retryable": len(run.count(lost_job, Failed))
        and run.count(lost_job, Failed)[lost_job[0]],
        "lost": sum(1 for n in done.values() if n == 0),
        "duplicated": sum(1 for n in done.values() if n > 1),
        "jobs": len(ids),
    }


# -- model affinity ----------------------------------------------------------------------------


async def affinity_run(models: dict[str, Path], root: Path, jobs: int, affinity: bool) -> dict:
    from pipeline.workers.local_pool import LocalPool

    config = config_for(models, root / "data", devices=["cpu"] * 3, max_models=1, affinity=affinity)
    pool = LocalPool(config)
    await pool.start()
    try:
        run = Run(pool, config, root)
        draw = random.Random(7)
        for i in range(jobs):
            run.enqueue(f"member{i % 4}", spec(i, model=draw.choice(["tiny", "other"]), size=64))
        seconds = await run.drain()
    finally:
        await pool.close()
    placements = dict(pool.placements)
    loads = placements.get("room", 0) + placements.get("swap", 0)
    return {"loads": loads, "batches": sum(placements.values()), "seconds": seconds}


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from pipeline.models.tiny import write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="sdbot-bench-cluster-"))
    tiny = write_tiny_model(root / "tiny")
    shutil.copytree(tiny, root / "other")
    models = {"tiny": tiny, "other": root / "other"}

    rounds = []
    if not args.no_ray:
        for i in range(args.rounds):
            rounds.append(asyncio.run(elasticity_round(models, root / f"ray{i}", args.jobs)))
    affinity = {
        on: asyncio.run(affinity_run(models, root / f"aff-{on}", args.jobs, on))
        for on in (False, True)
    }

    print(f"\n`python bench/bench_cluster.py --rounds {args.rounds} --jobs {args.jobs}`\n")
    if rounds:
        heads = " | ".join(f"round {i + 1}" for i in range(len(rounds)))
        print(f"| Ray cluster, per round | {heads} | median |")
        print("|---|" + "---:|" * (len(rounds) + 1))
        for key, name in (
            ("join_to_first_job_s", "node joins → its first job started (s)"),
            ("loss_to_requeued_s", "node lost mid-job → that job failed retryably, requeued (s)"),
            ("loss_to_elsewhere_s", "node lost mid-job → that job started elsewhere (s)*"),
        ):
            values = [r[key] for r in rounds]
            cells = " | ".join(f"{v:.2f}" for v in values)
            print(f"| {name} | {cells} | {statistics.median(values):.2f} |")
        lost = sum(r["lost"] for r in rounds)
        duplicated = sum(r["duplicated"] for r in rounds)
        total = sum(r["jobs"] for r in rounds)
        print(f"| jobs lost / duplicated (of {total}) | {lost} / {duplicated} |")
        print("\n\\* includes waiting for the other node to finish the job it was running.")
    print("\n| mixed queue, 2 models, 3 workers, max_models 1 | jobs needing a model load | "
          "share | seconds |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for on, result in affinity.items():
        share = result["loads"] / max(1, result["batches"])
        label = "affinity on" if on else "affinity off (any free worker)"
        print(f"| {label} | {result['loads']} of {result['batches']} | {share:.0%} | "
              f"{result['seconds']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
