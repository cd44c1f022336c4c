"""Tiny random-weight models of the flow-matching families, written offline in diffusers'
folder layout, for tests and demos. The writers live beside their family modules
(`pipeline/families/flux_tiny.py`, `zimage_tiny.py`, `qwen_image_tiny.py`,
`flux2_klein_tiny.py`); here are the parts they share: `tokenizers` builds their
tokenizers from an in-memory vocabulary, `common` their other parts.

Each writer is `write_tiny_<family>(directory, **variant) -> Path`. Worker side (torch).
"""

from pipeline.families.flux_tiny import write_tiny_flux, write_tiny_flux_redux

__all__ = [
    "write_tiny_flux",
    "write_tiny_flux_redux",
]
