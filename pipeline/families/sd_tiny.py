"""Write a tiny random-weight Stable Diffusion model in diffusers format.

No weights can be downloaded where this project is developed and tested, so every
test runs real diffusers/peft code on this model. It has the real layouts — SD 1.x
(one CLIP text encoder), SDXL (two text encoders, pooled embeddings, time ids) and a
9-channel inpainting UNet — at a size where a 64×64, 4-step image takes a few
milliseconds on a CPU. The VAE downsamples by 8 like the real one, so size rules
(multiples of 8) and mask alignment behave as they do on real models.

The tokenizer is a real CLIP BPE tokenizer over a vocabulary we write ourselves:
every byte-level character, each also as an end-of-word token, plus a few hundred
merges of common prompt words, so prompts tokenize like CLIP's do (words, not just
characters) and long prompts really do span several 75-token chunks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Common prompt words get their own token (via BPE merges) so token counts look like
# CLIP's; anything else falls back to characters, exactly as CLIP does for rare words.
_COMMON_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "at",
    "by",
    "for",
    "to",
    "from",
    "photo",
    "portrait",
    "painting",
    "picture",
    "cat",
    "dog",
    "man",
    "woman",
    "person",
    "girl",
    "boy",
    "face",
    "eyes",
    "hair",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "big",
    "small",
    "high",
    "quality",
    "detailed",
    "masterpiece",
    "best",
    "worst",
    "low",
    "blurry",
    "sharp",
    "light",
    "dark",
    "sky",
    "sea",
    "city",
    "forest",
    "mountain",
    "house",
    "street",
    "night",
    "day",
    "sun",
    "moon",
    "star",
    "space",
    "astronaut",
    "style",
    "art",
    "oil",
    "digital",
    "cinematic",
    "lighting",
    "background",
    "smile",
    "beautiful",
    "ugly",
    "bad",
    "hands",
    "sks",
    "ohwx",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable-unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def write_tokenizer(directory: Path) -> int:
    """Write vocab.json, merges.txt and the tokenizer config; return the vocab size."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _COMMON_WORDS:
        for merge in _word_merges(word):
            if merge not in merges:
                merges.append(merge)
    for a, b in merges:
        if a + b not in vocab_tokens:
            vocab_tokens.append(a + b)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return len(vocab)


# SD 1.5's scheduler configuration: samplers are built from it with from_config, so it
# must carry the real values (betas, offsets) for sampler mapping to mean anything.
_SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


# The mean the tiny text encoders' outputs have (see _text_encoder).
OUTPUT_MEAN = 0.1


def _text_encoder(vocab_size: int, *, projection: bool, hidden: int = 32):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu" if projection else "quick_gelu",
    )
    torch.manual_seed(1 if projection else 0)
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = model_class(config)
    # Real CLIP's outputs do not average zero, and A1111's renormalisation of weighted
    # prompts (z *= old_mean / new_mean) divides by that mean: a freshly initialised
    # encoder averages ~1e-9 there, so weighted prompts would measure float noise. Give
    # the residual stream (SDXL reads the penultimate layer) and the final layer norm
    # (SD 1.x reads the last one) an offset of the same order as real CLIP's.
    generator = torch.Generator().manual_seed(2 if projection else 3)
    text_model = getattr(model, "text_model", model)  # transformers 5 flattens CLIPTextModel
    with torch.no_grad():
        text_model.embeddings.token_embedding.weight.add_(OUTPUT_MEAN)
        bias = text_model.final_layer_norm.bias
        bias.copy_(OUTPUT_MEAN + 0.2 * torch.randn(bias.shape, generator=generator))
    return model


def tiny_vae(scaling_factor: float):
    """The tiny VAE architecture: four blocks (downsamples by 8, like SD's), 4 latent
    channels. Its trained weights come from `pipeline.models.train_tiny_vae`."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 64, 64),
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


TINY_VAE_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "data" / "tiny_vae.safetensors"


def trained_tiny_vae():
    """The tiny VAE with the weights `pipeline.models.train_tiny_vae` trained on real
    photos (committed), so photos survive the encode/decode round trip."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(TINY_VAE_WEIGHTS), framework="pt") as f:
        scaling_factor = json.loads(f.metadata()["scaling_factor"])
    torch.manual_seed(0)
    vae = tiny_vae(scaling_factor)
    state = {k: v.float() for k, v in load_file(str(TINY_VAE_WEIGHTS)).items()}
    vae.load_state_dict(state)
    return vae


def _unet(*, xl: bool, in_channels: int):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if not xl:
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)
    return UNet2DConditionModel(
        **common,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + 32 pooled
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
    )


def write_tiny_model(directory: str | Path, *, xl: bool = False, inpaint: bool = False) -> Path:
    """Write a tiny random-weight diffusers model folder and return its path.

    Deterministic: the same flags always give byte-identical weights.
    """
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    directory = Path(directory)
    tokenizer_dir = directory / "_tokenizer_src"
    vocab_size = write_tokenizer(tokenizer_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    unet = _unet(xl=xl, in_channels=9 if inpaint else 4)
    vae = trained_tiny_vae()
    text_encoder = _text_encoder(vocab_size, projection=False)
    if xl:
        scheduler = EulerDiscreteScheduler.from_config(
            {**_SD_SCHEDULER, "timestep_spacing": "leading"}
        )
        pipeline_class = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
        pipe = pipeline_class(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=_text_encoder(vocab_size, projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        scheduler = PNDMScheduler.from_config(_SD_SCHEDULER)
        pipeline_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
        pipe = pipeline_class(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the BPE files too so the folder
    # also loads with transformers 4's slow CLIPTokenizer.
    for name in ("tokenizer", "tokenizer_2"):
        if (directory / name).is_dir():
            for source in ("vocab.json", "merges.txt"):
                shutil.copyfile(tokenizer_dir / source, directory / name / source)
    shutil.rmtree(tokenizer_dir)
    return directory
