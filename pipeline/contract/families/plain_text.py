"""How the text-template families (Z-Image, Qwen-Image, Flux.2 klein) read an A1111
prompt, torch-free: their pipelines wrap the prompt in a chat template and read it with
a language model, so the text is passed as words, not as weighted 75-token chunks.

- `(word:1.2)`, `(word)`, `[word]`: the words are kept, the weight is not applied (a
  language model's hidden states are not scaled per word as CLIP's are); the member is
  told it had no effect (`plain_prompt`'s notices).
- `BREAK`: removed (there are no 75-token chunks to break); the member is told.
- Prompt editing `[a:b:when]`, alternation `[a|b]` and `AND`: refused before queueing
  (`check_plain_prompt`): each would need the prompt encoded per step and the transformer
  run once per part, which these families' pipelines do not do.
See docs/DECISIONS.md (issue 24).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

from pipeline.contract.families.flow import FlowSpec
from pipeline.contract.jobs import GenerateSpec, JobError
from pipeline.contract.prompt_schedule import plan_prompt
from pipeline.contract.prompt_syntax import parse_prompt_attention, strip_loras

_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def check_plain_prompt(label: str, prompt: str, negative: str) -> None:
    """Refuse A1111 syntax whose meaning would be lost, in one line naming the family."""
    plan = plan_prompt(strip_loras(prompt), strip_loras(negative), 1000)
    if len(plan.parts) > 1 or plan.parts[0][0] != 1.0:
        raise JobError(
            f"{label} models read the prompt as plain text: AND and a part weight "
            "(`a cat :1.2`) are SD syntax; remove them"
        )
    if not plan.plain:
        raise JobError(
            f"{label} models read the prompt as plain text: prompt editing [a:b:when] and "
            "alternation [a|b] are SD syntax; remove them"
        )


def plain_prompt(label: str, text: str) -> tuple[str, list[str]]:
    """The words of an A1111 prompt (LoRA tags, weights and BREAK taken out) and the
    notices for the member: what was written that had no effect."""
    text = strip_loras(text)
    notices = []
    if _BREAK.search(text):
        text = _BREAK.sub(" ", text).strip()
        notices.append(f"BREAK has no effect on {label} models (no 75-token chunks)")
    runs = parse_prompt_attention(text)
    if any(weight != 1.0 for _, weight in runs):
        notices.append(
            f"attention weights such as (word:1.2) have no effect on {label} models; "
            "the words were kept"
        )
    words = "".join(part for part, _ in runs if part != "BREAK")
    return words, notices


# --- the families that read prompts this way ---------------------------------------------


class TextTemplateSpec(FlowSpec):
    """What Z-Image, Qwen-Image and Flux.2 klein share, torch-free: flow-matching
    transformers over 16-pixel patches (an 8× VAE and 2×2 patches; the flow samplers and
    defaults of `FlowSpec`), prompts read as plain text, and LoRA files recognised by
    the names of their transformer blocks."""

    size_multiple = 16
    default_size = 1024
    train_resolution = 1024
    # ai-toolkit's person-LoRA settings for these transformers: rank 16, alpha 16, 1e-4.
    train_rank = 16
    train_alpha = 16.0
    options = frozenset({"negative_prompt", "cfg_scale", "face_fix"})
    max_prompt_tokens: ClassVar[int] = 512  # the pipelines' max_sequence_length
    # ControlNets (where `options` has "control"): the modes diffusers has a ControlNet
    # pipeline for, the units one job may use (one: the published ControlNets are "union"
    # nets, and diffusers' pipelines of these families run one), and whether a unit's
    # guidance window (start/end) applies. sd-webui-controlnet's control modes are UNet
    # residual tricks: these transformers take "Balanced" only.
    control_modes: ClassVar[frozenset[str]] = frozenset({"txt2img"})
    max_control_units: ClassVar[int] = 1
    control_window: ClassVar[bool] = True
    # A LoRA key (dots and underscores alike) that only this family's transformer has.
    lora_key_pattern: ClassVar[str] = ""
    # How a model file is recognised: a model_index.json listing `index_class`, or a
    # single-file checkpoint holding one tensor of each group in `checkpoint_keys`.
    # Left empty, that kind of file is never taken as this family.
    index_class: ClassVar[str] = ""
    checkpoint_keys: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        return bool(cls.index_class) and cls.index_class in index_classes(index)

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        groups = cls.checkpoint_keys
        return bool(groups) and all(has_key(keys, *names) for names in groups)

    @classmethod
    def check_job(cls, spec: GenerateSpec) -> None:
        super().check_job(spec)
        cls.check_size(spec.width, spec.height)  # every mode: the transformer's patches
        check_plain_prompt(cls.label, spec.prompt, spec.negative_prompt)
        if spec.negative_prompt.strip() and "negative_prompt" not in cls.options:
            cls.check_option("negative_prompt")
        if spec.control:
            cls.check_control(spec)

    @classmethod
    def check_control(cls, spec: GenerateSpec) -> None:
        """A job's ControlNet units as this family's pipelines can run them."""
        cls.check_option("control")
        if spec.mode not in cls.control_modes:
            raise JobError(
                f"{cls.label} ControlNets work for {', '.join(sorted(cls.control_modes))} "
                f"only; this job is {spec.mode}"
            )
        if len(spec.control) > cls.max_control_units:
            most = cls.max_control_units
            raise JobError(
                f"{cls.label} models take at most {most} ControlNet unit"
                f"{'s' if most > 1 else ''} per job; this job gave {len(spec.control)}"
            )
        for unit in spec.control:
            if unit.control_mode != "Balanced":
                raise JobError(
                    f"{cls.label} ControlNets have no control modes (they are SD's); "
                    f"unit '{unit.name}' must use Balanced"
                )
            if not cls.control_window and (unit.guidance_start, unit.guidance_end) != (0, 1):
                raise JobError(
                    f"{cls.label} ControlNets act on every step: unit '{unit.name}' cannot "
                    "set guidance start/end"
                )

    @classmethod
    def matches_lora_keys(cls, keys: Collection[str]) -> bool:
        pattern = re.compile(cls.lora_key_pattern)
        return bool(cls.lora_key_pattern) and any(pattern.search(k.replace(".", "_")) for k in keys)


def index_classes(index: Mapping[str, Any]) -> set[str]:
    """The class names a model_index.json lists: the pipeline's and each component's."""
    names = {str(index.get("_class_name", ""))}
    for value in index.values():
        if isinstance(value, list) and len(value) == 2:
            names.add(str(value[1]))
    return names


def has_key(keys: Collection[str], *names: str) -> bool:
    """Whether a checkpoint has one of these tensors, bare or under ComfyUI's
    `model.diffusion_model.` prefix (as diffusers' single-file loader reads both)."""
    found = set(keys)
    return any(n in found or f"model.diffusion_model.{n}" in found for n in names)
