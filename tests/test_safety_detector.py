"""NudeNet (the real detector and its shipped model) on real photos from skimage.data,
and the threshold rules that turn its labels into "flagged"."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.contract.jobs import Done, OutputImage, event_from_json, event_to_json
from pipeline.contract.safety import flagged_labels
from pipeline.safety.detector import detect_many, detect_png

# Portraits and object photos shipped with scikit-image. (Not `colorwheel`: a synthetic
# hue disc that NudeNet 3.4 scores BUTTOCKS_EXPOSED 0.83 — a known false positive of the
# detector on a non-photo, which an admin can raise with [safety.labels].)
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "horse", "page")


def png_of(array: np.ndarray) -> bytes:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(array[..., :3].astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_scores() -> dict[str, dict[str, float]]:
    pngs = [png_of(getattr(data, name)()) for name in PHOTOS]
    return dict(zip(PHOTOS, detect_many(pngs)))


def test_no_false_positives_on_portraits_and_objects(photo_scores):
    for name, scores in photo_scores.items():
        assert flagged_labels(scores, 0.6, {}) == [], (name, scores)
    # The detector did look: it finds the faces, which are not explicit.
    assert photo_scores["astronaut"].get("FACE_FEMALE", 0) >= 0.6
    assert photo_scores["camera"].get("FACE_MALE", 0) >= 0.5


def test_label_thresholds_override_per_label(photo_scores):
    astronaut = photo_scores["astronaut"]
    assert flagged_labels(astronaut, 0.6, {"FACE_FEMALE": 0.5}) == ["FACE_FEMALE"]
    assert flagged_labels(astronaut, 0.6, {"FACE_FEMALE": 0.99}) == []
    # An explicit label scoring exactly at the threshold flags ("at or above").
    assert flagged_labels({"BUTTOCKS_EXPOSED": 0.6}, 0.6, {}) == ["BUTTOCKS_EXPOSED"]
    assert flagged_labels({"BUTTOCKS_EXPOSED": 0.59}, 0.6, {}) == []
    assert flagged_labels({"BUTTOCKS_EXPOSED": 0.7}, 0.6, {"BUTTOCKS_EXPOSED": 0.9}) == []


def test_tiny_images_and_round_trip_of_scores():
    # A 64² image is below what the 320-pixel detector resolves: no labels, no error.
    small = Image.fromarray(data.astronaut()).resize((64, 64))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    assert detect_png(buffer.getvalue()) == {}
    image = OutputImage(png=b"x", seed=1, nsfw={"FACE_FEMALE": 0.72})
    back = event_from_json(event_to_json(Done("j", (image,))))
    assert back.images[0].nsfw == {"FACE_FEMALE": 0.72}
