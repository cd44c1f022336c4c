"""Run adapted layers with each sample's own LoRAs: one code path for every format,
for a single job and for mixed-LoRA batches alike.

While a job runs, each adapted Linear/Conv2d has its `forward` replaced: rows whose
sample uses a set of adapters run the layer's own op with the weight
`W + Σ wᵢ·ΔWᵢ`, summed in float32 in a fixed order (by adapter name) and cast once to
the layer's dtype (kept for the call's later steps within a memory budget); rows
without adapters run the original forward. A sample therefore
gets the same arithmetic alone and in any batch (only the matrix shapes differ), in
fp32, fp16 and bf16 alike. Nothing is merged into the model: leaving the context puts
the original `forward` back, and the weights were never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.loras.formats import LayerDelta

Combo = tuple[tuple[str, float], ...]  # ((adapter name, weight), …) sorted by name
# Merged weights one pipeline call may keep between its steps (beyond: rebuilt per call).
MERGED_BUDGET_BYTES = 1 << 30


class RowPlan:
    """Which adapters, at which weights, each row of a layer's input gets.

    `per_sample[i]` is sample i's {adapter: weight}. With `uniform`, every row is
    sample 0 (one job). Otherwise the UNet sees samples in order, repeated for CFG
    (negatives then positives: "tile"), and the text encoders see each sample's rows
    together ("interleave"), as `pipeline.prompts.encoding.encode_prompts` feeds them.
    """

    def __init__(
        self,
        per_sample: Sequence[dict[str, float]],
        *,
        cfg: bool = False,
        uniform: bool = False,
        merged_budget: int = MERGED_BUDGET_BYTES,
    ) -> None:
        self.per_sample = list(per_sample)
        self.cfg = cfg
        self.uniform = uniform
        self._cache: dict[tuple, list[tuple[Combo, torch.Tensor | None]]] = {}
        # Merged weights kept for the rest of this pipeline call (every step reuses them),
        # up to `merged_budget` bytes; past it they are rebuilt at each call.
        self._merged: dict[tuple[int, Combo], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._merged_bytes = 0
        self.merged_budget = merged_budget

    def weights(
        self, module: nn.Module, entries: dict[str, LayerDelta], combo: Combo
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (id(module), combo)
        found = self._merged.get(key)
        if found is not None:
            return found
        merged = merged_weight(module, entries, combo)
        size = merged[0].numel() * merged[0].element_size()
        if self._merged_bytes + size <= self.merged_budget:
            self._merged[key] = merged
            self._merged_bytes += size
        return merged

    def groups(
        self, layout: str, rows: int, device: torch.device, adapters: frozenset[str]
    ) -> list[tuple[Combo, torch.Tensor | None]]:
        """[(combo, row index or None for all rows)] for a layer with these adapters."""
        key = (layout, rows, str(device), adapters)
        if key not in self._cache:
            self._cache[key] = self._build(layout, rows, device, adapters)
        return self._cache[key]

    def _build(self, layout: str, rows: int, device: torch.device, adapters: frozenset[str]):
        samples = [0] * rows if self.uniform else self._row_samples(layout, rows)
        combos: dict[Combo, list[int]] = {}
        for row, sample in enumerate(samples):
            weights = self.per_sample[sample]
            combo = tuple(sorted((a, w) for a, w in weights.items() if a in adapters))
            combos.setdefault(combo, []).append(row)
        if len(combos) == 1:
            return [(next(iter(combos)), None)]
        return [(c, torch.tensor(r, device=device)) for c, r in combos.items()]

    def _row_samples(self, layout: str, rows: int) -> list[int]:
        n = len(self.per_sample)
        if layout == "tile":  # UNet: [samples] or, with CFG, [negatives…, positives…]
            expected = n * (2 if self.cfg else 1)
            if rows != expected:
                raise RuntimeError(f"mixed-LoRA batch of {n} samples got {rows} UNet rows")
            return list(range(n)) * (rows // n)
        if rows % n:  # text encoders: each sample's chunk rows together
            raise RuntimeError(f"mixed-LoRA batch of {n} samples got {rows} text-encoder rows")
        return [i for i in range(n) for _ in range(rows // n)]


def merged_weight(
    module: nn.Module, entries: dict[str, LayerDelta], combo: Combo
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W + Σ w·ΔW (and the bias likewise), summed in float32, cast once to W's dtype."""
    weight, bias = module.weight, getattr(module, "bias", None)  # RMSNorm has none
    diff = diff_b = None
    for name, w in combo:
        d, db = entries[name].delta(weight, bias)
        diff = d * w if diff is None else diff + d * w
        if db is not None:
            diff_b = db * w if diff_b is None else diff_b + db * w
    new_weight = weight if diff is None else (weight.float() + diff).to(weight.dtype)
    new_bias = bias
    if diff_b is not None:
        new_bias = (bias.float() + diff_b).to(bias.dtype)
    return new_weight, new_bias


def _op(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    if isinstance(module, nn.Conv2d):
        return module._conv_forward
    if isinstance(module, nn.LayerNorm):
        return lambda x, w, b: F.layer_norm(x, module.normalized_shape, w, b, module.eps)
    if isinstance(module, nn.GroupNorm):
        return lambda x, w, b: F.group_norm(x, module.num_groups, w, b, module.eps)
    if isinstance(module, nn.RMSNorm):
        return lambda x, w, b: F.rms_norm(x, module.normalized_shape, w, module.eps)
    return F.linear


def _forward(module: nn.Module, original: Callable, entries, plan: RowPlan, layout: str):
    op = _op(module)
    names = frozenset(entries)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        groups = plan.groups(layout, x.shape[0], x.device, names)
        if len(groups) == 1:
            combo = groups[0][0]
            return op(x, *plan.weights(module, entries, combo)) if combo else original(x)
        out = None
        for combo, index in groups:
            part = x.index_select(0, index)
            y = op(part, *plan.weights(module, entries, combo)) if combo else original(part)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index, y)
        return out

    return forward


@contextmanager
def patched(
    modules: dict[str, nn.Module],
    layers: dict[tuple[str, str], dict[str, LayerDelta]],
    plan: RowPlan,
    *,
    denoiser: str,
) -> Iterator[None]:
    """Within the context, every layer in `layers` runs per `plan`.

    `modules` maps a model attribute (the denoiser's, "text_encoder", …) to the model;
    `layers` maps (model attr, module path) to {adapter: LayerDelta} for that layer.
    The denoiser's rows are tiled (the pipeline repeats the batch for CFG), the text
    encoders' interleaved (`encode_prompts`' sample-by-sample order).
    """
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for (model_name, path), entries in layers.items():
            module = modules[model_name].get_submodule(path)
            layout = "tile" if model_name == denoiser else "interleave"
            saved.append((module, module.__dict__.get("forward")))
            module.forward = _forward(module, module.forward, entries, plan, layout)
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
