"""ControlNet units and IP-Adapter references of a job: torch-free specs and checks.

A `ControlUnit` names a configured ControlNet (`[controlnets.NAME]`), its control
image (a blob; None = the job's own input image), the preprocessor that turns the
image into a map, and the A1111 unit settings: weight, guidance start/end (fractions
of the steps), control mode and resize mode. A `Reference` names a configured
IP-Adapter (`[ip_adapters.NAME]`) and one or more reference images (averaged).

The bot and the CLI check a spec against the config here (unknown unit, wrong family,
preprocessor nobody configured a model for) before anything is queued; the worker
checks again, since a model's family may only be known once it is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Crop and Resize", "Resize and Fill", "Just Resize")
MAX_CONTROL_WEIGHT = 2.0

# Preprocessor name → (needs a model, Threshold A default, Threshold B default), as
# sd-webui-controlnet names and defaults them. -1 = the preprocessor has no such slider.
PREPROCESSORS: dict[str, tuple[bool, float, float]] = {
    "none": (False, -1, -1),
    "canny": (False, 100.0, 200.0),
    "tile_resample": (False, 1.0, -1),  # Threshold A: down-sampling rate
    "invert": (False, -1, -1),
    "scribble_xdog": (False, 32.0, -1),  # Threshold A: XDoG threshold
    "lineart_standard": (False, -1, -1),
    "depth": (True, -1, -1),  # transformers depth-estimation model, [control] depth_model
    "openpose": (True, -1, -1),  # ViTPose body keypoints drawn as OpenPose, [control] pose_model
    "seg_ofade20k": (True, -1, -1),  # ADE20K segmentation, [control] segmentation_model
}
PREPROCESSOR_ALIASES = {
    "scribble": "scribble_xdog",
    "depth_midas": "depth",
    "seg_ufade20k": "seg_ofade20k",
    "segmentation": "seg_ofade20k",
    "": "",
}
# The [control] key naming the model of each preprocessor that needs one.
MODEL_KEYS = {
    "depth": "depth_model",
    "openpose": "pose_model",
    "seg_ofade20k": "segmentation_model",
}


def canonical_preprocessor(name: str) -> str:
    return PREPROCESSOR_ALIASES.get(name, name)


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit of a job (sd-webui-controlnet's "ControlNet N")."""

    name: str  # the [controlnets.NAME] entry
    image: str | None = None  # blob sha256 of the control image; None = the job's input
    preprocessor: str = ""  # "" = the unit's configured preprocessor
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: int = 512
    threshold_a: float = -1  # -1 = the preprocessor's default
    threshold_b: float = -1

    def settings_key(self) -> str:
        """Everything but the image: units with equal keys can share a batch."""
        values = dataclasses.asdict(self)
        values.pop("image")
        return "|".join(f"{k}={values[k]}" for k in sorted(values))


@dataclass(frozen=True)
class Reference:
    """IP-Adapter: reference images (averaged) steering style, subject or face."""

    name: str  # the [ip_adapters.NAME] entry
    images: tuple[str, ...] = ()  # blob sha256 of each reference image
    weight: float = 1.0

    def settings_key(self) -> str:
        # diffusers repeats one set of image embeddings over the whole batch, so only
        # jobs with the same reference images can share one.
        return f"{self.name}|{self.weight}|{','.join(self.images)}"


def unit_from_dict(data: dict[str, Any]) -> ControlUnit:
    return ControlUnit(**data)


def reference_from_dict(data: dict[str, Any] | None) -> Reference | None:
    if data is None:
        return None
    data = dict(data)
    data["images"] = tuple(data.get("images", ()))
    return Reference(**data)


def check_units(
    units: tuple[ControlUnit, ...], reference: Reference | None, max_units: int
) -> None:
    """Config-free checks: counts, ranges, names of modes. Raises JobError."""
    from pipeline.contract.jobs import JobError

    if len(units) > max_units:
        raise JobError(
            f"{len(units)} ControlNet units in one job; the limit is {max_units} "
            "(limits.max_controlnets)"
        )
    for unit in units:
        who = f"ControlNet unit '{unit.name}'"
        _weight(who, unit.weight)
        for label, value in (("start", unit.guidance_start), ("end", unit.guidance_end)):
            if not _number(value) or not 0.0 <= value <= 1.0:
                raise JobError(f"{who}: guidance {label} must be between 0 and 1, not {value!r}")
        if unit.guidance_end < unit.guidance_start:
            raise JobError(
                f"{who}: guidance end {unit.guidance_end:g} is before guidance start "
                f"{unit.guidance_start:g}; the end must be at or after the start"
            )
        if unit.control_mode not in CONTROL_MODES:
            raise JobError(f"{who}: control mode must be one of {', '.join(CONTROL_MODES)}")
        if unit.resize_mode not in RESIZE_MODES:
            raise JobError(f"{who}: resize mode must be one of {', '.join(RESIZE_MODES)}")
        pre = canonical_preprocessor(unit.preprocessor)
        if pre and pre not in PREPROCESSORS:
            raise JobError(
                f"{who}: unknown preprocessor {unit.preprocessor!r}; "
                f"known: {', '.join(PREPROCESSORS)}"
            )
        if isinstance(unit.processor_res, bool) or not 64 <= unit.processor_res <= 2048:
            raise JobError(f"{who}: processor resolution must be 64 to 2048")
    if reference is not None:
        _weight(f"reference '{reference.name}'", reference.weight)
        if not reference.images:
            raise JobError("a reference (IP-Adapter) needs at least one image")
        if len(reference.images) > 4:
            raise JobError(f"{len(reference.images)} reference images; the limit is 4")


def check_against_config(
    units: tuple[ControlUnit, ...], reference: Reference | None, config: Any, model_family: str
) -> None:
    """Names and families against config.toml. `model_family` "auto" skips the family
    check (the worker does it once the model is loaded). Raises JobError."""
    from pipeline.contract.families import label as family_label
    from pipeline.contract.families import spec as family_spec
    from pipeline.contract.jobs import JobError

    if model_family != "auto":  # a family without ControlNets or IP-Adapters says so
        for option, used in (("control", units), ("reference", reference)):
            if used:
                family_spec(model_family).check_option(option)
    for unit in units:
        entry = config.controlnets.get(unit.name)
        if entry is None:
            names = ", ".join(config.controlnets) or "none"
            raise JobError(f"unknown ControlNet unit '{unit.name}'; configured units: {names}")
        if model_family != "auto" and entry.family not in ("auto", model_family):
            raise JobError(
                f"ControlNet '{unit.name}' is for {family_label(entry.family)} but the model is "
                f"{family_label(model_family)}; pick a {family_label(model_family)} unit"
            )
        pre = canonical_preprocessor(unit.preprocessor or entry.preprocessor)
        if pre not in available_preprocessors(config):
            raise JobError(
                f"preprocessor '{pre}' needs a model and none is configured "
                f"([control] {MODEL_KEYS.get(pre, 'depth_model')}); use another preprocessor "
                "or 'none'"
            )
    if reference is not None:
        entry = config.ip_adapters.get(reference.name)
        if entry is None:
            names = ", ".join(config.ip_adapters) or "none"
            raise JobError(f"unknown IP-Adapter '{reference.name}'; configured: {names}")
        if model_family != "auto" and entry.family not in ("auto", model_family):
            raise JobError(
                f"IP-Adapter '{reference.name}' is for {family_label(entry.family)} but the "
                f"model is {family_label(model_family)}"
            )


def available_preprocessors(config: Any) -> list[str]:
    """The preprocessors a member may pick: model-free ones, plus those whose model the
    admin configured."""
    names = [name for name, (needs_model, _, _) in PREPROCESSORS.items() if not needs_model]
    names += [name for name, key in MODEL_KEYS.items() if getattr(config.control, key, "")]
    return names


def thresholds(unit: ControlUnit, preprocessor: str) -> tuple[float, float]:
    _, a, b = PREPROCESSORS.get(preprocessor, (False, -1, -1))
    return (
        unit.threshold_a if unit.threshold_a != -1 else a,
        unit.threshold_b if unit.threshold_b != -1 else b,
    )


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def _weight(who: str, value: Any) -> None:
    from pipeline.contract.jobs import JobError

    if not _number(value) or not 0.0 <= value <= MAX_CONTROL_WEIGHT:
        raise JobError(f"{who}: weight must be between 0 and {MAX_CONTROL_WEIGHT:g}, not {value!r}")


# --- A1111 infotext: `ControlNet 0: "Module: canny, Model: …, Weight: 1.0, …"` ------------


def unit_infotext(
    module: str,
    model: str,
    weight: float,
    *,
    resize_mode: str = "Crop and Resize",
    processor_res: int = 512,
    threshold_a: float = -1,
    threshold_b: float = -1,
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
    control_mode: str = "Balanced",
) -> str:
    """One unit's value as sd-webui-controlnet writes it (floats as Python prints them)."""
    pairs = [
        ("Module", module),
        ("Model", model),
        ("Weight", float(weight)),
        ("Resize Mode", resize_mode),
        ("Processor Res", int(processor_res)),
        ("Threshold A", float(threshold_a)),
        ("Threshold B", float(threshold_b)),
        ("Guidance Start", float(guidance_start)),
        ("Guidance End", float(guidance_end)),
        ("Pixel Perfect", False),
        ("Control Mode", control_mode),
    ]
    return ", ".join(f"{k}: {v}" for k, v in pairs)


def parse_unit_infotext(value: str) -> dict[str, str]:
    """`Module: canny, Model: x [abcd], …` → {"Module": "canny", …}."""
    result = {}
    for part in value.split(", "):
        key, sep, item = part.partition(": ")
        if sep:
            result[key.strip()] = item.strip()
    return result


def units_from_infotext(params: dict[str, Any]) -> list[dict[str, str]]:
    """Every `ControlNet N` entry of parsed infotext, in order, each parsed."""
    found = []
    for key, value in params.items():
        if key.startswith("ControlNet ") and key[len("ControlNet ") :].isdigit():
            found.append((int(key.split()[1]), parse_unit_infotext(str(value))))
    return [unit for _, unit in sorted(found)]
