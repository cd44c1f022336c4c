"""Overhead of `pipeline.generate.modes.run_generation` over a plain diffusers pipeline call.

Same process, same tiny model, identical parameters, alternating runs; both sides
produce PIL images from the same seed (ours also writes the PNG with infotext, which a
bot must do anyway). Prints a markdown table. Run:

    python bench/bench_generate.py [--steps 20] [--size 64] [--runs 15] [--model DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.workers.quiet import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32")
    args = parser.parse_args()
    quiet_libraries()
    from diffusers import EulerAncestralDiscreteScheduler

    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache

    source = args.model or write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    config = config_from_dict(
        {"models": {"bench": {"source": str(source)}}, "workers": {"dtype": args.dtype}}
    )
    model = ModelCache(config, args.device).get()
    pipe = model.pipe
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(model.scheduler_config)
    spec = GenerateSpec(
        "a photo of a cat, high quality",
        negative_prompt="blurry",
        sampler="Euler a",
        steps=args.steps,
        cfg_scale=7.0,
        seed=1,
        width=args.size,
        height=args.size,
    )

    def plain() -> None:
        pipe(
            "a photo of a cat, high quality",
            negative_prompt="blurry",
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            width=args.size,
            height=args.size,
            generator=torch.Generator("cpu").manual_seed(1),
        )

    def ours() -> None:
        run_generation(model, [spec])

    for warm in (plain, ours, plain, ours):
        warm()
    cuda = args.device.startswith("cuda")
    times: dict[str, list[float]] = {"plain diffusers": [], "sdbot generate": []}
    peaks: dict[str, int] = {name: 0 for name in times}
    for _ in range(args.runs):
        for name, fn in (("plain diffusers", plain), ("sdbot generate", ours)):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain diffusers"])
    print(
        f"tiny model, {args.size}×{args.size}, {args.steps} steps, Euler a, CFG 7, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{args.runs} alternating runs\n"
    )
    if cuda:
        print(f"card: {torch.cuda.get_device_name()}, dtype {model.dtype}\n")
    print("| | median s/image | it/s | ratio to plain | peak GPU memory |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        peak = f"{peaks[name] / 2**30:.2f} GiB" if cuda else "-"
        speed = args.steps / median
        print(f"| {name} | {median:.4f} | {speed:.1f} | {median / base:.3f} | {peak} |")
    print(
        f"\ncommand: python bench/bench_generate.py --steps {args.steps} --size {args.size} "
        f"--runs {args.runs}"
    )


if __name__ == "__main__":
    main()
