"""The flow-matching objective (Flux.1, Z-Image, Flux.2 klein), as diffusers'
`train_dreambooth_lora_flux.py` trains: cached text conditioning from the frozen
encoders, σ drawn logit-normal on the model's schedule, noisy = (1 − σ)·x + σ·ε, and the
mean squared error between the transformer's velocity and ε − x (no loss weighting:
the script's `logit_normal` scheme weighs every σ alike). What differs per family (how
its text is encoded, how its transformer is called, its latents) is the family's:
`FlowFamily.training_text`, `flow_prediction`, `training_latents`, `training_sigmas`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.families import of_pipe


@dataclass
class FlowText:
    """A flow family's text conditioning, one entry per caption in each value (a tensor
    batch first, or a list: Z-Image's captions keep their own lengths)."""

    values: dict[str, Any]

    def select(self, rows: list[int]) -> FlowText:
        return FlowText({k: _rows(v, rows) for k, v in self.values.items()})

    def cat(self, other: FlowText) -> FlowText:
        return FlowText({k: _cat(v, other.values[k]) for k, v in self.values.items()})


def _rows(value: Any, rows: list[int]) -> Any:
    if isinstance(value, list):
        return [value[i] for i in rows]
    return value[rows]


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return a + b
    if a.shape[1:] != b.shape[1:]:  # two encodings padded to other lengths
        raise ValueError(f"cannot batch text of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.cat([a, b])


@torch.no_grad()
def encode_flow_text(pipe: Any, captions: list[str]) -> FlowText:
    """Each caption through the frozen encoders, once (the family's own pipeline code)."""
    return FlowText(of_pipe(pipe).training_text(pipe, list(captions)))


def flow_losses(
    pipe: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: FlowText,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-sample MSE between the transformer's velocity and the flow target at σ. The
    noisy latents are mixed in fp32 and handed over in `dtype` (the transformer's, as
    `Precision` has it); the loss is fp32."""
    family = of_pipe(pipe)
    latents, noise = latents.float(), noise.float().to(latents.device)
    sigma = sigmas.float().to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
    noisy = (1.0 - sigma) * latents + sigma * noise
    prediction = family.flow_prediction(pipe, noisy, sigmas.to(latents.device), text.values, dtype)
    target = family.flow_target(noise, latents)
    dims = tuple(range(1, latents.ndim))
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=dims)


def draw_flow(
    pipe: Any, schedule: Any, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and σ (on the family's `training_scheduler`) for one training step: noise
    first, then σ, from the job's generator, so a resumed run draws what an
    uninterrupted one would."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    sigmas = of_pipe(pipe).training_sigmas(schedule, len(latents), generator)
    return noise, sigmas.to(latents.device)


def fixed_sigmas(count: int) -> torch.Tensor:
    """`count` σ spread evenly inside (0, 1), for a repeatable held-out loss."""
    return torch.linspace(0.0, 1.0, count + 2)[1:-1]
