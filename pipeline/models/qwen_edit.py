"""What the Qwen-Image-Edit pipelines need to run offline, here and on a GPU box.

1. **The processor without a video processor.** The edit pipelines encode the prompt
   with the input image through a `Qwen2VLProcessor` (Qwen2.5-VL's). In transformers
   5.25 that processor has three parts — image processor, tokenizer, *video processor* —
   and checks each against its class even when it is None; the video processor exists
   only with torchvision, which cannot be installed beside our CPU torch (only CUDA
   wheels). The pipelines never pass videos, so `ImageOnlyQwen2VLProcessor` is the same
   processor declared with two parts (transformers builds its attributes from the
   `__init__` signature), and `load_qwen_processor` builds it from a model's
   `processor/` folder — the Hub's or our tiny one — with the PIL image processor, so
   the worker gives identical inputs with or without torchvision. The worker passes it
   to `from_pretrained(…, processor=…)`, which then does not load `processor/` itself.

2. **The input size.** The edit pipelines resize every input image to about 1024×1024
   (Edit: `calculate_dimensions(1024 * 1024, ratio)` in `__call__`; Edit-Plus: 384² for
   the text encoder's view and 1024² for the VAE), whatever the output size: on a tiny
   model that is minutes of VAE and attention on CPU. `edit_input_area(pixels)` scales
   those targets while a call runs (the images keep their aspect ratio and the
   pipelines' rounding to 32): tests use 64×64; a small GPU could use it too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import Qwen2VLProcessor

# The area the edit pipelines resize inputs to (diffusers 0.42: 1024 * 1024 in
# pipeline_qwenimage_edit and VAE_IMAGE_SIZE in pipeline_qwenimage_edit_plus).
PIPELINE_AREA = 1024 * 1024


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor with its image processor and tokenizer only (no video processor,
    so no torchvision). Same `__call__`: text with <|image_pad|> expanded per image."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor.__init__ sets the image/video token ids, then hands its three
        # parts to ProcessorMixin, which keeps as many as this signature names (two).
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_qwen_processor(folder: str | Path) -> ImageOnlyQwen2VLProcessor:
    """The processor of a Qwen-Image-Edit model's `processor/` folder, image-only."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def _edit_modules():
    from diffusers.pipelines.qwenimage import (
        pipeline_qwenimage_edit,
        pipeline_qwenimage_edit_inpaint,
        pipeline_qwenimage_edit_plus,
    )

    return (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus)


@contextmanager
def edit_input_area(pixels: int) -> Iterator[None]:
    """Within this block, the Qwen-Image-Edit pipelines resize their inputs to about
    `pixels` (instead of 1024²; Edit-Plus's 384² text-encoder view scales alike).
    Rebinds the pipelines' module-level `calculate_dimensions` and restores it on exit:
    one call at a time per process, as a worker runs jobs."""
    if pixels < 32 * 32:
        raise ValueError(f"edit input area must be at least 32×32 pixels, not {pixels}")
    scale = pixels / PIPELINE_AREA
    originals = [(module, module.calculate_dimensions) for module in _edit_modules()]

    def scaled(original):
        def calculate_dimensions(target_area, ratio):
            area = max(target_area * scale, 32 * 32 * max(ratio, 1 / ratio))
            return original(math.ceil(area), ratio)

        return calculate_dimensions

    try:
        for module, original in originals:
            module.calculate_dimensions = scaled(original)
        yield
    finally:
        for module, original in originals:
            module.calculate_dimensions = original
