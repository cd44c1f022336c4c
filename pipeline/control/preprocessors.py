"""Control-image preprocessors and resize modes, as sd-webui-controlnet defines them.

Each preprocessor takes an RGB photo, resizes it so its shorter side is the unit's
processor resolution (padded to a multiple of 64 while it works, like the extension's
`resize_image_with_pad`), and returns the control map. The map is then fitted to the
generation size by the unit's resize mode: Crop and Resize (cover, centre crop),
Resize and Fill (fit, pad with the border's median colour), Just Resize (stretch).
`depth`, `openpose` and `seg_ofade20k` need a model that the admin configures
(transformers' depth-estimation pipeline; ViTPose, see `pose`; an ADE20K segmentation
model, see `segmentation`); the others are OpenCV/numpy only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from pipeline.contract.control import MODEL_KEYS, canonical_preprocessor
from pipeline.contract.jobs import JobError


def _hwc3(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.concatenate([array] * 3, axis=2)
    if array.shape[2] == 4:
        return array[:, :, :3]
    return array


def _resize_with_pad(image: np.ndarray, resolution: int):
    """Shorter side → `resolution`, then edge-pad to a multiple of 64; and the function
    that crops a result back to the unpadded size."""
    image = _hwc3(image)
    height, width = image.shape[:2]
    k = float(resolution) / float(min(height, width))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    target_h, target_w = int(np.round(height * k)), int(np.round(width * k))
    image = cv2.resize(image, (target_w, target_h), interpolation=interpolation)
    pad_h = int(np.ceil(target_h / 64.0) * 64 - target_h)
    pad_w = int(np.ceil(target_w / 64.0) * 64 - target_w)
    padded = np.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")

    def remove_pad(result: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(result[:target_h, :target_w])

    return np.ascontiguousarray(padded), remove_pad


def canny(image: np.ndarray, res: int, low: float, high: float) -> np.ndarray:
    padded, remove_pad = _resize_with_pad(image, res)
    return remove_pad(cv2.Canny(padded, int(low), int(high)))


def scribble_xdog(image: np.ndarray, res: int, threshold: float) -> np.ndarray:
    padded, remove_pad = _resize_with_pad(image, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[2 * (255 - dog) > threshold] = 255
    return remove_pad(result)


def tile_resample(image: np.ndarray, rate: float) -> np.ndarray:
    image = _hwc3(image)
    if rate < 1.1:
        return image
    height, width = image.shape[:2]
    size = (max(int(width / rate), 1), max(int(height / rate), 1))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def invert(image: np.ndarray) -> np.ndarray:
    return 255 - _hwc3(image)


def lineart_standard(image: np.ndarray, res: int) -> np.ndarray:
    padded, remove_pad = _resize_with_pad(image, res)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16, float(np.median(strong)) if strong.size else 16)
    intensity *= 127
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=2)
def _depth_estimator(source: str, device: str):
    from transformers import pipeline

    try:
        return pipeline("depth-estimation", model=source, device=device)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise JobError(
            f"the depth model {source!r} could not be loaded ({type(exc).__name__})"
        ) from None


def depth(image: np.ndarray, res: int, source: str, device: str = "cpu") -> np.ndarray:
    padded, remove_pad = _resize_with_pad(image, res)
    estimator = _depth_estimator(source, device)
    predicted = estimator(Image.fromarray(padded))["predicted_depth"]
    array = predicted.squeeze().float().cpu().numpy()
    array = cv2.resize(array, (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_CUBIC)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return remove_pad((scaled * 255.0).clip(0, 255).astype(np.uint8))


def openpose(array: np.ndarray, res: int, source: str, detector: str, device: str) -> np.ndarray:
    from pipeline.control.pose import openpose as draw

    padded, remove_pad = _resize_with_pad(array, res)
    return remove_pad(draw(padded, source, detector, device))


def seg_ofade20k(array: np.ndarray, res: int, source: str, device: str) -> np.ndarray:
    from pipeline.control.segmentation import segmentation

    padded, remove_pad = _resize_with_pad(array, res)
    return remove_pad(segmentation(padded, source, device))


def run_preprocessor(
    name: str,
    image: Image.Image,
    *,
    res: int = 512,
    threshold_a: float = -1,
    threshold_b: float = -1,
    depth_model: str = "",
    pose_model: str = "",
    pose_detector: str = "",
    segmentation_model: str = "",
    device: str = "cpu",
) -> Image.Image:
    """The control map of `image` (RGB) for preprocessor `name`; the `*_model` arguments
    are the [control] models of the preprocessors that need one ("" = none)."""
    name = canonical_preprocessor(name)
    array = np.asarray(image.convert("RGB"))
    steps: dict[str, Callable[[], np.ndarray]] = {
        "none": lambda: _hwc3(array),
        "canny": lambda: canny(array, res, threshold_a, threshold_b),
        "scribble_xdog": lambda: scribble_xdog(array, res, threshold_a),
        "tile_resample": lambda: tile_resample(array, threshold_a),
        "invert": lambda: invert(array),
        "lineart_standard": lambda: lineart_standard(array, res),
    }
    models = {"depth": depth_model, "openpose": pose_model, "seg_ofade20k": segmentation_model}
    if name in models and not models[name]:
        raise JobError(
            f"preprocessor '{name}' needs a model and none is configured "
            f"([control] {MODEL_KEYS[name]})"
        )
    steps["depth"] = lambda: depth(array, res, depth_model, device)
    steps["openpose"] = lambda: openpose(array, res, pose_model, pose_detector, device)
    steps["seg_ofade20k"] = lambda: seg_ofade20k(array, res, segmentation_model, device)
    if name not in steps:
        raise JobError(f"unknown preprocessor {name!r}")
    return Image.fromarray(_hwc3(steps[name]()))


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Fit a control map to the generation size by the unit's resize mode."""
    if image.size == (width, height):
        return image
    if mode == "Just Resize":
        return image.resize((width, height), Image.LANCZOS)
    scale_cover = max(width / image.width, height / image.height)
    scale_fit = min(width / image.width, height / image.height)
    if mode == "Crop and Resize":
        w, h = (
            max(round(image.width * scale_cover), width),
            max(round(image.height * scale_cover), height),
        )
        big = image.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return big.crop((left, top, left + width, top + height))
    # Resize and Fill: fit inside, fill the rest with the border's median colour.
    array = np.asarray(image.convert("RGB"))
    borders = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]], axis=0)
    colour = tuple(int(c) for c in np.median(borders, axis=0))
    w, h = max(round(image.width * scale_fit), 1), max(round(image.height * scale_fit), 1)
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(
        image.convert("RGB").resize((w, h), Image.LANCZOS), ((width - w) // 2, (height - h) // 2)
    )
    return canvas
