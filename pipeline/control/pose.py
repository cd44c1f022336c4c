"""The `openpose` preprocessor: body keypoints from a transformers pose model, drawn as
the OpenPose skeleton the ControlNet openpose models were trained on.

The model is one the admin configures (`[control] pose_model`): a ViTPose checkpoint
(`VitPoseForPoseEstimation` with its image processor, e.g.
"usyd-community/vitpose-base-simple"), which predicts the 17 COCO keypoints of each
person box. The boxes come from an object-detection model (`[control] pose_detector`,
run by transformers' `pipeline("object-detection")`, its "person" boxes) or, without
one, the whole image is the one person box.

COCO keypoints become OpenPose's 18 as sd-webui-controlnet's DWPose does it
(`annotator/openpose/wholebody.py`): the neck is the shoulders' midpoint, present when
both shoulders are, and a keypoint scoring under 0.3 is left out. The skeleton is drawn
as its `annotator/openpose/util.py` `draw_bodypose` does: 17 limbs as filled ellipses
4 px wide in the limb's colour, the canvas dimmed to 60 %, then each keypoint as a
disc of radius 4 in its colour, on black.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.contract.jobs import JobError

# OpenPose body order: 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left
# shoulder/elbow/wrist, 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle,
# 14/15 right/left eye, 16/17 right/left ear. Limbs as 1-based pairs, and the colours of
# limb i and of keypoint i (RGB), as sd-webui-controlnet's draw_bodypose lists them.
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
STICK_WIDTH = 4
MIN_SCORE = 0.3
# COCO index of OpenPose keypoint i (None: the neck, made from both shoulders).
COCO_OF_OPENPOSE = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)

Keypoint = tuple[float, float] | None  # (x, y) as fractions of the width and height


def openpose_keypoints(coco: np.ndarray, scores: np.ndarray, width: int, height: int):
    """One person's 17 COCO keypoints (pixels) and scores → OpenPose's 18, normalised to
    [0, 1], None where the score is under 0.3."""
    points: list[Keypoint] = []
    for index in COCO_OF_OPENPOSE:
        if index is None:
            if scores[5] >= MIN_SCORE and scores[6] >= MIN_SCORE:
                x, y = (coco[5] + coco[6]) / 2
                points.append((float(x) / width, float(y) / height))
            else:
                points.append(None)
        elif scores[index] >= MIN_SCORE:
            points.append((float(coco[index][0]) / width, float(coco[index][1]) / height))
        else:
            points.append(None)
    return points


def draw_bodypose(canvas: np.ndarray, people: Sequence[Sequence[Keypoint]]) -> np.ndarray:
    """Draw each person's 18 OpenPose keypoints on `canvas` (H×W×3 uint8, RGB)."""
    height, width = canvas.shape[:2]
    for points in people:
        for (first, second), colour in zip(LIMBS, COLOURS):
            a, b = points[first - 1], points[second - 1]
            if a is None or b is None:
                continue
            ys = np.array([a[0], b[0]]) * float(width)  # (sic: the extension's names)
            xs = np.array([a[1], b[1]]) * float(height)
            length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
            polygon = cv2.ellipse2Poly(
                (int(np.mean(ys)), int(np.mean(xs))),
                (int(length / 2), STICK_WIDTH),
                int(angle),
                0,
                360,
                1,
            )
            cv2.fillConvexPoly(canvas, polygon, colour)
    canvas = (canvas * 0.6).astype(np.uint8)
    for points in people:
        for point, colour in zip(points, COLOURS):
            if point is None:
                continue
            centre = (int(point[0] * width), int(point[1] * height))
            cv2.circle(canvas, centre, 4, colour, thickness=-1)
    return canvas


def _load_error(what: str, source: str, exc: Exception) -> JobError:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return JobError(
        f"the {what} {source!r} could not be loaded ({type(exc).__name__}"
        f"{': ' + first if first else ''})"
    )


@functools.lru_cache(maxsize=2)
def _pose_model(source: str, device: str):
    from transformers import AutoImageProcessor, VitPoseForPoseEstimation

    try:
        processor = AutoImageProcessor.from_pretrained(source)
        model = VitPoseForPoseEstimation.from_pretrained(source).to(device).eval()
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise _load_error("pose model", source, exc) from None
    return processor, model


@functools.lru_cache(maxsize=2)
def _detector(source: str, device: str):
    from transformers import pipeline

    try:
        return pipeline("object-detection", model=source, device=device)
    except Exception as exc:  # noqa: BLE001
        raise _load_error("pose detector", source, exc) from None


def person_boxes(image, detector: str, device: str) -> list[list[float]]:
    """COCO boxes (x, y, w, h) of the people in `image`: the detector's "person" boxes,
    or the whole image without a detector."""
    if not detector:
        return [[0.0, 0.0, float(image.width), float(image.height)]]
    found = _detector(detector, device)(image, threshold=MIN_SCORE)
    return [
        [b["xmin"], b["ymin"], b["xmax"] - b["xmin"], b["ymax"] - b["ymin"]]
        for b in (d["box"] for d in found if str(d["label"]).lower() == "person")
        if b["xmax"] > b["xmin"] and b["ymax"] > b["ymin"]
    ]


def openpose(array: np.ndarray, source: str, detector: str = "", device: str = "cpu") -> np.ndarray:
    """The OpenPose skeleton map of an RGB photo, the photo's size."""
    import torch
    from PIL import Image

    image = Image.fromarray(array)
    height, width = array.shape[:2]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    boxes = person_boxes(image, detector, device)
    if not boxes:
        return canvas  # nobody found: an empty map, as the extension gives
    processor, model = _pose_model(source, device)
    inputs = processor(image, boxes=[boxes], return_tensors="pt").to(device)
    if getattr(model.config.backbone_config, "num_experts", 1) > 1:
        # ViTPose++ (mixture of experts): expert 0 is COCO's.
        inputs["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=device)
    with torch.no_grad():
        outputs = model(**inputs)
    if outputs.heatmaps.shape[1] < 17:
        raise JobError(
            f"the pose model {source!r} predicts {outputs.heatmaps.shape[1]} keypoints; "
            "openpose needs COCO's 17 body keypoints (a ViTPose COCO model)"
        )
    people = processor.post_process_pose_estimation(outputs, boxes=[boxes])[0]
    skeletons = [
        openpose_keypoints(
            person["keypoints"].float().cpu().numpy(),
            person["scores"].float().cpu().numpy(),
            width,
            height,
        )
        for person in people
    ]
    return draw_bodypose(canvas, skeletons)
