"""Qwen-Image and Qwen-Image-Edit (Alibaba Qwen), torch-free: a 20B MMDiT reading
Qwen2.5-VL's hidden states through a chat template, Qwen-Image's 16-channel causal VAE.

Three families, because what a job may ask differs: Qwen-Image makes images from text
(true CFG ~4, 40–50 steps); Qwen-Image-Edit edits one input image (it has no txt2img);
Qwen-Image-Edit-Plus (2509, 2511) edits with one to three. Their transformers have the
same layout, so a single file is read as Qwen-Image unless `family` says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from pipeline.contract.families.plain_text import TextTemplateSpec

# lightx2v's Qwen-Image(-Edit, -2509, -2511) Lightning LoRAs, as they are named:
# "Qwen-Image-Lightning-8steps-V1.1", "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16".
_LIGHTNING = re.compile(r"lightning", re.IGNORECASE)
_STEPS = re.compile(r"(\d+)[-_ ]?steps?", re.IGNORECASE)


class QwenImage(TextTemplateSpec):
    name = "qwen-image"
    memory_profile = "qwen_image"
    label = "Qwen-Image"
    default_steps = 40
    default_cfg = 4.0  # true CFG: the transformer runs twice per step
    options = TextTemplateSpec.options | {"control"}  # InstantX's ControlNets
    lora_key_pattern = r"transformer_blocks_\d+_(img_mlp|txt_mlp|img_mod|txt_mod)"
    index_class = "QwenImageTransformer2DModel"
    checkpoint_keys = (("txt_norm.weight",), ("transformer_blocks.0.img_mod.1.weight",))

    @classmethod
    def few_step_lora(cls, names: Collection[str]) -> int | None:
        """A Lightning LoRA by name (the LoRA's, or its file's title): "Lightning" and
        its step count ("4steps", "8-step"); without a count, 8 (the slower, surer one)."""
        for name in names:
            if _LIGHTNING.search(name):
                found = _STEPS.search(name)
                return int(found.group(1)) if found else 8
        return None


class QwenImageEdit(QwenImage):
    name = "qwen-image-edit"
    label = "Qwen-Image-Edit"
    modes = frozenset({"edit", "inpaint", "outpaint", "facefix"})
    options = TextTemplateSpec.options  # no ControlNet pipeline edits
    edit_registers = True  # it shifts and zooms its output against the input
    default_steps = 40  # 2511 with its Lightning LoRA: 4 or 8, CFG 1
    lora_key_pattern = ""  # Qwen-Image's LoRAs are theirs too (the same transformer)
    lora_family = "qwen-image"
    train_refusal = "it edits images; train on a Qwen-Image model (its LoRAs work here)"

    index_class = "QwenImageEditPipeline"
    checkpoint_keys = ()  # the same transformer as Qwen-Image's: say `family` in config


class QwenImageEditPlus(QwenImageEdit):
    name = "qwen-image-edit-plus"
    label = "Qwen-Image-Edit-Plus"
    max_input_images = 3

    index_class = "QwenImageEditPlusPipeline"
