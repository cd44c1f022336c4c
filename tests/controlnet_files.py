"""A diffusers ControlNet written as one file in the ORIGINAL ControlNet layout, the
way Civitai ships them (`control_model.input_blocks…`, `zero_convs`, `input_hint_block`,
`middle_block_out`).

No converter from diffusers to the original ControlNet layout exists (diffusers only
converts the other way, `convert_controlnet_checkpoint` in
`diffusers/loaders/single_file_utils.py`), so the inverse is derived from diffusers' own
mapping and checked against it: the encoder and middle block take the original UNet
names (`pipeline.models.single_file.unet_to_ldm`, itself checked against diffusers'
UNet converter), the conditioning embedding, zero convolutions and middle-block output
the names diffusers' converter reads them from (`DIFFUSERS_TO_LDM_MAPPING["controlnet"]`:
`input_hint_block.0`/`.14`; blocks `2·(i+1)`; `zero_convs.i.0`; `middle_block_out.0`).
Then diffusers' `convert_controlnet_checkpoint` must map the file's tensors back to
exactly the ControlNet's own weights, every key and every value, or nothing is written.
"""

from __future__ import annotations

import re
from pathlib import Path

PREFIX = "control_model."


def original_state_dict(net) -> dict:
    from pipeline.models.single_file import unet_to_ldm

    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    config = dict(net.config)
    config.setdefault("up_block_types", [])  # a ControlNet has no up blocks
    shared, original = {}, {}
    for key, value in state.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding.") :]
            if m := re.fullmatch(r"blocks\.(\d+)\.(weight|bias)", rest):
                original[f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"] = value
            elif m := re.fullmatch(r"conv_in\.(weight|bias)", rest):
                original[f"input_hint_block.0.{m[1]}"] = value
            elif m := re.fullmatch(r"conv_out\.(weight|bias)", rest):
                original[f"input_hint_block.14.{m[1]}"] = value
            else:
                raise ValueError(key)
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            original[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.fullmatch(r"controlnet_mid_block\.(weight|bias)", key):
            original[f"middle_block_out.0.{m[1]}"] = value
        else:
            shared[key] = value
    original.update(unet_to_ldm(shared, config))
    return original


def write_original_controlnet(net, path: Path, *, prefix: str = PREFIX) -> Path:
    """`net` (a diffusers ControlNetModel) → `path` in the original layout, keys under
    `prefix` ("control_model." as the ControlNet 1.1 files have; "" as some others)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import save_file

    original = original_state_dict(net)
    back = convert_controlnet_checkpoint({PREFIX + k: v for k, v in original.items()}, net.config)
    mine = net.state_dict()
    if set(back) != set(mine):
        raise AssertionError(f"diffusers reads other keys: {sorted(set(back) ^ set(mine))[:5]}")
    for key, value in mine.items():
        if not torch.equal(back[key], value):
            raise AssertionError(f"diffusers reads {key} as another tensor")
    save_file({prefix + k: v for k, v in original.items()}, str(path))
    return path
