"""An edit model's result mapped back onto the photo (pipeline/generate/align.py).

The moved results are made by OpenCV's own warp of a real photo (skimage's astronaut)
with a known transform, so the truth is known: the fitted transform must land every
point of the picture within 1 px of where the truth puts it.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.faces.detection import NoFaceFound, detect_faces, face_ellipse
from pipeline.generate.align import align_to_input


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())


def moved(photo: Image.Image, dx: float, dy: float, zoom: float = 1.0, turn: float = 0.0):
    """The photo as an edit model hands it back, moved by a known transform.

    Returns (picture, transform): the transform maps photo pixels to result pixels.
    """
    w, h = photo.size
    transform = cv2.getRotationMatrix2D((w / 2, h / 2), turn, zoom)
    transform[:, 2] += (dx, dy)
    pixels = cv2.warpAffine(
        np.asarray(photo), transform, (w, h), flags=cv2.INTER_LANCZOS4,
        borderMode=cv2.BORDER_REFLECT101,
    )  # fmt: skip
    return Image.fromarray(pixels), transform


def residual_px(found: np.ndarray, truth: np.ndarray, size: tuple[int, int]) -> float:
    """The largest distance between where the two transforms put a 9×9 grid of points."""
    w, h = size
    grid = np.array([[x, y, 1.0] for x in np.linspace(0, w, 9) for y in np.linspace(0, h, 9)])
    return float(np.linalg.norm(grid @ found.T - grid @ truth.T, axis=1).max())


def levels(a: Image.Image, b: Image.Image, margin: int = 32) -> float:
    """Mean absolute difference in levels away from the edges (which a shift uncovers)."""
    x = np.asarray(a, dtype=np.float32)[margin:-margin, margin:-margin]
    y = np.asarray(b, dtype=np.float32)[margin:-margin, margin:-margin]
    return float(np.abs(x - y).mean())


def edited(image: Image.Image) -> Image.Image:
    """What an instruction edit does besides moving: new colours, a repainted region, JPEG."""
    image = ImageEnhance.Color(image).enhance(1.5)
    ImageDraw.Draw(image).rectangle((300, 250, 500, 500), fill=(90, 60, 40))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return Image.open(out).convert("RGB")


@pytest.mark.parametrize(
    ("dx", "dy", "zoom", "turn", "model_size"),
    [
        (7.3, -4.6, 1.0, 0.0, 512),  # a plain sub-pixel shift at the photo's size
        (7.3, -4.6, 1.04, 0.0, 1024),  # Qwen-Image-Edit's flaw: zoomed, shifted, at 1024²
        (-12.0, 9.0, 0.97, 1.5, 768),  # zoomed out and turned a little, another size
    ],
)
def test_a_known_shift_and_zoom_are_recovered_within_a_pixel(
    photo, dx, dy, zoom, turn, model_size
) -> None:
    result, truth = moved(photo, dx, dy, zoom, turn)
    result = result.resize((model_size, model_size), Image.Resampling.LANCZOS)
    aligned = align_to_input(photo, result)
    assert aligned.image.size == photo.size
    assert aligned.transform is not None and aligned.notices == ()
    assert residual_px(aligned.transform, truth, photo.size) < 1.0
    assert aligned.zoom == pytest.approx(zoom, abs=0.005)
    plain = result.resize(photo.size, Image.Resampling.LANCZOS)
    # Registered, the result lies on the photo: a few levels of resampling, where the
    # plain resize is off by the whole shift.
    assert levels(aligned.image, photo) < 6
    assert levels(plain, photo) > 3 * levels(aligned.image, photo)


def test_a_real_edit_that_also_moved_the_picture_is_registered_within_a_pixel(photo) -> None:
    result, truth = moved(photo, 9.5, -6.2, zoom=1.05)
    result = edited(result).resize((1024, 1024), Image.Resampling.LANCZOS)
    aligned = align_to_input(photo, result)
    assert aligned.method in ("orb+ecc", "orb", "ecc")
    assert residual_px(aligned.transform, truth, photo.size) < 1.0


def test_a_result_that_was_not_moved_is_only_resized(photo) -> None:
    result = photo.resize((1024, 1024), Image.Resampling.LANCZOS)
    aligned = align_to_input(photo, result)
    assert (aligned.method, aligned.transform, aligned.notices) == ("resize", None, ())
    assert aligned.image.size == photo.size


def test_a_failed_registration_falls_back_to_the_resize_and_says_so(photo) -> None:
    unrelated = Image.fromarray(skimage.data.coffee())  # nothing in it matches the photo
    aligned = align_to_input(photo, unrelated)
    assert (aligned.method, aligned.transform) == ("resize", None)
    assert len(aligned.notices) == 1 and "only resized" in aligned.notices[0]
    plain = unrelated.resize(photo.size, Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(aligned.image), np.asarray(plain))


def test_keep_face_puts_the_photos_face_back_over_the_aligned_result(photo) -> None:
    result, _ = moved(photo, 6.0, 4.0, zoom=1.03)
    result = edited(result).resize((1024, 1024), Image.Resampling.LANCZOS)
    box = detect_faces(photo)[0]
    aligned = align_to_input(photo, result, keep="face")
    bare = align_to_input(photo, result)
    out, original = np.asarray(aligned.image), np.asarray(photo)
    x0, y0, x1, y1 = (round(v) for v in face_ellipse(box))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    core = (slice(cy - 20, cy + 20), slice(cx - 20, cx + 20))
    assert np.array_equal(out[core], original[core])  # the face is the photo's, exactly
    corner = (slice(400, 500), slice(400, 500))  # far from the face: the edit's pixels
    assert np.array_equal(out[corner], np.asarray(bare.image)[corner])


def test_the_kept_face_is_feathered_into_the_result(photo) -> None:
    # A black result shows the blend directly: output / photo = how much photo is kept.
    black = Image.new("RGB", (1024, 1024))
    box = detect_faces(photo)[0]
    aligned = align_to_input(photo, black, keep="face", face_boxes=[box])
    x0, y0, x1, y1 = (round(v) for v in face_ellipse(box))
    cy = (y0 + y1) // 2
    out = np.asarray(aligned.image, dtype=np.float32)[cy, (x0 + x1) // 2 :].mean(axis=1)
    kept = out / np.maximum(np.asarray(photo, dtype=np.float32)[cy, (x0 + x1) // 2 :].mean(1), 1)
    assert kept[0] == pytest.approx(1.0) and kept[-1] == 0.0
    blended = np.flatnonzero((kept > 0.05) & (kept < 0.95))
    # One soft seam at the ellipse's edge, several pixels wide (feather: 1% of 512, >= 4 px).
    assert len(blended) >= 6 and blended.max() - blended.min() < 40
    assert abs(int(np.median(blended)) + (x0 + x1) // 2 - x1) < 20


def test_keep_background_puts_the_photos_background_back(photo) -> None:
    result, _ = moved(photo, 6.0, 4.0)
    aligned = align_to_input(photo, edited(result), keep="background")
    corner = (slice(0, 40), slice(440, 512))  # top right: background, far from the person
    assert np.array_equal(np.asarray(aligned.image)[corner], np.asarray(photo)[corner])


def test_keeping_a_face_in_a_photo_without_one_is_refused() -> None:
    coffee = Image.fromarray(skimage.data.coffee())
    with pytest.raises(NoFaceFound, match="no face found"):
        align_to_input(coffee, coffee, keep="face")
