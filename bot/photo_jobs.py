"""Photo work the bot needs an answer to before queueing, run in a helper process.

These functions execute in the bot's single helper process (`bot.face_probe`), never
in the bot itself: they import OpenCV. They return plain data (bytes, strings,
dicts) and turn user-facing errors into `{"error": message}`, because unpickling a
`pipeline.training.dataset` exception in the bot would import OpenCV there.
"""

from __future__ import annotations

import io
from typing import Any


def prepare_photos(
    photos: list[tuple[str, bytes]], zip_data: bytes | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """Dataset preparation for /train: square face crops, captions, held-out split."""
    from pipeline.training.dataset import DatasetError, dataset_summary, prepare_dataset

    try:
        dataset = prepare_dataset(photos, zip_data=zip_data, **settings)
    except DatasetError as exc:
        return {"error": str(exc)}

    def png(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=4)
        return buffer.getvalue()

    return {
        "summary": dataset_summary(dataset.report),
        "token": dataset.token,
        "train": [png(t.image) for t in dataset.train],
        "captions": [t.caption for t in dataset.train],
        "test": [png(t.image) for t in dataset.test],
    }


def count_faces_in(png: bytes, max_pixels: int) -> int:
    """Runs in the helper process: the only place the bot's side imports OpenCV."""
    from pipeline.contract.images import open_image
    from pipeline.faces.detection import detect_faces

    return len(detect_faces(open_image(png, max_pixels=max_pixels, name="the image")))
