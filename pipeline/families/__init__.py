"""Model families, worker side: one module per family (`sd1.py`, `sdxl.py`, `flux.py`) on
`base.Family` (the flow-matching ones on `flow.FlowFamily`), each the one place that
knows that family; its tiny model's writer beside it (`sd_tiny.py` writes both UNet
families, `flux_tiny.py` Flux.1's variants). See docs/ARCHITECTURE.md,
"Adding a model family"."""

from __future__ import annotations

from typing import Any

from pipeline.families.base import Family
from pipeline.families.flux import Flux
from pipeline.families.flux2_klein import Flux2Klein
from pipeline.families.qwen_image import QwenImage, QwenImageEdit, QwenImageEditPlus
from pipeline.families.sd1 import SD1
from pipeline.families.sdxl import SDXL
from pipeline.families.zimage import ZImage, ZImageOmni

# Most specific first: an SDXL pipeline also holds every SD 1.x component; the edit
# pipelines hold Qwen-Image's transformer, Omni's Z-Image's.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Flux(),
        SDXL(),
        SD1(),
        QwenImageEditPlus(),
        QwenImageEdit(),
        QwenImage(),
        ZImageOmni(),
        ZImage(),
        Flux2Klein(),
    )
}


def family(name: str) -> Family:
    """The family named in config or on a loaded model (`sd1`, `sdxl`, `zimage`…)."""
    return FAMILIES[name]


def of_pipe(pipe: Any) -> Family:
    """The family of a diffusers pipeline, from the components it holds."""
    for candidate in FAMILIES.values():
        if candidate.owns(pipe):
            return candidate
    raise ValueError(f"{type(pipe).__name__} is a pipeline of no family this bot runs")


__all__ = ["FAMILIES", "Family", "family", "of_pipe"]
