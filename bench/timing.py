"""Timing helpers, and the plain SD job the benchmarks time, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(
    fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median seconds of `repeats` runs after one warm-up, by `clock` (wall time unless
    told: `time.process_time` gives this process's CPU seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def alternating_medians(
    sides: list[tuple[str, Callable[[int], object]]],
    step_counts: tuple[int, ...],
    rounds: int,
    sync: Callable[[], object] = lambda: None,
) -> dict[tuple[str, int], float]:
    """Median seconds of each (side, step count), the sides timed in turn in every round
    so that a shared machine's changing load falls on both alike. `sync` waits for the
    device (torch.cuda.synchronize on a GPU)."""
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for name, fn in sides:
            for steps in step_counts:
                sync()
                start = time.perf_counter()
                fn(steps)
                sync()
                times.setdefault((name, steps), []).append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def sd_job(prompt: str, steps: int, size: int, **extra):
    """The SD job the benchmarks time (Euler a, CFG 7, seed 1, a short negative prompt),
    one place so that their figures stay comparable; `extra` adds GenerateSpec fields."""
    from pipeline.contract.jobs import GenerateSpec

    return GenerateSpec(
        prompt,
        negative_prompt="blurry",
        sampler="Euler a",
        steps=steps,
        cfg_scale=7.0,
        seed=1,
        width=size,
        height=size,
        **extra,
    )


def unet_flops(unet, rows: int, latent: int, tokens: int = 77) -> int:
    """FLOPs of one UNet evaluation on `rows` latents of latent×latent (matmuls and
    convolutions, counted by torch's FlopCounterMode). Works on a loaded UNet and on
    one built on the meta device (no weights, no time)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(unet.parameters())
    like = {"device": parameter.device, "dtype": parameter.dtype}
    sample = torch.zeros(rows, unet.config.in_channels, latent, latent, **like)
    context = torch.zeros(rows, tokens, unet.config.cross_attention_dim, **like)
    timestep = torch.full((rows,), 500, device=parameter.device)
    extra = {}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":  # SDXL
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * 256
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(rows, pooled, **like),
            "time_ids": torch.zeros(rows, 6, **like),
        }
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, encoder_hidden_states=context, **extra)
    return counter.get_total_flops()
