"""Flux.1 LoRA training steps/s: `pipeline.training.loop.train_lora` vs a bare step written
the way diffusers' `train_dreambooth_lora_flux.py` writes it, side by side.

Both sides train the same LoRA (rank 16, the script's twelve target layers, AdamW, grad
clip 1.0, batch 1, guidance 1, logit-normal σ on the model's schedule) on the same model in
the same process, with the VAE latents and the text embeddings computed once before the
loop on both sides (the script's `--cache_latents` and its precomputed prompt embeddings),
alternating runs; each loop is timed from the first step's end to the last's. What the
ratio measures is our loop's own cost: the family dispatch, batch selection, the
precision context, progress callbacks.

    python bench/bench_train_flow.py                          # tiny Flux.1, CPU, 64² and 128²
    python bench/bench_train_flow.py --width 256 --resolutions 256   # a wider cut-down Flux
    python bench/bench_train_flow.py --arch --dtype bfloat16 --device cuda --resolutions 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train import optimizer_step, print_table, side_by_side  # noqa: E402
from pipeline.contract.jobs import TrainSpec  # noqa: E402
from pipeline.families import of_pipe  # noqa: E402
from pipeline.workers.quiet import quiet_libraries  # noqa: E402


def load(model: Path, device: str, dtype: str = "float32"):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def script_step_rate(pipe, spec: TrainSpec, images) -> float:
    """The script's loop body, cached latents and prompt embeddings (its defaults)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig

    from pipeline.training.denoising import latents_of, pixels

    transformer = pipe.transformer
    device = transformer.device
    for model in (transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        model.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            init_lora_weights="gaussian",
            target_modules=list(of_pipe(pipe).training_targets),
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for param in params:  # the script's `cast_training_params`: fp32 LoRA under autocast
        param.data = param.data.float()
    half = transformer.dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=transformer.dtype, enabled=half)
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=1e-2)
    schedule = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        latents = latents_of(pipe, pixels(images, spec.resolution))
        embeds, pooled, text_ids = pipe.encode_prompt(
            [f"photo of {spec.token} {spec.subject}"], prompt_2=None, max_sequence_length=512
        )
    _, channels, height, width = latents.shape
    image_ids = pipe._prepare_latent_image_ids(1, height // 2, width // 2, device, latents.dtype)
    transformer.train()
    stamps = []
    for step in range(spec.steps):
        model_input = latents[[step % len(latents)]]
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling("logit_normal", 1, logit_mean=0.0, logit_std=1.0)
        indices = (u * schedule.config.num_train_timesteps).long()
        sigmas = schedule.sigmas[indices].to(device)
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * model_input + sigmas.view(-1, 1, 1, 1) * noise
        packed = pipe._pack_latents(noisy, 1, channels, height, width)
        guidance = (
            torch.tensor([1.0], device=device) if transformer.config.guidance_embeds else None
        )
        with autocast:
            pred = transformer(
                hidden_states=packed,
                timestep=sigmas,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        scale = pipe.vae_scale_factor
        pred = pipe._unpack_latents(pred, height * scale, width * scale, scale)
        loss = F.mse_loss(pred.float(), (noise - model_input).float())
        optimizer_step(loss, params, optimizer, stamps)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def write_model(root: Path, width: int, arch: bool = False) -> Path:
    """The tiny Flux.1 folder; with a wider transformer (heads of 64 at `width`, 2 + 2
    blocks), or with `arch` Flux.1's own transformer (24 heads of 128, its rope axes) cut
    to 1 + 1 blocks: the tiny text encoders stay (their states are cached before the loop,
    so only the transformer's text projection is narrower than the real one)."""
    from pipeline.families.flux_tiny import write_tiny_flux

    model = write_tiny_flux(root / "tiny")
    if width <= 32 and not arch:
        return model
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    heads, head_dim, axes, blocks = (24, 128, [16, 56, 56], 1)
    if not arch:
        heads, head_dim, axes, blocks = (width // 64, 64, [16, 24, 24], 2)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=blocks,
        num_single_layers=blocks,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=axes,
    ).save_pretrained(model / "transformer")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Flux.1 diffusers folder (default: tiny)")
    parser.add_argument("--width", type=int, default=32, help="transformer width of the default")
    parser.add_argument("--arch", action="store_true", help="Flux.1's width, 1 + 1 blocks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_model(Path(tmp), args.width, args.arch)
        rows = side_by_side(
            lambda: load(model, args.device, args.dtype), script_step_rate, args, 16.0, Path(tmp)
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    label = args.model or f"tiny Flux.1 dev, transformer width {args.width}"
    if args.arch:
        label = "Flux.1's transformer at full width (24 × 128), 1 + 1 blocks"
    print_table(
        f"Flux.1 LoRA training, rank 16, batch 1, {args.steps} steps, median of "
        f"{args.repeats}, {device}, {args.dtype}, {args.threads} thread(s), model: {label}",
        "script-style step",
        rows,
    )


if __name__ == "__main__":
    main()
