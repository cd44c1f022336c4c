"""SDXL (base and its fine-tunes: Pony, Illustrious, …), torch-free: see `base.py`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pipeline.contract.families.base import FamilySpec, text_encoder_component

_SECOND = text_encoder_component(1)  # OpenCLIP bigG


class SDXL(FamilySpec):
    name = "sdxl"
    label = "SDXL"
    edit_route = "classic"  # edit: the instruction as an img2img/inpaint prompt
    default_size = 1024
    train_resolution = 1024
    # kohya names SDXL's two text encoders te1/te2; diffusers and peft files name the second.
    lora_key_prefixes = ("lora_te1_", "lora_te2_", f"{_SECOND}.", "te2.")
    single_file_text_encoders = ("conditioner.embedders.0.", "conditioner.embedders.1.")
    # 2048: both encoders' states side by side (768 + 1280); 64: the tiny model's.
    cross_attention_widths = (2048, 64)

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        two_encoders = "unet" in index and _SECOND in index
        return two_encoders or "XL" in index.get("_class_name", "")

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        return any(k.startswith("conditioner.embedders.1") for k in keys)
