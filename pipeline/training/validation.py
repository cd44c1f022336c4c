"""Validation: the denoising loss on held-out photos, before and after training."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.families import of_pipe
from pipeline.training.denoising import (
    Cond,
    denoising_loss,
    encode_text,
    is_flow,
    latents_of,
    micro_conditioning,
    pixels,
    training_scheduler,
)
from pipeline.training.flow_matching import encode_flow_text, fixed_sigmas, flow_losses
from pipeline.training.precision import Precision


@torch.no_grad()
def loss_on_images(
    pipe: Any,
    images: list[Image.Image],
    captions: list[str],
    *,
    seed: int = 0,
    n_timesteps: int = 8,
    resolution: int | None = None,
) -> float:
    """Mean denoising loss of the pipe's current UNet (and adapters) on `images`.

    Fixed noise (from `seed`) and `n_timesteps` timesteps spread evenly over the
    schedule, so two calls differ only by what changed in the model: this is how
    the base model and the trained adapter are compared on held-out photos.
    """
    if not images:
        raise ValueError("loss_on_images needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    resolution = resolution or min(images[0].size) // 8 * 8
    if is_flow(pipe):
        return _flow_loss(pipe, images, captions, seed, n_timesteps, resolution)
    denoiser = of_pipe(pipe).denoiser(pipe)
    device = denoiser.device
    scheduler = training_scheduler(pipe)
    count = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, count - 1, n_timesteps + 2)[1:-1].round().long().to(device)
    latents = latents_of(pipe, pixels(images, resolution))
    embeds, pooled = encode_text(pipe, captions)
    time_ids = micro_conditioning(pipe, resolution, len(images))
    losses = []
    with Precision.of(pipe).autocast():
        for i in range(len(images)):
            generator = torch.Generator().manual_seed(seed + i)
            noise = torch.randn((n_timesteps, *latents.shape[1:]), generator=generator)
            clean = latents[i : i + 1].expand(n_timesteps, -1, -1, -1)
            cond = Cond(
                embeds[i : i + 1].expand(n_timesteps, -1, -1),
                None if pooled is None else pooled[i : i + 1].expand(n_timesteps, -1),
                None if time_ids is None else time_ids[:1].expand(n_timesteps, -1),
            )
            loss = denoising_loss(denoiser, scheduler, clean, noise.to(device), timesteps, cond)
            losses.append(loss.mean().item())
    return float(np.mean(losses))


def _flow_loss(
    pipe: Any, images: list[Image.Image], captions: list[str], seed: int, count: int, size: int
) -> float:
    """The same for a flow family: fixed noise, `count` σ spread evenly over (0, 1)."""
    latents = latents_of(pipe, pixels(images, size))
    text = encode_flow_text(pipe, captions)
    sigmas = fixed_sigmas(count)
    losses = []
    precision = Precision.of(pipe)
    with precision.autocast():
        for i in range(len(images)):
            generator = torch.Generator().manual_seed(seed + i)
            noise = torch.randn((count, *latents.shape[1:]), generator=generator)
            clean = latents[i : i + 1].expand(count, *latents.shape[1:])
            rows = text.select([i] * count)
            loss = flow_losses(pipe, clean, noise, sigmas, rows, precision.dtype)
            losses.append(loss.mean().item())
    return float(np.mean(losses))


@torch.no_grad()
def held_out_loss(
    pipe: Any, images: list[Image.Image], prompts: list[str], resolution: int
) -> float:
    if not images:
        return float("nan")  # no held-out photos: nothing honest to report
    return loss_on_images(pipe, images, prompts, seed=0, resolution=resolution)
