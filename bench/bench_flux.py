"""Flux.1 through our engine vs the plain diffusers call, side by side in one run.

Two models: the tiny Flux.1 dev (`pipeline/families/flux_tiny.py`, fp32, 64², one torch
thread, as the tests run) and `--arch`: the real Flux.1 transformer at full width (3072,
24 heads of 128, T5's 4096-wide context, CLIP's 768 pooled) cut to 1 double + 1 single
block, bf16, 512², with one-layer text encoders at the real widths (a real T5-XXL does
not fit this machine; the text encoders run once per image, not per step). Each round
times our `run_generation` and `FluxPipeline.__call__` with the same inputs, alternating;
the figure is the median over rounds of each, and their ratio. Per step: the difference
between a `--steps` call and a 1-step call, divided by `--steps` − 1, so the encoders'
and the VAE's once-per-image cost drops out.

    python bench/bench_flux.py [--rounds 5] [--steps 8] [--arch] [--device cuda] [--size 1024]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.workers.quiet import quiet_libraries  # noqa: E402


def _arch_model(folder: Path):
    """The tiny folder's VAE and tokenizers with a full-width transformer and one-layer
    text encoders at the real widths, saved as a diffusers folder."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tiny = FluxPipeline.from_pretrained(folder)
    # The tiny model's own configs (pipeline/families/flux_tiny.py) at the real widths:
    # only what differs from the tiny layout is named here.
    torch.manual_seed(0)
    # Flux.1's: 24 heads of 128 (RoPE over 16+56+56), T5-XXL's 4096 context, CLIP-L's 768.
    real = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56))
    real |= dict(joint_attention_dim=4096, pooled_projection_dim=768, out_channels=None)
    transformer = FluxTransformer2DModel.from_config({**tiny.transformer.config, **real})
    clip_widths = {"hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 1}
    clip = CLIPTextModel(CLIPTextConfig(**{**tiny.text_encoder.config.to_dict(), **clip_widths}))
    t5_widths = {"d_model": 4096, "d_kv": 16, "d_ff": 64, "num_layers": 1}
    t5 = T5EncoderModel(T5Config(**{**tiny.text_encoder_2.config.to_dict(), **t5_widths}))
    pipe = FluxPipeline(
        scheduler=tiny.scheduler,
        vae=tiny.vae,
        text_encoder=clip,
        tokenizer=tiny.tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tiny.tokenizer_2,
        transformer=transformer,
    )
    out = folder.parent / "arch"
    pipe.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arch", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=0, help="0: 64 (tiny), 512 (--arch)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument(
        "--diffusers-first", action="store_true", help="each round times diffusers' call first"
    )
    args = parser.parse_args()
    quiet_libraries()
    from diffusers import FluxPipeline

    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.families.flux_tiny import write_tiny_flux
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache

    if args.threads or not args.arch:
        torch.set_num_threads(args.threads or 1)
    size = args.size or (512 if args.arch else 64)
    dtype = "bfloat16" if args.arch else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_flux(Path(tmp) / "dev")
        if args.arch:
            folder = _arch_model(folder)
        config = config_from_dict(
            {"models": {"flux": {"source": str(folder)}}, "workers": {"dtype": dtype}}
        )
        model = ModelCache(config, args.device).get()
        plain = FluxPipeline.from_pretrained(folder, torch_dtype=model.dtype).to(args.device)
        plain.set_progress_bar_config(disable=True)

        def ours(steps: int) -> None:
            job = GenerateSpec(
                prompt="a photo of a cat",
                width=size,
                height=size,
                steps=steps,
                seed=1,
                sampler="Euler",
                cfg_scale=1.0,
            )
            run_generation(model, [job], preview_every=0)

        def theirs(steps: int) -> None:
            with torch.inference_mode():
                plain(
                    "a photo of a cat",
                    width=size,
                    height=size,
                    num_inference_steps=steps,
                    guidance_scale=3.5,
                    generator=[torch.Generator().manual_seed(1)],
                )

        times: dict[tuple[str, int], list[float]] = {}
        for fn in (ours, theirs):  # warm-up
            fn(1)
        for _ in range(args.rounds):
            order = [("ours", ours), ("diffusers", theirs)]
            for name, fn in reversed(order) if args.diffusers_first else order:
                for steps in (1, args.steps):
                    _sync(args.device)
                    start = time.perf_counter()
                    fn(steps)
                    _sync(args.device)
                    times.setdefault((name, steps), []).append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    label = "Flux.1 architecture, 1+1 blocks, bf16" if args.arch else "tiny Flux.1 dev, fp32"
    label += f", {args.device}"
    print(
        f"| model | size | call ({args.steps} steps): ours | diffusers | ratio "
        "| per step: ours | diffusers | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    per = {
        n: (med[(n, args.steps)] - med[(n, 1)]) / (args.steps - 1) for n in ("ours", "diffusers")
    }
    call = {n: med[(n, args.steps)] for n in ("ours", "diffusers")}
    print(
        f"| {label} | {size}² | {call['ours'] * 1000:.1f} ms | {call['diffusers'] * 1000:.1f} ms | "
        f"{call['ours'] / call['diffusers']:.3f}× | {per['ours'] * 1000:.1f} ms | "
        f"{per['diffusers'] * 1000:.1f} ms | {per['ours'] / per['diffusers']:.3f}× |"
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
