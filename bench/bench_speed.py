"""Plain diffusers vs our eager path vs our compiled path (`[workers] compile = true`).

Same process, same weights, same seeds; the three alternate within each round. "plain"
is `StableDiffusionPipeline.from_pretrained(...)(prompt, ...)`; "eager" and "compiled"
are `run_generation` on two loaded copies of the model, the second prepared by
`pipeline.generate.compiled` (compiled once per batch size before timing: that
compile time is printed too). Each batch of N images runs with CFG (2N UNet rows).
Prints a markdown table of seconds per image (median of the rounds). Run:

    python bench/bench_speed.py                       # tiny model, 64², batches 1 2 4 8
    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_speed.py --model /tmp/sd15-arch --size 256 --steps 2 --batches 1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import unet_flops  # noqa: E402
from pipeline.workers.quiet import quiet_libraries  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--variants", nargs="+", default=["plain", "eager", "compiled"])
    parser.add_argument(
        "--shared",
        action="store_true",
        help="eager and compiled on one loaded model (half the memory; eager then runs "
        "with the prepared model's channels_last weights)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda (for bench/gpu.sh)")
    parser.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32")
    parser.add_argument(
        "--no-untimed", action="store_true", help="skip the untimed first call (slow models)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None, help="write bench_speed.json here")
    parser.add_argument(
        "--compile-mode",
        default="",
        help="torch.compile mode for this run (default: the worker's, max-autotune on CUDA)",
    )
    parser.add_argument(
        "--backend",
        default="",
        help="torch.compile backend (default inductor; aot_eager: the GPU script's dry run)",
    )
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from pipeline.contract.config import ModelConfig
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.generate import compiled
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import load_model

    folder = args.model or write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    entry = ModelConfig(name="bench", source=str(folder))
    from pipeline.models.loading import choose_dtype

    plain = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, torch_dtype=choose_dtype(args.device, args.dtype)
    ).to(args.device)
    plain.set_progress_bar_config(disable=True)
    wanted = [v for v in ("eager", "compiled") if v in args.variants]
    if args.shared and wanted:
        ours = dict.fromkeys(wanted, load_model(entry, device=args.device, dtype=args.dtype))
    else:
        ours = {v: load_model(entry, device=args.device, dtype=args.dtype) for v in wanted}
    if args.compile_mode:
        compiled.CUDA_MODE = compiled.CPU_MODE = args.compile_mode
    if args.backend:
        compiled.BACKEND = args.backend
    if "compiled" in ours:
        compiled.prepare(ours["compiled"])
    step_flops = unet_step_flops(plain, args.size, args.cfg)
    peak = peak_tflops(args.device)

    def eager_call(model, spec) -> None:
        saved = model.__dict__.pop("_compiled", None)  # the hook then runs eager
        try:
            run_generation(model, [spec], preview_every=0)
        finally:
            if saved is not None:
                model._compiled = saved

    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"model {folder.name}, {args.size}², {args.steps} steps, CFG {args.cfg}, "
        f"{args.sampler}, {torch.get_num_threads()} threads, {card}; one UNet step "
        f"(all CFG rows of one image) {step_flops / 1e12:.3g} TFLOP"
        + (f", card peak {peak:g} TFLOP/s dense" if peak else "")
    )
    print(
        "\n| batch | variant | s/image | images/s | vs plain | compile s | UNet TFLOP/s "
        "| % of peak | peak memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results: list[dict] = []
    for batch in args.batches:
        spec = GenerateSpec(
            prompt="a photo of a cat",
            width=args.size,
            height=args.size,
            steps=args.steps,
            cfg_scale=args.cfg,
            sampler=args.sampler,
            seed=1,
            count=batch,
        )

        def run_plain(batch: int = batch) -> None:
            generators = [torch.Generator().manual_seed(1 + i) for i in range(batch)]
            with torch.inference_mode():
                plain(
                    ["a photo of a cat"] * batch,
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    guidance_scale=args.cfg,
                    generator=generators,
                )

        calls = {"plain": run_plain}
        for name, model in ours.items():
            if name == "compiled":
                calls[name] = lambda model=model, spec=spec: run_generation(
                    model, [spec], preview_every=0
                )
            else:
                calls[name] = lambda model=model, spec=spec: eager_call(model, spec)
        compile_s = 0.0
        if "compiled" in calls:
            start = time.perf_counter()
            with compiled.compiling():
                calls["compiled"]()
            compile_s = time.perf_counter() - start
        for name in args.variants:  # one untimed call each: caches, allocator
            if name != "compiled" and not args.no_untimed:
                calls[name]()
        times: dict[str, list[float]] = {name: [] for name in args.variants}
        memory: dict[str, float] = {}
        for _ in range(args.rounds):
            for name in args.variants:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize(args.device)
                    torch.cuda.reset_peak_memory_stats(args.device)
                start = time.perf_counter()
                calls[name]()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize(args.device)
                    memory[name] = torch.cuda.max_memory_allocated(args.device) / 2**30
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["plain"]) if "plain" in times else None
        for name in args.variants:
            per_image = statistics.median(times[name]) / batch
            ratio = f"{base / batch / per_image:.2f}×" if base else "-"
            extra = f"{compile_s:.0f}" if name == "compiled" else ""
            # The whole call's time, not the UNet's alone: a lower bound of the UNet's rate.
            achieved = step_flops * args.steps / per_image / 1e12
            share = f"{100 * achieved / peak:.0f}%" if peak else "-"
            mem = f"{memory[name]:.1f} GiB" if name in memory else "-"
            row = [batch, name, f"{per_image:.3f}", f"{1 / per_image:.2f}", ratio, extra]
            row += [f"{achieved:.3g}", share, mem]
            print("| " + " | ".join(str(c) for c in row) + " |")
            results.append(
                {
                    "batch": batch,
                    "variant": name,
                    "s_per_image": per_image,
                    "vs_plain": base / batch / per_image if base else None,
                    "compile_s": compile_s if name == "compiled" else None,
                    "unet_tflops": achieved,
                    "peak_share": achieved / peak if peak else None,
                    "peak_memory_gib": memory.get(name),
                }
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        summary = {"card": card, "size": args.size, "steps": args.steps, "results": results}
        (args.out / "bench_speed.json").write_text(json.dumps(summary, indent=1))


# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) by card name, from NVIDIA's
# data sheets: what "% of peak" is measured against.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def peak_tflops(device: str) -> float:
    if not device.startswith("cuda"):
        return 0.0
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756.0
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def unet_step_flops(pipe, size: int, cfg: float) -> float:
    """FLOPs of one denoising step of one image (both CFG rows)."""
    return float(unet_flops(pipe.unet, 2 if cfg > 1 else 1, size // pipe.vae_scale_factor))


if __name__ == "__main__":
    main()
