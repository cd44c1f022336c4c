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
    "MODEL_DEFAULT_KEYS",
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
    "model_defaults",
    "model_guidance",
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


# The keys a model may set for itself (`[models.NAME]`), as GenerateSpec names them.
MODEL_DEFAULT_KEYS = (
    "sampler",
    "schedule",
    "steps",
    "cfg_scale",
    "guidance",
    "width",
    "height",
    "negative_prompt",
)


def model_defaults(model: Any, family: type[FamilySpec]) -> dict[str, Any]:
    """What a job on this configured model (`ModelConfig`) gets for an option the member
    leaves out, where the model decides it rather than the server's `[defaults]` and the
    member's /settings (which are SD's): its family's own defaults (a flow model: Flux.1's
    Euler/Simple, 28 steps, CFG 1, 1024², no negative prompt; schnell 4 steps; Z-Image
    Turbo 8 steps, CFG 1), its Distilled CFG where it has one, then its own
    `[models.NAME]` keys over them. Keys it leaves out are not in the dict."""
    own: dict[str, Any] = {}
    if family.default_sampler:
        own.update(
            sampler=family.default_sampler,
            schedule=family.default_schedule,
            steps=family.default_steps,
            cfg_scale=family.default_cfg,
            width=family.default_size,
            height=family.default_size,
            negative_prompt="",  # needs true CFG (Flux.1 dev) or is refused (schnell)
        )
    if "guidance" in family.options and family.default_guidance is not None:
        own["guidance"] = family.default_guidance
    configured = {k: getattr(model, k) for k in MODEL_DEFAULT_KEYS if getattr(model, k) is not None}
    if "sampler" in configured and "schedule" not in configured:
        configured["schedule"] = "Automatic"  # the name carries its schedule ("… Karras")
    return own | configured


def defaults_for(config: Any, model_name: str) -> Any:
    """The `[defaults]` a job on this model starts from: the config's, with what the model
    decides itself over them (`model_defaults`; its Distilled CFG is not a `[defaults]`
    key: see `model_defaults`)."""
    import dataclasses

    model = config.model(model_name)
    own = model_defaults(model, family_of_model(model))
    own.pop("guidance", None)
    return dataclasses.replace(config.defaults, **own)


def model_guidance(config: Any, model_name: str) -> float | None:
    """The Distilled CFG a job on this model gets when none is asked: its `[models.NAME]`
    guidance, else its family's (None for families without one)."""
    model = config.model(model_name)
    return model_defaults(model, family_of_model(model)).get("guidance")
