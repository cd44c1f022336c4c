"""A tiny random-weight Z-Image model (Turbo layout) in diffusers' layout.

Z-Image's real layout at a tiny width: a Qwen3 text encoder (`Qwen3Model`, the pipeline
reads its second-to-last hidden states) behind a Qwen2 BPE tokenizer with Qwen3's chat
template, Flux.1's 16-channel VAE (downsampling by 8), and a `ZImageTransformer2DModel`
with 2×2 patches over 16 latent channels. Sizes follow diffusers' tests
(tests/pipelines/z_image/test_z_image.py).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families.flux_tiny import VAE_SCALING
from pipeline.models.tiny_families import common, tokenizers

# Z-Image-Turbo's published scheduler config: a fixed shift of 3.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


SIGLIP_WIDTH = 16  # Omni's SigLIP2 vision tower at a tiny width
SIGLIP_PATCH = 8
SIGLIP_PATCHES = 16  # the processor's max_num_patches: a 32×32 view of each input


def _transformer(caption_width: int, siglip_width: int | None = None):
    import torch
    from diffusers import ZImageTransformer2DModel

    common.seeded(0)
    transformer = ZImageTransformer2DModel(
        cap_feat_dim=caption_width,
        siglip_feat_dim=siglip_width,
        **common.tiny_config("zimage_transformer"),
    )
    # The pad tokens are created with torch.empty (whatever memory held): give them
    # values, or the saved files (and the images) differ from run to run.
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
        if siglip_width is not None:
            transformer.siglip_pad_token.copy_(torch.randn_like(transformer.siglip_pad_token))
    return transformer


def _components(siglip_width: int | None = None) -> dict:
    """Z-Image's parts (each seeded on its own, so the same in any order)."""
    tokenizer = tokenizers.qwen_tokenizer(qwen3=True)
    return dict(
        scheduler=common.flow_scheduler(**SCHEDULER),
        vae=common.vae_8x(latent_channels=16, **VAE_SCALING),
        text_encoder=common.qwen3_text_encoder(tokenizer, causal_lm=False),
        tokenizer=tokenizer,
        transformer=_transformer(caption_width=16, siglip_width=siglip_width),
    )


def write_tiny_zimage(directory: str | Path) -> Path:
    """Write a tiny Z-Image folder that `DiffusionPipeline.from_pretrained` loads as
    ZImagePipeline. Deterministic: the same call gives the same files."""
    from diffusers import ZImagePipeline

    return common.save_pipeline(ZImagePipeline(**_components()), directory)


def _siglip():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    config = Siglip2VisionConfig(
        hidden_size=SIGLIP_WIDTH,
        intermediate_size=SIGLIP_WIDTH * 2,
        num_hidden_layers=1,
        num_attention_heads=2,
        patch_size=SIGLIP_PATCH,
        num_patches=SIGLIP_PATCHES,
    )
    common.seeded(0)
    return Siglip2VisionModel(config).eval()


def write_tiny_zimage_omni(directory: str | Path) -> Path:
    """Write a tiny Z-Image Omni folder (`ZImageOmniPipeline`: Z-Image's parts, a
    transformer that also reads SigLIP2 features of its input images, and the SigLIP2
    vision tower with its image processor). Deterministic, as `write_tiny_zimage`."""
    from diffusers import ZImageOmniPipeline
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        Siglip2ImageProcessorPil,
    )

    pipe = ZImageOmniPipeline(
        **_components(siglip_width=SIGLIP_WIDTH),
        siglip=_siglip(),
        # the PIL processor (no torchvision), named as the Hub's folders name it
        siglip_processor=Siglip2ImageProcessorPil(
            patch_size=SIGLIP_PATCH, max_num_patches=SIGLIP_PATCHES
        ),
    )
    directory = common.save_pipeline(pipe, directory)
    common.name_components_as_hub(
        directory, {"siglip_processor": ["transformers", "Siglip2ImageProcessor"]}
    )
    return directory


def write_tiny_zimage_controlnet(model_dir: str | Path, directory: str | Path) -> Path:
    """A tiny `ZImageControlNetModel` that fits the tiny Z-Image at `model_dir`, in the
    layout of alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (control blocks beside
    the transformer's layers, the control image's 16 VAE channels in; the embedders and
    refiners are the transformer's own, shared by the pipeline's `from_transformer`)."""
    from diffusers import ZImageControlNetModel

    settings = common.tiny_config("zimage_transformer")
    keep = ("all_patch_size", "all_f_patch_size", "dim", "n_refiner_layers", "n_heads")
    common.seeded(0)
    net = ZImageControlNetModel(
        control_layers_places=list(range(settings["n_layers"])),
        control_in_dim=settings["in_channels"],
        n_kv_heads=settings["n_kv_heads"],
        norm_eps=settings["norm_eps"],
        qk_norm=settings["qk_norm"],
        **{k: settings[k] for k in keep},
    )
    projections = [block.after_proj for block in net.control_layers]
    projections += [b.before_proj for b in net.control_layers if hasattr(b, "before_proj")]
    common.wake_zero_layers(projections)
    net.save_pretrained(Path(directory), safe_serialization=True)
    return Path(directory)
