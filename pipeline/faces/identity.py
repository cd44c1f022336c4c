"""Identity, measured: is the person in an edited picture still the person in the photo?

A face-recognition embedding of the input's face (the largest, or the one the member
picks with `face: n`, numbered as `detection.detect_faces` orders them) is compared
with each result's faces. The embedding is dlib's 128-d ResNet face recogniser, whose
weights ship inside the `face_recognition_models` package (CC0) and run on dlib's
CPU build (`dlib-bin`, Boost licence): no download, no GPU, ~0.1 s a face.

dlib's recogniser puts two photos of one person closer than 0.6 (Euclidean) and two
people further apart (99.38% on LFW, dlib's published figure). The score shown to
members maps that distance to [0, 1] linearly: 1 for the same descriptor, 0.5 at
dlib's 0.6, 0 at twice it (`score_from_distance`). docs/DECISIONS.md (issue 25) has
the calibration behind `[edit] min_identity`.

Runs in workers and the photo helper; never in the bot process (dlib is in
tests/test_layering.py's forbidden list).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from pipeline.faces.detection import FaceBox, detect_faces

# dlib's own operating point for "same person" on its descriptors (Euclidean distance).
DLIB_SAME_PERSON_DISTANCE = 0.6
# The 5-point landmark model is dlib's own (CC0); the 68-point one in the same package
# was trained on iBUG 300-W, whose licence excludes commercial use, so it is not used.
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNISER_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# dlib's HOG detector looks again (upsampled once) when the Haar cascades find no face
# in a result: a missed face would count as a lost person and cost a retry.
HOG_UPSAMPLE = 1


class IdentityError(ValueError):
    """The photo cannot be measured for identity; the message is for the member."""


@dataclass(frozen=True)
class FaceIdentity:
    """One face's 128-d descriptor and where it was found."""

    embedding: np.ndarray
    box: FaceBox


@dataclass(frozen=True)
class IdentityScore:
    """How well a result keeps the reference face: `score` in [0, 1] (1 = the same).

    `distance` is dlib's Euclidean descriptor distance (None without a face);
    `face` is the result's best-matching face, None when the result shows no face.
    """

    score: float
    distance: float | None
    face: FaceBox | None
    faces_found: int

    @property
    def label(self) -> str:
        """What the result message shows: "identity 0.93", or that no face was found."""
        return f"identity {self.score:.2f}" if self.face else "identity 0.00 (no face)"

    @property
    def infotext(self) -> str:
        """The infotext field's value (`Identity: 0.93`)."""
        return f"{self.score:.2f}"


def score_from_distance(distance: float) -> float:
    """dlib's descriptor distance as a [0, 1] score: 1 at 0, 0.5 at dlib's 0.6, 0 at 1.2."""
    return float(np.clip(1.0 - distance / (2 * DLIB_SAME_PERSON_DISTANCE), 0.0, 1.0))


# ---------------------------------------------------------------- the models


def _models_dir() -> Path:
    # The package's __init__ imports pkg_resources (gone from recent setuptools), so
    # find its folder without running it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "identity needs the face_recognition_models package (pip install it in the worker)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@cache
def _landmarks() -> dlib.shape_predictor:
    return dlib.shape_predictor(str(_models_dir() / LANDMARKS_FILE))


@cache
def _recogniser() -> dlib.face_recognition_model_v1:
    return dlib.face_recognition_model_v1(str(_models_dir() / RECOGNISER_FILE))


@cache
def _hog_detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


def load_models() -> None:
    """Load the landmark and recogniser weights now (a worker warms up with this)."""
    _landmarks(), _recogniser(), _hog_detector()


# ---------------------------------------------------------------- embeddings


def embed(pixels: np.ndarray, box: FaceBox) -> np.ndarray:
    """The 128-d descriptor of the face in `box` (RGB uint8 pixels, H×W×3)."""
    rect = dlib.rectangle(box.x, box.y, box.x1, box.y1)
    shape = _landmarks()(pixels, rect)
    return np.asarray(_recogniser().compute_face_descriptor(pixels, shape), dtype=np.float64)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def reference_face(image: Image.Image, face: int = 1) -> FaceIdentity:
    """The descriptor of the photo's face number `face` (1 = largest, as detect_faces orders).

    Raises IdentityError when the photo has no face or fewer than `face` faces.
    """
    boxes = detect_faces(image)
    if not boxes:
        raise IdentityError(
            "no face found in the photo; attach one where the face is clear and faces the camera"
        )
    if not 1 <= face <= len(boxes):
        raise IdentityError(f"face {face} asked for, but the photo shows {_faces(len(boxes))}")
    box = boxes[face - 1]
    return FaceIdentity(embed(_rgb(image), box), box)


def _faces(count: int) -> str:
    return "1 face; leave face out" if count == 1 else f"{count} faces; pick 1 to {count}"


def result_faces(image: Image.Image) -> list[FaceBox]:
    """The faces in a result: the Haar detector's, or dlib's HOG detector's if it finds none."""
    boxes = detect_faces(image)
    if boxes:
        return boxes
    found = _hog_detector()(_rgb(image), HOG_UPSAMPLE)
    boxes = [_clipped(rect, image.size) for rect in found]
    return sorted((b for b in boxes if b.area > 0), key=lambda b: b.area, reverse=True)


def _clipped(rect: dlib.rectangle, size: tuple[int, int]) -> FaceBox:
    x0, y0 = max(0, rect.left()), max(0, rect.top())
    x1, y1 = min(size[0], rect.right()), min(size[1], rect.bottom())
    return FaceBox(x0, y0, max(0, x1 - x0), max(0, y1 - y0))


def result_identities(result: Image.Image) -> list[FaceIdentity]:
    """The descriptor of every face in a result (none when it shows no face)."""
    boxes = result_faces(result)
    pixels = _rgb(result) if boxes else None
    return [FaceIdentity(embed(pixels, box), box) for box in boxes]


def identity_score(reference: FaceIdentity, result: Image.Image) -> IdentityScore:
    """How well `result` keeps the reference person: its best-matching face's score.

    The best match, not the largest face, because an edit may add people. A result
    without a face scores 0: the person was not kept.
    """
    return best_match(reference, result_identities(result))


def best_match(reference: FaceIdentity, faces: list[FaceIdentity]) -> IdentityScore:
    """The score of the face among `faces` closest to the reference; 0 without faces."""
    if not faces:
        return IdentityScore(0.0, None, None, 0)
    distances = [float(np.linalg.norm(f.embedding - reference.embedding)) for f in faces]
    best = int(np.argmin(distances))
    score = score_from_distance(distances[best])
    return IdentityScore(score, distances[best], faces[best].box, len(faces))


def compare_identity(photo: Image.Image, result: Image.Image, face: int = 1) -> IdentityScore:
    """The identity score of one result against face `face` of the member's photo."""
    return identity_score(reference_face(photo, face), result)
