"""Wall time of one diffusers pipeline call on each tiny flow-matching model, per mode.

Each tiny model (`pipeline.models.tiny_families`) is written to a temporary folder,
loaded with `DiffusionPipeline.from_pretrained`, and every mode diffusers has for it is
called at 64×64 with 2 denoising steps, one torch thread (as the tests run): the median
of `--runs` calls after one warm-up. `--full-area` also times, once each, the two edit
pipelines at the input size they pick by themselves (Kontext's ~1 MP preset, Qwen-Image-
Edit's 1024²) beside the tiny size, which is why the tests pass a size. Prints markdown.

    python bench/bench_tiny_families.py [--runs 5] [--full-area]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.timing import timed  # noqa: E402
from pipeline.workers.quiet import quiet_libraries  # noqa: E402

SIZE = 64


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


SIZED = dict(height=SIZE, width=SIZE)
IMG2IMG = dict(image=_image(), strength=0.5, num_inference_steps=4, **SIZED)  # 2 steps
INPAINT = dict(image=_image(), mask_image=_mask(), strength=0.75, num_inference_steps=3, **SIZED)
KONTEXT = dict(image=_image(), max_area=SIZE * SIZE, _auto_resize=False, **SIZED)


def _models():
    """(name, writer, writer kwargs, [(mode, pipeline class name or None, call kwargs)])."""
    from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.families.zimage_tiny import write_tiny_zimage
    from pipeline.models import tiny_families as tf

    return [
        (
            "Flux.1 dev",
            tf.write_tiny_flux,
            {},
            [
                ("txt2img", None, SIZED),
                ("img2img", "FluxImg2ImgPipeline", IMG2IMG),
                ("inpaint", "FluxInpaintPipeline", INPAINT),
            ],
        ),
        (
            "Flux.1 schnell",
            tf.write_tiny_flux,
            {"variant": "schnell"},
            [
                ("txt2img", None, dict(guidance_scale=0.0, **SIZED)),
            ],
        ),
        (
            "Flux.1 Kontext",
            tf.write_tiny_flux,
            {"variant": "kontext"},
            [
                ("edit (1 image)", None, KONTEXT),
                ("edit inpaint", "FluxKontextInpaintPipeline", dict(mask_image=_mask(), **KONTEXT)),
            ],
        ),
        (
            "Flux.1 Fill",
            tf.write_tiny_flux,
            {"variant": "fill"},
            [
                ("fill (mask)", None, dict(image=_image(), mask_image=_mask(), **SIZED)),
            ],
        ),
        (
            "Z-Image",
            write_tiny_zimage,
            {},
            [
                ("txt2img", None, SIZED),
                ("img2img", "ZImageImg2ImgPipeline", IMG2IMG),
                ("inpaint", "ZImageInpaintPipeline", INPAINT),
            ],
        ),
        (
            "Qwen-Image",
            write_tiny_qwen_image,
            {},
            [
                ("txt2img", None, SIZED),
                ("img2img", "QwenImageImg2ImgPipeline", IMG2IMG),
                ("inpaint", "QwenImageInpaintPipeline", INPAINT),
            ],
        ),
        (
            "Qwen-Image-Edit",
            write_tiny_qwen_image,
            {"variant": "edit"},
            [
                ("edit (1 image)", None, dict(image=_image(), **SIZED)),
                ("edit inpaint", "QwenImageEditInpaintPipeline", dict(INPAINT, strength=1.0)),
            ],
        ),
        (
            "Qwen-Image-Edit-Plus",
            write_tiny_qwen_image,
            {"variant": "edit-plus"},
            [
                ("edit (3 images)", None, dict(image=[_image(0), _image(1), _image(2)], **SIZED)),
            ],
        ),
        (
            "Flux.2 klein",
            write_tiny_flux2_klein,
            {},
            [
                ("txt2img", None, SIZED),
                ("2 reference images", None, dict(image=[_image(0), _image(1)], **SIZED)),
                ("inpaint", "Flux2KleinInpaintPipeline", INPAINT),
            ],
        ),
    ]


def _load(folder: Path):
    from diffusers import DiffusionPipeline

    from pipeline.models.qwen_edit import load_qwen_processor

    extra = {}
    if (folder / "processor").is_dir():
        extra["processor"] = load_qwen_processor(folder / "processor")
    pipe = DiffusionPipeline.from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _caller(pipe, call: dict):
    from pipeline.models.qwen_edit import edit_input_area

    call = {"num_inference_steps": 2, **call}
    edit = type(pipe).__name__.startswith("QwenImageEdit")

    def run() -> None:
        with edit_input_area(SIZE * SIZE) if edit else contextlib.nullcontext():
            pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(0), **call)

    return run


def _parameters(pipe) -> int:
    from pipeline.models.tiny_families.common import parameter_count

    return parameter_count(pipe)


def _redux_row(root: Path, flux, runs: int) -> None:
    """FLUX.1-Redux: reference image (+ prompt, through the base's text encoders) →
    Flux prompt embeddings; the row's parameters are Redux's own."""
    from pipeline.models.tiny_families import write_tiny_flux_redux

    names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    redux = _load(write_tiny_flux_redux(root / "redux"))
    own = _parameters(redux)
    redux = type(redux).from_pipe(redux, **{name: getattr(flux, name) for name in names})
    redux.set_progress_bar_config(disable=True)
    seconds = timed(lambda: redux(image=_image(), prompt="a photo of a cat"), runs)
    print(
        f"| Flux.1 Redux | {own:,} | reference image → embeddings | {type(redux).__name__} "
        f"| {seconds:.3f} |"
    )


def _full_area(root: Path) -> None:
    """The edit pipelines at the input size they choose themselves, one call each."""
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.models import tiny_families as tf
    from pipeline.models.qwen_edit import edit_input_area

    print("\n| pipeline | input area | s/call |\n|---|---|---|")
    kontext = _load(tf.write_tiny_flux(root / "kontext-full", variant="kontext"))
    qwen = _load(write_tiny_qwen_image(root / "edit-full", variant="edit"))
    cases = [
        ("FluxKontextPipeline", "tiny (_auto_resize=False)", kontext, KONTEXT, None),
        ("FluxKontextPipeline", "its ~1 MP preset", kontext, dict(image=_image(), **SIZED), None),
        ("QwenImageEditPipeline", "64² (edit_input_area)", qwen, SIZED, SIZE * SIZE),
        ("QwenImageEditPipeline", "its 1024²", qwen, SIZED, None),
    ]
    for name, area, pipe, call, pixels in cases:
        call = {"image": _image(), "num_inference_steps": 2, **call}
        start = time.perf_counter()
        with edit_input_area(pixels) if pixels else contextlib.nullcontext():
            pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(0), **call)
        print(f"| {name} | {area} | {time.perf_counter() - start:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--full-area", action="store_true")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    import diffusers

    root = Path(tempfile.mkdtemp())
    print("| model | parameters | mode | pipeline | s/call |\n|---|---|---|---|---|")
    for name, writer, variant, modes in _models():
        pipe = _load(writer(root / name.replace(" ", "_"), **variant))
        for mode, class_name, call in modes:
            runner = getattr(diffusers, class_name).from_pipe(pipe) if class_name else pipe
            runner.set_progress_bar_config(disable=True)
            seconds = timed(_caller(runner, call), args.runs)
            print(
                f"| {name} | {_parameters(pipe):,} | {mode} "
                f"| {type(runner).__name__} | {seconds:.3f} |"
            )
        if name == "Flux.1 dev":
            _redux_row(root, pipe, args.runs)
    if args.full_area:
        _full_area(root)


if __name__ == "__main__":
    main()
