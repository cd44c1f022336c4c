"""Model families, torch-free: what the bot, the config and the workers all ask.

`FAMILIES` maps each config name to its class (`sd1.SD1`, `sdxl.SDXL`): label, sizes,
defaults, sampler names, modes and options, and the tests that recognise its files
(`sources.detect_family` for a model, `lora_family` for a LoRA file). The worker half
of each family (components, pipelines, denoiser, prompt encoding, LoRA key maps,
training) is `pipeline/families/`.
"""

from __future__ import annotations

from typing import Any

from pipeline.contract.families.base import OPTIONS, FamilySpec, names
from pipeline.contract.families.registry import (
    DEFAULT,
    FAMILIES,
    cross_attention_width,
    family_from_index,
    family_from_keys,
    label,
    lora_family,
    spec,
)
from pipeline.contract.families.sources import (
    SINGLE_FILE_SUFFIXES,
    ModelError,
    detect_family,
    family_from_checkpoint,
    hub_error,
    safetensors_keys,
)

__all__ = [
    "DEFAULT",
    "FAMILIES",
    "OPTIONS",
    "SINGLE_FILE_SUFFIXES",
    "FamilySpec",
    "ModelError",
    "cross_attention_width",
    "defaults_for",
    "detect_family",
    "family_from_checkpoint",
    "family_from_index",
    "family_from_keys",
    "family_of_model",
    "hub_error",
    "label",
    "lora_family",
    "names",
    "safetensors_keys",
    "spec",
]


def family_of_model(model: Any) -> type[FamilySpec]:
    """The family of a configured model (`ModelConfig`): its `family`, or for "auto"
    what its files say; a source that cannot be read counts as the default family (the
    worker, loading it, says what is wrong). A family's variant (Flux.1 schnell) is read
    from the files too: its defaults and modes are the variant's."""
    name = model.family
    if name == "auto":
        try:
            name = detect_family(model.source)
        except ModelError:
            name = DEFAULT.name
    return spec(name).for_source(model.source)


def defaults_for(config: Any, model_name: str) -> Any:
    """The `[defaults]` a job on this model starts from: the config's, or for a family
    with defaults of its own (a flow model: Flux.1's Euler/Simple, 28 steps, CFG 1,
    1024²; schnell's 4 steps) the family's, since the config's are SD's. A default
    negative prompt is left out there: it needs true CFG (Flux.1 dev) or is refused
    (schnell)."""
    import dataclasses

    family = family_of_model(config.model(model_name))
    defaults = config.defaults
    if not family.default_sampler:
        return defaults
    return dataclasses.replace(
        defaults,
        sampler=family.default_sampler,
        schedule=family.default_schedule,
        steps=family.default_steps,
        cfg_scale=family.default_cfg,
        width=family.default_size,
        height=family.default_size,
        negative_prompt="",
    )
