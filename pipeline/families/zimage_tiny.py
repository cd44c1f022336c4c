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


def _transformer(caption_width: int):
    import torch
    from diffusers import ZImageTransformer2DModel

    common.seeded(0)
    transformer = ZImageTransformer2DModel(
        cap_feat_dim=caption_width, **common.tiny_config("zimage_transformer")
    )
    # The pad tokens are created with torch.empty (whatever memory held): give them
    # values, or the saved files (and the images) differ from run to run.
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.randn_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.randn_like(transformer.cap_pad_token))
    return transformer


def write_tiny_zimage(directory: str | Path) -> Path:
    """Write a tiny Z-Image folder that `DiffusionPipeline.from_pretrained` loads as
    ZImagePipeline. Deterministic: the same call gives the same files."""
    from diffusers import ZImagePipeline

    tokenizer = tokenizers.qwen_tokenizer(qwen3=True)
    pipe = ZImagePipeline(
        scheduler=common.flow_scheduler(**SCHEDULER),
        vae=common.vae_8x(latent_channels=16, **VAE_SCALING),
        text_encoder=common.qwen3_text_encoder(tokenizer, causal_lm=False),
        tokenizer=tokenizer,
        transformer=_transformer(caption_width=16),
    )
    return common.save_pipeline(pipe, directory)
