"""Export a diffusers Stable Diffusion pipeline as one original-format (LDM / A1111) checkpoint.

The inverse of diffusers' single-file conversion (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`
in `diffusers/loaders/single_file_utils.py`). It exists so the tests have a real
single-file checkpoint of the tiny model and `from_single_file` is exercised for real
(no weights can be downloaded where this project is tested); it also lets a user turn a
diffusers folder (a fine-tune, a merge) into a `.safetensors` file A1111 and ComfyUI read.

The key mapping is driven by the UNet/VAE configs (number of blocks, layers_per_block,
which up blocks have attention), so it is not tied to SD 1.5's 4×2 layout. SD 1.x
(CLIP text encoder under `cond_stage_model.transformer.`) and SDXL (CLIP-L under
`conditioner.embedders.0.transformer.`, OpenCLIP bigG under `conditioner.embedders.1.model.`)
are written; other architectures raise ValueError rather than write a partial file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

StateDict = dict[str, Any]

# Modules outside the down/mid/up blocks: diffusers name → LDM name.
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + time-id embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# Named alike in both formats.
_VAE_SAME_NAME = re.compile(r"((en|de)coder\.)?(post_quant_conv|quant_conv|conv_in|conv_out)\.\w+")
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def export_single_file(pipe: Any, path: str | Path) -> Path:
    """Write the pipeline's UNet, VAE and text encoder(s) into one LDM-format .safetensors.

    Tensors keep their dtype (an fp16 pipeline gives an fp16 checkpoint). Returns the path.
    """
    from safetensors.torch import save_file

    from pipeline.families import of_pipe

    family = of_pipe(pipe)
    unet = family.denoiser(pipe)
    state = prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), unet.config))
    state.update(prefixed(VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)))
    state.update(family.ldm_text_encoders(pipe))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors; the weights may live on a GPU.
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def prefixed(prefix: str, state: StateDict) -> StateDict:
    return {prefix + key: value for key, value in state.items()}


def _convert(state: StateDict, rename: Callable[[str], str | None], what: str) -> StateDict:
    """Rename every key; an unknown one means an architecture this mapping doesn't know."""
    converted = {}
    for key, value in state.items():
        new_key = rename(key)
        if new_key is None:
            raise ValueError(f"cannot export {what} weight {key!r} to the LDM format")
        converted[new_key] = value
    return converted


def _replace_head(name: str, table: dict[str, str]) -> str | None:
    """Map `name`'s leading module path through `table` (longest match first)."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old) :]
    return None


# --- UNet ----------------------------------------------------------------------------


def unet_to_ldm(state: StateDict, config: Any) -> StateDict:
    """UNet2DConditionModel weights → LDM `openaimodel.UNetModel` names (no prefix)."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        # diffusers' own converter assumes one count for every block; so do we.
        raise ValueError(f"cannot export a UNet with per-block layers_per_block={layers!r}")
    up_with_attention = {
        i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind
    }
    return _convert(state, lambda key: _unet_key(key, layers, up_with_attention), "UNet")


def _unet_key(key: str, layers: int, up_with_attention: set[int]) -> str | None:
    # LDM numbers input/output blocks flat: a down block takes layers_per_block entries
    # plus one for its downsampler; an up block layers_per_block + 1, its upsampler
    # sitting in the last one. Input block 0 is conv_in.
    per_down = layers + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_down + layer
        return _unet_sublayer(f"input_blocks.{index}", kind, rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        # middle_block alternates resnet, attention, resnet.
        index = 2 * int(m[2]) + (m[1] == "attentions")
        return _unet_sublayer(f"middle_block.{index}", m[1], m[3], in_sequence=False)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _unet_sublayer(f"output_blocks.{block * per_down + layer}", kind, rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the resnet, and the attention when the block has one.
        position = 2 if block in up_with_attention else 1
        return f"output_blocks.{block * per_down + layers}.{position}.conv.{m[2]}"
    return _replace_head(key, _UNET_TOP)


def _unet_sublayer(base: str, kind: str, rest: str, *, in_sequence: bool = True) -> str | None:
    """A resnet or attention inside an LDM block: `.0`/`.1` in input/output blocks."""
    if kind == "attentions":
        # Transformer internals (proj_in, transformer_blocks.…) keep their names.
        return f"{base}.1.{rest}" if in_sequence else f"{base}.{rest}"
    renamed = _replace_head(rest, _UNET_RESNET)
    if renamed is None:
        return None
    return f"{base}.0.{renamed}" if in_sequence else f"{base}.{renamed}"


# --- VAE -----------------------------------------------------------------------------


def vae_to_ldm(state: StateDict, config: Any) -> StateDict:
    """AutoencoderKL weights → LDM `AutoencoderKL` names (no prefix).

    LDM's mid-block attention uses 1×1 convolutions, so q/k/v/proj_out become [C, C, 1, 1].
    """
    up_blocks = len(config["up_block_types"])
    converted = _convert(state, lambda key: _vae_key(key, up_blocks), "VAE")
    for key, value in converted.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            converted[key] = value[:, :, None, None]
    return converted


def _vae_key(key: str, up_blocks: int) -> str | None:
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # LDM's decoder numbers its up blocks from the lowest resolution's end: reversed.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        renamed = _replace_head(m[2], _VAE_ATTENTION)
        return None if renamed is None else f"{m[1]}.mid.attn_1.{renamed}"
    if renamed := _replace_head(key, _VAE_TOP):
        return renamed
    return key if _VAE_SAME_NAME.fullmatch(key) else None


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


# --- text encoders -------------------------------------------------------------------


def clip_to_ldm(state: StateDict) -> StateDict:
    """CLIPTextModel weights → `transformer.text_model.…` names (without the prefix).

    transformers ≥ 5.6 flattened CLIPTextModel (no `text_model.` level); checkpoints and
    diffusers' converter always have it, so add it where missing.
    """
    return {
        key if key.startswith("text_model.") else "text_model." + key: value
        for key, value in state.items()
    }


def open_clip_to_ldm(state: StateDict) -> StateDict:
    """CLIPTextModelWithProjection weights → OpenCLIP names (SDXL's second encoder).

    OpenCLIP fuses q/k/v into one `in_proj` and stores text_projection transposed.
    """
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    converted: StateDict = {
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    layers = {int(m[1]) for key in state if (m := re.match(r"encoder\.layers\.(\d+)\.", key))}
    for layer in sorted(layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for part in ("weight", "bias"):
            qkv = [state.pop(f"{source}self_attn.{name}_proj.{part}") for name in "qkv"]
            converted[f"{target}attn.in_proj_{part}"] = _cat(qkv)
    for key, value in state.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        renamed = _replace_head(m[2], _OPEN_CLIP_LAYER) if m else None
        if renamed is None:
            raise ValueError(f"cannot export OpenCLIP text weight {key!r} to the LDM format")
        converted[f"transformer.resblocks.{m[1]}.{renamed}"] = value
    return converted


def _cat(tensors: list[Any]) -> Any:
    import torch

    return torch.cat(tensors, dim=0)


def export_folder(folder: str | Path, path: str | Path) -> Path:
    """Export a diffusers model folder as one original-layout `.safetensors`."""
    from diffusers import DiffusionPipeline

    return export_single_file(DiffusionPipeline.from_pretrained(folder), path)
