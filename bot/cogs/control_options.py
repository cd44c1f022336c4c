"""ControlNet units and IP-Adapter references from what a member typed: the CLI's
`--control NAME[:IMAGE[:WEIGHT[:START:END]]]` / `--reference IMAGE[:WEIGHT]`, and the
Discord options. Torch-free: images are only checked to be images here; the worker
preprocesses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.contract.control import ControlUnit, Reference
from pipeline.contract.jobs import JobError


def _number(text: str, what: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise JobError(f"{option}: {what} must be a number, not {text!r}") from None


def parse_control(text: str) -> tuple[str, str | None, dict[str, float]]:
    """`NAME[:IMAGE[:WEIGHT[:START:END]]]` → (name, image path or None, settings)."""
    name, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if not name or len(parts) > 4 or len(parts) == 3:
        raise JobError(
            f"--control wants NAME[:IMAGE[:WEIGHT[:START:END]]], e.g. canny:photo.png:0.8, "
            f"not {text!r}"
        )
    image = parts[0] or None if parts else None
    settings: dict[str, float] = {}
    if len(parts) >= 2:
        settings["weight"] = _number(parts[1], "the weight", "--control")
    if len(parts) == 4:
        settings["guidance_start"] = _number(parts[2], "the guidance start", "--control")
        settings["guidance_end"] = _number(parts[3], "the guidance end", "--control")
    return name, image, settings


def parse_reference(text: str) -> tuple[str, float | None]:
    image, sep, weight = text.rpartition(":")
    if sep and image:
        try:
            return image, float(weight)
        except ValueError:
            pass
    return text, None


def default_ip_adapter(config: Any, requested: str | None) -> str:
    if requested:
        return requested
    if not config.ip_adapters:
        raise JobError("no IP-Adapter is configured ([ip_adapters.NAME] in config.toml)")
    return next(iter(config.ip_adapters))


def cli_control(args: Any, config: Any, blobs: Any, read_input: Any) -> dict[str, Any]:
    """GenerateSpec fields for the CLI's --control / --reference options."""
    limit = config.limits.max_input_pixels
    units = []
    for text in args.control:
        name, image, settings = parse_control(text)
        sha = None
        if image is not None:
            data, _ = read_input(Path(image), "control image", limit)
            sha = blobs.add_bytes(data)
        elif not args.image:
            raise JobError(f"--control {text}: give an image (NAME:IMAGE) or an --image")
        units.append(ControlUnit(name=name, image=sha, **settings))
    values: dict[str, Any] = {"control": tuple(units)}
    if args.reference:
        shas, weight = [], 1.0
        for text in args.reference:
            path, given = parse_reference(text)
            data, _ = read_input(Path(path), "reference image", limit)
            shas.append(blobs.add_bytes(data))
            weight = given if given is not None else weight
        name = default_ip_adapter(config, getattr(args, "ip_adapter", None))
        values["reference"] = Reference(name=name, images=tuple(shas), weight=weight)
    return values


def keep_unit(config: Any, keep: str, family: str) -> str:
    """The unit `/img2img keep: pose` (or depth) uses: the first configured unit of that
    kind for the model's family (pose falls back to depth)."""
    kinds = ("pose", "depth") if keep == "pose" else (keep,)
    for kind in kinds:
        for name, entry in config.controlnets.items():
            if entry.kind == kind and family in ("auto", entry.family):
                return name
    raise JobError(
        f'keep: {keep} needs a {keep} ControlNet unit ([controlnets.NAME] kind = "{keep}") '
        "and none is configured for this model"
    )


def default_unit(config: Any, family: str) -> str:
    for name, entry in config.controlnets.items():
        if family in ("auto", entry.family):
            return name
    raise JobError("no ControlNet unit is configured for this model ([controlnets.NAME])")


def ip_adapter_for(config: Any, family: str) -> str:
    for name, entry in config.ip_adapters.items():
        if family in ("auto", entry.family):
            return name
    raise JobError("no IP-Adapter is configured for this model, so reference images can't be used")


async def discord_control(
    config: Any,
    model: str,
    *,
    control: str | None = None,
    control_image: Any = None,
    control_weight: float | None = None,
    reference: Any = None,
    reference_weight: float | None = None,
    keep: str | None = None,
    has_input: bool = False,
) -> tuple[dict[str, Any], list[Any]]:
    """The Discord options → GenerateSpec fields (control, reference) and the attached
    photos to store. Attachments are downloaded and checked to be images; every option
    given is used or refused, never silently dropped."""
    from bot.plumbing.attachments import read_photo
    from pipeline.contract.control import check_against_config

    family = config.model(model).family
    photos: list[Any] = []
    units: list[ControlUnit] = []
    weight = 1.0 if control_weight is None else control_weight
    if keep in ("pose", "depth"):
        units.append(ControlUnit(keep_unit(config, keep, family), None, weight=weight))
    if control or control_image is not None:
        name = control.strip() if control else default_unit(config, family)
        sha = None
        if control_image is not None:
            photo = await read_photo(control_image, config, "control image")
            photos.append(photo)
            sha = photo.sha256
        elif not has_input:
            raise JobError(
                f"control: {name} needs a control_image (attach the pose, edges or photo)"
            )
        units.append(ControlUnit(name, sha, weight=weight))
    elif control_weight is not None and not units:
        raise JobError("control_weight needs a control unit or a control_image")
    values: dict[str, Any] = {"control": tuple(units)}
    if reference is not None:
        photo = await read_photo(reference, config, "reference")
        photos.append(photo)
        strength = 1.0 if reference_weight is None else reference_weight
        values["reference"] = Reference(ip_adapter_for(config, family), (photo.sha256,), strength)
    elif reference_weight is not None:
        raise JobError("reference_weight needs a reference image")
    check_against_config(values["control"], values.get("reference"), config, family)
    return values, photos
