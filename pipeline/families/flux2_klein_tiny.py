"""A tiny random-weight Flux.2 klein model in diffusers' layout.

klein's real layout at a tiny width: a Qwen3 causal LM as text encoder (the pipeline
stacks its hidden states 9, 18 and 27, so the tiny one has 28 layers, 16 wide), a Qwen2
BPE tokenizer with Qwen3's chat template, Flux.2's 32-channel VAE (`AutoencoderKLFlux2`,
downsampling by 8, latents 2×2-patchified to 128 channels) and a
`Flux2Transformer2DModel` without guidance embedding. `distilled=True` is klein 4B/9B
(few steps, no CFG), False the base models. Sizes follow diffusers' tests
(tests/pipelines/flux2/test_pipeline_flux2_klein.py).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families.flux_tiny import DEV_SCHEDULER
from pipeline.models.tiny_families import common, tokenizers

TEXT_WIDTH = 16
TEXT_LAYERS = 28  # the pipeline's default text_encoder_out_layers are (9, 18, 27)


def _transformer():
    from diffusers import Flux2Transformer2DModel

    common.seeded(0)
    return Flux2Transformer2DModel(
        # three hidden-state layers of the text encoder, concatenated
        joint_attention_dim=3 * TEXT_WIDTH,
        **common.tiny_config("flux2_klein_transformer"),
    )


def write_tiny_flux2_klein(directory: str | Path, *, distilled: bool = True) -> Path:
    """Write a tiny Flux.2 klein folder that `DiffusionPipeline.from_pretrained` loads as
    Flux2KleinPipeline. Deterministic: the same call gives the same files."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    tokenizer = tokenizers.qwen_tokenizer(qwen3=True)
    pipe = Flux2KleinPipeline(
        scheduler=common.flow_scheduler(**DEV_SCHEDULER),
        vae=common.vae_8x(AutoencoderKLFlux2, latent_channels=32),
        text_encoder=common.qwen3_text_encoder(
            tokenizer, causal_lm=True, layers=TEXT_LAYERS, hidden=TEXT_WIDTH
        ),
        tokenizer=tokenizer,
        transformer=_transformer(),
        is_distilled=distilled,
    )
    return common.save_pipeline(pipe, directory)
