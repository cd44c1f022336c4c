"""Write random LoRA files in each format the bot reads, for the tiny SD1 and SDXL models.

Key names come from the pipeline's own module names, the way each tool writes them:
kohya/A1111 (`lora_unet_…_attn1_to_q.lora_down.weight` + `.alpha`, LoCon adds the
resnet convolutions), diffusers/peft (`unet.….lora_A.weight`), LyCORIS LoHa
(`.hada_w1_a` …) and LoKr (`.lokr_w1`, `.lokr_w2_a` …) with kohya names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft.tuners.lokr.layer import factorization
from safetensors.torch import save_file
from torch import nn

_UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
_TE_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _components(pipe: Any) -> list[tuple[str, str, nn.Module]]:
    """(kohya prefix, diffusers prefix, model) for the UNet and each text encoder."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [
            ("lora_unet_", "unet", pipe.unet),
            ("lora_te1_", "text_encoder", pipe.text_encoder),
            ("lora_te2_", "text_encoder_2", pipe.text_encoder_2),
        ]
    return [("lora_unet_", "unet", pipe.unet), ("lora_te_", "text_encoder", pipe.text_encoder)]


def target_layers(model: nn.Module, *, convs: bool = False) -> list[tuple[str, nn.Module]]:
    """Attention/MLP linears (and, for LoCon, resnet 3×3 convolutions) by module path."""
    found = []
    for path, module in model.named_modules():
        if "base_layer" in path or ".lora_" in path:
            continue
        leaf = path.rsplit(".", 1)[-1]
        if hasattr(module, "get_base_layer"):  # already wrapped by a loaded adapter
            module = module.get_base_layer()
        linear = isinstance(module, nn.Linear) and (
            path.endswith(_UNET_LINEARS) or leaf in _TE_LINEARS
        )
        conv = convs and isinstance(module, nn.Conv2d) and leaf in ("conv1", "conv2")
        if linear or conv:
            found.append((path, module))
    return found


def _shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear or Conv2d."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels, tuple(module.kernel_size)
    return module.out_features, module.in_features, ()


def _randn(gen: torch.Generator, *shape: int, std: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def kohya_lora(
    pipe: Any,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    convs: bool = False,
    seed: int = 0,
    text_encoder: bool = True,
) -> dict[str, torch.Tensor]:
    """kohya LoRA (LoCon with `convs`): lora_down/lora_up/alpha per layer."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, _, model in _components(pipe):
        if prefix != "lora_unet_" and not text_encoder:
            continue
        for path, module in target_layers(model, convs=convs):
            key = prefix + path.replace(".", "_")
            out_dim, in_dim, kernel = _shape(module)
            ones = (1,) * len(kernel)
            sd[f"{key}.lora_down.weight"] = _randn(gen, rank, in_dim, *kernel)
            sd[f"{key}.lora_up.weight"] = _randn(gen, out_dim, rank, *ones)
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def peft_lora(pipe: Any, *, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers/peft format: `unet.<path>.lora_A.weight` / `lora_B`, no alphas (scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for _, prefix, model in _components(pipe):
        for path, module in target_layers(model):
            out_dim, in_dim, _ = _shape(module)
            sd[f"{prefix}.{path}.lora_A.weight"] = _randn(gen, rank, in_dim, std=0.15)
            sd[f"{prefix}.{path}.lora_B.weight"] = _randn(gen, out_dim, rank, std=0.15)
    return sd


def loha(pipe: Any, *, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/rank; convs flattened."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, _, model in _components(pipe):
        for path, module in target_layers(model, convs=True):
            key = prefix + path.replace(".", "_")
            out_dim, in_dim, kernel = _shape(module)
            flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)
            for w in ("w1", "w2"):
                sd[f"{key}.hada_{w}_a"] = _randn(gen, out_dim, rank, std=0.5)
                sd[f"{key}.hada_{w}_b"] = _randn(gen, rank, flat_in, std=0.5)
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def lokr(pipe: Any, *, rank: int = 2, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr (factor -1): ΔW = kron(w1, w2_a @ w2_b) · alpha/rank, on linears."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, _, model in _components(pipe):
        for path, module in target_layers(model):
            key = prefix + path.replace(".", "_")
            out_dim, in_dim, _ = _shape(module)
            out_l, out_k = factorization(out_dim, -1)
            in_m, in_n = factorization(in_dim, -1)
            sd[f"{key}.lokr_w1"] = _randn(gen, out_l, in_m, std=0.5)
            sd[f"{key}.lokr_w2_a"] = _randn(gen, out_k, rank, std=0.5)
            sd[f"{key}.lokr_w2_b"] = _randn(gen, rank, in_n, std=0.5)
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


WRITERS = {"kohya": kohya_lora, "locon": kohya_lora, "peft": peft_lora, "loha": loha, "lokr": lokr}


def write_lora(path: Path, pipe: Any, kind: str, **kwargs: Any) -> Path:
    """Write one LoRA of `kind` (kohya, locon, peft, loha, lokr) for `pipe` to `path`."""
    if kind == "locon":
        kwargs.setdefault("convs", True)
    tensors = {k: v.contiguous() for k, v in WRITERS[kind](pipe, **kwargs).items()}
    save_file(tensors, str(path))
    return path
