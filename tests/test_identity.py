"""Identity for /edit, measured on real photos (skimage.data): dlib's real recogniser.

Eileen Collins (skimage's astronaut) moved, scaled and recoloured is still Eileen
Collins; the cameraman is someone else; a photo without a face is refused, and a
result without one scores 0. The margins come from bench/bench_identity.py's
calibration (docs/DECISIONS.md, issue 25): same person at least 0.60 across different
photos of one person, different people at most 0.51.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance

from pipeline.contract.compare import BACKGROUND, compare_picture, identity_caption
from pipeline.contract.config import ConfigError, EditConfig, config_from_dict, load_config
from pipeline.faces import identity
from pipeline.faces.detection import detect_faces
from pipeline.faces.identity import IdentityError

# Calibrated (bench/bench_identity.py): the same person across different photos scores
# 0.60 to 1.00, different people 0.24 to 0.51; these photos' own edits score 0.85+.
SAME = 0.75
DIFFERENT = 0.5


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def collins() -> Image.Image:
    return photo("astronaut")


@pytest.fixture(scope="module")
def reference(collins) -> identity.FaceIdentity:
    return identity.reference_face(collins)


@pytest.fixture(scope="module")
def two_people(collins) -> Image.Image:
    """Collins on the left, the cameraman on the right: two real faces in one picture."""
    canvas = Image.new("RGB", (1024, 512))
    canvas.paste(collins, (0, 0))
    canvas.paste(photo("camera"), (512, 0))
    return canvas


def moved_scaled_recoloured(image: Image.Image) -> Image.Image:
    """What an edit does to a face it keeps: zoom 10%, shift, warmer colours, JPEG."""
    w, h = image.size
    zoomed = image.resize((round(w * 1.1), round(h * 1.1)), Image.Resampling.BICUBIC)
    moved = zoomed.crop((30, 10, 30 + w, 10 + h))
    r, g, b = ImageEnhance.Color(moved).enhance(1.4).split()
    warmer = Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.15))), g, b))
    jpeg = io.BytesIO()
    warmer.save(jpeg, "JPEG", quality=60)
    return Image.open(jpeg).convert("RGB")


def test_the_same_face_moved_scaled_and_recoloured_scores_high(collins, reference) -> None:
    edited = moved_scaled_recoloured(collins)
    result = identity.identity_score(reference, edited)
    assert result.face is not None and result.faces_found == 1
    # The face moved by the edit: found where it went, not where it was.
    assert abs(result.face.x - (reference.box.x * 1.1 - 30)) < 15
    assert result.score >= SAME, result
    assert result.label == f"identity {result.score:.2f}"
    assert result.infotext == f"{result.score:.2f}"  # the infotext's `Identity:` value


def test_the_same_face_at_another_size_scores_high(collins, reference) -> None:
    larger = collins.resize((1024, 1024), Image.Resampling.LANCZOS)
    assert identity.identity_score(reference, larger).score >= SAME
    grey = collins.convert("L").convert("RGB")
    assert identity.identity_score(reference, grey).score >= SAME


def test_a_tilted_face_the_cascades_miss_is_found_by_dlibs_detector(collins, reference) -> None:
    tilted = collins.rotate(25, resample=Image.Resampling.BICUBIC)  # a head tilted 25°
    assert detect_faces(tilted) == []  # the Haar cascades only know upright faces
    result = identity.identity_score(reference, tilted)
    assert result.face is not None and result.score >= SAME


def test_a_different_person_scores_low(reference) -> None:
    result = identity.identity_score(reference, photo("camera"))
    assert result.face is not None
    assert result.score < DIFFERENT, result


def test_a_result_without_a_face_scores_zero(reference) -> None:
    result = identity.identity_score(reference, photo("coffee"))
    assert (result.score, result.distance, result.face, result.faces_found) == (0.0, None, None, 0)
    assert result.label == "identity 0.00 (no face)"


def test_a_photo_without_a_face_is_refused_in_one_line() -> None:
    with pytest.raises(IdentityError, match=r"^no face found in the photo; [^\n]+$"):
        identity.reference_face(photo("coffee"))


def test_a_face_index_out_of_range_is_refused_naming_the_count(collins, two_people) -> None:
    with pytest.raises(IdentityError, match=r"^face 2 asked for, but the photo shows 1 face;"):
        identity.reference_face(collins, face=2)
    with pytest.raises(IdentityError, match=r"shows 2 faces; pick 1 to 2$"):
        identity.reference_face(two_people, face=3)
    with pytest.raises(IdentityError, match=r"^face 0 asked for"):
        identity.reference_face(two_people, face=0)


def test_the_face_index_picks_the_face_in_detection_order(two_people, collins) -> None:
    boxes = detect_faces(two_people)  # largest first: the order members number faces in
    assert len(boxes) == 2
    faces = [identity.reference_face(two_people, face=n) for n in (1, 2)]
    assert [face.box for face in faces] == boxes
    left, right = sorted(faces, key=lambda face: face.box.x)
    assert left.box.x1 <= 512 <= right.box.x
    assert identity.identity_score(left, collins).score >= SAME  # Collins
    assert identity.identity_score(right, collins).score < DIFFERENT  # the cameraman


def test_the_best_matching_face_of_a_result_counts(reference, two_people) -> None:
    # An edit that adds a person still keeps Collins: the best match is scored.
    result = identity.identity_score(reference, two_people)
    assert result.faces_found == 2
    assert result.face is not None and result.face.x1 <= 512
    assert result.score >= SAME


def test_the_score_maps_dlibs_distance_onto_zero_to_one() -> None:
    assert identity.score_from_distance(0.0) == 1.0
    assert identity.score_from_distance(identity.DLIB_SAME_PERSON_DISTANCE) == pytest.approx(0.5)
    assert identity.score_from_distance(1.2) == 0.0
    assert identity.score_from_distance(3.0) == 0.0
    distances = np.linspace(0, 1.5, 31)
    scores = [identity.score_from_distance(d) for d in distances]
    assert scores == sorted(scores, reverse=True)


def test_the_same_call_twice_gives_the_same_descriptor(collins, reference) -> None:
    again = identity.reference_face(collins)
    assert np.array_equal(again.embedding, reference.embedding)
    assert again.embedding.shape == (128,)


# ---------------------------------------------------------------- [edit] in config.toml


def test_the_shipped_config_toml_sets_the_calibrated_edit_defaults() -> None:
    config = load_config(Path(__file__).resolve().parent.parent / "config.toml")
    assert config.edit == EditConfig()
    assert (config.edit.min_identity, config.edit.max_retries) == (0.55, 2)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"min_identity": 1.5}, "edit.min_identity must be a number from 0 to 1"),
        ({"min_identity": "high"}, "edit.min_identity must be a number from 0 to 1"),
        ({"max_retries": -1}, "edit.max_retries must be a whole number from 0 to 10"),
        ({"max_retries": 2.5}, "edit.max_retries must be a whole number from 0 to 10"),
        ({"retries": 2}, "unknown key"),
    ],
)
def test_bad_edit_settings_are_refused_in_one_line(values, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"models": {"m": {"source": "x"}}, "edit": values}, path="config.toml")


# ---------------------------------------------------------------- the Compare picture


def test_the_compare_picture_shows_both_side_by_side_with_the_score(collins) -> None:
    after = moved_scaled_recoloured(collins).resize((1024, 1024), Image.Resampling.LANCZOS)
    picture = compare_picture(collins, after, 0.93)
    band = 512 // 10
    assert picture.size == (512 + 8 + 512, 512 + band)
    pixels = np.asarray(picture, dtype=np.int16)
    # Before: the photo itself; after: the result at the photo's height (1 level of rounding).
    assert np.array_equal(pixels[:512, :512], np.asarray(collins))
    shrunk = np.asarray(after.resize((512, 512), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(pixels[:512, 520:] - shrunk).max() <= 1
    # The band carries text: the middle (the score) and both ends (before / after).
    text = np.abs(pixels[512:] - BACKGROUND).sum(axis=2) > 100
    thirds = np.array_split(text, 3, axis=1)
    assert all(third.sum() > 50 for third in thirds)
    # Another score is written differently; the pictures above it are the same.
    other = np.asarray(compare_picture(collins, after, 0.41), dtype=np.int16)
    assert np.array_equal(other[:512], pixels[:512])
    assert not np.array_equal(other[512:], pixels[512:])


def test_the_compare_picture_keeps_each_aspect_at_one_height(collins) -> None:
    wide = collins.resize((1000, 400))
    tall = collins.resize((300, 900))
    picture = compare_picture(wide, tall, None, max_height=300)
    assert picture.size == (750 + 8 + 100, 300 + 30)
    assert identity_caption(None) == "identity: no face in the result"
    assert identity_caption(0.934) == "identity 0.93"
