"""SD 1.x (and the 1.x-shaped fine-tunes on Civitai), torch-free: see `base.py`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pipeline.contract.families.base import FamilySpec


class SD1(FamilySpec):
    name = "sd1"
    label = "SD 1.x"
    edit_route = "classic"  # edit: the instruction as an img2img/inpaint prompt
    # 768: CLIP ViT-L/14's width; 32: the tiny model's (pipeline/families/sd_tiny.py), so
    # the tests meet the same refusals a member does.
    cross_attention_widths = (768, 32)
    text_encoder_widths = (768, 32)
    single_file_text_encoders = ("cond_stage_model.",)

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        return "unet" in index

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        return any(k.startswith("model.diffusion_model.") for k in keys)
