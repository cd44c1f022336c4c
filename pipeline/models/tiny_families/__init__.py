"""Tiny random-weight models of the flow-matching families (Flux.1 and its Redux, Z-Image,
Qwen-Image, Flux.2 klein), written offline in diffusers' folder layout, for tests and demos.

One module per family, each with `write_tiny_<family>(directory, **variant) -> Path`;
`tokenizers` builds their tokenizers from an in-memory vocabulary. Worker side (torch).
"""

import importlib

# Each writer is imported on first use, not at package import: Flux.1's lives beside its
# family (pipeline/families/flux_tiny.py) and uses this package's common parts, and the
# others take Flux.1's scheduler and VAE constants from it.
_WRITERS = {
    "write_tiny_flux": "pipeline.families.flux_tiny",
    "write_tiny_flux_redux": "pipeline.families.flux_tiny",
    "write_tiny_flux2_klein": "pipeline.models.tiny_families.flux2_klein",
    "write_tiny_qwen_image": "pipeline.models.tiny_families.qwen_image",
    "write_tiny_zimage": "pipeline.models.tiny_families.zimage",
}


def __getattr__(name: str):
    if name in _WRITERS:
        return getattr(importlib.import_module(_WRITERS[name]), name)
    raise AttributeError(name)


__all__ = [
    "write_tiny_flux",
    "write_tiny_flux2_klein",
    "write_tiny_flux_redux",
    "write_tiny_qwen_image",
    "write_tiny_zimage",
]
