"""SD 1.x: one CLIP ViT-L text encoder (last layer), an ε-prediction UNet, 4 latent
channels. Torch-free half: `pipeline.contract.families.sd1`; tiny model: `sd_tiny.py`."""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.sd1 import SD1 as SPEC
from pipeline.families.base import Family


class SD1(Family):
    spec = SPEC
    lora_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    pipelines = {
        "txt2img": "StableDiffusionPipeline",
        "img2img": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    }
    control_pipelines = {
        "txt2img": "StableDiffusionControlNetPipeline",
        "img2img": "StableDiffusionControlNetImg2ImgPipeline",
        "inpaint": "StableDiffusionControlNetInpaintPipeline",
    }
    ip_adapter_preprocessor = "ip-adapter_clip_sd15"
    preview_factors = (
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    )
    kohya_base_model = "sd_v1"

    def owns(self, pipe: Any) -> bool:
        # SDXL's pipelines hold this one's components too, and a second encoder
        return super().owns(pipe) and getattr(pipe, "text_encoder_2", None) is None

    def load_options(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def ldm_text_encoders(self, pipe: Any) -> dict[str, Any]:
        from pipeline.models.single_file import CLIP_PREFIX, clip_to_ldm, prefixed

        return prefixed(CLIP_PREFIX, clip_to_ldm(pipe.text_encoder.state_dict()))
