"""A tiny random-weight Flux.1 model (dev, schnell, Kontext, Fill) in diffusers' layout.

The real layout at a tiny width: CLIP-L and T5 text encoders (CLIP 77 tokens, T5
512 for dev/Kontext/Fill and 256 for schnell), a 16-channel VAE that downsamples by 8,
and a `FluxTransformer2DModel` whose input is the real one — 2×2-packed latents, 64
channels (Fill: 384 = 64 noisy + 64 masked-image latents + 256 packed mask pixels, as
BFL's FLUX.1-Fill-dev has), guidance embedding on dev/Kontext/Fill, none on schnell.
Sizes follow diffusers' own pipeline tests (tests/pipelines/flux/), widened only where
the real layout needs it (VAE depth and latent channels).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.models.tiny_families import common, tokenizers

# The published scheduler configs: dev/Kontext/Fill shift with resolution; schnell does not.
DEV_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

# Flux.1's VAE latent statistics (the real ones: the pipelines read them from the config).
VAE_SCALING = dict(scaling_factor=0.3611, shift_factor=0.1159)

VARIANTS = ("dev", "schnell", "kontext", "fill", "control")
# The transformer's input channels: 64 packed latent channels; Fill adds the masked image's
# latents and the packed mask (384); Canny/Depth the control image's latents (128).
IN_CHANNELS = {"fill": 384, "control": 128}


def _transformer(*, in_channels: int, guidance: bool):
    from diffusers import FluxTransformer2DModel

    common.seeded(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width
        pooled_projection_dim=32,  # CLIP's pooled width
        guidance_embeds=guidance,
        axes_dims_rope=[4, 6, 6],
    )


def _clip_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    common.seeded(0)
    return CLIPTextModel(config).eval()


def _t5_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    common.seeded(0)
    return T5EncoderModel(config).eval()


def write_tiny_flux(directory: str | Path, *, variant: str = "dev") -> Path:
    """Write a tiny Flux.1 `variant` ("dev", "schnell", "kontext", "fill" or "control")
    folder that `DiffusionPipeline.from_pretrained` loads as FluxPipeline /
    FluxKontextPipeline / FluxFillPipeline / FluxControlPipeline (Canny/Depth dev).
    Deterministic: the same variant gives the same files."""
    from diffusers import FluxControlPipeline, FluxFillPipeline, FluxKontextPipeline, FluxPipeline

    if variant not in VARIANTS:
        raise ValueError(f"unknown Flux.1 variant {variant!r}: use one of {', '.join(VARIANTS)}")
    directory = Path(directory)
    tokenizer = tokenizers.clip_tokenizer()
    tokenizer_2 = tokenizers.t5_tokenizer()
    if variant == "schnell":
        tokenizer_2.model_max_length = 256
    pipeline_class = {
        "kontext": FluxKontextPipeline,
        "fill": FluxFillPipeline,
        "control": FluxControlPipeline,
    }.get(variant, FluxPipeline)
    pipe = pipeline_class(
        scheduler=common.flow_scheduler(
            **(SCHNELL_SCHEDULER if variant == "schnell" else DEV_SCHEDULER)
        ),
        vae=common.vae_8x(
            latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, **VAE_SCALING
        ),
        text_encoder=_clip_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_text_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=_transformer(
            in_channels=IN_CHANNELS.get(variant, 64), guidance=variant != "schnell"
        ),
        **(
            {}
            if variant in ("fill", "control")
            else {"image_encoder": None, "feature_extractor": None}
        ),
    )
    return common.save_pipeline(pipe, directory)


def write_tiny_flux_redux(directory: str | Path) -> Path:
    """Write a tiny FLUX.1-Redux folder (`FluxPriorReduxPipeline`: a SigLIP vision encoder,
    its image processor and the Redux projector into T5's width) for the tiny Flux.1
    models: its output embeddings feed `FluxPipeline(prompt_embeds=…)`.

    Like the Hub's FLUX.1-Redux-dev it has no text encoders: without them the pipeline
    fills the text part with zeros at the *real* widths (512×4096, 768), so with a tiny
    (or any) base model the caller passes the base pipeline's text encoders and
    tokenizers to `from_pretrained` — as diffusers documents for Redux with a prompt.
    """
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,  # the real one reads 384² in 14-pixel patches (729 tokens); 16 here
        patch_size=14,
    )
    common.seeded(0)
    image_encoder = SiglipVisionModel(vision).eval()
    common.seeded(0)
    pipe = FluxPriorReduxPipeline(
        image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessorPil(size={"height": 56, "width": 56}),
        image_embedder=ReduxImageEncoder(redux_dim=16, txt_in_features=32),
    )
    common.save_pipeline(pipe, directory)
    feature_extractor = ["transformers", "SiglipImageProcessor"]
    common.name_components_as_hub(Path(directory), {"feature_extractor": feature_extractor})
    return Path(directory)


def write_tiny_flux_controlnet(
    base: str | Path, directory: str | Path, *, union: bool = False, hint: bool = False
) -> Path:
    """A tiny `FluxControlNetModel` for the tiny Flux.1 model at `base`: the InstantX
    layout (the control image's latents through `controlnet_x_embedder`), with `union`
    InstantX/Shakker's Union (`num_mode` 10: a mode embedding per control type), with
    `hint` XLabs' (pixels through `input_hint_block`). Built as diffusers'
    `from_transformer` builds one, with the zero-initialised projections randomised so
    the unit has an effect to test."""
    import torch
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(Path(base) / "transformer")
    config = dict(transformer.config)
    common.seeded(1)
    net = FluxControlNetModel(
        # XLabs' maps come as pixels: the hint block's 16 channels at 1/8, patchified 2×2
        # into the packed latents' 64.
        patch_size=2 if hint else config["patch_size"],
        in_channels=config["in_channels"],
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config["attention_head_dim"],
        num_attention_heads=config["num_attention_heads"],
        joint_attention_dim=config["joint_attention_dim"],
        pooled_projection_dim=config["pooled_projection_dim"],
        guidance_embeds=config["guidance_embeds"],
        axes_dims_rope=list(config["axes_dims_rope"]),
        num_mode=10 if union else None,
        conditioning_embedding_channels=16 if hint else None,
    )
    with torch.no_grad():
        for module in (*net.controlnet_blocks, *net.controlnet_single_blocks):
            torch.nn.init.normal_(module.weight, std=0.3)
        if not hint:
            torch.nn.init.normal_(net.controlnet_x_embedder.weight, std=0.3)
    net.save_pretrained(directory)
    return Path(directory)
