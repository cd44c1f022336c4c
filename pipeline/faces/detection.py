"""Face detection and the masks built from it (ADetailer-style face fix, `/inpaint keep:`).

Detection uses the Haar cascades that ship with `opencv-python-headless<5`: no
weights to download, fast on a CPU, and good enough to find the face a member
means in a portrait. Each cascade alone finds "faces" in coins, craters and cat
fur, so a face is only reported when the evidence is strong: two different
cascades agree on it, or one of them is very sure (many overlapping hits).

Every mask here is a PIL "L" image in the A1111/diffusers convention:
**255 (white) = repaint, 0 (black) = keep**.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# Detection runs on a copy whose longest side is at most this; faces smaller
# than 5% of the photo stay above the cascades' 24 px window, and time stays
# well under a second on a CPU.
DETECT_MAX_SIDE = 1024
CASCADE_WINDOW = 24
SCALE_STEP = 1.1
MIN_HITS = 3  # OpenCV's minNeighbors: overlapping raw hits needed for a candidate

# Which cascade files, and how many overlapping hits one cascade needs on its
# own to be believed. Measured on skimage.data: real faces get 30-45 frontal
# hits and 14 profile hits; the worst false positives are a moon crater (15
# frontal), coins (8) and a cat (4 profile).
_CASCADES = {
    "frontal": "haarcascade_frontalface_default.xml",
    "frontal_alt2": "haarcascade_frontalface_alt2.xml",
    "profile": "haarcascade_profileface.xml",
}
_SURE_ALONE = {"frontal": 20, "frontal_alt2": 20, "profile": 8}
# Two different cascades on the same spot: false pairs seen had 7 hits together.
_SURE_TOGETHER = 12
_SAME_FACE_IOU = 0.3

FACE_WIDTH_GROWTH = 1.1  # the Haar box stops at the cheeks; the face is a bit wider
FACE_HEIGHT_GROWTH = 1.3  # ... and stops at the brows and the mouth
FACE_DROP = 0.08  # the box sits high: its centre is above the centre of the face


class NoFaceFound(ValueError):
    """A face-based mask was asked for but the photo shows no face we can find."""

    def __init__(self) -> None:
        super().__init__("no face found in the photo; attach a mask instead")


@dataclass(frozen=True)
class FaceBox:
    """A face in pixel coordinates; `score` is detector votes (higher is surer)."""

    x: int
    y: int
    w: int
    h: int
    score: float = 0.0

    @property
    def x1(self) -> int:
        return self.x + self.w

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def area(self) -> int:
        return self.w * self.h

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y + self.h / 2)

    def intersection(self, other: FaceBox) -> int:
        width = min(self.x1, other.x1) - max(self.x, other.x)
        height = min(self.y1, other.y1) - max(self.y, other.y)
        return max(0, width) * max(0, height)

    def iou(self, other: FaceBox) -> float:
        overlap = self.intersection(other)
        union = self.area + other.area - overlap
        return overlap / union if union else 0.0

    def padded(self, pad: int, image_size: tuple[int, int]) -> FaceBox:
        """The box grown by `pad` pixels on every side, clipped to the image."""
        width, height = image_size
        x0, y0 = max(0, self.x - pad), max(0, self.y - pad)
        x1, y1 = min(width, self.x1 + pad), min(height, self.y1 + pad)
        return FaceBox(x0, y0, x1 - x0, y1 - y0, self.score)

    def scaled(self, factor: float) -> FaceBox:
        return FaceBox(
            round(self.x * factor),
            round(self.y * factor),
            round(self.w * factor),
            round(self.h * factor),
            self.score,
        )


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class _Hit:
    box: FaceBox
    cascade: str


@cache
def _cascade(name: str) -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + _CASCADES[name]
    classifier = cv2.CascadeClassifier(path)
    if classifier.empty():
        raise RuntimeError(f"OpenCV could not load its face model {path}")
    return classifier


def detect_faces(image: Image.Image, *, min_size_frac: float = 0.05) -> list[FaceBox]:
    """Faces in the photo, largest first; an empty list when there is none.

    `min_size_frac` is the smallest face to look for, as a fraction of the
    photo's shorter side: smaller faces are too small to repaint well anyway.
    """
    gray, factor = _detection_gray(image)
    min_side = max(CASCADE_WINDOW, round(min_size_frac * min(gray.shape)))
    hits = _cascade_hits(gray, min_side)
    faces = [_merge(group) for group in _group_same_face(hits) if _is_sure(group)]
    faces = [face.scaled(1 / factor) for face in faces]
    return sorted(faces, key=lambda face: face.area, reverse=True)


def _detection_gray(image: Image.Image) -> tuple[np.ndarray, float]:
    """Grey, contrast-equalised copy for the cascades, and its scale factor."""
    factor = min(1.0, DETECT_MAX_SIDE / max(image.size))
    if factor < 1.0:
        size = (round(image.width * factor), round(image.height * factor))
        image = image.resize(size, Image.Resampling.BILINEAR)
    gray = np.asarray(image.convert("L"))
    # Equalising makes dark or washed-out portraits look like the training set.
    return cv2.equalizeHist(gray), factor


def _cascade_hits(gray: np.ndarray, min_side: int) -> list[_Hit]:
    hits = _run(gray, "frontal", min_side) + _run(gray, "frontal_alt2", min_side)
    hits += _run(gray, "profile", min_side)
    # The profile cascade only knows faces turned one way; the mirror finds the other.
    mirrored = np.ascontiguousarray(gray[:, ::-1])
    width = gray.shape[1]
    for hit in _run(mirrored, "profile", min_side):
        box = hit.box
        hits.append(_Hit(FaceBox(width - box.x1, box.y, box.w, box.h, box.score), "profile"))
    return hits


def _run(gray: np.ndarray, cascade: str, min_side: int) -> list[_Hit]:
    boxes, votes = _cascade(cascade).detectMultiScale2(
        gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_HITS, minSize=(min_side, min_side)
    )
    return [
        _Hit(FaceBox(int(x), int(y), int(w), int(h), float(v)), cascade)
        for (x, y, w, h), v in zip(boxes, np.ravel(votes), strict=True)
    ]


def _group_same_face(hits: list[_Hit]) -> list[list[_Hit]]:
    """Greedy non-max grouping: each hit joins the strongest group it overlaps."""
    groups: list[list[_Hit]] = []
    for hit in sorted(hits, key=lambda hit: hit.box.score, reverse=True):
        for group in groups:
            if hit.box.iou(group[0].box) >= _SAME_FACE_IOU:
                group.append(hit)
                break
        else:
            groups.append([hit])
    return groups


def _votes_per_cascade(group: list[_Hit]) -> dict[str, float]:
    best: dict[str, float] = {}
    for hit in group:
        best[hit.cascade] = max(best.get(hit.cascade, 0.0), hit.box.score)
    return best


def _is_sure(group: list[_Hit]) -> bool:
    votes = _votes_per_cascade(group)
    if any(count >= _SURE_ALONE[cascade] for cascade, count in votes.items()):
        return True
    return len(votes) >= 2 and sum(votes.values()) >= _SURE_TOGETHER


def _merge(group: list[_Hit]) -> FaceBox:
    """Vote-weighted average of the group's boxes; score = votes of its cascades."""
    weights = np.array([hit.box.score for hit in group])
    coords = np.array([(h.box.x, h.box.y, h.box.x1, h.box.y1) for h in group], dtype=float)
    x0, y0, x1, y1 = np.round(weights @ coords / weights.sum()).astype(int)
    score = sum(_votes_per_cascade(group).values())
    return FaceBox(int(x0), int(y0), int(x1 - x0), int(y1 - y0), float(score))


# ---------------------------------------------------------------- masks


def face_ellipse(box: FaceBox) -> tuple[float, float, float, float]:
    """Bounds (x0, y0, x1, y1) of the ellipse covering the face, forehead to chin."""
    cx, cy = box.center
    cy += FACE_DROP * box.h
    half_w, half_h = box.w * FACE_WIDTH_GROWTH / 2, box.h * FACE_HEIGHT_GROWTH / 2
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def face_mask(
    size: tuple[int, int], boxes: list[FaceBox], dilate: int = 4, blur: int = 4
) -> Image.Image:
    """255 over each face (repaint the faces), 0 elsewhere; edges grown and feathered.

    Defaults are ADetailer's: dilate 4 px, blur 4 px. Raises NoFaceFound without faces.
    """
    _require(boxes)
    mask = _ellipses(size, [face_ellipse(box) for box in boxes])
    return _feather(_grow(mask, dilate), blur)


def keep_face_mask(
    size: tuple[int, int], boxes: list[FaceBox], dilate: int = 4, blur: int = 4
) -> Image.Image:
    """255 everywhere except the faces (repaint all but the faces).

    The face ellipse itself is exactly 0, so an inpaint that keeps unmasked
    pixels keeps the face untouched; the feathered seam lies just outside it.
    """
    _require(boxes)
    faces = _ellipses(size, [face_ellipse(box) for box in boxes])
    keep = _feather(_grow(faces, dilate + blur), blur)
    keep = ImageChops.lighter(keep, faces)  # no feathering may reach into the face
    return ImageChops.invert(keep)


def keep_mask(
    size: tuple[int, int], boxes: list[FaceBox], keep: str, blur: int | None = None
) -> Image.Image:
    """What `keep:` repaints (white): all but the faces ("face", `keep_face_mask`) or
    the person ("background", `person_mask`); `blur` None: each mask's own feathering."""
    feather = {} if blur is None else {"blur": blur}
    if keep == "face":
        return keep_face_mask(size, boxes, **feather)
    if keep == "background":
        return person_mask(size, boxes, **feather)
    raise ValueError(f"keep must be face or background, not {keep!r}")


def person_mask(size: tuple[int, int], boxes: list[FaceBox], blur: int = 8) -> Image.Image:
    """255 over each person's estimated head and shoulders (repaint the person).

    A guess anchored on the face: hair around it, then neck, shoulders and
    torso below, widening and running to the bottom of the photo or about
    five face-heights down. Use with "keep the background".
    """
    _require(boxes)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.ellipse(_head_ellipse(box), fill=255)
        draw.polygon(_torso_outline(box, size[1]), fill=255)
    return _feather(mask, blur)


def _head_ellipse(box: FaceBox) -> tuple[float, float, float, float]:
    # Hair reaches about half a face above the box and a third to each side.
    cx, cy = box.center
    half_w, half_h = 0.85 * box.w, 0.95 * box.h
    return (cx - half_w, cy - 0.15 * box.h - half_h, cx + half_w, cy - 0.15 * box.h + half_h)


def _torso_outline(box: FaceBox, image_height: int) -> list[tuple[float, float]]:
    # Neck under the chin, shoulders about 3.4 face-widths wide a face-height lower.
    cx = box.center[0]
    chin = box.y1 + 0.15 * box.h
    shoulders = box.y1 + 0.9 * box.h
    bottom = max(shoulders + 1, min(image_height, box.y1 + 5 * box.h))
    neck, shoulder, hip = 0.35 * box.w, 1.7 * box.w, 2.0 * box.w
    return [
        (cx - neck, chin),
        (cx + neck, chin),
        (cx + shoulder, shoulders),
        (cx + hip, bottom),
        (cx - hip, bottom),
        (cx - shoulder, shoulders),
    ]


def _require(boxes: list[FaceBox]) -> None:
    if not boxes:
        raise NoFaceFound()


def _ellipses(
    size: tuple[int, int], bounds: list[tuple[float, float, float, float]]
) -> Image.Image:
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for ellipse in bounds:
        draw.ellipse(ellipse, fill=255)
    return mask


def _grow(mask: Image.Image, pixels: int) -> Image.Image:
    if pixels <= 0:
        return mask
    # A round kernel grows an ellipse into a slightly bigger ellipse, not a box.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return Image.fromarray(cv2.dilate(np.asarray(mask), kernel), "L")


def _feather(mask: Image.Image, blur: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


# ---------------------------------------------------------------- face fix


def face_crop_box(
    box: FaceBox, image_size: tuple[int, int], padding: int = 32
) -> tuple[int, int, int, int]:
    """Square crop (x0, y0, x1, y1) around the face plus `padding`, inside the image.

    ADetailer inpaints this crop at 512×512 and pastes it back. The square is
    shifted rather than cut where it meets an edge, and only shrinks when the
    photo itself is narrower than the square.
    """
    width, height = image_size
    side = min(max(box.w, box.h) + 2 * padding, width, height)
    cx, cy = box.center
    x0 = _clamp(round(cx - side / 2), 0, width - side)
    y0 = _clamp(round(cy - side / 2), 0, height - side)
    return (x0, y0, x0 + side, y0 + side)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
