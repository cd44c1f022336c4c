"""Z-Image: one Qwen3 text encoder (its chat template), a single-stream transformer,
Flux.1's VAE; CFG as `guidance_scale` (Turbo: 1, no second pass). Torch-free half:
`pipeline.contract.families.zimage`; tiny model: `zimage_tiny.py`."""

from __future__ import annotations

from pipeline.contract.families.zimage import ZImage as SPEC
from pipeline.families.flux import Flux
from pipeline.families.text_template import TextTemplateFamily


class ZImage(TextTemplateFamily):
    spec = SPEC
    transformer_class = "ZImageTransformer2DModel"
    packed = False  # its loop's latents are [batch, 16, h/8, w/8]
    # Flux.1's VAE: its latent → RGB preview factors
    preview_factors = Flux.preview_factors
    preview_bias = Flux.preview_bias
    pipelines = {
        "txt2img": "ZImagePipeline",
        "img2img": "ZImageImg2ImgPipeline",
        "inpaint": "ZImageInpaintPipeline",
    }
