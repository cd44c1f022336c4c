"""What each configured model takes and starts from, asked of its family's spec.

The bot never names a family (tests/test_families.py): for a configured model it asks
the torch-free `FamilySpec` (`pipeline/contract/families/`), read once per model
(`family_of`, off the event loop: `family = "auto"` reads the model's files).

- **Defaults.** An option the member leaves out takes, in order: what the model
  decides itself (`contract.families.model_defaults`: its family's own defaults, its
  Distilled CFG, its `[models.NAME]` keys), else the member's /settings, else the
  server's `[defaults]` (`pick_values`).
- **Options.** An option the member set that the model's family lacks is refused in
  one line naming the model (`check_given`, through `FamilySpec.check_option`): Discord
  shows one option list per command, so this is where a model's own list is enforced.
- **Autocomplete.** Sampler names the family takes (`FamilySpec.sampler_names`), sizes
  in its multiple, and, per command, only the models whose family has that mode.
- **/models** (`describe`): per model, its family, variant, modes, defaults and options.
"""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace
from typing import Any

from pipeline.contract.config import Config
from pipeline.contract.families import FamilySpec, family_of_model, model_defaults
from pipeline.contract.jobs import ALL_MODES

# A generation command's option → the family option it needs (`FamilySpec.options`).
NEEDS = {
    "negative": "negative_prompt",
    "cfg": "cfg_scale",
    "guidance": "guidance",
    "face_fix": "face_fix",
    "control": "control",
    "control_image": "control",
    "control_weight": "control",
    "reference": "reference",
    "reference_weight": "reference",
}
# The mode each generation command asks of a model (its model autocomplete offers only
# the models whose family has it).
COMMAND_MODES = {
    "imagine": "txt2img",
    "img2img": "img2img",
    "inpaint": "inpaint",
    "outpaint": "outpaint",
    "edit": "edit",
}


@functools.lru_cache(maxsize=64)
def _family(family: str, source: str) -> type[FamilySpec]:
    """A configured model's family, read once (for `family = "auto"` from its files, which
    for a Hub id may mean one request for its model_index.json)."""
    return family_of_model(SimpleNamespace(family=family, source=source))


async def family_of(config: Config, name: str) -> type[FamilySpec]:
    """The family spec (with its variant) of the configured model ``name`` ("default":
    the first)."""
    model = config.model(name)
    return await asyncio.to_thread(_family, model.family, model.source)


async def defaults_of(config: Config, name: str) -> dict[str, Any]:
    """What the model decides itself for options left out (see `model_defaults`)."""
    return model_defaults(config.model(name), await family_of(config, name))


def check_given(family: type[FamilySpec], model: str, options: dict[str, Any]) -> None:
    """JobError in one line naming the model for an option the member set that its
    family lacks (a CFG scale on Flux.1 schnell, a Distilled CFG on SD). An option left
    at its default (None, False, an empty negative prompt) was not set."""
    for name, needs in NEEDS.items():
        value = options.get(name)
        if value is None or value is False or (isinstance(value, str) and not value.strip()):
            continue
        family.check_option(needs, model)


def drop_lacking(
    family: type[FamilySpec], options: dict[str, Any], filled: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """Options filled from pasted parameters (``filled``) that the model's family lacks
    are left out rather than refused: the member typed none of them. Returns the
    options and the names left out, for the paste's notice."""
    lacking = [o for o in filled if o in NEEDS and NEEDS[o] not in family.options]
    return {**options, **dict.fromkeys(lacking)}, lacking


def pick_values(
    own: dict[str, Any], mine: dict[str, Any], server: Any, sampler: str | None
) -> dict[str, Any]:
    """The spec fields of options left out: the model's own (``own``), else the member's
    /settings (``mine``), else the server's defaults. A sampler the member picks
    (``sampler``, or in /settings) carries its own schedule ("DPM++ 2M Karras")."""
    values = {}
    for key in ("steps", "cfg_scale", "width", "height", "negative_prompt"):
        values[key] = own[key] if key in own else mine.get(key, getattr(server, key))
    if sampler:
        values["sampler"], values["schedule"] = sampler, "Automatic"
    elif "sampler" in own:
        values["sampler"], values["schedule"] = own["sampler"], own.get("schedule", "Automatic")
    elif mine.get("sampler"):
        values["sampler"], values["schedule"] = mine["sampler"], "Automatic"
    else:
        # a model's own schedule alone ([models.NAME] schedule) goes with the server's sampler
        values["sampler"], values["schedule"] = server.sampler, own.get("schedule", server.schedule)
    values["guidance"] = own.get("guidance")
    return values


async def models_for(config: Config, command: str) -> list[str]:
    """The configured models a command may use: for a generation command, those whose
    family has its mode; for any other, all."""
    mode = COMMAND_MODES.get(command)
    names = list(dict.fromkeys(m.name for m in config.models))
    if mode is None:
        return names
    families = await asyncio.gather(*(family_of(config, n) for n in names))
    return [n for n, family in zip(names, families, strict=True) if family.has_mode(mode)]


def family_label(family: type[FamilySpec]) -> str:
    """'Flux.1 (flux, variant dev)': what a member reads, and what config.toml says."""
    variant = f", variant {family.variant}" if family.variant else ""
    return f"{family.label} ({family.name}{variant})"


def _modes(family: type[FamilySpec]) -> str:
    """Its modes in /imagine's order; an edit by the classic route (SD: the instruction as
    the prompt of an img2img or keep-face inpaint) says so."""
    names = [m for m in ALL_MODES if m in family.modes]
    if family.has_mode("edit") and "edit" not in family.modes:
        names.append("edit (classic route)")
    return ", ".join(names)


def describe(name: str, family: type[FamilySpec], own: dict[str, Any], server: Any) -> str:
    """One model for /models: its family and variant, modes, defaults and options."""
    values = pick_values(own, {}, server, None)
    schedule = values["schedule"]
    sampler = values["sampler"] + ("" if schedule == "Automatic" else f" {schedule}")
    defaults = [sampler, f"{values['steps']} steps", f"CFG {values['cfg_scale']:g}"]
    if values["guidance"] is not None:
        defaults.append(f"Distilled CFG {values['guidance']:g}")
    size = f"{values['width']}x{values['height']} (multiples of {family.size_multiple})"
    taken = [o for o, needs in NEEDS.items() if needs in family.options and o in _SHOWN]
    lacking = [o for o, needs in NEEDS.items() if needs not in family.options and o in _SHOWN]
    lines = [
        f"**{name}** · {family_label(family)}",
        f"modes: {_modes(family)}",
        f"defaults: {' · '.join(defaults)} · {size}",
        f"options: {', '.join(taken)}" + (f"; not: {', '.join(lacking)}" if lacking else ""),
    ]
    return "\n".join(lines)


_SHOWN = ("negative", "cfg", "guidance", "face_fix", "control", "reference")
