"""Z-Image (Tongyi-MAI: Turbo, Base), torch-free: a 6B single-stream transformer reading
Qwen3's hidden states through a chat template, Flux.1's 16-channel VAE.

Defaults are Turbo's (8 steps, CFG 1: distilled, no negative prompt needed); Base wants
about 28–50 steps at CFG 3–5, set per job. diffusers has txt2img, img2img and inpaint.
"""

from __future__ import annotations

from pipeline.contract.families.plain_text import TextTemplateSpec


class ZImage(TextTemplateSpec):
    name = "zimage"
    label = "Z-Image"
    default_steps = 8
    default_cfg = 1.0
    options = TextTemplateSpec.options | {"control"}
    control_window = False  # diffusers' ZImageControlNetPipeline: every step
    # Its blocks: `layers.N.attention|feed_forward`, and the refiners before them.
    lora_key_pattern = r"(noise_refiner|context_refiner|(^|_)layers_\d+_(attention|feed_forward))_"
    index_class = "ZImageTransformer2DModel"
    # diffusers' key for Z-Image, and its pad tokens (which Lumina 2 lacks)
    checkpoint_keys = (("layers.0.adaLN_modulation.0.weight",), ("x_pad_token", "cap_pad_token"))
