"""Tiny random-weight models of the flow-matching families (Flux.1 and its Redux, Z-Image,
Qwen-Image, Flux.2 klein), written offline in diffusers' folder layout, for tests and demos.

One module per family, each with `write_tiny_<family>(directory, **variant) -> Path`;
`tokenizers` builds their tokenizers from an in-memory vocabulary. Worker side (torch).
"""

from pipeline.families.flux_tiny import write_tiny_flux, write_tiny_flux_redux
from pipeline.models.tiny_families.flux2_klein import write_tiny_flux2_klein
from pipeline.models.tiny_families.qwen_image import write_tiny_qwen_image
from pipeline.models.tiny_families.zimage import write_tiny_zimage

__all__ = [
    "write_tiny_flux",
    "write_tiny_flux2_klein",
    "write_tiny_flux_redux",
    "write_tiny_qwen_image",
    "write_tiny_zimage",
]
