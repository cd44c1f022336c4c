"""Write a random-weight SD 1.5 or SDXL model folder at the real architecture's size.

Speed and memory depend only on the architecture, so GPU benchmarks build the real
UNet, VAE and text encoders from the published configurations (`bench/configs/`,
values from shared/BENCH_CONFIGS.md) with random weights, and point `--model` at
the folder. The tokenizer is the tiny model's (ids stay below 49408).

    python bench/arch_model.py sd15 /tmp/sd15-arch
    python bench/bench_generate.py --model /tmp/sd15-arch --device cuda --size 512 --steps 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def _json(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def write_arch_model(
    kind: str, directory: Path, *, device: str = "cpu", dtype: str = "float32"
) -> Path:
    """Build the architecture on `device` (random init on a GPU takes seconds, not
    minutes) and save it in `dtype` (float16 halves the files)."""
    import torch

    from pipeline.families.sd_tiny import write_tokenizer

    torch.manual_seed(0)
    write_tokenizer(directory / "_tok")
    with torch.device(device):
        pipe = _build(kind, directory)
    pipe.to(dtype=getattr(torch, dtype))
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def _build(kind: str, directory: Path):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from pipeline.families.sd_tiny import _SD_SCHEDULER

    tokenizer = CLIPTokenizer.from_pretrained(directory / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(**_json("clip_vit_l.json")))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**_json("sd15_vae.json")),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**_json("sd15_unet.json")),
            scheduler=PNDMScheduler.from_config(_SD_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**_json("sdxl_vae.json")),
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(
                CLIPTextConfig(**_json("openclip_bigg.json"))
            ),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=UNet2DConditionModel(**_json("sdxl_unet.json")),
            scheduler=EulerDiscreteScheduler.from_config(_SD_SCHEDULER),
        )
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["sd15", "sdxl"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--device", default="cpu", help="where to build (cuda: fast init)")
    parser.add_argument("--dtype", default="float32", help="dtype of the saved files")
    args = parser.parse_args()
    print(write_arch_model(args.kind, args.dir, device=args.device, dtype=args.dtype))


if __name__ == "__main__":
    main()
