"""SDXL: CLIP ViT-L and OpenCLIP bigG side by side (penultimate layers, pooled output
of the second), size and crop time ids, 4 latent channels. Torch-free half:
`pipeline.contract.families.sdxl`; tiny model: `sd_tiny.py` (`xl=True`)."""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.sdxl import SDXL as SPEC
from pipeline.families.base import Family


class SDXL(Family):
    spec = SPEC
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    lora_prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    pipelines = {
        "txt2img": "StableDiffusionXLPipeline",
        "img2img": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    }
    control_pipelines = {
        "txt2img": "StableDiffusionXLControlNetPipeline",
        "img2img": "StableDiffusionXLControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionXLControlNetInpaintPipeline",
    }
    ip_adapter_preprocessor = "ip-adapter_clip_sdxl"
    penultimate_hidden_state = True
    pooled_text = True
    preview_factors = (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    )
    preview_bias = (0.1084, -0.0175, -0.0011)
    kohya_base_model = "sdxl_base_v1-0"

    def owns(self, pipe: Any) -> bool:
        # the refiner has no first encoder: the second one is what tells SDXL
        present = (self.denoiser_name, "text_encoder_2")
        return all(getattr(pipe, n, None) is not None for n in present)

    def micro_conditioning(self, pipe: Any, resolution: int, count: int) -> Any:
        """Original size, crop top-left, target size: one row per sample."""
        import torch

        size = [resolution, resolution]
        ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32)
        return ids.repeat(count, 1).to(self.denoiser(pipe).device)

    def ldm_text_encoders(self, pipe: Any) -> dict[str, Any]:
        from pipeline.models.single_file import (
            XL_CLIP_PREFIX,
            XL_OPEN_CLIP_PREFIX,
            clip_to_ldm,
            open_clip_to_ldm,
            prefixed,
        )

        state = prefixed(XL_CLIP_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
        state.update(
            prefixed(XL_OPEN_CLIP_PREFIX, open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
        )
        return state
