"""The photo helper's /train work (`bot.photo_helper.work.prepare_photos`), run here as
the helper process runs it: each photo is decoded once, and the crops come back as
PNGs the bot can store and the worker can read without decoding anything again.

Photos are scikit-image's real photographs; scores come from the real NudeNet."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from skimage import data

from bot.photo_helper.work import prepare_photos
from pipeline.contract.blobs import sha256_hex
from pipeline.safety.detector import detect_png
from tests.test_safety_detector import png_of

PHOTOS = ("astronaut", "coffee", "chelsea", "camera")
SETTINGS = dict(resolution=64, min_side=64, subject="person", max_photos=10, min_photos=3)


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, bytes]]:
    return [(f"{name}.png", png_of(getattr(data, name)())) for name in PHOTOS]


def test_each_photo_is_decoded_once_and_its_crops_scored_in_memory(photos, monkeypatch):
    opened: list[int] = []
    real_open = Image.open

    def counting_open(*args, **kwargs):  # the real decoder, counted
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    prepared = prepare_photos(photos, None, dict(SETTINGS, token="sks"), nsfw=True)
    monkeypatch.undo()

    crops = [*prepared["train"], *prepared["test"]]
    assert len(crops) == len(PHOTOS)
    assert len(opened) == len(PHOTOS)  # the originals, once each; the crops never
    # What the bot stores and the worker reads: PNGs named by their sha256, sized as said.
    for crop in crops:
        assert crop["sha256"] == sha256_hex(crop["png"])
        with Image.open(io.BytesIO(crop["png"])) as image:
            assert image.size == (crop["width"], crop["height"]) == (64, 64)
    # Scoring the crops in memory gives what decoding their PNGs again gave.
    assert prepared["nsfw"] == [detect_png(crop["png"]) for crop in crops]


def test_no_scores_unless_the_server_checks_photos(photos):
    prepared = prepare_photos(photos, None, dict(SETTINGS, token="sks"))
    assert "nsfw" not in prepared and len(prepared["captions"]) == len(prepared["train"])
