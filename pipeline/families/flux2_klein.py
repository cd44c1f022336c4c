"""Flux.2 klein: a Qwen3 causal LM (three hidden layers stacked) as the text encoder, the
Flux.2 transformer over 2×2-patchified 32-channel latents, reference images as edit
inputs; CFG only for the base (undistilled) models, with an empty negative. Torch-free
half: `pipeline.contract.families.flux2_klein`; tiny model: `flux2_klein_tiny.py`."""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.flux2_klein import WIDTH_KEY, variant_mismatch
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

    def load_single_file(self, cls: Any, path: Any, torch_dtype: Any, config: str) -> Any:
        """A klein transformer file (.safetensors as BFL and ComfyUI ship it, or GGUF):
        the text encoder, tokenizer and VAE come from `config`, a klein diffusers folder
        of the same size. A 9B file configured with the 4B's folder (or the reverse) is
        refused naming both, before anything is loaded."""
        import json
        from pathlib import Path

        from pipeline.contract.families import ModelError
        from pipeline.contract.families.sources import safetensors_header

        if str(path).endswith(".safetensors") and config and Path(config).is_dir():
            header = safetensors_header(Path(path))
            entry = header.get(WIDTH_KEY) or header.get(f"model.diffusion_model.{WIDTH_KEY}")
            shape = entry["shape"] if entry else None
            settings = json.loads((Path(config) / "transformer" / "config.json").read_text())
            width = settings["num_attention_heads"] * settings["attention_head_dim"]
            problem = shape and variant_mismatch(str(path), int(shape[-1]), width)
            if problem:
                raise ModelError(problem)
        return super().load_single_file(cls, path, torch_dtype, config)
