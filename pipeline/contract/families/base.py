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
from pipeline.contract.samplers import SAMPLERS, resolve

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


def text_encoder_component(index: int) -> str:
    """diffusers' attribute for a pipeline's text encoder number `index` from 0
    (`text_encoder`, then the same name with `_2`, `_3`…): the one place the contract spells that
    convention; a family says how many it has and in which order."""
    return "text_encoder" if index == 0 else f"text_encoder_{index + 1}"


class FamilySpec:
    """One model family, torch-free. Subclasses override the class attributes."""

    name: ClassVar[str]  # the config value: `family = "sd1"`
    label: ClassVar[str]  # what a member reads: "SD 1.x"
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
    def check_option(cls, option: str) -> None:
        if option not in cls.options:
            raise JobError(f"{cls.label} models have no {option.replace('_', ' ')} option")

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
