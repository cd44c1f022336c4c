"""Face jobs on a real photo: keep-face inpainting and ADetailer-style face fix."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import config_from_dict
from pipeline.contract.jobs import GenerateSpec
from pipeline.faces import detection as faces
from pipeline.generate.modes import _Run, fix_faces, run_generation
from pipeline.models.loading import ModelCache
from tests.conftest import HALF_DTYPES, png_of


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(photos.astronaut()).resize((256, 256), Image.LANCZOS)


def outside_padded_face(image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Pixels outside the face crop (32 px padding) that face fix may not touch."""
    [box] = faces.detect_faces(image)
    crop = faces.face_crop_box(box, image.size, 32)
    outside = np.ones((image.height, image.width), dtype=bool)
    outside[crop[1] : crop[3], crop[0] : crop[2]] = False
    return outside, crop


def spec(**changes) -> GenerateSpec:
    values = {"prompt": "photo of a woman", "width": 64, "height": 64, "steps": 3, "seed": 3}
    return GenerateSpec(**{**values, **changes})


def test_keep_face_leaves_every_face_pixel_unchanged(sd, astronaut, tmp_path):
    blobs = BlobStore(tmp_path)
    job = spec(mode="inpaint", image=blobs.put(png_of(astronaut)), keep="face", strength=1.0)
    out = np.asarray(Image.open(io.BytesIO(run_generation(sd, [job], blobs=blobs)[0][0].png)))
    boxes = faces.detect_faces(astronaut)
    kept = np.asarray(faces.keep_face_mask(astronaut.size, boxes)) == 0
    original = np.asarray(astronaut)
    assert kept.sum() > 500  # the face is a real region
    assert np.array_equal(out[kept], original[kept])
    assert np.abs(out[~kept].astype(int) - original[~kept]).mean() > 10  # the rest repainted


def test_keep_background_repaints_the_person_only(sd, astronaut, tmp_path):
    blobs = BlobStore(tmp_path)
    job = spec(mode="inpaint", image=blobs.put(png_of(astronaut)), keep="background")
    out = np.asarray(Image.open(io.BytesIO(run_generation(sd, [job], blobs=blobs)[0][0].png)))
    person = np.asarray(faces.person_mask(astronaut.size, faces.detect_faces(astronaut)))
    background = person == 0
    assert np.array_equal(out[background], np.asarray(astronaut)[background])


def test_a_photo_without_a_face_gets_the_message(sd, tmp_path):
    blobs = BlobStore(tmp_path)
    coffee = Image.fromarray(photos.coffee()).resize((128, 96))
    job = spec(mode="inpaint", image=blobs.put(png_of(coffee)), keep="face")
    with pytest.raises(faces.NoFaceFound, match="no face found in the photo; attach a mask"):
        run_generation(sd, [job], blobs=blobs)


def test_face_fix_changes_nothing_outside_the_padded_face_box(sd, astronaut):
    run = _Run(sd, None, None, 0)
    fixed = np.asarray(fix_faces(run, spec(), astronaut, None, None))
    original = np.asarray(astronaut)
    outside, (x0, y0, x1, y1) = outside_padded_face(astronaut)
    assert np.array_equal(fixed[outside], original[outside])
    assert not np.array_equal(fixed[y0:y1, x0:x1], original[y0:y1, x0:x1])


def test_face_fix_option_runs_on_generated_images(sd):
    # Random weights draw no faces: face fix must then leave the image exactly as is.
    plain = run_generation(sd, [spec()])[0][0]
    fixed = run_generation(sd, [spec(face_fix=True)])[0][0]
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(plain.png))), np.asarray(Image.open(io.BytesIO(fixed.png)))
    )
    assert "ADetailer model" in fixed.infotext


def test_fix_faces_mode_repaints_only_the_face_of_an_earlier_image(sd, astronaut, tmp_path):
    blobs = BlobStore(tmp_path)
    job = spec(mode="facefix", image=blobs.put(png_of(astronaut)), width=256, height=256)
    [[image]] = run_generation(sd, [job], blobs=blobs)
    fixed = np.asarray(Image.open(io.BytesIO(image.png)))
    original = np.asarray(astronaut)
    outside, _ = outside_padded_face(astronaut)
    assert np.array_equal(fixed[outside], original[outside])
    assert not np.array_equal(fixed, original)
    assert "ADetailer model" in image.infotext


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_keep_face_and_face_fix_in_half_precision(tiny_sd, astronaut, tmp_path, dtype):
    config = config_from_dict(
        {"models": {"tiny": {"source": str(tiny_sd)}}, "workers": {"dtype": dtype}}
    )
    half = ModelCache(config, "cpu").get()
    blobs = BlobStore(tmp_path)
    photo = blobs.put(png_of(astronaut))
    keep = spec(mode="inpaint", image=photo, keep="face", strength=1.0, steps=2)
    out = np.asarray(Image.open(io.BytesIO(run_generation(half, [keep], blobs=blobs)[0][0].png)))
    kept = np.asarray(faces.keep_face_mask(astronaut.size, faces.detect_faces(astronaut))) == 0
    original = np.asarray(astronaut)
    assert np.array_equal(out[kept], original[kept])
    assert np.abs(out[~kept].astype(int) - original[~kept]).mean() > 10
    fixed = np.asarray(fix_faces(_Run(half, None, None, 0), spec(steps=2), astronaut, None, None))
    outside, (x0, y0, x1, y1) = outside_padded_face(astronaut)
    assert np.array_equal(fixed[outside], original[outside])
    assert not np.array_equal(fixed[y0:y1, x0:x1], original[y0:y1, x0:x1])
