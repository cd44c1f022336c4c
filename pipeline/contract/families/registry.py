"""The families this bot runs, most specific first, and what recognises each."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pipeline.contract.families.base import FamilySpec
from pipeline.contract.families.flux import Flux
from pipeline.contract.families.flux2_klein import Flux2Klein
from pipeline.contract.families.qwen_image import QwenImage, QwenImageEdit, QwenImageEditPlus
from pipeline.contract.families.sd1 import SD1
from pipeline.contract.families.sdxl import SDXL
from pipeline.contract.families.zimage import ZImage, ZImageOmni

# Order matters: the first family whose test matches a file wins. The transformer
# families first: their single files may carry SD's `model.diffusion_model.` prefix;
# the edit models' folders hold Qwen-Image's transformer, Omni's Z-Image's; Flux.2's BFL files have
# Flux.1's double_blocks/single_blocks names and more.
FAMILIES: dict[str, type[FamilySpec]] = {
    f.name: f
    for f in (
        QwenImageEditPlus,
        QwenImageEdit,
        QwenImage,
        ZImageOmni,
        ZImage,
        Flux2Klein,
        Flux,
        SDXL,
        SD1,
    )
}
# What a folder or checkpoint that no family claims is loaded as (as before families).
DEFAULT = SD1


class _SD2(FamilySpec):
    """Recognised in LoRA files only, so one made for it is refused by name."""

    name = "sd2"
    label = "SD 2.x"
    cross_attention_widths = (1024,)
    text_encoder_widths = (1024,)


# Families whose LoRA files are recognised, supported or not.
_LORA_FAMILIES: tuple[type[FamilySpec], ...] = (*FAMILIES.values(), _SD2)


def spec(name: str) -> type[FamilySpec]:
    """The family named in config (`sd1`, `sdxl`); KeyError for an unknown name."""
    return FAMILIES[name]


def label(name: str) -> str:
    """'SD 1.x' for 'sd1'; a name no family has is shown as it is."""
    found = next((f for f in _LORA_FAMILIES if f.name == name), None)
    return found.label if found else name


def family_from_index(index: Mapping[str, Any]) -> str:
    return next((f.name for f in FAMILIES.values() if f.matches_index(index)), DEFAULT.name)


def family_from_keys(keys: Collection[str]) -> str:
    return next((f.name for f in FAMILIES.values() if f.matches_checkpoint(keys)), DEFAULT.name)


# --- LoRA files ------------------------------------------------------------------------

# A LoRA layer's factor whose second dimension is the layer's input width, per format.
_INPUT_FACTORS = (
    "lora_down.weight",
    "lora_A.weight",
    "lora.down.weight",
    "lora_linear_layer.down.weight",
    "hada_w1_b",
    "hada_w2_b",
    "diff",
    "b2.weight",  # GLoRA's ΔW = W·a1·a2 + b1·b2
)


def lora_family(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The family a LoRA file was made for, from its tensor names and shapes (torch-free:
    a safetensors header gives both), or None when they don't tell.

    Text-encoder names first (kohya calls SDXL's encoders te1/te2), then the width of
    the text embedding its cross-attention key/value layers read (768 for SD 1.x, 2048
    for SDXL): every format's input factor carries it, LoKr's as the product of its two
    Kronecker factors' widths. (IA3 and OFT files scale or rotate a layer's outputs:
    they carry no input width, so only their text-encoder names can tell.)"""
    for family in _LORA_FAMILIES:
        if any(k.startswith(family.lora_key_prefixes) for k in shapes if family.lora_key_prefixes):
            return family.name
        if family.matches_lora_keys(shapes):  # the transformer families: their block names
            return family.name
    width = cross_attention_width(shapes)
    if width is not None:
        return next((f.name for f in _LORA_FAMILIES if width in f.cross_attention_widths), None)
    if any(k.startswith("lora_te_") for k in shapes):
        widths = {s[-1] for k, s in shapes.items() if k.endswith("q_proj.lora_down.weight")}
        for family in _LORA_FAMILIES:
            if widths & set(family.text_encoder_widths) and family is not DEFAULT:
                return family.name
        return DEFAULT.name  # a lone `lora_te_` is 1.x-shaped unless its width says 2.x
    return None


def cross_attention_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The text width a LoRA's cross-attention key/value layers read, if it has any."""
    layers: dict[str, dict[str, Sequence[int]]] = {}
    for key, shape in shapes.items():
        flat = key.replace(".", "_")
        if "attn2_to_k" in flat or "attn2_to_v" in flat:
            module = _module_of(key)
            layers.setdefault(module, {})[key[len(module) + 1 :]] = shape
    for params in layers.values():
        width = _input_width(params)
        if width is not None:
            return width
    return None


def _module_of(key: str) -> str:
    for suffix in (*_INPUT_FACTORS, "lokr_w1", "lokr_w1_b", "lokr_w2", "lokr_w2_b"):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key.rpartition(".")[0]


def _input_width(params: Mapping[str, Sequence[int]]) -> int | None:
    for name in _INPUT_FACTORS:
        shape = params.get(name)
        if shape is not None and len(shape) == 2:
            return int(shape[1])
    w1 = params.get("lokr_w1", params.get("lokr_w1_b"))
    w2 = params.get("lokr_w2", params.get("lokr_w2_b"))
    if w1 is not None and w2 is not None and len(w1) == 2 and len(w2) == 2:
        return int(w1[1]) * int(w2[1])  # ΔW = kron(w1, w2): widths multiply
    return None
