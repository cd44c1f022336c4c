"""Job specifications and progress events: the contract between bot, queue and workers.

Everything here is a frozen dataclass with a JSON round-trip, and this module never
imports torch: the bot process builds, validates and stores specs, and a worker (in
another process, perhaps on another machine) runs them.

Blob references: input images, masks and LoRA files travel as sha256 hex strings of
blobs in the content-addressed blob store (`pipeline.contract.blobs`), never as paths, so a
spec means the same thing on every machine. Keys that hold blob references in spec
and result JSON are named `image`, `mask`, `sha256` or `images` (a list).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.contract.control import (
    ControlUnit,
    Reference,
    check_units,
    reference_from_dict,
    unit_from_dict,
)

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "upscale", "facefix")
# Instruction editing is a mode of the edit models' families only (FamilySpec.modes).
ALL_MODES = (*MODES, "edit")
MAX_FACES = 20  # edit: face: 1..20 picks the person among the input's faces
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down", "all")
KEEP_CHOICES = ("face", "background")
TRAIN_METHODS = ("lora", "loha", "lokr")
# How a Flux.1 LoRA is written (`[training] flux_lora_layout`): kohya's sd-scripts names
# (ComfyUI, Forge, diffusers at the 12B model's widths) or diffusers' peft layout.
FLUX_LORA_LAYOUTS = ("kohya", "diffusers")
MAX_SEED = 2**32 - 1


class JobError(ValueError):
    """A spec that cannot run. The message is shown to the member as is: it names the
    bad value and the limit."""


@dataclass(frozen=True)
class Limits:
    """What a job may ask for. Built from config.toml's `[limits]` table."""

    max_steps: int = 150
    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 1536 * 1536
    min_side: int = 64
    max_count: int = 4
    min_cfg: float = 0.0
    max_cfg: float = 30.0
    max_prompt_chars: int = 4000
    max_outpaint_pixels: int = 512
    max_input_pixels: int = 4096 * 4096
    max_loras: int = 8
    max_lora_weight: float = 4.0
    max_and_subprompts: int = 8
    max_train_steps: int = 3000
    max_controlnets: int = 3
    commands_per_minute: int = 20  # a member's slash commands; faster ones are refused


@dataclass(frozen=True)
class LoraRef:
    """One LoRA applied to a job: resolved by the bot (or CLI) from `<lora:name:w>`."""

    name: str
    sha256: str
    weight: float = 1.0


@dataclass(frozen=True)
class GenerateSpec:
    """One image-generation job: txt2img, img2img, inpaint, outpaint or upscale.

    `seed` is None until `with_seed()` fixes it; the bot fixes it before queueing so
    a retried job draws the same image. Image `i` of the job uses `seed + i`, as in
    AUTOMATIC1111.
    """

    kind: ClassVar[str] = "generate"

    prompt: str
    # facefix: only the ADetailer-style face pass, on the input image (the "Fix faces" button)
    # edit: instruction editing of `image` (and `images`) by an edit model's family
    mode: Literal["txt2img", "img2img", "inpaint", "outpaint", "upscale", "facefix", "edit"] = (
        "txt2img"
    )
    negative_prompt: str = ""
    model: str = "default"
    sampler: str = "Euler a"
    schedule: str = "Automatic"
    steps: int = 20
    cfg_scale: float = 7.0
    # A guidance-distilled model's embedded guidance (Forge's "Distilled CFG Scale",
    # Flux.1); None: the model's default. Ignored by families without it.
    guidance: float | None = None
    seed: int | None = None
    width: int = 512
    height: int = 512
    count: int = 1
    image: str | None = None  # blob sha256 of the input image (img2img/inpaint/outpaint)
    images: tuple[str, ...] = ()  # edit: blob sha256 of the second, third… input image
    mask: str | None = None  # blob sha256 of the mask; white = repaint
    strength: float = 0.75  # denoising strength for img2img and inpaint
    mask_blur: int = 4
    only_masked: bool = True  # inpaint a crop around the mask at full resolution
    only_masked_padding: int = 32
    outpaint_direction: str | None = None
    outpaint_pixels: int = 128
    keep: str | None = None  # inpaint, edit: "face" or "background" builds the mask
    # edit: which face of the input is the person (1..n, left to right); 0: the largest.
    # Identity is measured against it, and `keep: face` keeps it.
    face: int = 0
    face_fix: bool = False
    upscale_factor: float = 2.0
    loras: tuple[LoraRef, ...] = ()
    control: tuple[ControlUnit, ...] = ()  # ControlNet units, applied in order
    reference: Reference | None = None  # IP-Adapter reference images

    def with_seed(self, seed: int | None = None) -> GenerateSpec:
        """A copy with a concrete seed (a random one when neither is given)."""
        if seed is None:
            seed = self.seed if self.seed is not None else random.randint(0, MAX_SEED)
        return dataclasses.replace(self, seed=seed)

    def seeds(self) -> list[int]:
        if self.seed is None:
            raise JobError("the seed must be fixed before the job runs")
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.count)]

    def batch_key(self) -> str:
        """Jobs with equal keys can share one batch on a worker.

        Batching needs the same model, size, steps, sampler and CFG; inputs that are
        per-image (img2img, masks) are not batched with anything else, and LoRAs may
        differ (mixed-LoRA batches run each sample with its own adapters).
        """
        if self.mode != "txt2img" or self.face_fix:
            return ""  # empty key: never batched
        if any(unit.image is None for unit in self.control):
            return ""  # a unit on the job's own input image: no txt2img batch
        # Same units and adapter settings share a batch; their images may differ.
        control = [unit.settings_key() for unit in self.control]
        if self.reference is not None:
            control.append(self.reference.settings_key())
        parts = (
            self.model,
            self.width,
            self.height,
            self.steps,
            self.sampler,
            self.schedule,
            self.cfg_scale,
        )
        if self.guidance is not None:
            parts += (f"g{self.guidance}",)
        key = "gen|" + "|".join(str(p) for p in parts)
        return key + ("|control|" + "|".join(control) if control else "")

    def a1111_prompt(self) -> str:
        """The prompt as A1111's infotext writes it: the member's prompt, then a
        ``<lora:name:w>`` tag for each LoRA chosen by option rather than typed in it."""
        from pipeline.contract.prompt_syntax import extract_loras  # it raises our JobError

        typed = [name.lower() for name, _ in extract_loras(self.prompt, max_weight=math.inf)[1]]
        tags = []
        for lora in self.loras:  # in order: the prompt's tags first, then the options'
            if lora.name.lower() in typed:
                typed.remove(lora.name.lower())
            else:
                tags.append(f"<lora:{lora.name}:{lora.weight:g}>")
        return " ".join([self.prompt, *tags]) if tags else self.prompt

    def blob_refs(self) -> list[str]:
        refs = [r for r in (self.image, self.mask) if r] + list(self.images)
        refs += [unit.image for unit in self.control if unit.image]
        refs += list(self.reference.images) if self.reference else []
        return refs + [lora.sha256 for lora in self.loras]

    def check(self, limits: Limits) -> None:
        """Raise JobError naming the first bad value and its limit."""
        _check_text("prompt", self.prompt, limits.max_prompt_chars)
        _check_text("negative prompt", self.negative_prompt, limits.max_prompt_chars)
        if self.mode not in ALL_MODES:
            raise JobError(f"mode must be one of {', '.join(ALL_MODES)}, not {self.mode!r}")
        _check_int("steps", self.steps, 1, limits.max_steps)
        _check_int("count", self.count, 1, limits.max_count)
        _check_number("CFG scale", self.cfg_scale, limits.min_cfg, limits.max_cfg)
        if self.guidance is not None:
            _check_number("distilled CFG scale", self.guidance, 0.0, 100.0)
        _check_number("strength", self.strength, 0.0, 1.0)
        if self.mode in ("img2img", "inpaint", "upscale") and self.strength == 0:
            raise JobError("strength 0 would return the input unchanged; use 0.05 to 1")
        _check_int("mask blur", self.mask_blur, 0, 64)
        _check_int("only-masked padding", self.only_masked_padding, 0, 256)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.mode == "txt2img":
            check_size(self.width, self.height, limits)
        if self.mode != "txt2img" and not self.image:
            raise JobError(f"{self.mode} needs an input image")
        if self.images and self.mode != "edit":
            raise JobError(f"{self.mode} takes one input image; more are for edit")
        if self.mode == "inpaint" and not (self.mask or self.keep):
            raise JobError("inpaint needs a mask (white = repaint) or keep: face|background")
        if self.mode == "edit":
            _check_edit(self)
        _check_int("face", self.face, 0, MAX_FACES)
        if self.face and self.mode != "edit":
            raise JobError("face: picks the person of an edit; other modes do not take it")
        if self.keep is not None and self.keep not in KEEP_CHOICES:
            raise JobError(f"keep must be one of {', '.join(KEEP_CHOICES)}, not {self.keep!r}")
        if self.mode == "outpaint":
            if self.outpaint_direction not in OUTPAINT_DIRECTIONS:
                raise JobError(
                    f"outpaint direction must be one of {', '.join(OUTPAINT_DIRECTIONS)}, "
                    f"not {self.outpaint_direction!r}"
                )
            _check_int("outpaint pixels", self.outpaint_pixels, 8, limits.max_outpaint_pixels)
            if self.outpaint_pixels % 8:
                raise JobError(
                    f"outpaint pixels must be a multiple of 8, but is {self.outpaint_pixels}"
                )
        if self.mode == "upscale":
            _check_number("upscale factor", self.upscale_factor, 1.0, 4.0)
        _check_loras(self.loras, limits)
        check_units(self.control, self.reference, limits.max_controlnets)
        if self.mode in ("outpaint", "upscale", "facefix", "edit") and (
            self.control or self.reference
        ):
            raise JobError(
                "ControlNet and reference images work with txt2img, img2img and inpaint, "
                f"not {self.mode}"
            )
        if self.mode == "txt2img" and any(unit.image is None for unit in self.control):
            raise JobError("a ControlNet unit needs a control image (txt2img has no input image)")
        _check_prompt_schedule(self, limits)


@dataclass(frozen=True)
class TrainSpec:
    """One personal-model training job. Photos are blob references, deleted after."""

    kind: ClassVar[str] = "train"

    name: str
    photos: tuple[str, ...]  # blob sha256 of each usable, already-prepared photo
    test_photos: tuple[str, ...] = ()  # held-out photos for validation
    captions: tuple[str, ...] = ()
    token: str = "sks"
    subject: str = "person"
    model: str = "default"
    method: Literal["lora", "loha", "lokr"] = "lora"
    rank: int = 16
    alpha: float = 8.0
    learning_rate: float = 1e-4
    steps: int = 0  # 0: about 100 per photo, capped by limits.max_train_steps
    batch_size: int = 1
    resolution: int = 512
    train_text_encoder: bool = False
    min_snr_gamma: float = 5.0
    flux_lora_layout: Literal["kohya", "diffusers"] = "kohya"  # Flux.1 LoRA files only
    prior_preservation: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def batch_key(self) -> str:
        return ""

    def blob_refs(self) -> list[str]:
        return list(self.photos) + list(self.test_photos)

    def planned_steps(self, limits: Limits) -> int:
        steps = self.steps or 100 * len(self.photos)
        return min(steps, limits.max_train_steps)

    def check(self, limits: Limits) -> None:
        if not self.name or len(self.name) > 40:
            raise JobError("the model name must be 1 to 40 characters")
        if self.method not in TRAIN_METHODS:
            raise JobError(f"method must be one of {', '.join(TRAIN_METHODS)}, not {self.method!r}")
        if self.flux_lora_layout not in FLUX_LORA_LAYOUTS:
            raise JobError(
                f"flux_lora_layout must be {' or '.join(FLUX_LORA_LAYOUTS)}, "
                f"not {self.flux_lora_layout!r}"
            )
        if len(self.photos) < 1:
            raise JobError("training needs at least one usable photo")
        _check_int("steps", self.steps, 0, limits.max_train_steps)
        _check_int("rank", self.rank, 1, 128)
        _check_int("batch size", self.batch_size, 1, 16)
        _check_number("learning rate", self.learning_rate, 1e-7, 1e-2)


JobSpec = GenerateSpec | TrainSpec
_SPEC_CLASSES: dict[str, type] = {GenerateSpec.kind: GenerateSpec, TrainSpec.kind: TrainSpec}


def check_size(width: int, height: int, limits: Limits) -> None:
    for name, value, top in (
        ("width", width, limits.max_width),
        ("height", height, limits.max_height),
    ):
        _check_int(name, value, limits.min_side, top)
        if value % 8:
            raise JobError(f"{name} must be a multiple of 8, but is {value}")
    if width * height > limits.max_pixels:
        raise JobError(
            f"{width}×{height} is {width * height / 1e6:.2f} MP; "
            f"the limit is {limits.max_pixels / 1e6:.2f} MP"
        )


def _check_edit(spec: GenerateSpec) -> None:
    """What an edit job cannot mean: no instruction, or a mask (the kept region comes
    from `keep: face|background`, around the person's face)."""
    if not spec.prompt.strip():
        raise JobError("edit needs an instruction: say what to change, e.g. 'make it night'")
    if spec.mask:
        raise JobError("edit takes no mask; keep: face or keep: background keeps a region")


def _check_text(name: str, text: str, limit: int) -> None:
    if not isinstance(text, str):
        raise JobError(f"{name} must be text")
    if len(text) > limit:
        raise JobError(f"the {name} is {len(text)} characters; the limit is {limit}")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobError(f"{name} must be a whole number, not {value!r}")
    if not low <= value <= high:
        raise JobError(f"{name} must be between {low} and {high}, but is {value}")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise JobError(f"{name} must be a number, not {value!r}")
    if not low <= value <= high:
        raise JobError(f"{name} must be between {low:g} and {high:g}, but is {value:g}")


def _check_prompt_schedule(spec: GenerateSpec, limits: Limits) -> None:
    # Here, not at import: prompt_schedule raises this module's JobError.
    from pipeline.contract.prompt_schedule import check_prompt_schedule
    from pipeline.contract.prompt_syntax import strip_loras

    prompt, negative = strip_loras(spec.prompt), strip_loras(spec.negative_prompt)
    check_prompt_schedule(prompt, negative, limits.max_and_subprompts)


def _check_loras(loras: tuple[LoraRef, ...], limits: Limits) -> None:
    if len(loras) > limits.max_loras:
        raise JobError(f"{len(loras)} LoRAs in one prompt; the limit is {limits.max_loras}")
    top = limits.max_lora_weight
    for lora in loras:
        if not -top <= lora.weight <= top:
            raise JobError(
                f"LoRA '{lora.name}' has weight {lora.weight:g}; weights must be "
                f"between {-top:g} and {top:g}"
            )


# --- JSON round-trip ---------------------------------------------------------------


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["kind"] = spec.kind
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    data = dict(data)
    kind = data.pop("kind", None)
    cls = _SPEC_CLASSES.get(kind)
    if cls is None:
        raise JobError(f"unknown job kind {kind!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise JobError(f"unknown {kind} fields: {', '.join(sorted(unknown))}")
    if cls is GenerateSpec and "loras" in data:
        data["loras"] = tuple(LoraRef(**lora) for lora in data["loras"])
    if cls is GenerateSpec and "control" in data:
        data["control"] = tuple(unit_from_dict(unit) for unit in data["control"])
    if cls is GenerateSpec and "reference" in data:
        data["reference"] = reference_from_dict(data["reference"])
    for name in ("photos", "test_photos", "captions", "images"):
        if name in data:
            data[name] = tuple(data[name])
    return cls(**data)


def spec_to_json(spec: JobSpec) -> str:
    return json.dumps(spec_to_dict(spec), sort_keys=True)


def spec_from_json(text: str) -> JobSpec:
    return spec_from_dict(json.loads(text))


# --- Events: what a worker streams back while running a job ---------------------------


@dataclass(frozen=True)
class OutputImage:
    """One finished image: PNG bytes (with infotext) and the seed that drew it.

    `nsfw`: the NSFW detector's best score per label (`pipeline.safety`), or None when
    the image was not checked."""

    png: bytes
    seed: int
    infotext: str = ""
    # What the member must be told with this image, e.g. "LoRA 'x': 12 of 95 layers do
    # not fit this model and were left out". Shown with the result, never only logged.
    notices: tuple[str, ...] = ()
    nsfw: dict[str, float] | None = None
    # edit: the person kept, 0..1 (pipeline.faces.identity), of the input's face against
    # this result's; None when not measured (no face in the input, or not an edit).
    identity: float | None = None
    tries: int = 1  # edit: the drawings it took (results below [edit] min_identity are redone)
    input_face: bool = False  # the input held a real face (the NSFW rule for edits of people)


@dataclass(frozen=True)
class Started:
    job_id: str
    worker: str = ""
    type: ClassVar[str] = "started"


@dataclass(frozen=True)
class Progress:
    """Step n of N; `preview` is a small JPEG of the current latents (optional)."""

    job_id: str
    step: int
    total: int
    preview: bytes | None = None
    loss: float | None = None  # training only
    message: str = ""
    type: ClassVar[str] = "progress"


@dataclass(frozen=True)
class Done:
    job_id: str
    images: tuple[OutputImage, ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()  # other outputs, e.g. ("me.safetensors", …)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. validation figures
    type: ClassVar[str] = "done"


@dataclass(frozen=True)
class Failed:
    """`message` is user-safe; `retryable` says whether running it again may help
    (a worker that died: yes; a corrupt input: no)."""

    job_id: str
    message: str
    retryable: bool = False
    type: ClassVar[str] = "failed"


@dataclass(frozen=True)
class Cancelled:
    job_id: str
    type: ClassVar[str] = "cancelled"


@dataclass(frozen=True)
class Paused:
    """A training job yielded the worker to queued generation jobs after saving a
    checkpoint at `step`; it goes back to the queue and resumes from there."""

    job_id: str
    step: int
    type: ClassVar[str] = "paused"


Event = Started | Progress | Done | Failed | Cancelled | Paused
TERMINAL_EVENTS = (Done, Failed, Cancelled, Paused)
_EVENT_CLASSES: dict[str, type] = {
    cls.type: cls for cls in (Started, Progress, Done, Failed, Cancelled, Paused)
}


def _encode(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__b64__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__b64__"}:
            return base64.b64decode(value["__b64__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def event_to_json(event: Event) -> str:
    data = _encode(dataclasses.asdict(event))
    data["type"] = event.type
    return json.dumps(data)


def event_from_json(text: str) -> Event:
    data = _decode(json.loads(text))
    cls = _EVENT_CLASSES[data.pop("type")]
    if cls is Done:
        data["images"] = tuple(OutputImage(**image) for image in data.get("images", ()))
        data["files"] = tuple(tuple(item) for item in data.get("files", ()))
        data["info"] = _untuple(data.get("info", {}))
    return cls(**data)


def _untuple(value: Any) -> Any:
    """JSON has lists, not tuples: give `info` back its lists."""
    if isinstance(value, tuple):
        return [_untuple(v) for v in value]
    if isinstance(value, dict):
        return {k: _untuple(v) for k, v in value.items()}
    return value
