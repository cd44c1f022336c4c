"""An edit model's result mapped back onto the member's photo (/edit, issue 25).

Edit models work at their own size, and some shift or zoom what they hand back
(Qwen-Image-Edit's known flaw: a few percent of zoom and a few pixels of shift). So a
result is

1. resized to the photo's size,
2. registered onto the photo: ORB features matched and fitted with RANSAC (a
   similarity: shift, zoom, a little rotation; robust to what the edit changed), then
   refined to a fraction of a pixel with OpenCV's ECC (affine, on the pixels the edit
   left alone, brought back to the nearest similarity), both on grey copies,
3. warped by that transform, and
4. with `keep: face|background`, the kept region of the photo composited over it
   through the feathered masks of `pipeline.faces.detection`.

Registration never makes things worse: a transform that is implausible (more zoom,
shift or turn than an edit model makes) or that does not bring the result closer to
the photo is dropped, the plain resize is used, and the returned notices say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from pipeline.faces import detection as faces

# Registration runs on grey copies at most this large (ECC's cost grows with pixels;
# at 1024 a transform found there is within a pixel at the photo's size).
REGISTER_MAX_SIDE = 1024
ORB_FEATURES = 3000
ORB_RATIO = 0.75  # Lowe's ratio test between the best and second-best match
MIN_INLIERS = 12  # RANSAC inliers needed to believe a feature fit
RANSAC_PX = 3.0
ECC_ITERATIONS = 200
ECC_EPSILON = 1e-6
ECC_BLUR = 5  # ECC's own Gaussian pre-filter (odd, pixels)
# ECC registers on what the edit left alone: pixels differing from the photo by more
# than this many times the median difference (after a blur of this sigma) are left out,
# unless that leaves less than this fraction of the picture.
UNCHANGED_SPREAD = 3.0
UNCHANGED_BLUR = 3.0
MIN_UNCHANGED = 0.3
# What an edit model does to its picture, at most; anything beyond is a failed fit.
MAX_ZOOM = 1.25  # either way
MAX_SHIFT = 0.15  # of the photo's side
MAX_TURN_DEG = 5.0
MAX_ANISOTROPY = 0.05  # an edit zooms evenly; |sx/sy - 1| beyond this is a bad fit
# The fit must bring the result this much closer to the photo (mean grey level
# difference, relative) to be used; otherwise the plain resize is kept.
MIN_IMPROVEMENT = 0.02
FEATHER_FRACTION = 0.01  # keep-region feather, of the photo's longer side (>= 4 px)

Keep = str  # "face" | "background" | "none"


@dataclass(frozen=True)
class Alignment:
    """The result on the photo's canvas, and how it got there.

    `transform` maps photo pixels to the (resized) result's pixels (2×3, OpenCV's
    warp convention), None when the plain resize was kept. `shift` and `zoom` read
    it: how far and how much the edit model had moved the picture.
    """

    image: Image.Image
    transform: np.ndarray | None
    method: str  # "orb+ecc", "ecc", "orb", or "resize"
    shift: tuple[float, float]
    zoom: float
    notices: tuple[str, ...] = ()


def align_to_input(
    photo: Image.Image,
    result: Image.Image,
    *,
    keep: Keep = "none",
    face_boxes: list[faces.FaceBox] | None = None,
    registered: bool = True,
) -> Alignment:
    """`result` resized and registered onto `photo`, with the kept region composited.

    `face_boxes` are the photo's faces (detected here when not given); keep: face and
    background need at least one (faces.NoFaceFound otherwise). `registered=False`:
    only resized (a model that does not move its picture).
    """
    # 1. The photo's size.
    photo = photo.convert("RGB")
    resized = result.convert("RGB")
    if resized.size != photo.size:
        resized = resized.resize(photo.size, Image.Resampling.LANCZOS)
    # 2. Register, 3. warp; or keep the resize, saying why.
    if registered:
        transform, method, notices = register(photo, resized)
    else:
        transform, method, notices = None, "resize", []
    if transform is None:
        aligned = resized
        shift, zoom = (0.0, 0.0), 1.0
    else:
        aligned = warp(resized, transform)
        shift, zoom = shift_and_zoom(transform)
    # 4. The kept region of the photo, over the result.
    if keep in ("face", "background"):
        boxes = faces.detect_faces(photo) if face_boxes is None else face_boxes
        aligned = composite(photo, aligned, keep_mask(photo.size, boxes, keep))
    return Alignment(aligned, transform, method, shift, zoom, tuple(notices))


# ---------------------------------------------------------------- registration


def register(photo: Image.Image, result: Image.Image) -> tuple[np.ndarray | None, str, list[str]]:
    """(photo→result transform at the photo's size, method, notices); None: keep the resize."""
    template, factor = _grey(photo)
    moving, _ = _grey(result)
    candidates: list[tuple[str, np.ndarray]] = []
    features = _orb_fit(template, moving)
    if features is not None and _plausible(features, template.shape):
        candidates.append(("orb", features))
    start = features if candidates else _identity()
    refined = _ecc_fit(template, moving, start, _unchanged(template, moving, start))
    if refined is not None and _plausible(refined, template.shape):
        similarity = _nearest_similarity(refined, template.shape)
        candidates.insert(0, ("orb+ecc" if candidates else "ecc", similarity))
    if not candidates:
        return None, "resize", ["alignment failed (no plausible fit); the result was only resized"]
    if _is_identity(candidates[0][1]):
        return None, "resize", []  # nothing to undo: the result was not moved
    before = _mismatch(template, moving, None)
    for method, fit in candidates:
        if _mismatch(template, moving, fit) <= before * (1 - MIN_IMPROVEMENT):
            return _to_full_size(fit, factor), method, []
    return None, "resize", ["alignment did not match the photo better; the result was only resized"]


def _grey(image: Image.Image) -> tuple[np.ndarray, float]:
    factor = min(1.0, REGISTER_MAX_SIDE / max(image.size))
    if factor < 1.0:
        size = (round(image.width * factor), round(image.height * factor))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image.convert("L")), factor


def _identity() -> np.ndarray:
    return np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


def _orb_fit(template: np.ndarray, moving: np.ndarray) -> np.ndarray | None:
    """Similarity photo→result from ORB matches and RANSAC; None with too few inliers."""
    orb = cv2.ORB_create(nfeatures=ORB_FEATURES)
    kp_t, des_t = orb.detectAndCompute(template, None)
    kp_m, des_m = orb.detectAndCompute(moving, None)
    if des_t is None or des_m is None or len(kp_t) < MIN_INLIERS or len(kp_m) < MIN_INLIERS:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(des_t, des_m, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ORB_RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return None
    src = np.float32([kp_t[m.queryIdx].pt for m in good])
    dst = np.float32([kp_m[m.trainIdx].pt for m in good])
    fit, inliers = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX
    )
    if fit is None or inliers is None or int(inliers.sum()) < MIN_INLIERS:
        return None
    return fit.astype(np.float32)


def _unchanged(template: np.ndarray, moving: np.ndarray, fit: np.ndarray) -> np.ndarray | None:
    """Where the result, placed by `fit`, still looks like the photo (255), or None.

    ECC fits every pixel it is given; the regions the edit repainted would pull the
    fit towards a shear that matches them. Both images are normalised first (an edit's
    global colour change is no change here), and a pixel is "changed" when it differs
    by more than UNCHANGED_SPREAD times the median difference.
    """
    height, width = template.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(moving, fit, (width, height), flags=flags)
    a, b = _normalised(template), _normalised(warped)
    difference = cv2.GaussianBlur(np.abs(a - b), (0, 0), UNCHANGED_BLUR)
    unchanged = difference <= UNCHANGED_SPREAD * float(np.median(difference))
    if unchanged.mean() < MIN_UNCHANGED:
        return None  # mostly changed: let ECC use every pixel
    return unchanged.astype(np.uint8) * 255


def _normalised(grey: np.ndarray) -> np.ndarray:
    values = grey.astype(np.float32)
    return (values - values.mean()) / max(float(values.std()), 1.0)


def _ecc_fit(
    template: np.ndarray, moving: np.ndarray, start: np.ndarray, mask: np.ndarray | None
) -> np.ndarray | None:
    """ECC's affine refinement from `start` on the `mask` pixels; None if it diverges."""
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, ECC_ITERATIONS, ECC_EPSILON)
    warp_matrix = start.astype(np.float32).copy()
    try:
        _, warp_matrix = cv2.findTransformECC(
            template, moving, warp_matrix, cv2.MOTION_AFFINE, criteria, mask, ECC_BLUR
        )
    except cv2.error:  # "the algorithm stopped before its convergence" and kin
        return None
    return warp_matrix


def _nearest_similarity(fit: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The zoom-turn-shift closest to an affine `fit`, agreeing with it at the centre.

    Edit models zoom evenly and never shear; what shear ECC finds comes from what the
    edit changed (measured: dropping it halves the error on edited photos,
    BENCHMARKS.md), so it is dropped.
    """
    height, width = shape[:2]
    centre = np.array([width / 2, height / 2])
    zoom_cos = (fit[0, 0] + fit[1, 1]) / 2
    zoom_sin = (fit[1, 0] - fit[0, 1]) / 2
    linear = np.array([[zoom_cos, -zoom_sin], [zoom_sin, zoom_cos]])
    shift = fit[:, :2] @ centre + fit[:, 2] - linear @ centre
    return np.hstack([linear, shift[:, None]]).astype(np.float32)


def _plausible(fit: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Within what an edit model does: little zoom, shift and turn, an even zoom."""
    sx, sy = np.hypot(fit[0, 0], fit[1, 0]), np.hypot(fit[0, 1], fit[1, 1])
    turn = np.degrees(np.arctan2(fit[1, 0], fit[0, 0]))
    height, width = shape[:2]
    centre = fit @ np.array([width / 2, height / 2, 1.0])
    moved = np.abs(centre - (width / 2, height / 2)) / (width, height)
    return bool(
        np.isfinite(fit).all()
        and 1 / MAX_ZOOM <= sx <= MAX_ZOOM
        and 1 / MAX_ZOOM <= sy <= MAX_ZOOM
        and abs(sx / sy - 1) <= MAX_ANISOTROPY
        and abs(turn) <= MAX_TURN_DEG
        and (moved <= MAX_SHIFT).all()
    )


def _is_identity(fit: np.ndarray, tolerance: float = 0.25) -> bool:
    # Within a quarter pixel at every corner of a 1024 px image: nothing to undo.
    corners = np.array([[0, 0, 1], [1024, 0, 1], [0, 1024, 1], [1024, 1024, 1]], float)
    return bool(np.abs(corners @ (fit - _identity()).T).max() <= tolerance)


def _mismatch(template: np.ndarray, moving: np.ndarray, fit: np.ndarray | None) -> float:
    """Mean absolute grey difference where the (warped) result covers the photo."""
    if fit is None:
        return float(np.abs(template.astype(np.float32) - moving).mean())
    height, width = template.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(moving, fit, (width, height), flags=flags)
    covered = cv2.warpAffine(np.full_like(moving, 255), fit, (width, height), flags=flags) == 255
    difference = np.abs(template.astype(np.float32) - warped)
    return float(difference[covered].mean()) if covered.any() else float("inf")


def _to_full_size(fit: np.ndarray, factor: float) -> np.ndarray:
    full = fit.astype(np.float64).copy()
    full[:, 2] /= factor  # the linear part is the same at any scale; the shift scales
    return full


def shift_and_zoom(transform: np.ndarray) -> tuple[tuple[float, float], float]:
    """How the result had moved the picture: (dx, dy) of the photo's origin, zoom."""
    zoom = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    return (float(transform[0, 2]), float(transform[1, 2])), zoom


def warp(result: Image.Image, transform: np.ndarray) -> Image.Image:
    """The result resampled onto the photo's pixels (edges it does not cover replicated)."""
    pixels = np.asarray(result)
    flags = cv2.INTER_LANCZOS4 | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(
        pixels, transform, result.size, flags=flags, borderMode=cv2.BORDER_REPLICATE
    )
    return Image.fromarray(warped)


# ---------------------------------------------------------------- the kept region


def keep_mask(size: tuple[int, int], boxes: list[faces.FaceBox], keep: Keep) -> Image.Image:
    """255 where the result shows, 0 where the photo is kept, feathered between."""
    return faces.keep_mask(size, boxes, keep, blur=max(4, round(FEATHER_FRACTION * max(size))))


def composite(photo: Image.Image, result: Image.Image, mask: Image.Image) -> Image.Image:
    """The result where `mask` is white, the photo where it is black, blended between."""
    return Image.composite(result, photo, mask)
