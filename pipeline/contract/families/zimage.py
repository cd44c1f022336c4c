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


class ZImageOmni(ZImage):
    """Z-Image Omni (Base): the same transformer also reading its input images (their VAE
    latents and SigLIP2 features), so one model makes images from text and edits with
    reference images (`ZImageOmniPipeline`). Undistilled: Base's steps and CFG. Its
    LoRAs are Z-Image's (the same blocks); a single transformer file cannot say it is
    Omni: set `family = "zimage-omni"` with a folder as `single_file_config`."""

    name = "zimage-omni"
    label = "Z-Image Omni"
    memory_profile = "zimage"
    modes = frozenset({"txt2img", "edit"})
    max_input_images = 3  # each adds its latents and SigLIP tokens to the sequence
    options = TextTemplateSpec.options  # no ControlNet pipeline reads reference images
    default_steps = 28
    default_cfg = 4.0
    lora_key_pattern = ""
    lora_family = "zimage"
    index_class = "ZImageOmniPipeline"
    train_refusal = "it edits with reference images; train on Z-Image (its LoRAs work here)"
    checkpoint_keys = ()
