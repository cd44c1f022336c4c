"""Training checkpoints: one file per job, written atomically, resumed only by the
same job (same spec on the same base model)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.contract.jobs import TrainSpec, spec_to_json
from pipeline.training.adapters import trainable, trainable_models
from pipeline.training.precision import load_scaler_state

CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_key(spec: TrainSpec, model_hash: str) -> str:
    """A checkpoint belongs to one job: same spec on the same base model."""
    return hashlib.sha256(f"{spec_to_json(spec)}|{model_hash}".encode()).hexdigest()


def checkpoint_state(
    pipe: Any,
    job_key: str,
    step: int,
    seconds: float,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> dict[str, Any]:
    adapters = {
        f"{i}:{name}": param.detach().cpu().clone()
        for i, (_, model) in enumerate(trainable_models(pipe, train_text=True))
        for name, param in trainable(model)
    }
    return {
        "job": job_key,
        "step": step,
        "seconds": seconds,
        "adapters": adapters,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": generator.get_state(),
    }


def save_atomically(state: dict[str, Any], path: Path) -> None:
    """Temp file + fsync + os.replace: a kill at any moment leaves the old or new file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path, job_key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("job") == job_key else None  # another job's: start afresh


def restore_checkpoint(
    pipe: Any,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> None:
    with torch.no_grad():
        for i, (_, model) in enumerate(trainable_models(pipe, train_text=True)):
            for name, param in trainable(model):
                param.copy_(state["adapters"][f"{i}:{name}"])
    optimizer.load_state_dict(state["optimizer"])
    load_scaler_state(scaler, state["scaler"])
    generator.set_state(state["generator"])
