"""A tiny random-weight Qwen-Image model (and Qwen-Image-Edit / Edit-Plus) in diffusers' layout.

Qwen-Image's real layout at a tiny width: a Qwen2.5-VL text encoder
(`Qwen2_5_VLForConditionalGeneration`, with its vision tower, which the edit models use
to read the input image) behind a Qwen2 BPE tokenizer whose special tokens sit at the
ids the encoder's config names, Qwen-Image's causal 3D VAE (`AutoencoderKLQwenImage`,
16 latent channels, downsampling by 8) and a `QwenImageTransformer2DModel` over
2×2-packed latents (64 channels in, 16 out). The edit models add `processor/`: the
Qwen2-VL image processor and the tokenizer, as the Hub's Qwen-Image-Edit folders have
(load it with `pipeline.models.qwen_edit.load_qwen_processor`: see there why).
Sizes follow diffusers' tests (tests/pipelines/qwenimage/).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.models.tiny_families import common, tokenizers

# Qwen-Image's published scheduler config (resolution-dependent exponential shift).
SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)

VARIANTS = ("image", "edit", "edit-plus")
TEXT_WIDTH = 16
LATENT_CHANNELS = 16


def _transformer():
    from diffusers import QwenImageTransformer2DModel

    common.seeded(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def _vae():
    from diffusers import AutoencoderKLQwenImage

    common.seeded(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def _text_encoder(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    token_ids = common.qwen_token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            **token_ids,
        },
        vision_config={
            "depth": 2,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": TEXT_WIDTH,
            "num_heads": 2,
            "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [1],
        },
        hidden_size=TEXT_WIDTH,
        **token_ids,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    common.seeded(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _processor(tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from pipeline.models.qwen_edit import ImageOnlyQwen2VLProcessor

    # Qwen2-VL's published preprocessing: 14-pixel patches merged 2×2, 3136 px minimum.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    return ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def _as_hub_layout(directory: Path) -> None:
    """Name the processor as the Hub's Qwen-Image-Edit folders do (transformers'
    Qwen2VLProcessor), not by our image-only stand-in."""
    common.name_components_as_hub(directory, {"processor": ["transformers", "Qwen2VLProcessor"]})
    config_path = directory / "processor" / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tiny_qwen_image(directory: str | Path, *, variant: str = "image") -> Path:
    """Write a tiny Qwen-Image folder: `variant` "image" (QwenImagePipeline), "edit"
    (QwenImageEditPipeline) or "edit-plus" (QwenImageEditPlusPipeline, 2509/2511's
    several input images). Deterministic: the same variant gives the same files."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    if variant not in VARIANTS:
        raise ValueError(
            f"unknown Qwen-Image variant {variant!r}: use one of {', '.join(VARIANTS)}"
        )
    directory = Path(directory)
    tokenizer = tokenizers.qwen_tokenizer(qwen3=False)
    components = dict(
        scheduler=common.flow_scheduler(**SCHEDULER),
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=_transformer(),
    )
    if variant == "image":
        return common.save_pipeline(QwenImagePipeline(**components), directory)
    pipeline_class = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    common.save_pipeline(pipeline_class(**components, processor=_processor(tokenizer)), directory)
    _as_hub_layout(directory)
    return directory


def write_tiny_qwen_controlnet(model_dir: str | Path, directory: str | Path) -> Path:
    """A tiny `QwenImageControlNetModel` that fits the tiny Qwen-Image at `model_dir`,
    made from its transformer as diffusers' `from_transformer` makes one (InstantX's
    Qwen-Image ControlNet-Union layout: a few transformer blocks, the control image's
    packed latents in)."""
    from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(Path(model_dir) / "transformer")
    common.seeded(0)
    net = QwenImageControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    common.wake_zero_layers([*net.controlnet_blocks, net.controlnet_x_embedder])
    net.save_pretrained(Path(directory), safe_serialization=True)
    return Path(directory)
