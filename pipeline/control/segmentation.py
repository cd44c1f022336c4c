"""The `seg_ofade20k` preprocessor: a semantic-segmentation model's classes painted in
the ADE20K palette the ControlNet seg models were trained on.

The model is one the admin configures (`[control] segmentation_model`), loaded by
transformers' `pipeline("image-segmentation")` from a Hub id or folder: an ADE20K
model such as SegFormer ("nvidia/segformer-b0-finetuned-ade-512-512"), UperNet
("openmmlab/upernet-convnext-small") or Mask2Former
("facebook/mask2former-swin-small-ade-semantic"). Its per-pixel
class (0 = wall … 149 = flag, ADE20K's 150 classes) is painted with mmsegmentation's
`ade_palette()` (RGB), the table sd-webui-controlnet's `seg_ufade20k` and `seg_ofade20k`
and ControlNet 1.1's annotator colour their maps with.
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.contract.jobs import JobError

# mmsegmentation's ade_palette() (mmseg/core/evaluation/class_names.py): class i → RGB.
# (Class 6 "road" and 48 "skyscraper" share (140, 140, 140) there, as here.)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip


@functools.lru_cache(maxsize=2)
def _segmenter(source: str, device: str):
    from transformers import pipeline

    try:
        return pipeline("image-segmentation", model=source, device=device)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise JobError(
            f"the segmentation model {source!r} could not be loaded ({type(exc).__name__}"
            f"{': ' + first if first else ''})"
        ) from None


def class_map(array: np.ndarray, source: str, device: str = "cpu") -> np.ndarray:
    """Each pixel's class id (H×W int) as the configured model predicts it."""
    import torch
    from PIL import Image

    segmenter = _segmenter(source, device)
    processor, model = segmenter.image_processor, segmenter.model
    image = Image.fromarray(array)
    if model.config.model_type == "oneformer" or not hasattr(
        processor, "post_process_semantic_segmentation"
    ):
        raise JobError(
            f"the segmentation model {source!r} ({model.config.model_type}) is not supported; "
            "use a SegFormer, UperNet, MaskFormer or Mask2Former ADE20K model"
        )
    inputs = processor(images=[image], return_tensors="pt").to(device)
    with torch.no_grad():
        outputs = model(**inputs)
    size = [(array.shape[0], array.shape[1])]
    return processor.post_process_semantic_segmentation(outputs, target_sizes=size)[0].cpu().numpy()


def paint(classes: np.ndarray) -> np.ndarray:
    """Class ids → the ADE20K palette's colours (ids past 149 wrap round)."""
    palette = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    return palette[np.asarray(classes, dtype=np.int64) % len(palette)]


def segmentation(array: np.ndarray, source: str, device: str = "cpu") -> np.ndarray:
    return paint(class_map(array, source, device))
