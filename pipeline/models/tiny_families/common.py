"""What the tiny family writers share: seeding, the 8× VAE, the Qwen3 text encoder, saving."""

from __future__ import annotations

import json
from pathlib import Path

# Every tiny VAE downsamples by 8 like the real ones (four blocks), so the pipelines'
# size rules (multiples of 16 after 2×2 packing) and mask alignment are the real ones.
VAE_BLOCKS = (8, 8, 16, 16)


def tiny_config(name: str) -> dict:
    """A tiny model's architecture settings, kept as data beside the family writers
    (`pipeline/families/tiny_configs/NAME.json`): the same keyword arguments diffusers'
    own tests give the model class."""
    folder = Path(__file__).resolve().parents[2] / "families" / "tiny_configs"
    return json.loads((folder / f"{name}.json").read_text())


def seeded(seed: int) -> None:
    """Seed torch before building a component, so its random weights (and the saved
    files) are the same on every run and every machine."""
    import torch

    torch.manual_seed(seed)


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def vae_8x(vae_class=None, *, latent_channels: int, **config):
    """An AutoencoderKL-shaped VAE (Flux.1's, Z-Image's, or Flux.2's subclass) that
    downsamples by 8 into `latent_channels`, at a width that costs milliseconds."""
    from diffusers import AutoencoderKL

    seeded(0)
    return (vae_class or AutoencoderKL)(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        block_out_channels=VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The token ids a Qwen text encoder's config names, as the real configs set them
    (bos <|endoftext|>, eos <|im_end|>), at the tiny tokenizer's ids."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        vocab_size=len(tokenizer),
    )


def qwen3_text_encoder(
    tokenizer, *, causal_lm: bool, layers: int = 2, hidden: int = 16, mlp: int | None = None
):
    """A Qwen3 text encoder (`Qwen3Model` for Z-Image, `Qwen3ForCausalLM` for Flux.2
    klein), 16 wide, its embedding sized to the tiny tokenizer. `mlp`: its MLP's width
    (twice `hidden` without it; the benchmarks' real-width encoders keep it narrow)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        **qwen_token_ids(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        tie_word_embeddings=causal_lm,
    )
    seeded(0)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def save_pipeline(pipe, directory: str | Path) -> Path:
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def name_components_as_hub(directory: Path, components: dict[str, list[str]]) -> None:
    """Name components in model_index.json as the Hub's folders of the family do.

    We build some processors as their torchvision-free variants (`…Pil`, our image-only
    Qwen2-VL processor), and `save_pretrained` records the class it was given; the Hub's
    folders name the base class, which is what the loading code meets on real models."""
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(components)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def parameter_count(pipe) -> int:
    """Parameters in all of a pipeline's torch modules."""
    import torch

    return sum(
        p.numel()
        for component in pipe.components.values()
        if isinstance(component, torch.nn.Module)
        for p in component.parameters()
    )


def wake_zero_layers(layers, seed: int = 0, scale: float = 0.2) -> None:
    """Give a ControlNet's zero-initialised output layers small random weights: a freshly
    made ControlNet changes nothing, and a test of one must see its effect."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
            if layer.bias is not None:
                layer.bias.zero_()
