"""Every family's real component sizes, counted from the published configs on the meta
device (accelerate's `init_empty_weights`: no weights, no memory), written as the table
`pipeline/contract/families/published_sizes.json` the memory planner and its tests use.

    python bench/component_sizes.py            # print the table (and check the fp8 rule)
    python bench/component_sizes.py --write    # rewrite contract/families/published_sizes.json

The configs are in bench/configs/ (sources in bench/configs/SOURCES.md). The fp8 count is
the header rule of `pipeline.contract.families.weight_sizes` (what the planner reads from real
files); `--check` also applies diffusers' own `enable_layerwise_casting` to each denoiser
and prints both counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "bench" / "configs"
TABLE = ROOT / "pipeline" / "contract" / "families" / "published_sizes.json"

# family → component → [builder, config file, dtype the published files store]; a table of
# data, so it is kept as JSON beside this script rather than as repeated Python literals.
FAMILIES = json.loads((ROOT / "bench" / "component_sizes.json").read_text())


def build(kind: str, config: dict):
    """One model of the given kind from its config dict (call inside init_empty_weights)."""
    import diffusers
    import transformers as tf

    diffusers_classes = {
        "unet": diffusers.UNet2DConditionModel,
        "vae": diffusers.AutoencoderKL,
        "flux": diffusers.FluxTransformer2DModel,
        "zimage": diffusers.ZImageTransformer2DModel,
        "qwen_image": diffusers.QwenImageTransformer2DModel,
        "qwen_image_vae": diffusers.AutoencoderKLQwenImage,
        "flux2": diffusers.Flux2Transformer2DModel,
        "flux2_vae": diffusers.AutoencoderKLFlux2,
    }
    if kind in diffusers_classes:
        return diffusers_classes[kind].from_config(config)
    transformers_classes = {
        "clip": (tf.CLIPTextModel, tf.CLIPTextConfig),
        "clip_projection": (tf.CLIPTextModelWithProjection, tf.CLIPTextConfig),
        "t5": (tf.T5EncoderModel, tf.T5Config),
        "qwen3_model": (tf.Qwen3Model, tf.Qwen3Config),
        "qwen3_causal": (tf.Qwen3ForCausalLM, tf.Qwen3Config),
        "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig),
    }
    model_class, config_class = transformers_classes[kind]
    return model_class(config_class(**config))


def meta_tensors(model, dtype: str) -> dict[str, tuple[str, list[int]]]:
    """What the model's .safetensors header would list: tied weights once. On the meta
    device transformers does not tie them, so the tied copies are dropped here: an output
    head only when the config ties it, an input-side copy (T5's encoder embedding) always."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    ties_head = getattr(model.config, "tie_word_embeddings", False)
    drop = {t for t in tied if ties_head or not t.startswith("lm_head")}
    return {n: (dtype, list(p.shape)) for n, p in model.named_parameters() if n not in drop}


def diffusers_fp8_params(model) -> int:
    """Parameters diffusers' own enable_layerwise_casting stores in fp8 (meta device)."""
    import torch

    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)


def table(check: bool = False) -> dict[str, dict[str, dict[str, int | str]]]:
    from accelerate import init_empty_weights

    from pipeline.contract.families.weight_sizes import size_of
    from pipeline.contract.memory_plan import FAMILY_MEMORY

    result: dict[str, dict[str, dict[str, int | str]]] = {}
    for family, components in FAMILIES.items():
        result[family] = {}
        for name, (kind, config_file, dtype) in components.items():
            config = json.loads((CONFIGS / config_file).read_text())
            with init_empty_weights():
                model = build(kind, config)
            skip = FAMILY_MEMORY[family].skip_patterns if name in ("unet", "transformer") else ()
            size = size_of(name, meta_tensors(model, dtype), skip)
            result[family][name] = {
                "params": size.params,
                "stored_bytes": size.stored_bytes,
                "stored_dtype": size.stored_dtype,
                "fp8_params": size.fp8_params,
                "block_params": size.block_params,
                "loose_params": size.loose_params,
                "largest_tensor": size.largest_tensor,
                "width": size.width,
            }
            if check and name in ("unet", "transformer"):
                exact = diffusers_fp8_params(model)
                print(
                    f"{family} {name}: fp8 by header rule {size.fp8_params:,}, diffusers {exact:,}"
                )
            print(f"{family:15} {name:15} {size.params / 1e9:7.3f} B params  {config_file}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.relative_to(ROOT)}")
    parser.add_argument("--check", action="store_true", help="compare the fp8 rule with diffusers")
    args = parser.parse_args()
    sizes = table(check=args.check)
    if args.write:
        TABLE.write_text(json.dumps(sizes, indent=2) + "\n")
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
