"""Photo work the bot needs an answer to before queueing, run in a helper process.

These functions execute in the bot's single helper process (`bot.photo_helper.process`), never
in the bot itself: they import OpenCV. They return plain data (bytes, strings,
dicts) and turn user-facing errors into `{"error": message}`, because unpickling a
`pipeline.training.dataset` exception in the bot would import OpenCV there.
"""

from __future__ import annotations

import io
from typing import Any


def prepare_photos(
    photos: list[tuple[str, bytes]],
    zip_data: bytes | None,
    settings: dict[str, Any],
    nsfw: bool = False,
) -> dict[str, Any]:
    """Dataset preparation for /train: square face crops, captions, held-out split.

    Each photo is decoded once, here; the crops come back encoded as PNGs with their
    sha256 and size (so the bot stores them without decoding them again) and, with
    ``nsfw``, their NSFW scores, taken from the crops in memory."""
    from pipeline.contract.blobs import sha256_hex
    from pipeline.training.dataset import DatasetError, dataset_summary, prepare_dataset

    try:
        dataset = prepare_dataset(photos, zip_data=zip_data, **settings)
    except DatasetError as exc:
        return {"error": str(exc)}

    def crop(image) -> dict[str, Any]:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=4)
        png = buffer.getvalue()
        return {"png": png, "sha256": sha256_hex(png), "width": image.width, "height": image.height}

    prepared = {
        "summary": dataset_summary(dataset.report),
        "token": dataset.token,
        "train": [crop(t.image) for t in dataset.train],
        "captions": [t.caption for t in dataset.train],
        "test": [crop(t.image) for t in dataset.test],
    }
    if nsfw:
        from pipeline.safety.detector import detect_image

        prepared["nsfw"] = [detect_image(t.image) for t in [*dataset.train, *dataset.test]]
    return prepared


def count_faces_in(png: bytes, max_pixels: int) -> int:
    """Runs in the helper process: the only place the bot's side imports OpenCV."""
    from pipeline.contract.images import open_image
    from pipeline.faces.detection import detect_faces

    return len(detect_faces(open_image(png, max_pixels=max_pixels, name="the image")))


def detect_nsfw(images: list[bytes]) -> list[dict[str, float]]:
    """NudeNet's best score per label for each image (`pipeline.safety.detector`: it
    imports OpenCV and onnxruntime, so it runs here, not in the bot)."""
    from pipeline.safety.detector import detect_many

    return detect_many(images)


def inspect_lora(data: bytes, name: str) -> dict[str, Any]:
    """For `/admin lora add`: ``{"format", "family"}`` of a LoRA file, or
    ``{"error": message}`` (reading the tensors needs torch, so it runs here)."""
    from safetensors.torch import load

    from pipeline.loras.formats import detect_family, detect_format

    try:
        state_dict = load(data)
    except Exception:  # noqa: BLE001 - safetensors raises its own types for any bad header
        return {"error": f"'{name}' is not a LoRA file (not a readable .safetensors)"}
    fmt = detect_format(state_dict)
    if fmt is None:
        return {"error": f"'{name}' is not a LoRA file (it has no LoRA weights)"}
    return {"format": fmt, "family": detect_family(state_dict)}
