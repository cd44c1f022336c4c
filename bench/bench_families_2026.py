"""Z-Image, Qwen-Image, Qwen-Image-Edit-Plus and Flux.2 klein through our engine vs the
plain diffusers call with the same inputs, side by side in one run.

Two kinds of model: the tiny ones (`pipeline/families/*_tiny.py`, fp32, 64², one torch
thread, as the tests run), and `--arch`: each family's real transformer at full width
(`bench/configs/`, the published configs) cut to `--blocks` blocks, bf16, with text
encoders at the real hidden width but narrow inside (they run once per image, not per
step) and the tiny VAE (decoded once per image). The edit case runs on the tiny models
only.

Each round times our `run_generation` and the pipeline's `__call__`, alternating, at 2
and `--steps` steps (one step of the tiny Qwen-Image ends on NaN); the figures are
medians over rounds. Per step: the difference between the two divided by `--steps` − 2,
so the text encoder's and the VAE's once-per-image cost drops out.

    python bench/bench_families_2026.py [--rounds 5] [--steps 8]
    python bench/bench_families_2026.py --arch [--device cuda] [--size 1024] [--blocks 1]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import alternating_medians  # noqa: E402
from pipeline.workers.quiet import quiet_libraries  # noqa: E402

SIZE = 64
PROMPT = "a photo of a cat"


class _Blobs:
    def __init__(self, image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        self.png = buffer.getvalue()

    def get(self, sha: str) -> bytes:
        return self.png


def _cases(root: Path):
    """(label, folder, job fields, plain call's own arguments)."""
    from PIL import Image

    from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.families.zimage_tiny import write_tiny_zimage

    photo = Image.new("RGB", (SIZE, SIZE), (180, 90, 40))
    return photo, [
        ("Z-Image", write_tiny_zimage(root / "z"), {}, dict(guidance_scale=1.0)),
        (
            "Qwen-Image (true CFG 4)",
            write_tiny_qwen_image(root / "q"),
            dict(cfg_scale=4.0),
            dict(true_cfg_scale=4.0, negative_prompt=[" "]),
        ),
        (
            "Qwen-Image-Edit-Plus, edit (true CFG 4)",
            write_tiny_qwen_image(root / "e", variant="edit-plus"),
            dict(cfg_scale=4.0, mode="edit", image="photo"),
            dict(true_cfg_scale=4.0, negative_prompt=[" "], image=[photo]),
        ),
        ("Flux.2 klein 4B", write_tiny_flux2_klein(root / "k"), {}, dict(guidance_scale=1.0)),
    ]


CONFIGS = ROOT / "bench" / "configs"


def _published(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def _qwen3(tokenizer, published: str, layers: int, causal_lm: bool):
    """A Qwen3 text encoder at the published hidden width, narrow inside (2 heads of 8,
    MLP 64): the transformer sees states of the real width; `layers` as many as the
    pipeline reads hidden states from."""
    from pipeline.models.tiny_families.common import qwen3_text_encoder

    hidden = _published(published)["hidden_size"]
    return qwen3_text_encoder(tokenizer, causal_lm=causal_lm, layers=layers, hidden=hidden, mlp=64)


def _qwen25_vl(tiny_encoder):
    """Qwen-Image's Qwen2.5-VL text model at its published width (3584; 28 heads of 128
    for its multimodal RoPE), one layer, MLP 64; the tiny vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    real = _published("qwen2_5_vl_7b")["text_config"]
    config = tiny_encoder.config.to_dict()
    text = {k: v for k, v in config["text_config"].items() if k != "layer_types"}
    text.update(
        hidden_size=real["hidden_size"],
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=real["num_attention_heads"],
        num_key_value_heads=real["num_key_value_heads"],
        # Qwen2.5-VL's multimodal RoPE sections (its config.json), for heads of 128
        rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    )
    config["text_config"] = text
    config["vision_config"] = {**config["vision_config"], "out_hidden_size": text["hidden_size"]}
    config["hidden_size"] = text["hidden_size"]
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).eval()


def _arch_folder(label: str, tiny: Path, blocks: int) -> Path:
    """The tiny folder with the family's full-width transformer cut to `blocks` blocks
    and its text encoder at the real width, saved as a diffusers folder."""
    from diffusers import (
        DiffusionPipeline,
        Flux2Transformer2DModel,
        QwenImageTransformer2DModel,
        ZImageTransformer2DModel,
    )

    pipe = DiffusionPipeline.from_pretrained(tiny)
    torch.manual_seed(0)
    if label.startswith("Z-Image"):
        cut = dict(n_layers=blocks, n_refiner_layers=1)
        pipe.transformer = ZImageTransformer2DModel.from_config(
            {**_published("zimage_transformer"), **cut}
        )
        # Z-Image reads the second-to-last hidden state
        pipe.text_encoder = _qwen3(pipe.tokenizer, "qwen3_4b", 2, causal_lm=False)
    elif label.startswith("Qwen-Image"):
        pipe.transformer = QwenImageTransformer2DModel.from_config(
            {**_published("qwen_image_transformer"), "num_layers": blocks}
        )
        pipe.text_encoder = _qwen25_vl(pipe.text_encoder)
    else:  # Flux.2 klein 4B: hidden states 9, 18 and 27 of Qwen3-4B, stacked
        cut = dict(num_layers=blocks, num_single_layers=blocks)
        pipe.transformer = Flux2Transformer2DModel.from_config(
            {**_published("flux2_klein_4b_transformer"), **cut}
        )
        pipe.text_encoder = _qwen3(pipe.tokenizer, "qwen3_4b", 28, causal_lm=True)
    out = tiny.parent / f"{tiny.name}-arch"
    pipe.save_pretrained(out)
    return out


def _runners(folder: Path, photo, job: dict, call: dict, size: int, device: str, dtype: str):
    """Our call and the plain pipeline's, for one model."""
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from pipeline.models.qwen_edit import edit_input_area

    config = config_from_dict(
        {"models": {"m": {"source": str(folder)}}, "workers": {"dtype": dtype}}
    )
    model = ModelCache(config, device).get()
    # The plain pipeline shares our components (the same weights, device and dtype).
    pipe, blobs = model.derive("edit" if job.get("mode") else "txt2img"), _Blobs(photo)

    def ours(steps: int) -> None:
        fields = {"cfg_scale": 1.0, **job}
        spec = GenerateSpec(
            prompt=PROMPT, width=size, height=size, steps=steps, seed=1, sampler="Euler", **fields
        )
        run_generation(model, [spec], blobs=blobs, preview_every=0)

    def theirs(steps: int) -> None:
        with torch.inference_mode(), edit_input_area(size * size):
            pipe(
                prompt=[PROMPT],
                width=size,
                height=size,
                num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(1)],
                **call,
            )

    return ours, theirs


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arch", action="store_true", help="full-width transformers, bf16")
    parser.add_argument("--blocks", type=int, default=1, help="--arch: transformer blocks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=0, help="0: 64 (tiny), 512 (--arch)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: 1 (tiny)")
    args = parser.parse_args()
    quiet_libraries()
    if args.threads or not args.arch:
        torch.set_num_threads(args.threads or 1)
    size = args.size or (512 if args.arch else SIZE)
    dtype = "bfloat16" if args.arch else "float32"
    kind = f"{args.blocks} block(s) at full width, bf16" if args.arch else "tiny, fp32"
    print(
        f"| model ({kind}, {size}², {args.device}) | call ({args.steps} steps): ours | diffusers "
        "| ratio | per step: ours | diffusers | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        photo, cases = _cases(Path(tmp))
        for label, folder, job, call in cases:
            if args.arch:
                if job.get("mode"):
                    continue  # the edit case: tiny models only (see the docstring)
                folder = _arch_folder(label, folder, args.blocks)
            ours, theirs = _runners(folder, photo, job, call, size, args.device, dtype)
            for fn in (ours, theirs):
                fn(2)  # warm-up
            med = alternating_medians(
                [("ours", ours), ("diffusers", theirs)],
                (2, args.steps),
                args.rounds,
                lambda: _sync(args.device),
            )
            call_s = {n: med[(n, args.steps)] for n in ("ours", "diffusers")}
            per = {n: (med[(n, args.steps)] - med[(n, 2)]) / (args.steps - 2) for n in call_s}
            print(
                f"| {label} | {call_s['ours'] * 1000:.1f} ms | {call_s['diffusers'] * 1000:.1f} ms "
                f"| {call_s['ours'] / call_s['diffusers']:.3f}× | {per['ours'] * 1000:.1f} ms "
                f"| {per['diffusers'] * 1000:.1f} ms | {per['ours'] / per['diffusers']:.3f}× |",
                flush=True,
            )
            del ours, theirs
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
