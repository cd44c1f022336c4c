"""The torch-free half of a model family: what the bot and the config may know of it.

One small class per family (`sd1.py`, `sdxl.py`) on this base, declaring only what
differs, in the spirit of ComfyUI's `supported_models`: how to recognise the family's
files (a model folder's `model_index.json`, a single-file checkpoint's keys, a LoRA
file's keys and shapes), its sizes and defaults, the sampler names it accepts, and
which modes and options it has. The worker half (`pipeline/families/`) builds on it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar

from pipeline.contract.jobs import MODES, GenerateSpec, JobError
from pipeline.contract.samplers import SAMPLERS, resolve, sampler_names

# Options of the generation commands a family may or may not have. `guidance` is a
# guidance-distilled model's "Distilled CFG Scale" (Flux.1), which the UNet families lack.
OPTIONS = (
    "negative_prompt",
    "cfg_scale",
    "clip_skip",
    "control",
    "reference",
    "face_fix",
    "guidance",
)
# What a member reads for an option whose name does not say it with spaces for "_".
OPTION_LABELS = {
    "cfg_scale": "CFG scale",
    "clip_skip": "CLIP skip",
    "guidance": "Distilled CFG Scale",
}


def text_encoder_component(index: int) -> str:
    """diffusers' attribute for a pipeline's text encoder number `index` from 0
    (`text_encoder`, then the same name with `_2`, `_3`…): the one place the contract spells that
    convention; a family says how many it has and in which order."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


class FamilySpec:
    """One model family, torch-free. Subclasses override the class attributes."""

    name: ClassVar[str]  # the config value: `family = "sd1"`
    label: ClassVar[str]  # what a member reads: "SD 1.x"
    variant: ClassVar[str] = ""  # a family's variant with its own defaults (Flux.1 "schnell")
    modes: ClassVar[frozenset[str]] = frozenset(MODES)  # edit: the edit models' families
    max_input_images: ClassVar[int] = 1  # images an edit job may give (`image` + `images`)
    # How an edit job draws: "model", the family's own instruction-editing pipeline
    # (where `modes` has "edit"); "classic", for families without one (SD 1.x, SDXL),
    # the instruction as the prompt of an img2img, or of an inpaint around the kept face
    # or person (`pipeline/generate/editing.py`): these take edit jobs beside `modes`,
    # which are their pipelines' modes (`has_mode("edit")` says whether a family edits).
    edit_route: ClassVar[str] = "model"
    # Whether its edit model shifts or zooms the picture it hands back (Qwen-Image-Edit's
    # known flaw), so a result is registered back onto the photo (`generate/align.py`).
    edit_registers: ClassVar[bool] = False
    options: ClassVar[frozenset[str]] = frozenset(OPTIONS) - {"guidance"}
    samplers: ClassVar[tuple[str, ...]] = tuple(SAMPLERS)  # A1111 names it accepts
    size_multiple: ClassVar[int] = 8  # the VAE's downsampling
    default_size: ClassVar[int] = 512  # sides of a txt2img image, and of upscale's pass
    train_resolution: ClassVar[int] = 512  # what `[training] resolution = 0` means
    # Personal models: what a job on this family gets unless the config says otherwise
    # (kohya's SD 1.x person LoRA: dim 16, alpha 8, 1e-4), and why it cannot train ("":
    # it can).
    train_rank: ClassVar[int] = 16
    train_alpha: ClassVar[float] = 8.0
    train_learning_rate: ClassVar[float] = 1e-4
    train_refusal: ClassVar[str] = ""
    default_steps: ClassVar[int] = 20
    default_cfg: ClassVar[float] = 7.0
    # Its row in the memory planner's figures (`families/memory.py`), "" = its name.
    memory_profile: ClassVar[str] = ""
    # A guidance-distilled model's embedded guidance ("Distilled CFG Scale"); None: none.
    default_guidance: ClassVar[float | None] = None
    # The sampler and schedule a job on this family gets when nobody chose one; "": the
    # config's [defaults].
    default_sampler: ClassVar[str] = ""
    default_schedule: ClassVar[str] = ""
    # Size rule: a side that is not a multiple of `size_multiple` is refused (False) or
    # rounded to the nearest multiple (True).
    round_sizes: ClassVar[bool] = False
    # Recognition. A LoRA's keys that only this family's files carry (its text encoders'
    # names), and the cross-attention widths of its denoiser: the width of the text
    # embedding it reads, which every layer reading the text has as its input width.
    lora_key_prefixes: ClassVar[tuple[str, ...]] = ()
    # Its text encoders' key prefixes in a single-file checkpoint, in encoder order.
    single_file_text_encoders: ClassVar[tuple[str, ...]] = ()
    cross_attention_widths: ClassVar[tuple[int, ...]] = ()
    # The family whose LoRA files this one takes (its own name unless it shares them).
    lora_family: ClassVar[str] = ""
    # A lone CLIP text encoder's width in kohya files (`lora_te_…`): SD 1.x 768, SD 2.x 1024.
    text_encoder_widths: ClassVar[tuple[int, ...]] = ()

    @classmethod
    def matches_index(cls, index: Mapping[str, Any]) -> bool:
        """Whether a diffusers folder's model_index.json is a model of this family."""
        return False

    @classmethod
    def matches_checkpoint(cls, keys: Collection[str]) -> bool:
        """Whether a single-file checkpoint with these tensor names is of this family."""
        return False

    @classmethod
    def matches_lora_keys(cls, keys: Collection[str]) -> bool:
        """Whether a LoRA file's keys name layers only this family's denoiser has."""
        return False

    @classmethod
    def takes_loras_of(cls, made_for: str) -> bool:
        return made_for == (cls.lora_family or cls.name)

    @classmethod
    def check_job(cls, spec: GenerateSpec) -> None:
        """Refuse, in one line naming the family, what a generation job asks of it that it
        lacks: a mode, a sampler, a size, more input images than it reads."""
        cls.check_mode(spec.mode)
        cls.resolve_sampler(spec.sampler, spec.schedule)
        if spec.mode == "txt2img":  # other modes take the input image's (fitted) size
            cls.check_size(spec.width, spec.height)
        count = len(spec.images) + (1 if spec.image else 0)
        if spec.mode == "edit" and count > cls.max_input_images:
            raise JobError(
                f"{cls.label} models edit with at most {cls.max_input_images} input "
                f"image{'s' if cls.max_input_images > 1 else ''}; this job gave {count}"
            )

    @classmethod
    def few_step_lora(cls, names: Collection[str]) -> int | None:
        """The steps a distillation LoRA is made for, recognised by its names (the LoRA's
        name and its file's title); None: not one this family knows."""
        return None

    @classmethod
    def with_lora_defaults(
        cls, spec: GenerateSpec, names: Mapping[str, Collection[str]]
    ) -> tuple[GenerateSpec, tuple[str, ...]]:
        """The job with a few-step LoRA's defaults (its steps, CFG 1) where the job has
        the family's defaults, and what the member is told; a setting other than the
        family's default was chosen, and wins. `names`: each LoRA's sha256 → its names."""
        import dataclasses

        for ref in spec.loras:
            steps = cls.few_step_lora([ref.name, *names.get(ref.sha256, ())])
            if steps is not None:
                break
        else:
            return spec, ()
        changes: dict[str, Any] = {}
        kept = []
        if spec.steps == cls.default_steps:
            changes["steps"] = steps
        elif spec.steps != steps:
            kept.append(f"{spec.steps} steps")
        if spec.cfg_scale == cls.default_cfg:
            changes["cfg_scale"] = 1.0
        elif spec.cfg_scale != 1.0:
            kept.append(f"CFG {spec.cfg_scale:g}")
        if not changes and not kept:
            return spec, ()  # the member chose the LoRA's own settings
        made_for = f"LoRA '{ref.name}' is made for {steps} steps at CFG 1"
        if kept:
            said = f"{made_for}; your {' and '.join(kept)} were kept"
        else:
            said = f"{made_for}: the job ran so (set steps or CFG to change it)"
        return dataclasses.replace(spec, **changes), (said,)

    @classmethod
    def check_training(cls, resolution: int) -> None:
        """Refuse, in one line naming the family, a personal model it cannot train: the
        family (or variant) is not trainable, or the resolution is off its multiple."""
        if cls.train_refusal:
            raise JobError(f"{cls.label} models cannot train personal models: {cls.train_refusal}")
        if resolution % cls.size_multiple:
            raise JobError(
                f"{cls.label} models train at a multiple of {cls.size_multiple} px, "
                f"not {resolution}"
            )

    @classmethod
    def check_size(cls, width: int, height: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if value % cls.size_multiple:
                raise JobError(
                    f"{cls.label} models need a {name} that is a multiple of "
                    f"{cls.size_multiple}, but it is {value}"
                )

    @classmethod
    def fit_size(cls, width: int, height: int) -> tuple[int, int]:
        """The size rounded down to the family's multiple (an input image's size)."""
        m = cls.size_multiple
        return max(m, width // m * m), max(m, height // m * m)

    @classmethod
    def for_source(cls, source: str) -> type[FamilySpec]:
        """The spec of the model at `source`: a variant of this family with its own
        defaults (Flux.1 schnell, Kontext, Fill) where the files say so, else this one."""
        return cls

    @classmethod
    def guidance_of(cls, spec: Any) -> float | None:
        """The embedded (distilled) guidance a job runs at; None for families without."""
        return None

    @classmethod
    def has_mode(cls, mode: str) -> bool:
        """Whether its models take jobs of `mode`: one of `modes`, or edit by the classic
        route (what a command asks to list the models it may use)."""
        return mode in cls.modes or (mode == "edit" and cls.edit_route == "classic")

    @classmethod
    def check_mode(cls, mode: str) -> None:
        """Refuse, in one line naming the family, a mode it lacks."""
        if not cls.has_mode(mode):
            raise JobError(
                f"{cls.label} models cannot {mode}; modes: {', '.join(sorted(cls.modes))}"
            )

    @classmethod
    def check_option(cls, option: str, model: str = "") -> None:
        """Refuse an option the family lacks, in one line naming the family (and the
        configured `model`, when given: what the member chose)."""
        if option in cls.options:
            return
        name = OPTION_LABELS.get(option, option.replace("_", " "))
        if model:
            raise JobError(f"model {model} ({cls.label}) has no {name} option; leave it out")
        raise JobError(f"{cls.label} models have no {name} option")

    @classmethod
    def sampler_names(cls) -> list[str]:
        """The sampler names a member may pick for this family, with the "… Karras"-style
        spellings that carry a schedule type (the bot's autocomplete offers these)."""
        return [n for n in sampler_names() if resolve(n)[0].name in cls.samplers]

    @classmethod
    def resolve_sampler(cls, sampler: str, schedule: str = "Automatic") -> tuple[str, str]:
        """(sampler name, schedule type) for what a member typed ("DPM++ 2M Karras"),
        refused in one line when the family cannot use it."""
        found, chosen = resolve(sampler, schedule)
        cls.check_sampler(found.name)
        return found.name, chosen

    @classmethod
    def check_sampler(cls, sampler: str) -> None:
        if sampler not in cls.samplers:
            raise JobError(
                f"{cls.label} models cannot use the sampler {sampler!r}; "
                f"they take: {', '.join(cls.samplers)}"
            )


def names(families: Iterable[type[FamilySpec]]) -> str:
    """'sd1 or sdxl' for a config error."""
    values = sorted(f.name for f in families)
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
