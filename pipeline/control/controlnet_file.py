"""Single-file ControlNets (`.safetensors` / `.pth` as Civitai ships them), loaded offline.

diffusers' `ControlNetModel.from_single_file` converts the original key layout
(`control_model.input_blocks…`, `zero_convs`, `input_hint_block`, `middle_block_out`)
or reads a diffusers-layout file, but it takes the model's configuration from the Hub
(`lllyasviel/control_v11p_sd15_canny` for any SD 1.x file) unless it is given one. We
give it one, derived without the network: a ControlNet is its base UNet's encoder and
middle block, so the configuration is the base model's UNet's (what diffusers'
`ControlNetModel.from_unet` copies), with the conditioning embedding's widths and input
channels read from the file's own `input_hint_block` shapes. The file is checked to fit
the base model first (first block width, cross-attention width, SDXL's added embedding),
so a ControlNet of another family is refused by name, not by a shape error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pipeline.contract.jobs import JobError

PREFIX = "control_model."
# The UNet configuration keys a ControlNet shares with its base model (from_unet's list).
SHARED = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "mid_block_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "addition_embed_type",
    "addition_time_embed_dim",
)


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, without loading the weights of a .safetensors."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("no state dict in the file")
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def controlnet_config(shapes: dict[str, tuple[int, ...]], unet_config: Any, name: str) -> dict:
    """The diffusers ControlNetModel configuration of a single-file ControlNet with these
    tensor shapes, for a base model with `unet_config`. Raises JobError when the file is
    no ControlNet or does not fit the base model."""
    shapes = {k[len(PREFIX) :] if k.startswith(PREFIX) else k: v for k, v in shapes.items()}
    if "input_hint_block.0.weight" in shapes:  # the original (ldm) layout
        hint = sorted(
            (int(m[1]), shapes[key])
            for key in shapes
            if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", key))
        )
        convs = [shape for _, shape in hint]
        first_width = shapes.get("input_blocks.0.0.weight", (0,))[0]
        xl = "label_emb.0.0.weight" in shapes
    elif "controlnet_cond_embedding.conv_in.weight" in shapes:  # diffusers layout, one file
        blocks = sorted(
            (int(m[1]), shapes[key])
            for key in shapes
            if (m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.weight", key))
        )
        convs = [
            shapes["controlnet_cond_embedding.conv_in.weight"],
            *(shape for _, shape in blocks),
            shapes["controlnet_cond_embedding.conv_out.weight"],
        ]
        first_width = shapes.get("conv_in.weight", (0,))[0]
        xl = "add_embedding.linear_1.weight" in shapes
    else:
        raise JobError(
            f"ControlNet '{name}': the file is not a ControlNet (no input_hint_block or "
            "controlnet_cond_embedding weights); give a ControlNet .safetensors"
        )
    cross = next((v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    mine = dict(unet_config)  # the UNet's config (a FrozenDict, or a plain dict)
    if (
        first_width != mine["block_out_channels"][0]
        or (cross is not None and cross != mine.get("cross_attention_dim"))
        or xl != (mine.get("addition_embed_type") == "text_time")
    ):
        raise JobError(
            f"ControlNet '{name}' does not fit this model (it was made for another base "
            "model or family); pick a unit made for this model's family"
        )
    config = {key: _plain(mine[key]) for key in SHARED if key in mine}
    config["_class_name"] = "ControlNetModel"
    config["conditioning_channels"] = convs[0][1]
    # conv_in, then (c_i → c_i, c_i → c_i+1) pairs, then conv_out: the widths c_0 … c_n.
    config["conditioning_embedding_out_channels"] = [convs[0][0], *(s[0] for s in convs[2:-1:2])]
    return config


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_folder(config: dict) -> Path:
    """A folder holding `config` as config.json (what from_single_file's `config` reads)."""
    text = json.dumps(config, sort_keys=True, indent=1)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "sdbot-controlnet-configs" / digest
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():  # written whole, then renamed: workers race
        part = folder / f"config.json.{os.getpid()}"
        part.write_text(text, encoding="utf-8")
        os.replace(part, folder / "config.json")
    return folder


def load_controlnet_file(path: Path, torch_dtype: Any, unet_config: Any, name: str) -> Any:
    """A single-file ControlNet for the model whose UNet has `unet_config`; no network."""
    from diffusers import ControlNetModel

    try:
        shapes = read_shapes(path)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise JobError(
            f"ControlNet '{name}': {path.name} could not be read ({type(exc).__name__}); "
            "give a ControlNet .safetensors or .pth"
        ) from None
    folder = config_folder(controlnet_config(shapes, unet_config, name))
    net = ControlNetModel.from_single_file(
        str(path), config=str(folder), torch_dtype=torch_dtype, local_files_only=True
    )
    missing = [n for n, p in net.named_parameters() if p.device.type == "meta"]
    if missing:
        raise JobError(
            f"ControlNet '{name}': {path.name} lacks {len(missing)} of the ControlNet's "
            f"weights (e.g. {missing[0]}); the file is incomplete or of another architecture"
        )
    return net
