"""The bot side of the one training flow, shared by `/train` and `sdbot train`: the
job's spec (with the configured checkpoint interval), its resolution and the figures
registered with the trained file. No torch here (the worker side is
`pipeline.training.job`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.contract.config import Config, ModelConfig
from pipeline.contract.families import FamilySpec, family_of_model
from pipeline.contract.jobs import TrainSpec

METRICS = ("base_loss", "adapter_loss", "got_worse", "steps")


def training_resolution(config: Config, model: ModelConfig) -> int:
    """`[training] resolution`, else the model's family's (512 for SD 1.x, 1024 for
    SDXL; read from the model's files, without torch)."""
    if config.training.resolution:
        return config.training.resolution
    return family_of_model(model).train_resolution


def train_spec(
    config: Config,
    *,
    name: str,
    photos: Sequence[str],
    captions: Sequence[str],
    token: str,
    subject: str,
    model: str,
    method: str,
    steps: int,
    resolution: int,
    test_photos: Sequence[str] = (),
    family: type[FamilySpec] | None = None,
) -> TrainSpec:
    """The job's spec; it yields the worker (and saves a checkpoint) every
    `[training] chunk_steps` steps, with the rank, alpha and learning rate of the model's
    `family` (its FamilySpec's `train_*`; TrainSpec's own defaults without one). Checked
    where it is submitted: `/train` through `JobService.submit` (the server's limits),
    `sdbot train` against config.toml's."""
    defaults = {}
    if family is not None:
        defaults = dict(
            rank=family.train_rank,
            alpha=family.train_alpha,
            learning_rate=family.train_learning_rate,
        )
    return TrainSpec(
        name=name,
        photos=tuple(photos),
        test_photos=tuple(test_photos),
        captions=tuple(captions),
        token=token,
        subject=subject,
        model=model,
        method=method,  # type: ignore[arg-type] - checked where it is submitted
        steps=steps,
        resolution=resolution,
        checkpoint_every=config.training.chunk_steps,
        flux_lora_layout=config.training.flux_lora_layout,  # type: ignore[arg-type] - checked
        **defaults,  # type: ignore[arg-type] - the FamilySpec's typed train_* values
    )


def training_family(model: ModelConfig) -> type[FamilySpec]:
    """The family (as the model's variant is) a personal model on `model` trains on, read
    from its files without torch (call it off the event loop)."""
    return family_of_model(model)


def training_metrics(info: dict[str, Any]) -> dict[str, Any]:
    """The figures stored with a registered model, from a finished job's info."""
    return {key: info.get(key) for key in METRICS}
