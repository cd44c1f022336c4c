"""LoRA slots in the compiled graph (`[loras] slots`, issue 13) against the other ways.

    python bench/bench_lora_slots.py [--threads 1] [--steps 4] [--size 64] [--rounds 5]

Same process, same weights, side by side (medians of alternating rounds):

1. switch: making the next job's LoRA current. Slots: `LoraCache.activate` that copies
   a LoRA into a slot (five LoRAs cycled through four slots, so every switch copies);
   diffusers: `load_lora_weights` + `fuse_lora`, and `unfuse_lora` + `unload_lora_weights`
   after; today's hooks: `activate` (patching) plus the merged weights its first UNet
   call builds (one UNet step with the LoRA minus one without).
2. mixed: four jobs with four different LoRAs: one call in the compiled graph with
   slots (warmed at batch 4), vs one by one the diffusers way (load + fuse, generate,
   unfuse + unload), vs one eager mixed call with today's hooks.
3. overhead (`--overhead`): images/s at batch 1 without LoRAs, compiled with slots
   (QKV unfused) vs compiled without slots (fused QKV, the default before slots) vs
   compiled without slots and unfused; and compiled with slots running a LoRA.

`--flops` instead counts (torch's FlopCounterMode, meta tensors: no weights, no time)
the FLOPs of one SD 1.5 UNet evaluation at 512² with CFG, without and with slots of
several sizes: the empty slots' cost on the real architecture.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.workers.quiet import quiet_libraries  # noqa: E402

PROMPT = "a photo of a cat"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_s(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Blobs:
    """The LoRA files by sha256, as run_generation's blob source wants them."""

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}

    def add(self, path: Path, weight: float = 0.8):
        from pipeline.contract.jobs import LoraRef

        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        self.paths[sha] = path
        return LoraRef(path.stem, sha, weight)

    def path(self, sha: str) -> Path:
        return self.paths[sha]

    def get(self, sha: str) -> bytes:
        return self.paths[sha].read_bytes()


def count_flops() -> None:
    import json

    from diffusers import UNet2DConditionModel

    from bench.timing import unet_flops
    from pipeline.loras import slots

    config = json.loads((Path(__file__).parent / "configs" / "sd15_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)

    def flops() -> int:
        return unet_flops(unet, rows=2, latent=64)

    base = flops()
    print("SD 1.5 UNet, 512², CFG (2 rows), one evaluation\n")
    print("| slots × max_rank | TFLOP | vs no slots |\n|---|---|---|")
    print(f"| none | {base / 1e12:.3f} | |")
    for count, rank in ((2, 16), (4, 8), (4, 16), (4, 32), (8, 32), (4, 64)):
        slots.install(unet, slots=count, max_rank=rank, rows=2)
        with_slots = flops()
        slots.uninstall(unet)
        extra = 100 * (with_slots / base - 1)
        print(f"| {count} × {rank} | {with_slots / 1e12:.3f} | +{extra:.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="SD 1.x diffusers folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--max-rank", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="rank of the LoRA files")
    parser.add_argument("--overhead", action="store_true", help="part 3 (three more compiles)")
    parser.add_argument("--device", default="", help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cuda-mode", default="", help="torch.compile mode on CUDA")
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (aot_eager: dry runs)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--flops", action="store_true", help="only the SD 1.5 FLOP count")
    args = parser.parse_args()
    quiet_libraries()
    if args.flops:
        count_flops()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from diffusers import StableDiffusionPipeline

    from pipeline.contract.config import ModelConfig
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.generate import compiled
    from pipeline.generate.modes import run_generation
    from pipeline.loras import slots
    from pipeline.loras.cache import LoraCache
    from pipeline.models.loading import load_model
    from tests.lycoris_files import make_lora

    if args.cuda_mode:
        compiled.CUDA_MODE = args.cuda_mode
    compiled.BACKEND = args.backend
    tmp = Path(tempfile.mkdtemp())
    folder = str(args.model or write_tiny_model(tmp / "tiny"))
    entry = ModelConfig(name="bench", source=str(folder))
    dtype = getattr(torch, args.dtype)

    def plain_pipe():
        pipe = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=dtype, safety_checker=None
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    plain = plain_pipe()
    blobs = Blobs()
    # The files are made by lycoris-lora on a CPU copy (its network is built on the CPU).
    maker = plain if device == "cpu" else StableDiffusionPipeline.from_pretrained(folder)
    files = [
        make_lora(tmp / f"lora{i}.safetensors", maker, "lora", seed=i, rank=args.rank).path
        for i in range(5)
    ]
    del maker
    refs = [blobs.add(path) for path in files]
    pairs = [(ref, path) for ref, path in zip(refs, files)]

    def spec(i: int, loras=()) -> GenerateSpec:
        return GenerateSpec(
            prompt=PROMPT,
            width=args.size,
            height=args.size,
            steps=args.steps,
            cfg_scale=7.0,
            sampler="Euler a",
            seed=10 + i,
            loras=tuple(loras),
        )

    # -- 1. switch ----------------------------------------------------------------------
    slot_pipe = plain_pipe()
    slots.install(slot_pipe.unet, slots=args.slots, max_rank=args.max_rank, rows=8)
    slot_cache = LoraCache(slot_pipe, max_bytes=1 << 30)
    for pair in pairs:  # parsed and cached once: a switch is the slot copy
        with slot_cache.activate([pair]):
            pass
    turn = iter(range(10**9))

    def slot_switch() -> None:
        with slot_cache.activate([pairs[next(turn) % len(pairs)]]):
            pass

    def diffusers_load() -> None:
        plain.load_lora_weights(str(files[0]), adapter_name="job")
        plain.fuse_lora()

    def diffusers_unload() -> None:
        plain.unfuse_lora()
        plain.unload_lora_weights()

    load_s, unload_s = [], []
    for _ in range(args.rounds):
        load_s.append(median_s(diffusers_load, 1))
        unload_s.append(median_s(diffusers_unload, 1))
    hook_pipe = plain_pipe()
    hook_cache = LoraCache(hook_pipe, max_bytes=1 << 30)
    unet = hook_pipe.unet
    latents = torch.randn(2, 4, args.size // 8, args.size // 8, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)

    def step(model) -> None:
        with torch.inference_mode():
            model(latents, t, encoder_hidden_states=context)

    def hooks_step() -> None:
        with hook_cache.activate([pairs[next(turn) % len(pairs)]]):
            step(unet)

    def hooks_enter() -> None:
        with hook_cache.activate([pairs[next(turn) % len(pairs)]]):
            pass

    hooks_enter()
    plain_step = median_s(lambda: step(unet), args.rounds)
    hooks = median_s(hooks_step, args.rounds) - plain_step
    switch = median_s(slot_switch, args.rounds * 4)
    slot_step = median_s(lambda: step(slot_pipe.unet), args.rounds)
    print(
        f"model {Path(folder).name}, {args.size}², {args.steps} steps, CFG 7, Euler a, "
        f"{args.dtype}, {device}, {torch.get_num_threads()} threads; LoRA files rank {args.rank}; "
        f"{args.slots} slots at rank {args.max_rank}\n"
    )
    print("| switch to the next job's LoRA | ms |\n|---|---|")
    print(f"| slots: copy into a slot (activate + leave) | {switch * 1e3:.2f} |")
    load_ms, unload_ms = statistics.median(load_s) * 1e3, statistics.median(unload_s) * 1e3
    print(f"| diffusers: load_lora_weights + fuse_lora | {load_ms:.1f} |")
    print(f"| diffusers: unfuse_lora + unload_lora_weights | {unload_ms:.1f} |")
    print(f"| today's hooks: activate + the first step's merged weights | {hooks * 1e3:.2f} |")
    print(
        f"| (one UNet step, eager: plain {plain_step * 1e3:.1f} ms, with empty slots "
        f"{slot_step * 1e3:.1f} ms) | |"
    )
    sync()

    # -- 2. mixed batch of 4 -------------------------------------------------------------
    model = load_model(entry, device=device, dtype=args.dtype)
    start = time.perf_counter()
    compiled.prepare(model, slots=args.slots, max_rank=args.max_rank, rows=8)
    with compiled.compiling():
        run_generation(model, [spec(i) for i in range(4)], preview_every=0)
    compile_s = time.perf_counter() - start
    cache = LoraCache(model.pipe, max_bytes=1 << 30)
    mixed_specs = [spec(i, [refs[i]]) for i in range(4)]
    bank = slots.bank_of(model.pipe.unet)

    def compiled_mixed() -> None:
        runs = model._compiled.runs
        with compiled.no_recompiling():
            run_generation(model, mixed_specs, blobs=blobs, loras=cache, preview_every=0)
        assert model._compiled.runs == runs + 1, "the mixed batch did not run compiled"

    def diffusers_one_by_one() -> None:
        for i in range(4):
            plain.load_lora_weights(str(files[i]), adapter_name=f"job{i}")
            plain.fuse_lora()
            generator = torch.Generator().manual_seed(10 + i)
            with torch.inference_mode():
                plain(
                    PROMPT,
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    guidance_scale=7.0,
                    generator=generator,
                )
            plain.unfuse_lora()
            plain.unload_lora_weights()

    eager_model = load_model(entry, device=device, dtype=args.dtype)
    eager_cache = LoraCache(eager_model.pipe, max_bytes=1 << 30)

    def eager_mixed() -> None:
        run_generation(eager_model, mixed_specs, blobs=blobs, loras=eager_cache, preview_every=0)

    calls = {
        "compiled + slots, one mixed call": compiled_mixed,
        "diffusers, one by one: load + fuse, generate, unfuse + unload": diffusers_one_by_one,
        "eager (today's hooks), one mixed call": eager_mixed,
    }
    for fn in calls.values():  # untimed: caches, allocator, LoRAs parsed
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(median_s(fn, 1))
    base = statistics.median(times[next(n for n in calls if n.startswith("diffusers"))])
    print("\n| 4 jobs, 4 different LoRAs | s | images/s | vs diffusers one by one |")
    print("|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.3f} | {4 / seconds:.2f} | {base / seconds:.2f}× |")
    print(
        f"| (compile at batch 4 with slots: {compile_s:.0f} s; slot fills {bank.stats.fills}, "
        f"eager fallbacks {bank.stats.eager}) | | | |"
    )

    # -- 3. overhead of empty slots --------------------------------------------------------
    if not args.overhead:
        return
    variants = {}
    for name, options in (
        ("compiled + slots (QKV unfused)", {"slots": args.slots, "max_rank": args.max_rank}),
        ("compiled, no slots, fused QKV", {}),
        ("compiled, no slots, unfused QKV", {}),
    ):
        m = load_model(entry, device=device, dtype=args.dtype)
        made = compiled.prepare(m, rows=2, **options)
        if "unfused" in name and "no slots" in name:
            made.fused = None
        start = time.perf_counter()
        with compiled.compiling():
            run_generation(m, [spec(0)], preview_every=0)
        variants[name] = (m, time.perf_counter() - start)
    slot_model = variants["compiled + slots (QKV unfused)"][0]
    slot_loras = LoraCache(slot_model.pipe, max_bytes=1 << 30)
    one = [spec(0, [refs[0]])]
    runs = {
        name: (lambda m=m: run_generation(m, [spec(0)], preview_every=0))
        for name, (m, _) in variants.items()
    }
    runs["compiled + slots, with a LoRA"] = lambda: run_generation(
        slot_model, one, blobs=blobs, loras=slot_loras, preview_every=0
    )
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(median_s(fn, 1))
    ref_name = "compiled, no slots, fused QKV"
    base = statistics.median(times[ref_name])
    print(
        "\n| batch 1, no LoRA unless said | s/image | images/s | vs fused, no slots | compile s |"
    )
    print("|---|---|---|---|---|")
    for name, values in times.items():
        seconds = statistics.median(values)
        compile_col = f"{variants[name][1]:.0f}" if name in variants else ""
        ratio = base / seconds
        print(f"| {name} | {seconds:.3f} | {1 / seconds:.2f} | {ratio:.2f}× | {compile_col} |")


if __name__ == "__main__":
    main()
    print("\nReproduce: python bench/bench_lora_slots.py " + " ".join(sys.argv[1:]))
