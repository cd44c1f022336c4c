"""Z-Image, Qwen-Image, Qwen-Image-Edit-Plus and Flux.2 klein through our engine vs the
plain diffusers call with the same inputs, side by side in one run, on the tiny models
(`pipeline/families/*_tiny.py`, fp32, 64², one torch thread, as the tests run).

Each round times our `run_generation` and the pipeline's `__call__`, alternating, at 2
and `--steps` steps (one step of the tiny Qwen-Image ends on NaN); the figures are
medians over rounds. Per step: the difference between the two divided by `--steps` − 2,
so the text encoder's and the VAE's once-per-image cost drops out.

    python bench/bench_families_2026.py [--rounds 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def _runners(folder: Path, photo, job: dict, call: dict):
    """Our call and the plain pipeline's, for one model."""
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from pipeline.models.qwen_edit import edit_input_area

    config = config_from_dict({"models": {"m": {"source": str(folder)}}})
    model = ModelCache(config, "cpu").get()
    pipe, blobs = model.derive("edit" if job.get("mode") else "txt2img"), _Blobs(photo)

    def ours(steps: int) -> None:
        fields = {"cfg_scale": 1.0, **job}
        spec = GenerateSpec(
            prompt=PROMPT, width=SIZE, height=SIZE, steps=steps, seed=1, sampler="Euler", **fields
        )
        run_generation(model, [spec], blobs=blobs, preview_every=0)

    def theirs(steps: int) -> None:
        with torch.inference_mode(), edit_input_area(SIZE * SIZE):
            pipe(
                prompt=[PROMPT],
                width=SIZE,
                height=SIZE,
                num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(1)],
                **call,
            )

    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    print(
        f"| model (tiny, fp32, 64², 1 thread) | call ({args.steps} steps): ours | diffusers "
        "| ratio | per step: ours | diffusers | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        photo, cases = _cases(Path(tmp))
        for label, folder, job, call in cases:
            ours, theirs = _runners(folder, photo, job, call)
            times: dict[tuple[str, int], list[float]] = {}
            for fn in (ours, theirs):
                fn(2)  # warm-up
            for _ in range(args.rounds):
                for name, fn in (("ours", ours), ("diffusers", theirs)):
                    for steps in (2, args.steps):
                        start = time.perf_counter()
                        fn(steps)
                        times.setdefault((name, steps), []).append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            call_s = {n: med[(n, args.steps)] for n in ("ours", "diffusers")}
            per = {n: (med[(n, args.steps)] - med[(n, 2)]) / (args.steps - 2) for n in call_s}
            print(
                f"| {label} | {call_s['ours'] * 1000:.1f} ms | {call_s['diffusers'] * 1000:.1f} ms "
                f"| {call_s['ours'] / call_s['diffusers']:.3f}× | {per['ours'] * 1000:.1f} ms "
                f"| {per['diffusers'] * 1000:.1f} ms | {per['ours'] / per['diffusers']:.3f}× |"
            )


if __name__ == "__main__":
    main()
