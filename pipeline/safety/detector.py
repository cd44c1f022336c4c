"""NudeNet on an image: the highest score of each label it found.

NudeNet ships its ONNX model (320n) inside the wheel and runs it on onnxruntime's
CPU provider, so nothing is downloaded and no GPU is needed (~60 ms per 512² image on
one core). It imports OpenCV: this module runs in a worker or in the bot's photo
helper process, never in the bot process. What to do with the labels (the policy
and thresholds) is torch-free and lives in `pipeline.contract.safety`.
"""

from __future__ import annotations

import io
import threading
from typing import Any

_lock = threading.RLock()
_detector: Any = None


def _nudenet() -> Any:
    global _detector
    with _lock:
        if _detector is None:
            import onnxruntime
            from nudenet import NudeDetector

            # One thread: a worker shares its cores with torch, the helper with the bot.
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            detector = NudeDetector()
            model_path = detector.onnx_session._model_path  # the wheel's 320n.onnx
            detector.onnx_session = onnxruntime.InferenceSession(
                model_path, sess_options=options, providers=["CPUExecutionProvider"]
            )
            _detector = detector
        return _detector


def detect_image(image: Any) -> dict[str, float]:
    """``{label: best score}`` for a PIL image (any mode)."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # NudeNet reads OpenCV's BGR order
    with _lock:  # an onnxruntime session is not shared across threads here
        found = _nudenet().detect(bgr)
    scores: dict[str, float] = {}
    for detection in found:
        label, score = detection["class"], round(float(detection["score"]), 3)
        scores[label] = max(score, scores.get(label, 0.0))
    return dict(sorted(scores.items()))


def detect_png(data: bytes) -> dict[str, float]:
    """``{label: best score}`` for encoded image bytes (PNG, JPEG, WebP)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return detect_image(image)


def detect_many(images: list[bytes]) -> list[dict[str, float]]:
    """For the photo helper process: one call, several photos."""
    return [detect_png(data) for data in images]
