"""FLUX.2 [klein] (Black Forest Labs: 4B Apache-2.0, 9B), torch-free: a Flux.2
transformer reading three hidden layers of Qwen3 (4B: Qwen3-4B, 9B: Qwen3-8B), Flux.2's
32-channel VAE. The distilled models make an image in about 4 steps without CFG; the
same pipeline edits with reference images. diffusers has txt2img (with references) and
inpaint; there is no img2img pipeline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from pipeline.contract.families.plain_text import TextTemplateSpec, has_key, index_classes

# The transformer's width (heads × 128) per published model, as its single file shows it.
VARIANTS = {3072: "Flux.2 klein 4B", 4096: "Flux.2 klein 9B", 6144: "FLUX.2 dev"}
# diffusers' key for a Flux.2 checkpoint; its input width is the transformer's width.
WIDTH_KEY = "single_stream_modulation.lin.weight"


class Flux2Klein(TextTemplateSpec):
    name = "flux2-klein"
    memory_profile = "flux2_klein_4b"  # a 9B file's own widths are read from it
    label = "Flux.2 klein"
    modes = frozenset({"txt2img", "edit", "inpaint", "outpaint", "facefix"})
    options = frozenset({"cfg_scale", "face_fix"})  # no negative prompt text
    max_input_images = 4  # reference images; more only slow it down
    default_steps = 4
    default_cfg = 1.0  # distilled: CFG is not used; the base models take ~4
    lora_key_pattern = (
        r"(to_qkv_mlp_proj|ff_linear_in|ff_context_linear_in|double_stream_modulation)"
    )

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        return "Flux2Transformer2DModel" in index_classes(index) and "Qwen3ForCausalLM" in (
            index_classes(index)
        )

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        return has_key(keys, WIDTH_KEY)


def variant(width: int) -> str:
    return VARIANTS.get(width, "a Flux.2 model")


def variant_mismatch(file: str, file_width: int, configured_width: int) -> str | None:
    """A klein single file must be the model its configuration folder describes: the
    one-line refusal of a 9B file configured as 4B (and any other pair), naming both."""
    if file_width == configured_width:
        return None
    return (
        f"model file {file} is {variant(file_width)} (width {file_width}) but its "
        f"single_file_config is {variant(configured_width)} (width {configured_width}); "
        "give the configuration folder of the same model"
    )
