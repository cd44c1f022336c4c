"""Identity for /edit: where `[edit] min_identity` comes from, and what identity and
alignment cost per image.

    OMP_NUM_THREADS=1 python bench/bench_identity.py calibrate [--photos DIR]
    OMP_NUM_THREADS=1 python bench/bench_identity.py cost [--repeats 10]

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
- `cost`: identity (detection + landmarks + descriptor of one face) per image at 512²
  and 1024², the reference face once; alignment (`align_to_input`: resize, ORB +
  RANSAC, ECC refinement, composite) per result at 512² and 1024²; median of
  `--repeats` after one warm-up, one thread.
"""

from __future__ import annotations

import argparse
import io
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageFilter  # noqa: E402
from skimage import data  # noqa: E402

from bench.timing import timed  # noqa: E402
from pipeline.faces import identity  # noqa: E402
from pipeline.faces.detection import FaceBox  # noqa: E402

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
    from pipeline.generate.align import align_to_input

    identity.load_models()
    photo = Image.fromarray(data.astronaut())
    print("| step | 512² | 1024² |\n|---|---|---|")
    rows: dict[str, list[float]] = {}
    for side in (512, 1024):
        image = photo.resize((side, side), Image.Resampling.LANCZOS)
        reference = identity.reference_face(image)
        result = _edited(image)
        rows.setdefault("identity: reference face (once per job)", []).append(
            timed(lambda: identity.reference_face(image), repeats)  # noqa: B023
        )
        rows.setdefault("identity: score one result", []).append(
            timed(lambda: identity.identity_score(reference, result), repeats)  # noqa: B023
        )
        rows.setdefault("align: one result (resize, register, composite keep:face)", []).append(
            timed(lambda: align_to_input(image, result, keep="face"), repeats)  # noqa: B023
        )
    for step, (small, large) in rows.items():
        print(f"| {step} | {small * 1000:.0f} ms | {large * 1000:.0f} ms |")


def _edited(image: Image.Image) -> Image.Image:
    """What Qwen-Image-Edit hands back: the picture zoomed 4% and shifted, at 1024²."""
    w, h = image.size
    zoomed = image.resize((round(w * 1.04), round(h * 1.04)), Image.Resampling.BICUBIC)
    out = zoomed.crop((12, 5, 12 + w, 5 + h))
    return ImageEnhance.Color(out).enhance(1.2).resize((1024, 1024), Image.Resampling.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--photos", type=Path, help="face_recognition's tests/test_images folder")
    run = sub.add_parser("cost")
    run.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.what == "calibrate":
        calibrate(args.photos)
    else:
        cost(args.repeats)


if __name__ == "__main__":
    main()
