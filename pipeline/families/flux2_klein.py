"""Flux.2 klein: a Qwen3 causal LM (three hidden layers stacked) as the text encoder, the
Flux.2 transformer over 2×2-patchified 32-channel latents, reference images as edit
inputs; CFG only for the base (undistilled) models, with an empty negative. Torch-free
half: `pipeline.contract.families.flux2_klein`; tiny model: `flux2_klein_tiny.py`."""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.flux2_klein import Flux2Klein as SPEC
from pipeline.families.text_template import TextTemplateFamily


class Flux2Klein(TextTemplateFamily):
    spec = SPEC
    transformer_class = "Flux2Transformer2DModel"
    pipelines = {
        "txt2img": "Flux2KleinPipeline",
        "edit": "Flux2KleinPipeline",
        "inpaint": "Flux2KleinInpaintPipeline",
    }

    def negative_inputs(self, negatives: list[str]) -> dict[str, Any]:
        return {}  # klein takes no negative text (the contract refuses one)
