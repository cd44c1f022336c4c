"""Face detection and face masks on real photos from skimage.data."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.faces.detection import (
    FaceBox,
    NoFaceFound,
    detect_faces,
    face_crop_box,
    face_mask,
    keep_face_mask,
    person_mask,
)

# Measured by hand on the 512×512 astronaut: skin from under the fringe to the chin.
ASTRONAUT_FACE = FaceBox(180, 58, 92, 110)
# The cameraman, seen in profile looking right: forehead to chin, ear to nose.
CAMERAMAN_FACE = FaceBox(195, 105, 70, 85)


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def inside_ellipse(box: FaceBox, size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """Boolean pixel map of the ellipse inscribed in `box`: the face's eroded core."""
    ys, xs = np.mgrid[: size[1], : size[0]]
    cx, cy = box.center
    return ((xs + 0.5 - cx) / (box.w / 2)) ** 2 + ((ys + 0.5 - cy) / (box.h / 2)) ** 2 <= 1


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return photo("astronaut")


@pytest.fixture(scope="module")
def astronaut_faces(astronaut: Image.Image) -> list[FaceBox]:
    return detect_faces(astronaut)


def test_astronaut_face_is_found(astronaut_faces: list[FaceBox]) -> None:
    assert len(astronaut_faces) == 1
    assert astronaut_faces[0].iou(ASTRONAUT_FACE) > 0.3
    assert astronaut_faces[0].score > 0


def test_profile_face_is_found() -> None:
    faces = detect_faces(photo("camera"))
    assert len(faces) == 1
    assert faces[0].iou(CAMERAMAN_FACE) > 0.3


def test_mirrored_face_is_found_where_it_moved(astronaut: Image.Image) -> None:
    faces = detect_faces(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    mirrored = FaceBox(
        512 - ASTRONAUT_FACE.x1, ASTRONAUT_FACE.y, ASTRONAUT_FACE.w, ASTRONAUT_FACE.h
    )
    assert len(faces) == 1
    assert faces[0].iou(mirrored) > 0.3


def test_large_photo_gives_boxes_in_its_own_pixels(astronaut: Image.Image) -> None:
    big = astronaut.resize((1536, 1536), Image.Resampling.BICUBIC)
    faces = detect_faces(big)
    assert len(faces) == 1
    assert faces[0].iou(ASTRONAUT_FACE.scaled(3)) > 0.3


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "moon", "coins"])
def test_photos_without_faces_give_none(name: str) -> None:
    # chelsea is a cat, moon has a face-like crater and coins fool one cascade alone
    assert detect_faces(photo(name)) == []


def test_face_box_geometry() -> None:
    box = FaceBox(10, 20, 30, 40, score=5.0)
    assert box.area == 1200
    assert box.iou(box) == 1.0
    assert box.iou(FaceBox(100, 100, 5, 5)) == 0.0
    assert box.iou(FaceBox(25, 20, 30, 40)) == pytest.approx(600 / 1800)
    padded = box.padded(15, (50, 100))
    assert (padded.x, padded.y, padded.x1, padded.y1) == (0, 5, 50, 75)
    assert padded.score == 5.0


def test_face_mask_covers_the_face_only(astronaut: Image.Image, astronaut_faces) -> None:
    mask = face_mask(astronaut.size, astronaut_faces)
    values = np.asarray(mask)
    assert mask.mode == "L" and mask.size == astronaut.size
    cx, cy = (round(v) for v in ASTRONAUT_FACE.center)
    assert values[cy, cx] == 255
    assert values[ASTRONAUT_FACE.y + 10, cx] == 255  # forehead
    assert values[ASTRONAUT_FACE.y1 - 5, cx] == 255  # chin
    assert values[:20].max() == 0 and values[300:].max() == 0


def test_keep_face_mask_keeps_the_face_exactly(astronaut: Image.Image, astronaut_faces) -> None:
    values = np.asarray(keep_face_mask(astronaut.size, astronaut_faces))
    assert values[inside_ellipse(ASTRONAUT_FACE.padded(-8, astronaut.size))].max() == 0
    assert values[300:].min() == 255  # the suit and helmet are repainted
    assert values[:, :120].min() == 255  # so is the flag
    # Everything away from the face is either repainted or feathered into it.
    assert values.mean() > 200


def test_keep_face_mask_is_the_face_mask_turned_around(
    astronaut: Image.Image, astronaut_faces
) -> None:
    face = np.asarray(face_mask(astronaut.size, astronaut_faces, blur=0)).astype(int)
    keep = np.asarray(keep_face_mask(astronaut.size, astronaut_faces, blur=0)).astype(int)
    assert np.all((face == 255) <= (keep < 255))  # repainting one never repaints the other
    assert np.all((face == 0) <= (keep == 255))


def test_person_mask_covers_head_and_shoulders(astronaut: Image.Image, astronaut_faces) -> None:
    person = np.asarray(person_mask(astronaut.size, astronaut_faces))
    cx, cy = (round(v) for v in ASTRONAUT_FACE.center)
    assert person[cy, cx] == 255  # face
    assert person[35, cx] == 255  # hair above the face box
    assert person[300, cx] == 255  # chest, well below the face
    assert person[300, 120] == 255  # her right shoulder
    assert person[5, 5] == 0 and person[5, 506] == 0  # top corners are background


@pytest.mark.parametrize("make_mask", [face_mask, keep_face_mask, person_mask])
def test_masks_need_a_face(make_mask) -> None:
    with pytest.raises(NoFaceFound, match="no face found in the photo; attach a mask instead"):
        make_mask((64, 64), [])


def test_face_crop_box_is_a_square_around_the_face(astronaut_faces: list[FaceBox]) -> None:
    face = astronaut_faces[0]
    x0, y0, x1, y1 = face_crop_box(face, (512, 512), padding=32)
    assert x1 - x0 == y1 - y0 == max(face.w, face.h) + 64
    assert x0 <= face.x and y0 <= face.y and x1 >= face.x1 and y1 >= face.y1


def test_face_crop_box_shifts_inside_the_photo() -> None:
    corner_face = FaceBox(5, 190, 50, 50)
    x0, y0, x1, y1 = face_crop_box(corner_face, (300, 250), padding=32)
    assert (x0, y0, x1, y1) == (0, 136, 114, 250)
    # A photo narrower than the square: the crop takes its full width.
    x0, y0, x1, y1 = face_crop_box(FaceBox(10, 10, 80, 80), (100, 400), padding=32)
    assert (x0, x1) == (0, 100) and y1 - y0 == 100
