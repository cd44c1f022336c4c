"""One training job, run the same way by a worker (`/train`) and by `sdbot train`.

The bot side (the spec, its checkpoint interval, the resolution) is `bot.training`;
this is the worker side: where the job's checkpoint lives, the options `train_lora`
gets from the config and the loaded model, and the figures a finished job reports.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.contract.config import Config
from pipeline.contract.jobs import TrainSpec
from pipeline.training.loop import (
    TrainingPaused,
    TrainOptions,
    TrainPhotos,
    TrainResult,
    train_lora,
)


def checkpoint_dir(config: Config, job_id: str) -> Path:
    """Under the data folder, so a restarted worker on this machine finds it again;
    class images are cached beside it (`checkpoints/class_images`), shared by jobs."""
    return Path(config.storage.data_dir) / "checkpoints" / job_id


def discard_checkpoints(config: Config, job_id: str) -> None:
    """The checkpoint holds weights learnt from the member's photos: it goes as soon as
    the job is over (done, failed or cancelled; a pause keeps it)."""
    shutil.rmtree(checkpoint_dir(config, job_id), ignore_errors=True)


def run_training(
    model: Any,
    spec: TrainSpec,
    photos: TrainPhotos,
    *,
    config: Config,
    job_id: str,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    should_yield: Callable[[], bool] | None = None,
) -> TrainResult | TrainingPaused:
    """Train `spec` on a loaded model (`pipeline.models.loading.LoadedModel`)."""
    model.kind.spec.check_training(spec.resolution)  # as its variant is (Flux.1 schnell…)
    options = TrainOptions(
        checkpoint_dir=checkpoint_dir(config, job_id),
        limits=config.limits,
        on_progress=on_progress,
        should_cancel=should_cancel,
        should_yield=should_yield,
        model_name=model.name,
        model_hash=model.hash,
    )
    return train_lora(model.pipe, spec, photos, options)


def training_info(result: TrainResult) -> dict[str, Any]:
    """The finished job's figures, JSON-safe (no test photos: the losses are None)."""
    return {
        "base_loss": _finite_or_none(result.base_loss),
        "adapter_loss": _finite_or_none(result.adapter_loss),
        "got_worse": bool(result.got_worse),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "metadata": dict(result.metadata),
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # no test photos: NaN, not JSON
