"""Mixed precision for training, the same on CUDA, MPS and the CPU.

The frozen base model keeps the dtype the worker loaded it in (`[workers] dtype`);
the trainable adapter weights are fp32 (standard mixed precision: the optimizer steps
fp32 master weights). The autocast dtype follows the base model's dtype — fp16 runs
under fp16 autocast with a GradScaler (its small range would underflow gradients),
bf16 under bf16 autocast with none, fp32 without autocast — and every tensor handed
to a model is cast to that model's dtype explicitly, so nothing relies on CUDA
autocast to reconcile them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # the base model's weights

    @classmethod
    def of(cls, pipe: Any) -> Precision:
        from pipeline.families import of_pipe

        denoiser = of_pipe(pipe).denoiser(pipe)
        return cls(denoiser.device, denoiser.dtype)

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype not in HALF:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only; its state is saved with each checkpoint."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """A checkpoint's scaler state, from a run in any dtype: a run without a scaler
    (fp32, bf16) saved an empty state, which an fp16 run starts from afresh; a scaler's
    state means nothing to a run without one."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
