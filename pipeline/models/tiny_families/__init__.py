"""Tiny random-weight models of the flow-matching families, written offline in diffusers'
folder layout, for tests and demos. The writers live beside their family modules
(`pipeline/families/flux_tiny.py`, `zimage_tiny.py`, `qwen_image_tiny.py`,
`flux2_klein_tiny.py`); here are the parts they share: `tokenizers` builds their
tokenizers from an in-memory vocabulary, `common` their other parts.

Each writer is `write_tiny_<family>(directory, **variant) -> Path`. Worker side (torch).
"""

import importlib

# Each writer is imported on first use, not at package import: each lives beside its
# family (pipeline/families/flux_tiny.py) and uses this package's common parts, and the
# others take Flux.1's scheduler and VAE constants from it.
_WRITERS = {
    "write_tiny_flux": "pipeline.families.flux_tiny",
    "write_tiny_flux_redux": "pipeline.families.flux_tiny",
    "write_tiny_flux2_klein": "pipeline.families.flux2_klein_tiny",
    "write_tiny_qwen_image": "pipeline.families.qwen_image_tiny",
    "write_tiny_zimage": "pipeline.families.zimage_tiny",
}


def __getattr__(name: str):
    if name in _WRITERS:
        return getattr(importlib.import_module(_WRITERS[name]), name)
    raise AttributeError(name)


__all__ = [
    "write_tiny_flux",
    "write_tiny_flux_redux",
]
