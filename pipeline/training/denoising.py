"""The denoising objective and what goes into it: VAE latents, text conditioning
(SD 1.x and SDXL), the noise scheduler, the per-sample loss and its min-SNR weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.contract.jobs import TrainSpec
from pipeline.families import of_pipe
from pipeline.training.flow_matching import FlowText, encode_flow_text


@dataclass
class Cond:
    """What the UNet is conditioned on, besides the noisy latents and timestep."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL

    def select(self, rows: list[int]) -> Cond:
        return Cond(
            self.embeds[rows],
            None if self.pooled is None else self.pooled[rows],
            None if self.time_ids is None else self.time_ids[rows],
        )

    def cat(self, other: Cond) -> Cond:
        def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None or y is None else torch.cat([x, y])

        return Cond(
            torch.cat([self.embeds, other.embeds]),
            cat(self.pooled, other.pooled),
            cat(self.time_ids, other.time_ids),
        )

    def unet_kwargs(self, dtype: torch.dtype) -> dict[str, Any]:
        """The UNet's keyword arguments, cast to its dtype."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.pooled is not None and self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.to(dtype),
                "time_ids": self.time_ids.to(dtype),
            }
        return kwargs


@dataclass
class Encoded:
    """Training images, encoded once: VAE latents and (frozen encoder) embeddings."""

    latents: torch.Tensor  # (n, c, h, w) on the device, in the denoiser's latent space
    cond: Cond | FlowText | None  # None when the text encoder trains: encoded every step
    captions: list[str]


@torch.no_grad()
def encode_images(
    pipe: Any, images: list[Image.Image], captions: list[str], spec: TrainSpec
) -> Encoded | None:
    if not images:
        return None
    if len(captions) == 1:
        captions = captions * len(images)
    latents = latents_of(pipe, pixels(images, spec.resolution))
    latents = latents.to(of_pipe(pipe).denoiser(pipe).device)  # where every step uses them
    cond: Cond | FlowText | None = None
    if is_flow(pipe):
        cond = encode_flow_text(pipe, captions)  # the flow families' encoders stay frozen
    elif not spec.train_text_encoder:
        embeds, pooled = encode_text(pipe, captions)
        cond = Cond(embeds, pooled, micro_conditioning(pipe, spec.resolution, len(images)))
    return Encoded(latents, cond, captions)


def is_flow(pipe: Any) -> bool:
    """Whether the pipe's family trains by flow matching (`flow_matching.py`)."""
    return of_pipe(pipe).training_objective == "flow"


def pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Centre-square, resize and scale to [-1, 1], as the VAE expects."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def latents_of(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's posterior means in the denoiser's latent space, as the family says (no
    sampling: the same every step)."""
    family = of_pipe(pipe)
    with _vae_in_float32_if_needed(pipe.vae):
        chunks = [family.training_latents(pipe, chunk) for chunk in pixels.split(4)]
    return torch.cat(chunks).float()


@contextmanager
def _vae_in_float32_if_needed(vae: Any) -> Iterator[None]:
    # The SDXL VAE overflows in fp16 (diffusers' `force_upcast`); fp16 → fp32 → fp16 is
    # lossless, so the pipe gets its weights back bit for bit.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def encode_text(pipe: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the family's pipelines build them (SDXL: penultimate hidden
    states of both encoders, concatenated, and encoder 2's pooled output). Not under
    no_grad: when the text encoder trains, gradients flow through here."""
    family = of_pipe(pipe)
    embeds, pooled = [], None
    for tokenizer, encoder in family.text_encoders(pipe):
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        if family.penultimate_hidden_state:
            output = encoder(ids, output_hidden_states=True)
            embeds.append(output.hidden_states[-2])
            pooled = output[0] if family.pooled_text else None
        else:
            embeds.append(encoder(ids)[0])
    return torch.cat(embeds, dim=-1), pooled


def micro_conditioning(pipe: Any, resolution: int, count: int) -> torch.Tensor | None:
    """What the family's denoiser takes beside the text (SDXL: original size, crop
    top-left, target size); None for SD 1.x."""
    return of_pipe(pipe).micro_conditioning(pipe, resolution, count)


def training_scheduler(pipe: Any) -> Any:
    """The family's training schedule (DDPM, or the flow families' FlowMatchEuler)."""
    return of_pipe(pipe).training_scheduler(pipe)


def denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond,
) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target (ε or v). The noise
    is added in fp32; the UNet gets its inputs in its own dtype; the loss is fp32."""
    noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy.to(unet.dtype), timesteps, **cond.unet_kwargs(unet.dtype)).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as in the diffusers examples."""
    if gamma <= 0:
        return torch.ones_like(timesteps, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr
