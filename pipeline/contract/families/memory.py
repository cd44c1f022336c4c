"""What the memory planner (`pipeline.contract.memory_plan`) needs to know of a family
besides its weights: latent pixels per token, widths, activation factors, CFG rows, the
VAE's tile and the layers diffusers' layerwise casting keeps out of fp8.

The table is keyed by the published model it was counted from (`published_sizes.py`);
a family names its row with `FamilySpec.memory_profile`, and the model's own widths,
read from its files, replace the row's where they are known (a tiny model, a 9B klein).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.contract.families.base import text_encoder_component

_FIRST, _SECOND = text_encoder_component(0), text_encoder_component(1)


@dataclass(frozen=True)
class FamilyMemory:
    """What the planner needs to know of a family besides its weights."""

    latent_pixels: int  # image pixels per denoiser token (VAE factor² × patch²)
    width: int  # channels of the denoiser's widest-resolution activations
    act_factor: float  # live activations per token, in units of `width` values
    text_tokens: int  # text tokens the denoiser attends over (joint attention)
    cfg_batch: int  # 2 when the negative prompt rides in the same batch
    vae_width: int  # channels of the VAE decoder at full resolution
    vae_factor: float  # live decode activations per pixel, in units of `vae_width`
    vae_tile: int  # side of diffusers' VAE tile (its tiled decode's working size)
    skip_patterns: tuple[str, ...] = ()  # the model's _skip_layerwise_casting_patterns
    names: dict[str, str] = field(default_factory=dict)  # component → what users call it
    # On the CPU only, on top of vae_factor: a 3-D (video) VAE's causal convs unfold their
    # input (torch's slow_conv3d: kernel 3×3×3 = 27 widths per pixel), pad it with two
    # frames and cache each conv's last frames; CUDA's convolutions hold none of it.
    vae_cpu_unfold: float = 0.0


# Activation factors: UNet and VAE factors measured on the SD 1.5 architecture on the CPU
# (bench/bench_memory_plan.py; BENCHMARKS.md, issue 26); the transformer factor counted
# from a block's live tensors at inference (docs/DECISIONS.md, issue 26) and measured on
# the flow families' full-width blocks (the slope per token from 256² to 768²: Flux.1 15,
# Z-Image 16, Qwen-Image 13, klein 21; DECISIONS "#26 (stop 29)"). Qwen-Image's 3-D VAE
# on the CPU: 40 widths per pixel measured the same way (8 + 32).
_UNET, _DIT, _VAE = 28.0, 16.0, 8.0
# Flux.2 klein's blocks hold more per token: a fused qkv+SwiGLU projection of 3 + 2×3
# widths, its SwiGLU halves, then the concatenated 4-width output (measured 21 on its
# full-width architecture, DECISIONS #26 stop 29; counted the same).
_KLEIN_DIT = 21.0
FAMILY_MEMORY: dict[str, FamilyMemory] = {  # published model → its figures
    "sd1": FamilyMemory(64, 320, _UNET, 0, 2, 128, _VAE, 512, ("norm",), {"text_encoder": "CLIP"}),
    "sdxl": FamilyMemory(
        64, 320, _UNET, 0, 2, 128, _VAE, 1024, ("norm",),
        {_FIRST: "CLIP-L", _SECOND: "CLIP-G"},
    ),
    "flux1": FamilyMemory(
        256, 3072, _DIT, 512, 1, 128, _VAE, 1024, ("pos_embed", "norm"),
        {_FIRST: "CLIP-L", _SECOND: "T5"},
    ),
    "zimage": FamilyMemory(
        256, 3840, _DIT, 512, 2, 128, _VAE, 1024, ("t_embedder", "cap_embedder"),
        {"text_encoder": "Qwen3"},
    ),
    "qwen_image": FamilyMemory(
        256, 3072, _DIT, 512, 1, 96, _VAE, 256, ("pos_embed", "norm"),
        {"text_encoder": "Qwen2.5-VL"}, vae_cpu_unfold=32,
    ),
    "flux2_klein_4b": FamilyMemory(
        256, 3072, _KLEIN_DIT, 512, 1, 128, _VAE, 1024, ("pos_embed", "norm"),
        {"text_encoder": "Qwen3"},
    ),
    "flux2_klein_9b": FamilyMemory(
        256, 4096, _KLEIN_DIT, 512, 1, 128, _VAE, 1024, ("pos_embed", "norm"),
        {"text_encoder": "Qwen3"},
    ),
}  # fmt: skip


def family_memory(name: str) -> FamilyMemory:
    """The figures for a family (its config name, `flux`) or a published model (`flux1`);
    a family without a row of its own plans as SD 1.x does."""
    if name in FAMILY_MEMORY:
        return FAMILY_MEMORY[name]
    from pipeline.contract.families.registry import FAMILIES

    spec = FAMILIES.get(name)
    profile = spec.memory_profile if spec is not None else ""
    return FAMILY_MEMORY.get(profile or name, FAMILY_MEMORY["sd1"])
