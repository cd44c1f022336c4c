"""Images the pipe draws during training: class images for prior preservation (cached
on disk, shared by jobs on the same base model) and the sample grid with the adapter."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.contract.jobs import TrainSpec

CLASS_BATCH = 4  # class images drawn per pipe call


def default_sample_prompts(spec: TrainSpec) -> list[str]:
    who = f"{spec.token} {spec.subject}"
    return [
        f"photo of {who}",
        f"a painting of {who}",
        f"portrait of {who}, detailed, high quality",
        f"{who} in the city at night",
    ]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste images (all the size of the first) into a near-square grid."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(
            image.convert("RGB").resize((width, height)),
            (i % columns * width, i // columns * height),
        )
    return grid


def class_prompt(spec: TrainSpec) -> str:
    return f"photo of a {spec.subject}"


def class_image_dir(checkpoint_dir: Path, model_key: str, spec: TrainSpec) -> Path:
    """Class images depend only on the base model, subject and size: shared by jobs."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_key or 'model'}_{spec.subject}")
    return checkpoint_dir.parent / "class_images" / f"{safe}_{spec.resolution}"


def draw_class_images(
    pipe: Any, spec: TrainSpec, directory: Path, count: int, steps: int
) -> list[Image.Image]:
    """Prior-preservation images drawn by the base model, cached on disk (seed = index)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:04d}.png" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    for start in range(0, len(missing), CLASS_BATCH):
        seeds = missing[start : start + CLASS_BATCH]
        drawn = _sample_batch(pipe, class_prompt(spec), seeds, steps, spec.resolution)
        for seed, image in zip(seeds, drawn, strict=True):
            temporary = paths[seed].with_suffix(".tmp")
            image.save(temporary, format="PNG")
            os.replace(temporary, paths[seed])  # a killed job never leaves half a PNG
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def sample(pipe: Any, prompt: str, seed: int, steps: int, size: int) -> Image.Image:
    return _sample_batch(pipe, prompt, [seed], steps, size)[0]


@torch.no_grad()
def _sample_batch(
    pipe: Any, prompt: str, seeds: list[int], steps: int, size: int
) -> list[Image.Image]:
    """One image per seed; a generator per image makes each one (to ±1 level of
    rounding) what its seed draws alone, so the cache does not depend on batching."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    result = pipe(
        prompt=[prompt] * len(seeds),  # by name: Flux.2 klein's first argument is an image
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=generators,
    )
    return result.images
