"""LoRA / LyCORIS files made by the `lycoris-lora` library itself, the tool members'
files come from: a LyCORIS network (`lycoris.kohya.create_network`, kohya naming) is
built on a copy of the tiny model's UNet and text encoders, its weights are randomised,
and it is saved with LyCORIS's own `save_weights`.

LyCORIS names layers from the module paths it is given. Two renames then give the names
kohya sd-scripts and AUTOMATIC1111 files carry:
- text encoders: transformers 5 has no `text_model` in CLIP's module paths; every
  A1111/kohya file has it (`lora_te_text_model_encoder_layers_0_mlp_fc1`).
- SDXL UNet: kohya writes the original SGM block names (`lora_unet_input_blocks_4_1_…`).
  The diffusers → SGM map is kohya's published one (sd-scripts
  `library/sdxl_model_util.py`, the same table as A1111's
  `extensions-builtin/Lora/lora_convert.py` `make_unet_conversion_map`): down block i,
  layer j → `input_blocks.{3i+j+1}` (`.0` resnet, `.1` attention), its downsampler →
  `input_blocks.{3(i+1)}.0.op`; up block i, layer j → `output_blocks.{3i+j}`, upsampler
  `output_blocks.{3i+2}.{1|2}`; mid block → `middle_block.{0,1,2}`; inside resnets
  conv1/conv2/norm1/norm2/time_emb_proj/conv_shortcut → in_layers.2/out_layers.3/
  in_layers.0/out_layers.0/emb_layers.1/skip_connection. "3" is SDXL's
  layers_per_block + 1; here it is computed from the tiny model's config.

The network that wrote a file stays applied to its own copy of the model: it is the
oracle (LyCORIS applying the file itself) that tests compare sdbot against.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# LyCORIS presets: the UNet/CLIP blocks A1111-era SD networks target (LyCORIS's "full"
# preset also names other architectures' blocks, which double-match diffusers' SD UNet).
_PRESETS = {
    "full": """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
""",
    "norm": """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPEncoderLayer"]
text_encoder_target_name = []
""",
    "attn": """enable_conv = false
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention"]
text_encoder_target_name = []
""",
}

# kind → create_network keyword arguments (algo and its options), and the preset.
KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "lora": ({"algo": "lora"}, "attn"),
    "locon": ({"algo": "locon"}, "full"),
    "locon-tucker": ({"algo": "locon", "use_tucker": True}, "full"),
    "loha": ({"algo": "loha"}, "full"),
    "loha-tucker": ({"algo": "loha", "use_tucker": True}, "full"),
    "lokr": ({"algo": "lokr"}, "full"),
    "lokr-factor4": ({"algo": "lokr", "factor": 4}, "full"),
    "lokr-both": ({"algo": "lokr", "decompose_both": True, "factor": 8}, "full"),
    "lokr-tucker": ({"algo": "lokr", "use_tucker": True}, "full"),
    "lora-dora": ({"algo": "lora", "dora_wd": True}, "full"),
    "loha-dora": ({"algo": "loha", "dora_wd": True}, "full"),
    "lokr-dora": ({"algo": "lokr", "dora_wd": True}, "full"),
    "dylora": ({"algo": "dylora", "block_size": 1}, "full"),
    "glora": ({"algo": "glora"}, "full"),
    "full": ({"algo": "full"}, "full"),
    "diag-oft": ({"algo": "diag-oft"}, "full"),
    "boft": ({"algo": "boft"}, "attn"),
    "ia3": ({"algo": "ia3"}, "full"),
    "locon-norm": ({"algo": "locon", "train_norm": True}, "norm"),
}


@dataclass
class Made:
    """A written file and the LyCORIS network (on its own model copy) that wrote it."""

    path: Path
    network: Any
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]


def _preset_file(name: str, folder: Path) -> str:
    path = folder / f"lycoris-preset-{name}.toml"
    if not path.exists():
        path.write_text(_PRESETS[name])
    return str(path)


def make_lora(
    path: Path, pipe: Any, kind: str = "lora", *, seed: int = 0, rank: int = 2, std: float = 0.1
) -> Made:
    """Build a LyCORIS network of `kind` on a copy of `pipe`'s models; save it at `path`
    in kohya/A1111 naming. `pipe` itself is left untouched."""
    from lycoris.kohya import create_network
    from lycoris.logging import logger

    options, preset = KINDS[kind]
    xl = getattr(pipe, "text_encoder_2", None) is not None
    unet = copy.deepcopy(pipe.unet)
    encoders = [copy.deepcopy(pipe.text_encoder)]
    if xl:
        encoders.append(copy.deepcopy(pipe.text_encoder_2))
    # LyCORIS initialises its down factors from the global generator: seed it, or a file
    # would depend on which tests ran before (fork_rng leaves the global state as it was).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            network = create_network(
                1.0,
                rank,
                1.0,
                None,
                encoders if xl else encoders[0],
                unet,
                preset=_preset_file(preset, path.parent),
                **options,
            )
            network.apply_to(encoders if xl else encoders[0], unet, True, True)
        finally:
            logger.setLevel(level)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    network.eval()
    raw = path.with_suffix(".lycoris.safetensors")
    network.save_weights(str(raw), torch.float32, {})
    tensors = load_file(str(raw))
    raw.unlink()
    save_file(
        _kohya_names(tensors, pipe.unet, xl), str(path), {"ss_network_module": "lycoris.kohya"}
    )
    return Made(path, network, unet, encoders)


def write_lora(path: Path, pipe: Any, kind: str = "lora", *, seed: int = 0) -> Path:
    """Write one LyCORIS-made file of `kind` (see KINDS; "kohya" means plain LoRA)."""
    kind = {"kohya": "lora", "peft": "lora"}.get(kind, kind)
    return make_lora(path, pipe, kind, seed=seed).path


def _kohya_names(tensors: dict[str, torch.Tensor], unet: Any, xl: bool) -> dict:
    sgm = _sgm_names(unet) if xl else {}
    out = {}
    for key, tensor in tensors.items():
        module, _, param = key.partition(".")
        for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
            if module.startswith(prefix) and not module.startswith(prefix + "text_model_"):
                module = prefix + "text_model_" + module[len(prefix) :]
        module = sgm.get(module, module)
        out[f"{module}.{param}"] = tensor.contiguous()
    return out


def _sgm_names(unet: Any) -> dict[str, str]:
    """kohya name of every diffusers UNet module path → its SGM (kohya SDXL) name."""
    config = unet.config
    per = config.layers_per_block + 1
    prefix_map = [
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("mid_block.attentions.0.", "middle_block.1."),
    ]
    for j in range(2):
        prefix_map.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    for i in range(len(config.down_block_types)):
        for j in range(config.layers_per_block):
            prefix_map.append(
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0.")
            )
            prefix_map.append(
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.")
            )
        prefix_map.append(
            (f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{per * (i + 1)}.0.op")
        )
    for i, block_type in enumerate(config.up_block_types):
        for j in range(per):
            prefix_map.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0."))
            prefix_map.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1."))
        slot = 2 if "CrossAttn" in block_type else 1
        prefix_map.append(
            (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{slot}.")
        )
    resnet_inner = [
        ("conv1", "in_layers.2"),
        ("conv2", "out_layers.3"),
        ("norm1", "in_layers.0"),
        ("norm2", "out_layers.0"),
        ("time_emb_proj", "emb_layers.1"),
        ("conv_shortcut", "skip_connection"),
    ]
    names = {}
    for path, _ in unet.named_modules():
        new = path
        for hf, sd in prefix_map:
            if new == hf or new.startswith(hf if hf.endswith(".") else hf + "."):
                new = sd + new[len(hf) :] if hf.endswith(".") else sd + new[len(hf) :]
                if ".resnets." in hf:
                    for hf_in, sd_in in resnet_inner:
                        if new.endswith("." + hf_in):
                            new = new[: -len(hf_in)] + sd_in
                break
        names["lora_unet_" + path.replace(".", "_")] = "lora_unet_" + new.replace(".", "_")
    return names


def write_diffusers_lora(path: Path, pipe: Any, *, seed: int = 0, rank: int = 2) -> Any:
    """A diffusers/peft LoRA as diffusers' training scripts write one: peft adapters
    (`LoraConfig`, random A and B) on a copy of the UNet and text encoder, saved under
    their pipeline-prefixed diffusers names. Returns the adapted copies: the oracle."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    unet, encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "te": ["q_proj", "v_proj"]}
    for model, names in ((unet, targets["unet"]), (encoder, targets["te"])):
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=False)
        inject_adapter_in_model(config, model)  # what `add_adapter` does (it needs peft ≥ 0.22)
    # What `save_lora_weights` writes (it needs a newer peft): each model's peft state
    # dict in diffusers naming, under the pipeline's component name.
    layers = {
        f"{prefix}.{key}": tensor.contiguous()
        for prefix, model in (("unet", unet), ("text_encoder", encoder))
        for key, tensor in convert_state_dict_to_diffusers(_peft_weights(model)).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(layers, str(path))
    return unet, encoder


def _peft_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out[f"{path}.lora_A.weight"] = module.lora_A["default"].weight.detach()
            out[f"{path}.lora_B.weight"] = module.lora_B["default"].weight.detach()
    return out


def randomised_transformer_network(transformer: torch.nn.Module, algo: str) -> Any:
    """A LoKr/LoHa network made by LyCORIS's own wrapper (`create_lycoris`) on a DiT
    transformer (Flux.1, Z-Image, Qwen-Image), applied to it in place, its weights moved
    off their zero start so it has an effect, and put in eval mode: the oracle that the
    Flux.1 and 2026 families' LyCORIS tests compare sdbot with. LyCORIS's info logging
    is quietened while it builds."""
    from lycoris.logging import logger
    from lycoris.wrapper import create_lycoris

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        network = create_lycoris(
            transformer, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, factor=4
        )
        network.apply_to()
    finally:
        logger.setLevel(level)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, parameter in network.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    network.eval()
    return network
