"""Export the trained adapter in kohya/AUTOMATIC1111 key format (`lora_unet_…`,
`lora_te_…`; LyCORIS names for LoHa/LoKr; Flux.1's LoRA under sd-scripts' lora_flux
names, its fused layers as `split_qkv` writes them), or diffusers' peft layout where the
family exports that, with kohya-style metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.contract.jobs import TrainSpec
from pipeline.contract.version import sdbot_version
from pipeline.families import of_pipe
from pipeline.training.adapters import ADAPTER, TEXT_LR_RATIO

VERSION = sdbot_version()


def kohya_state_dict(pipe: Any, spec: TrainSpec) -> dict[str, torch.Tensor]:
    """The pipe's `ADAPTER` weights under the names the family exports (kohya/LyCORIS
    names for SD and Flux.1; diffusers' peft names for the other flow families' LoRA, and
    Flux.1's when asked), in fp16."""
    family = of_pipe(pipe)
    layout = family.export_layout(spec)
    tensors: dict[str, torch.Tensor] = {}
    for index, (component, model) in enumerate(family.adaptable(pipe)):
        trained = {_kohya_path(index, path): layer for path, layer in _adapter_layers(model)}
        for name, paths in family.export_layers(component, model, list(trained), spec).items():
            if len(paths) > 1:
                parts = [trained.get(path) for path in paths]
                layer_tensors = _fused_tensors(model, paths, parts, spec.alpha)
            elif layout == "peft":
                layer_tensors = _peft_tensors(trained[paths[0]])
            else:
                layer_tensors = _layer_tensors(trained[paths[0]], spec.method)
                layer_tensors["alpha"] = torch.tensor(spec.alpha)
            for suffix, tensor in layer_tensors.items():
                tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", torch.float16)
    return tensors


def _kohya_path(index: int, path: str) -> str:
    if index and not path.startswith("text_model."):
        # transformers 5 flattened CLIPTextModel; kohya names keep `text_model`.
        return f"text_model.{path}"
    return path


def _fused_tensors(
    model: torch.nn.Module, paths: tuple[str, ...], parts: list[Any], alpha: float
) -> dict[str, torch.Tensor]:
    """One fused layer (Flux.1's qkv, linear1) from its parts' LoRAs, as sd-scripts'
    `split_qkv` saves it: the downs stacked (rank n·r), the up block-diagonal (each part's
    up on its own rows and its own r columns), which diffusers' kohya converter finds
    sparse and splits back. A part nobody trained (the single blocks' MLP input) is
    zeros. Every reader scales a layer by alpha / its down's rank, here n·r; sd-scripts
    keeps each part's alpha (so its own fused files read at 1/n of what trained): we
    write n·alpha, and alpha / rank is peft's alpha / r exactly."""
    first = next(part for part in parts if part is not None).lora_A[ADAPTER].weight
    downs, ups = [], []
    for path, part in zip(paths, parts, strict=True):
        if part is None:
            downs.append(first.new_zeros(first.shape))
            ups.append(first.new_zeros(model.get_submodule(path).out_features, first.shape[0]))
        else:
            downs.append(part.lora_A[ADAPTER].weight)
            ups.append(part.lora_B[ADAPTER].weight)
    return {
        "lora_down.weight": torch.cat(downs),
        "lora_up.weight": torch.block_diag(*ups),
        "alpha": torch.tensor(alpha * len(paths)),
    }


def _peft_tensors(layer: Any) -> dict[str, torch.Tensor]:
    """diffusers' layout: lora_A and lora_B with peft's scale (alpha / r) multiplied into
    lora_B, since a file in this layout carries no alpha (readers scale it by 1)."""
    return {
        "lora_A.weight": layer.lora_A[ADAPTER].weight,
        "lora_B.weight": layer.lora_B[ADAPTER].weight * layer.scaling[ADAPTER],
    }


def _adapter_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in _names(module):
            yield path, module


def _names(layer: Any) -> set[str]:
    names: set[str] = set()
    for attribute in layer.adapter_layer_names:
        names.update(getattr(layer, attribute).keys())
    return names


def _layer_tensors(layer: Any, method: str) -> dict[str, torch.Tensor]:
    """One layer's weights under LyCORIS/kohya names, scaled so that kohya's rule
    (delta × alpha / dim) gives exactly peft's delta (× alpha / r)."""
    if method == "lora":
        return {
            "lora_down.weight": layer.lora_A[ADAPTER].weight,
            "lora_up.weight": layer.lora_B[ADAPTER].weight,
        }
    if method == "loha":
        return {
            name: getattr(layer, name)[ADAPTER]
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        }
    tensors = {
        name: getattr(layer, name)[ADAPTER]
        for name in layer.adapter_layer_names
        if ADAPTER in getattr(layer, name)
    }
    if "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors:
        # Both Kronecker factors full: readers (A1111, ComfyUI, diffusers) then apply no
        # alpha/dim scale, but peft trained with alpha/r — bake it into w1.
        key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        tensors[key] = tensors[key] * layer.scaling[ADAPTER]
    return tensors


def metadata_of(
    pipe: Any,
    spec: TrainSpec,
    steps: int,
    model_name: str,
    model_hash: str,
    base_loss: float,
    adapter_loss: float,
    photos: int,
) -> dict[str, str]:
    lycoris = spec.method != "lora"
    family = of_pipe(pipe)
    text_lr = spec.learning_rate * TEXT_LR_RATIO if spec.train_text_encoder else 0.0
    metadata = {
        "ss_base_model_version": family.kohya_base_model or family.name,
        "ss_sd_model_name": model_name,
        "ss_output_name": spec.name,
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.alpha:g}",
        "ss_steps": str(steps),
        "ss_resolution": f"({spec.resolution}, {spec.resolution})",
        "ss_learning_rate": f"{spec.learning_rate:g}",
        "ss_unet_lr": f"{spec.learning_rate:g}",
        "ss_text_encoder_lr": f"{text_lr:g}",
        "ss_num_train_images": str(photos),
        "sdbot_version": VERSION,
        "sdbot_base_model": model_name,
        "sdbot_base_model_hash": model_hash,
        "sdbot_method": spec.method,
        "sdbot_steps": str(steps),
        "sdbot_token": spec.token,
        "sdbot_subject": spec.subject,
        "sdbot_base_loss": f"{base_loss:.6g}",
        "sdbot_adapter_loss": f"{adapter_loss:.6g}",
    }
    if lycoris:
        metadata["ss_network_args"] = json.dumps({"algo": spec.method})
    if family.export_layout(spec) == "peft":
        metadata["sdbot_layout"] = "peft: alpha / rank multiplied into lora_B"
    metadata.update(family.training_metadata(pipe, spec))
    return metadata
