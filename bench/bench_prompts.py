"""Per-step cost of prompt editing, alternation and AND against a plain prompt.

Same process, same model, same seed and sampler; variants alternate run by run. The
per-step cost is the slope between two step counts, (t(long) − t(short)) / (long −
short), fastest run of each, so text encoding, VAE decode and PNG writing (paid once
per image) cancel out.
Prints a markdown table. Run:

    python bench/bench_prompts.py                       # tiny model, 64²
    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_prompts.py --model /tmp/sd15-arch --size 256 --unet --runs 3

`--unet` times one denoising step's UNet call alone (through the same conditioning
code, CFG-shaped rows), for models too slow on a shared CPU to time whole images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.workers.quiet import quiet_libraries

VARIANTS = {
    "plain": "a photo of a cat in a garden, high quality",
    "editing [cat:dog:0.5]": "a photo of a [cat:dog:0.5] in a garden, high quality",
    "alternation [cat|dog]": "a photo of a [cat|dog] in a garden, high quality",
    "AND, two parts": "a photo of a cat in a garden AND a dog, high quality",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs=2, default=(4, 12), metavar=("SHORT", "LONG"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument("--unet", action="store_true", help="time one step's UNet call only")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.timing import sd_job
    from pipeline.contract.config import config_from_dict
    from pipeline.families.sd_tiny import write_tiny_model
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache

    source = args.model or write_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    config = config_from_dict({"models": {"bench": {"source": str(source)}}})
    model = ModelCache(config, args.device).get()

    def run(prompt: str, steps: int) -> float:
        spec = sd_job(prompt, steps, args.size)
        start = time.perf_counter()
        run_generation(model, [spec])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if args.unet:
        unet_steps(model, args)
        return
    short, long = args.steps
    run(VARIANTS["plain"], short)  # warm-up
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.runs):
        for name, prompt in VARIANTS.items():
            for steps in (short, long):
                times.setdefault((name, steps), []).append(run(prompt, steps))
    # Fastest of the runs: on a shared machine the slow ones measure the neighbours.
    per_step = {
        name: (min(times[name, long]) - min(times[name, short])) / (long - short)
        for name in VARIANTS
    }
    base = per_step["plain"]
    print(
        f"model {source.name}, {args.size}², {args.device}, steps {short}→{long}, runs {args.runs}"
    )
    print()
    print(f"| prompt | per step (ms) | × plain | image at {long} steps (s) |")
    print("|---|---:|---:|---:|")
    for name in VARIANTS:
        whole = min(times[name, long])
        shown = name.replace("|", "\\|")
        print(
            f"| {shown} | {per_step[name] * 1000:.1f} | {per_step[name] / base:.2f} | {whole:.2f} |"
        )


def unet_steps(model, args) -> None:
    """One step's UNet call per variant, alternating, fastest of `runs`."""
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.generate.conditioning import prompt_conditioning

    pipe = model.pipe
    side = args.size // 8
    latents = torch.randn(
        2, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0)
    )
    timestep = torch.tensor(500)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for run in range(args.runs + 1):  # the first round warms up
        for name, prompt in VARIANTS.items():
            spec = GenerateSpec(prompt, negative_prompt="blurry", steps=20, seed=1)
            with torch.inference_mode(), prompt_conditioning(pipe, [spec], 20) as kwargs:
                embeds = torch.cat([kwargs["negative_prompt_embeds"], kwargs["prompt_embeds"]])
                start = time.perf_counter()
                pipe.unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if run:
                    times[name].append(time.perf_counter() - start)
    base = min(times["plain"])
    print(
        f"model {args.model.name if args.model else 'tiny'}, {args.size}², {args.device}, "
        f"one step's UNet call, fastest of {args.runs}"
    )
    print()
    print("| prompt | UNet rows | per step (ms) | × plain |")
    print("|---|---:|---:|---:|")
    for name in VARIANTS:
        rows = 3 if name.startswith("AND") else 2
        shown = name.replace("|", "\\|")
        print(
            f"| {shown} | {rows} | {min(times[name]) * 1000:.1f} | {min(times[name]) / base:.2f} |"
        )


if __name__ == "__main__":
    main()
