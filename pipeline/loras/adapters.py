"""The LoRA API the rest of the engine uses, gathered from `formats` (files, key mapping,
ΔW per algorithm), `cache` (LoraCache) and `batch` (per-sample application)."""

from pipeline.loras.cache import LoraCache, adapter_name
from pipeline.loras.formats import (
    LoraError,
    LoraFile,
    detect_family,
    detect_format,
    lora_hash,
    read_lora_file,
    resolve_lora_names,
)

__all__ = [
    "LoraCache",
    "LoraError",
    "LoraFile",
    "adapter_name",
    "detect_family",
    "detect_format",
    "lora_hash",
    "read_lora_file",
    "resolve_lora_names",
]
