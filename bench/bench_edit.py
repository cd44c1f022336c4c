"""What an /edit job adds to the bare edit pipeline call: finding the person, mapping the
result back onto the photo (registration, keep: face composite) and measuring identity.

    OMP_NUM_THREADS=1 python bench/bench_edit.py [--rounds 3] [--sizes 512 1024] \
        [--work 512] [--steps 2]

Each round runs, one after the other on the same photo and seed:

- **bare**: the tiny Qwen-Image-Edit's `QwenImageEditPipeline` called directly (the
  photo at the output's area, true CFG 4, Euler), the result at the model's size;
- **edit job, keep: face**: `run_generation` of the same edit as `/edit` queues it
  (`[edit] max_retries = 0`: one try), which adds the photo's face and its descriptor,
  the result resized to the photo and registered onto it (Qwen-Image-Edit moves its
  picture: ORB + ECC), the face composited back, and the identity of the result;
- **edit job, no keep**: the same without the composite (the tiny model's result is
  noise: no face is found, so the identity step also runs dlib's HOG detector).

The tiny model's noise is the registration's worst case (nothing of the photo is left:
ORB finds no fit and ECC runs all its iterations on every pixel), so the steps timed
apart also register a plausible edit model's result (bench_identity.py's: the photo
zoomed 4%, moved and recoloured).

The photo is scikit-image's astronaut (Eileen Collins), 512² as shipped and resized to
1024²; the model works at the photo's size up to `--work` (the job's width × height: the
bot fits a photo into the member's pixel budget), and the job maps its result back to
the photo's size. Figures: medians over rounds of this
process's CPU time (what the job costs a core; the machine is shared) and of wall time,
the overhead as job − bare, and the steps of the overhead timed apart on one result.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from pipeline.contract.blobs import BlobStore  # noqa: E402
from pipeline.contract.config import EditConfig, ModelConfig  # noqa: E402
from pipeline.contract.jobs import GenerateSpec  # noqa: E402

PROMPT = "make her older"
ONE_TRY = EditConfig(min_identity=0.55, max_retries=0)


def both_clocks(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one run of fn."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--work", type=int, default=512, help="the model's side at most")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--parts-only", action="store_true", help="only the steps timed apart")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.models.loading import load_model

    root = Path(tempfile.mkdtemp(prefix="bench-edit-"))
    model = load_model(
        ModelConfig(name="edit", source=str(write_tiny_qwen_image(root / "m", variant="edit")))
    )
    blobs = BlobStore(root / "blobs")
    astronaut = Image.fromarray(data.astronaut()).convert("RGB")
    print("| photo (model) | run | CPU: bare | job | overhead | wall: bare | job | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        photo = astronaut.resize((size, size), Image.Resampling.LANCZOS)
        if not args.parts_only:
            _one_size(model, blobs, photo, args)
        _parts(model, photo, args)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def _one_size(model, blobs, photo: Image.Image, args) -> None:
    import io

    from pipeline.generate.modes import run_generation

    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    sha = blobs.put(buffer.getvalue())
    spec = GenerateSpec(
        PROMPT,
        mode="edit",
        image=sha,
        sampler="Euler",
        steps=args.steps,
        cfg_scale=4.0,
        width=min(photo.width, args.work),
        height=min(photo.height, args.work),
        seed=1,
    )
    runs: dict[str, Callable[[], object]] = {
        "bare": lambda: _bare(model, photo, args.steps, args.work),
        "keep: face": lambda: run_generation(
            model, [dataclasses.replace(spec, keep="face")], blobs=blobs, edit=ONE_TRY
        ),
        "no keep": lambda: run_generation(model, [spec], blobs=blobs, edit=ONE_TRY),
    }
    for fn in runs.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(both_clocks(fn))
    bare_cpu, bare_wall = (statistics.median(t[i] for t in times["bare"]) for i in (0, 1))
    for name in ("keep: face", "no keep"):
        cpu, wall = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        cells = [
            f"{photo.width}² ({spec.width}²)",
            f"edit job, {name}",
            *(f"{t:.2f} s" for t in (bare_cpu, cpu)),
            f"+{cpu - bare_cpu:.2f} s",
            *(f"{t:.2f} s" for t in (bare_wall, wall)),
            f"{wall - bare_wall:+.2f} s",
        ]
        print("| " + " | ".join(cells) + " |")


def _bare(model, photo: Image.Image, steps: int, work: int):
    """The plain diffusers call: the photo in, at the job's size (the input image at the
    output's area, as our Qwen-Image-Edit call context does)."""
    import torch

    from pipeline.models.qwen_edit import edit_input_area

    pipe = model.pipe
    width, height = min(photo.width, work), min(photo.height, work)
    with torch.inference_mode(), edit_input_area(width * height):
        return pipe(
            image=photo,
            prompt=[PROMPT],
            negative_prompt=[" "],
            true_cfg_scale=4.0,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=[torch.Generator("cpu").manual_seed(1)],
        ).images[0]


def _parts(model, photo: Image.Image, args) -> None:
    """The overhead's steps, each timed apart (CPU medians) on one bare result."""
    from bench.bench_identity import _edited as qwen_like
    from pipeline.faces import identity
    from pipeline.faces.detection import detect_faces
    from pipeline.generate.align import align_to_input

    result = _bare(model, photo, args.steps, args.work)
    plausible = qwen_like(photo).resize(result.size, Image.Resampling.LANCZOS)
    boxes = detect_faces(photo)
    reference = identity.FaceIdentity(
        identity.embed(np.ascontiguousarray(np.asarray(photo)), boxes[0]), boxes[0]
    )
    kept = align_to_input(photo, result, keep="face", face_boxes=boxes).image
    steps = {
        "the photo's face (detect + descriptor, once a job)": lambda: identity.FaceIdentity(
            identity.embed(np.ascontiguousarray(np.asarray(photo)), detect_faces(photo)[0]),
            boxes[0],
        ),
        "onto the photo: resize + register + keep: face (the tiny model's noise)": lambda: (
            align_to_input(photo, result, keep="face", face_boxes=boxes)
        ),
        "onto the photo: the same, a result zoomed 4%, moved and recoloured": lambda: (
            align_to_input(photo, plausible, keep="face", face_boxes=boxes)
        ),
        "identity of a result with the face": lambda: identity.identity_score(reference, kept),
        "identity of a result without a face (+ HOG)": lambda: identity.identity_score(
            reference, result.resize(photo.size)
        ),
    }
    for name, fn in steps.items():
        fn()
        cpu = statistics.median(both_clocks(fn)[0] for _ in range(args.rounds))
        print(f"|   {photo.width}²: {name} | | | {cpu:.2f} s CPU | | | | |")


if __name__ == "__main__":
    main()
