"""`sdbot doctor`: what works on this machine, one line per check (GPU, models, database, token;
with `workers.backend = "ray"`, the cluster: its nodes, their GPUs and sdbot's workers).

It loads torch and every configured model (a Hub model downloaded first, as a worker
would: `download_models`, which `--download` runs alone), so it runs as its own command,
never in the bot process. The Discord token is reported as set or not, never shown.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time

from pipeline.contract.config import Config, ModelConfig

OK, WARN, FAIL = "ok  ", "warn", "FAIL"


def _line(status: str, what: str, detail: str) -> None:
    print(f"[{status}] {what}: {detail}")


def run_doctor(config: Config) -> int:
    failures = 0
    _line(OK, "config", config.path or "(defaults)")
    failures += _check_torch(config)
    if config.workers.backend == "ray":
        failures += check_ray(config)
    for model in config.models:
        failures += _check_model(config, model.name)
    failures += _check_database(config)
    if os.environ.get("DISCORD_TOKEN"):
        _line(OK, "DISCORD_TOKEN", "set")
    else:
        _line(FAIL, "DISCORD_TOKEN", "not set; `sdbot run` needs it (see README, Quick start)")
        failures += 1
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 0 if not failures else 1


def _check_torch(config: Config) -> int:
    try:
        import torch
    except ImportError as exc:
        _line(FAIL, "torch", f"not importable ({exc})")
        return 1
    from pipeline.contract.devices import DeviceError, check_devices, dtype_for, dtype_warning
    from pipeline.workers.local_pool import detect_devices

    _line(OK, "torch", torch.__version__)
    configured = config.workers.dtype
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        capability = (props.major, props.minor)
        dtype = dtype_for("cuda", capability, configured)
        warning = dtype_warning("cuda", capability, dtype)
        _line(
            WARN if warning else OK,
            f"cuda:{i}",
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{props.major}.{props.minor}, workers use {dtype}"
            + (f" ({warning})" if warning else ""),
        )
    if not count:
        _line(WARN, "CUDA", "no GPU visible; workers will run on the CPU (slow)")
    failures = 0
    for device in detect_devices(config.workers.devices):
        if device.startswith("cuda"):
            try:
                check_devices([device], count, how=f"torch sees {count}")
            except DeviceError as exc:
                _line(FAIL, "workers.devices", str(exc))
                failures += 1
        elif device == "cpu":
            dtype = dtype_for("cpu", None, configured)
            warning = dtype_warning("cpu", None, dtype)
            _line(
                WARN if warning else OK,
                "cpu",
                f"a CPU worker uses {dtype}" + (f" ({warning})" if warning else ""),
            )
    return failures + _memory_plans(config)


def check_ray(config: Config) -> int:
    """The cluster at workers.ray_address: each node with its GPUs and the workers sdbot
    plans there, and the sdbot workers (RayWorker actors) alive on it now."""
    try:
        import ray
        from ray._private import state
    except ImportError:
        from pipeline.contract.pool import RAY_MISSING

        _line(FAIL, "ray", RAY_MISSING)
        return 1
    from pipeline.contract.pool import PoolError
    from pipeline.workers.ray_pool import RayNode, connect, plan_actors

    address, workers = config.workers.ray_address, config.workers
    try:
        owns = asyncio.run(connect(address, workers.ray_connect_timeout_s))
    except PoolError as exc:
        _line(FAIL, "ray", str(exc))
        return 1
    try:
        entries = ray.nodes()
        nodes = [RayNode(entry) for entry in entries if entry.get("Alive")]
        actors = state.actors(actor_state_name="ALIVE").values()
        sdbot = [a for a in actors if a.get("ActorClassName") == "RayWorker"]
    finally:
        if owns:
            ray.shutdown()
    lost = len(entries) - len(nodes)
    _line(
        OK,
        "ray",
        f"cluster at {address!r}, Ray {ray.__version__}, {len(nodes)} node(s) alive"
        + (f", {lost} gone" if lost else ""),
    )
    plan = plan_actors(workers.devices, nodes)
    for node in nodes:
        running = sum(1 for a in sdbot if a["Address"]["NodeID"] == node.id)
        planned = len(plan[node.id])
        _line(
            OK if planned else WARN,
            f"node {node.label}",
            f"{node.gpus} GPU(s), {node.cpus} CPU(s); sdbot plans {planned} worker(s) here "
            f"(workers.devices = {list(workers.devices)}), {running} running now",
        )
    if "auto" in workers.devices and not any(node.gpus for node in nodes):
        _line(WARN, "ray GPUs", "none on the cluster: workers.devices = ['auto'] runs CPU workers")
    return 0


def _check_model(config: Config, name: str) -> int:
    from pipeline.models.download import hub_parts
    from pipeline.models.loading import ModelError, load_model

    model, variants = config.model(name), {}
    try:
        parts = hub_parts(model)
    except ModelError as exc:
        _line(FAIL, f"model {name}", str(exc))
        return 1
    if parts and os.environ.get("HF_HUB_OFFLINE") != "1":
        # As the worker does: only the files it loads, with progress, then from the folder.
        fetched = _downloaded(config, model)
        if fetched is None:
            return 1
        model, variants = fetched
    start = time.perf_counter()
    try:
        loaded = load_model(
            model, device=config.workers.devices[0], dtype=config.workers.dtype, variants=variants
        )
    except (ModelError, ValueError, OSError) as exc:
        _line(FAIL, f"model {name}", str(exc))
        return 1
    seconds = time.perf_counter() - start
    _line(
        OK,
        f"model {name}",
        f"{loaded.family} from {config.model(name).source}, hash {loaded.hash}, "
        f"loaded on {loaded.device} in {seconds:.1f}s",
    )
    return 0


def _check_database(config: Config) -> int:
    path = config.storage.database
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as conn:
            conn.execute("select 1")
    except (OSError, sqlite3.Error) as exc:
        _line(FAIL, "database", f"{path}: {exc}")
        return 1
    _line(OK, "database", str(path))
    return 0


def _memory_plans(config: Config) -> int:
    """Per model × GPU (the CPU worker against RAM without one): the memory plan, its
    estimated peak and why (pipeline.contract.memory_plan); read from the files' headers,
    nothing loaded."""
    import torch

    from pipeline.contract.memory_plan import MemoryPlanError, ModelError, plan_for
    from pipeline.models.memory import worker_card
    from pipeline.workers.local_pool import detect_devices

    failures = 0
    for device in detect_devices(config.workers.devices):
        if device.startswith("cuda") and not torch.cuda.is_available():
            continue
        from pipeline.models.loading import choose_dtype

        card = worker_card(device, choose_dtype(device, config.workers.dtype))
        for model in config.models:
            try:
                plan = plan_for(config, model, card)
            except MemoryPlanError as exc:
                _line(FAIL, f"plan {model.name} on {device}", str(exc))
                failures += 1
            except ModelError as exc:
                _line(WARN, f"plan {model.name} on {device}", f"sizes unknown ({exc})")
            else:
                _line(OK, f"plan {model.name} on {device}", plan.reason)
    return failures


def download_models(config: Config, only: str = "") -> int:
    """`sdbot doctor --download [MODEL]`: fetch every configured Hub model (or `only`) into
    the Hugging Face cache, the weights the first worker's precision loads; a line for the
    disk (needed, free, where), a line per file (size, speed, the whole download's
    progress and time left), one line per model at the end. Returns the exit status."""
    from pipeline.models.download import hub_parts
    from pipeline.models.loading import ModelError

    failures = 0
    for model in [config.model(only)] if only else list(config.models):
        try:
            local = not hub_parts(model)
        except ModelError as exc:
            _line(FAIL, f"download {model.name}", str(exc))
            failures += 1
            continue
        if local:
            _line(OK, f"download {model.name}", f"{model.source} is local; nothing to download")
        elif _downloaded(config, model) is None:
            failures += 1
    return 1 if failures else 0


def _downloaded(config: Config, model: ModelConfig) -> tuple[ModelConfig, dict[str, str]] | None:
    """A model's Hub repositories (its source, inpaint_source, a single file's
    single_file_config) fetched as the first worker would (lines: the disk, each file,
    the outcome), as its snapshot folders and their weights variants; None after a FAIL
    line."""
    from pipeline.models.download import fetch_model, hub_parts
    from pipeline.models.loading import ModelError, choose_device, choose_dtype
    from pipeline.workers.local_pool import detect_devices

    device = choose_device(detect_devices(config.workers.devices)[0])
    half = str(choose_dtype(device, config.workers.dtype)) != "torch.float32"
    what, start = f"download {model.name}", time.perf_counter()
    try:
        fetched = fetch_model(
            model,
            half=half,
            on_progress=_FileLines(),
            on_disk=lambda needed, free, where: _line(
                OK, what, f"needs {_size(needed)} in {where}; {_size(free)} free there"
            ),
        )
    except ModelError as exc:
        _line(FAIL, what, str(exc))
        return None
    repos = []
    for part in hub_parts(model):
        variant = fetched.variants.get(part.key, "")
        shown = f" ({variant} weights)" if variant else ""
        named = "" if part.key == "source" else f"{part.key} "
        repos.append(f"{named}{part.repo}{shown} in {getattr(fetched.model, part.key)}")
    _line(
        OK,
        what,
        f"{'; '.join(repos)}: {_size(fetched.fetched)} fetched "
        f"in {time.perf_counter() - start:.1f}s",
    )
    return fetched.model, dict(fetched.variants)


def _size(n: int) -> str:
    from pipeline.contract.memory_plan import size_text

    return size_text(n)


class _FileLines:
    """A line per file downloaded; on a terminal, the file in progress rewritten in place."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.shown = 0.0

    def __call__(self, progress) -> None:
        from pipeline.models.download import file_line

        if progress.finished:
            print(("\r" if self.tty else "") + f"       {file_line(progress)}", flush=True)
        elif self.tty and time.monotonic() - self.shown > 0.5:
            self.shown = time.monotonic()
            print(f"\r       {file_line(progress)}", end="", flush=True)
