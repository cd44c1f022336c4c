"""Tiny random-weight models of the flow-matching families, written offline in diffusers'
folder layout, for tests and demos: Flux.1 and its Redux here (`flux.py`); Z-Image,
Qwen-Image and Flux.2 klein beside their family modules (`pipeline/families/*_tiny.py`).

Each writer is `write_tiny_<family>(directory, **variant) -> Path`; `tokenizers` builds
their tokenizers from an in-memory vocabulary, `common` their shared parts. Worker side.
"""

from pipeline.models.tiny_families.flux import write_tiny_flux, write_tiny_flux_redux

__all__ = [
    "write_tiny_flux",
    "write_tiny_flux_redux",
]
