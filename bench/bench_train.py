"""Training steps/s: `pipeline.training.loop.train_lora` vs the diffusers example's way.

The diffusers DreamBooth-LoRA example runs the VAE and the text encoder on every
step; we run them once per photo before the loop. Both sides here train the same
LoRA (rank, targets, AdamW, min-SNR-γ, batch, resolution) on the same model in the
same process, alternating runs, and the loop is timed from the first step's end to
the last's (setup, validation and samples excluded on both sides).

    python bench/bench_train.py                      # tiny model, CPU, 64² and 128²
    python bench/bench_train.py --model DIR --device cuda --resolutions 512 --steps 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.contract.jobs import Limits, TrainSpec  # noqa: E402
from pipeline.families import of_pipe  # noqa: E402
from pipeline.training.loop import TrainOptions, TrainPhotos, train_lora  # noqa: E402


def load(model: Path, device: str, xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photos(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size))
        for _ in range(count)
    ]


def ours(pipe, spec: TrainSpec, images: list[Image.Image], workdir: Path) -> float:
    stamps: list[float] = []
    options = TrainOptions(
        checkpoint_dir=workdir,
        limits=Limits(),
        on_progress=lambda step, total, loss: stamps.append(time.perf_counter()),
        sample_prompts=["x"],
        sample_steps=1,
    )
    train_lora(pipe, spec, TrainPhotos(images), options)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def diffusers_example(pipe, spec: TrainSpec, images: list[Image.Image]) -> float:
    """The example's loop: encode pixels and prompt on every step (SD 1.x only)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig

    device = pipe.unet.device
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        init_lora_weights="gaussian",
        target_modules=list(of_pipe(pipe).training_targets),
    )
    pipe.unet.add_adapter(config)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=1e-2)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompt = f"photo of {spec.token} {spec.subject}"
    pixels = torch.stack(
        [
            torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
            for i in images
        ]
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    stamps = []
    pipe.unet.train()
    for step in range(spec.steps):
        batch = pixels[[step % len(images)]].to(device, pipe.vae.dtype)
        with autocast:
            latents = pipe.vae.encode(batch).latent_dist.sample() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer(
                [prompt],
                padding="max_length",
                truncation=True,
                max_length=pipe.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids.to(device)
            embeds = pipe.text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
            pred = pipe.unet(scheduler.add_noise(latents, noise, t), t, embeds).sample
            snr = compute_snr(scheduler, t)
            weight = torch.clamp(snr, max=spec.min_snr_gamma) / snr
            loss = (
                F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
                * weight
            ).mean()
        optimizer_step(loss, params, optimizer, stamps)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def optimizer_step(loss, params, optimizer, stamps: list[float]) -> None:
    """The examples' step after the loss: backward, clip at 1.0, AdamW; then the time."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if params[0].device.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())


def side_by_side(load_model, theirs, args, alpha: float, workroot: Path) -> list[tuple]:
    """(resolution, ours, theirs) in steps/s, the medians of `args.repeats` alternating
    runs (so drift hits both alike), each on a freshly loaded model."""
    rows = []
    for resolution in args.resolutions:
        spec = TrainSpec(
            name="bench",
            photos=("x",) * 4,
            steps=args.steps,
            rank=16,
            alpha=alpha,
            resolution=resolution,
            checkpoint_every=10**6,
        )
        images = photos(4, resolution)
        ours_rates, their_rates = [], []
        for repeat in range(args.repeats):
            workdir = workroot / f"ck{resolution}_{repeat}"
            ours_rates.append(ours(load_model(), spec, images, workdir))
            their_rates.append(theirs(load_model(), spec, images))
        rows.append((resolution, statistics.median(ours_rates), statistics.median(their_rates)))
    return rows


def print_table(title: str, theirs: str, rows: list[tuple]) -> None:
    print(f"\n{title}\n")
    print(f"| resolution | ours (steps/s) | {theirs} (steps/s) | ours / theirs |")
    print("|---|---|---|---|")
    for resolution, ours_rate, their_rate in rows:
        print(
            f"| {resolution}² | {ours_rate:.1f} | {their_rate:.1f} | "
            f"{ours_rate / their_rate:.2f}× |"
        )
    print(f"\ncommand: python {' '.join(sys.argv)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="diffusers folder (default: tiny SD1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: steady figures on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from pipeline.families.sd_tiny import write_tiny_model

            model = write_tiny_model(Path(tmp) / "tiny")
        rows = side_by_side(
            lambda: load(model, args.device, False), diffusers_example, args, 8.0, Path(tmp)
        )
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else (f"CPU, {args.threads} thread(s)")
    )
    print_table(
        f"LoRA training, rank 16, batch 1, {args.steps} steps, median of {args.repeats}, "
        f"{device}, model: {args.model or 'tiny SD1'}",
        "diffusers example",
        rows,
    )


if __name__ == "__main__":
    main()
