"""A worker under a real memory limit, for tests/test_memory.py (run as a subprocess).

`python -m tests.memory_limit_worker MODEL_DIR DATA_DIR` loads the tiny model in a
Runner, measures how much address space one 384² image takes, then caps the process's
address space (RLIMIT_AS) at that much above what it uses now: four images in
one call (below VAE slicing's size) cannot fit. Run it with MALLOC_MMAP_THRESHOLD_=131072,
so that glibc maps every large tensor on its own and unmaps it when freed (else its
arenas keep freed memory and the room a call needs depends on what ran before). It
runs a batch of four, then loads a second model with almost no room left, and prints
each job's events as one JSON line. Linux only (RLIMIT_AS, /proc/self/status).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import threading


def vm(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(model_dir: str, data_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.models.loading import ModelCache, load_model
    from pipeline.workers.runner import Runner

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    models = {"tiny": {"source": model_dir}, "other": {"source": model_dir}}
    config = config_from_dict({"models": models, "storage": {"data_dir": data_dir}})
    runner = Runner(config, device="cpu", blobs=BlobStore(f"{data_dir}/blobs"), name="oom")
    runner.warm_up()

    def job(seed: int, size: int = 384) -> GenerateSpec:
        return GenerateSpec(prompt="a cat", width=size, height=size, steps=1, seed=seed)

    def run(batch) -> dict[str, list]:
        events: list = []
        runner.run(batch, events.append, lambda job_id: False)
        out: dict[str, list] = {}
        for event in events:
            if type(event).__name__ != "Progress":
                out.setdefault(event.job_id, []).append(
                    [type(event).__name__, getattr(event, "message", "")]
                )
        return out

    run([("warm", job(0, 64))])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    # Measure: the largest address space seen while one 384² image is made (sampled by
    # a thread); then exactly that above the current size: four images in one call cannot fit.
    before, peak, running = vm("VmSize"), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], vm("VmSize"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run([("one", job(0))])
    running[0] = False
    sampler.join()
    room = peak[0] - before
    print(f"one 384² image took {(peak[0] - before) >> 20} MB", file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + room, hard))
    print(json.dumps({"batch": run([(f"j{i}", job(i)) for i in range(4)])}), flush=True)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    # Loading with (almost) no room: the message must say it was the loading.
    keep = load_model(config.model("tiny"), device="cpu")  # noqa: F841 - holds the imports
    resource.setrlimit(resource.RLIMIT_AS, (vm("VmSize") + (1 << 20), hard))
    cache = ModelCache(config, "cpu")
    try:
        cache.get("other")
        loading = "loaded"
    except Exception as exc:  # noqa: BLE001 - reported to the test
        loading = f"{type(exc).__name__}: {exc}"
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    print(json.dumps({"loading": loading}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
