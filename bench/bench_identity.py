"""Identity for /edit: where `[edit] min_identity` comes from, and what identity and
alignment cost per image.

    OMP_NUM_THREADS=1 python bench/bench_identity.py calibrate [--photos DIR]
    OMP_NUM_THREADS=1 python bench/bench_identity.py cost [--repeats 10]
    OMP_NUM_THREADS=1 python bench/bench_identity.py residual

- `calibrate`: dlib descriptor distances and scores (pipeline/faces/identity.py) for
  "same person" pairs and "different people" pairs, and the false accept / false
  reject rates at a range of thresholds. The photos are real: scikit-image's
  astronaut (Eileen Collins) and cameraman, plus, with `--photos DIR`, the test photos
  of the `face_recognition` package on PyPI (three photos of Barack Obama, one of
  Joe Biden; get them with
  `pip download face_recognition==1.3.0 --no-deps --no-binary :all: -d /tmp/fr &&
  tar xzf /tmp/fr/face_recognition-1.3.0.tar.gz -C /tmp/fr` and pass
  `--photos /tmp/fr/face_recognition-1.3.0/tests/test_images`).
  Same person: each photo against real transformations of itself (crop, scale,
  shift, recolour, grey, JPEG, blur, rotation: what an edit model does to a face it
  keeps) and, where a person has several photos, the photos against each other.
  Different people: every photo (and its transforms) against every other person's.
  scikit-image's 25×25 LFW subset is scored apart: faces that small are below what
  the recogniser can tell apart, which is itself worth knowing.
- `cost`: identity of one result at the photo's size (512² and 1024²: Haar face
  detection + dlib landmarks and descriptor per face; the reference face costs the same
  once per job), split into its parts; alignment (`align_to_input`: resize, ORB +
  RANSAC, ECC refinement, keep: face composite, the photo's faces found beforehand) of
  a 1024² result onto a 512² and a 1024² photo; median of `--repeats` after one
  warm-up, one thread: CPU time of the process (what the step costs a core of its
  own) and wall time in brackets, with the load average (the machine is shared).
- `residual`: how far the alignment's transform lands from the truth (the largest
  distance over a 9×9 grid of points, in the photo's pixels) when a real photo is
  moved by a known transform (OpenCV's warp) and handed back at another size; plain
  (moved only) and edited (moved, recoloured, a region repainted, JPEG, as
  tests/test_align.py's `edited`), on four of scikit-image's real photos.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter  # noqa: E402
from skimage import data  # noqa: E402

from bench.timing import timed  # noqa: E402
from pipeline.faces import identity  # noqa: E402
from pipeline.faces.detection import FaceBox, detect_faces  # noqa: E402
from pipeline.generate.align import align_to_input  # noqa: E402

THRESHOLDS = (0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60)
# The face_recognition test photos: which person each shows (32bit.png is obama2.jpg
# saved as RGBA, and the partial faces are cut by the frame: both left out).
PERSON_OF = {"obama.jpg": "obama", "obama2.jpg": "obama", "obama3.jpg": "obama",
             "biden.jpg": "biden"}  # fmt: skip


# ---------------------------------------------------------------- photos


def photos(extra: Path | None) -> list[tuple[str, str, Image.Image]]:
    """(person, photo name, image) for every real photo at hand."""
    found = [
        ("collins", "skimage astronaut", Image.fromarray(data.astronaut())),
        ("cameraman", "skimage camera", Image.fromarray(data.camera()).convert("RGB")),
    ]
    if extra:
        for name, person in PERSON_OF.items():
            found.append((person, name, Image.open(extra / name).convert("RGB")))
    return found


def transforms(image: Image.Image) -> dict[str, Image.Image]:
    """Real transformations of one photo that keep its person."""
    w, h = image.size
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=30)
    shifted = Image.new("RGB", image.size, (128, 128, 128))
    shifted.paste(image, (w // 10, h // 12))
    return {
        "crop 80%": image.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
        "scale 0.5": image.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "scale 1.5": image.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.LANCZOS),
        "shift 10%": shifted,
        "warmer": Image.merge("RGB", [c.point(lambda v, k=k: min(255, int(v * k)))
                                      for c, k in zip(image.split(), (1.15, 1.0, 0.8))]),
        "saturation 1.6": ImageEnhance.Color(image).enhance(1.6),
        "darker 0.6": ImageEnhance.Brightness(image).enhance(0.6),
        "grey": image.convert("L").convert("RGB"),
        "jpeg q30": Image.open(jpeg).convert("RGB"),
        "blur 2px": image.filter(ImageFilter.GaussianBlur(2)),
        "rotate 8°": image.rotate(8, resample=Image.Resampling.BICUBIC, fillcolor=(128,) * 3),
        "mirror": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }  # fmt: skip


# ---------------------------------------------------------------- calibration


def calibrate(extra: Path | None) -> None:
    people = photos(extra)
    references = {name: identity.reference_face(image) for _, name, image in people}
    same: list[tuple[str, float | None]] = []
    different: list[tuple[str, float | None]] = []
    variants = []  # (person, name, label, image)
    for person, name, image in people:
        variants.append((person, name, "original", image))
        variants += [(person, name, t, im) for t, im in transforms(image).items()]
    faces = [identity.result_identities(image) for *_, image in variants]
    for (ref_person, ref_name, _), ((person, name, label, _), found) in itertools.product(
        people, zip(variants, faces)
    ):
        if ref_name == name and label == "original":
            continue
        result = identity.best_match(references[ref_name], found)
        pair = (f"{ref_name} vs {name} [{label}]", result.distance)
        (same if person == ref_person else different).append(pair)
    _report("same person", same)
    _report("different people", different)
    _rates(same, different)
    _lfw()


def _report(title: str, pairs: list[tuple[str, float | None]]) -> None:
    found = [d for _, d in pairs if d is not None]
    missed = [what for what, d in pairs if d is None]
    print(f"\n{title}: {len(pairs)} pairs, no face found in {len(missed)}")
    if found:
        q = np.percentile(found, [0, 5, 50, 95, 100])
        print("  distance min/p5/median/p95/max", " ".join(f"{v:.3f}" for v in q))
        print("  score    max/p95/median/p5/min",
              " ".join(f"{identity.score_from_distance(v):.2f}" for v in q))  # fmt: skip
    ordered = sorted((p for p in pairs if p[1] is not None), key=lambda p: p[1])
    edge = ordered[:3] if title.startswith("different") else ordered[-3:]
    for what, d in edge:  # the pairs nearest the other side
        print(f"  edge: {what}: distance {d:.3f}")
    for what in missed:
        print(f"  no face: {what}")


def _rates(same: list, different: list) -> None:
    print("\nmin_identity | distance | false reject (same person) | false accept (different)")
    for threshold in THRESHOLDS:
        s = [identity.score_from_distance(d) if d is not None else 0.0 for _, d in same]
        o = [identity.score_from_distance(d) if d is not None else 0.0 for _, d in different]
        rejected = sum(v < threshold for v in s)
        accepted = sum(v >= threshold for v in o)
        distance = (1 - threshold) * 2 * identity.DLIB_SAME_PERSON_DISTANCE
        reject = f"{rejected}/{len(s)} ({rejected / len(s):.1%})"
        accept = f"{accepted}/{len(o)} ({accepted / len(o):.1%})"
        print(f"| {threshold:.2f} | {distance:.2f} | {reject} | {accept} |")


def _lfw() -> None:
    faces = data.lfw_subset()[:100]  # the first 100 are faces, the rest are not
    size = 150
    box = FaceBox(0, 0, size, size)
    embeddings = []
    for face in faces:
        grey = Image.fromarray((face * 255).astype(np.uint8)).resize((size, size))
        embeddings.append(identity.embed(np.asarray(grey.convert("RGB")), box))
    e = np.array(embeddings)
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)[np.triu_indices(len(e), 1)]
    print(f"\nLFW subset (25×25 faces upscaled to 150², labels unknown): {len(d)} pairs, "
          f"distance p1/p5/median {np.percentile(d, 1):.3f}/{np.percentile(d, 5):.3f}/"
          f"{np.median(d):.3f}; under 0.6: {(d < 0.6).mean():.1%}")  # fmt: skip


# ---------------------------------------------------------------- cost


def cost(repeats: int) -> None:
    identity.load_models()
    photo = Image.fromarray(data.astronaut())
    rows: dict[str, list[float]] = {}
    for side in (512, 1024):
        for step, fn in _steps(photo.resize((side, side), Image.Resampling.LANCZOS)).items():
            rows.setdefault(step, []).append((cpu_timed(fn, repeats), timed(fn, repeats)))
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| step | 512² photo: CPU (wall) | 1024² photo: CPU (wall) |\n|---|---|---|")
    for step, ((cpu_s, wall_s), (cpu_l, wall_l)) in rows.items():
        print(f"| {step} | {cpu_s * 1000:.0f} ms ({wall_s * 1000:.0f}) "
              f"| {cpu_l * 1000:.0f} ms ({wall_l * 1000:.0f}) |")  # fmt: skip


def cpu_timed(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of this process (all its threads) per run, after a warm-up: on a
    shared machine, what the step costs a core of its own, however busy the others are."""
    return timed(fn, repeats, clock=time.process_time)


def _steps(image: Image.Image) -> dict[str, Callable[[], object]]:
    reference = identity.reference_face(image)
    moved = _edited(image)  # the model's output, 1024²
    result = moved.resize(image.size, Image.Resampling.LANCZOS)
    pixels = np.asarray(result)
    boxes = detect_faces(image)  # the photo's faces: found once per job, as for identity
    return {
        "identity: score one result (detect + descriptor)": lambda: identity.identity_score(
            reference, result
        ),
        "… of which face detection (Haar, detection.py)": lambda: detect_faces(result),
        "… of which one descriptor (dlib 5-point + ResNet)": lambda: identity.embed(
            pixels, reference.box
        ),
        "align: one 1024² result onto the photo (keep: face)": lambda: align_to_input(
            image, moved, keep="face", face_boxes=boxes
        ),
    }


def _edited(image: Image.Image) -> Image.Image:
    """What Qwen-Image-Edit hands back: the picture zoomed 4% and shifted, at 1024²."""
    w, h = image.size
    zoomed = image.resize((round(w * 1.04), round(h * 1.04)), Image.Resampling.BICUBIC)
    out = zoomed.crop((12, 5, 12 + w, 5 + h))
    return ImageEnhance.Color(out).enhance(1.2).resize((1024, 1024), Image.Resampling.BICUBIC)


RESIDUAL_CASES = (  # dx, dy, zoom, turn (degrees), the model's output side
    (7.3, -4.6, 1.0, 0.0, 512),
    (7.3, -4.6, 1.04, 0.0, 1024),
    (-12.0, 9.0, 0.97, 1.5, 768),
    (20.0, -15.0, 1.08, -2.0, 1024),
)


def residual() -> None:
    from tests.test_align import edited, moved, residual_px  # the tests' known transforms

    print("| photo | dx, dy, zoom, turn → model size | plain: residual px (method) "
          "| edited: residual px (method) | align s |\n|---|---|---|---|---|")  # fmt: skip
    for name in ("astronaut", "camera", "coffee", "chelsea"):
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        for dx, dy, zoom, turn, side in RESIDUAL_CASES:
            cells = []
            for edit in (False, True):
                result, truth = moved(photo, dx, dy, zoom, turn)
                result = (edited(result) if edit else result).resize((side, side))
                start = time.perf_counter()
                aligned = align_to_input(photo, result)
                seconds = time.perf_counter() - start
                found = "—" if aligned.transform is None else (
                    f"{residual_px(aligned.transform, truth, photo.size):.2f}")  # fmt: skip
                cells.append(f"{found} ({aligned.method})")
            print(f"| {name} | {dx:+g}, {dy:+g}, ×{zoom:g}, {turn:+g}° → {side}² "
                  f"| {cells[0]} | {cells[1]} | {seconds:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--photos", type=Path, help="face_recognition's tests/test_images folder")
    run = sub.add_parser("cost")
    run.add_argument("--repeats", type=int, default=10)
    sub.add_parser("residual")
    args = parser.parse_args()
    if args.what == "calibrate":
        calibrate(args.photos)
    elif args.what == "cost":
        cost(args.repeats)
    else:
        residual()


if __name__ == "__main__":
    main()
