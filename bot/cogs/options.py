"""The options /imagine, /img2img, /inpaint and /outpaint share, declared once.

A command lists its options, in order, with `@generation_options(...)`: shared ones
from `OPTIONS` and its own keyword-only parameters (an own parameter of the same name
replaces the shared one); it receives them all as keywords. An `app_commands.describe`
above it gives the command's own wording, for its own options or shared ones.

discord.py reads a command's options from its signature, so the decorator writes
them into ``__signature__`` with their descriptions and autocomplete: what Discord
shows (names, types, limits, descriptions, order) is exactly what explicit
parameters would give.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import discord
from discord import app_commands

from bot import store
from bot.errors import UserError
from bot.services.model_options import COMMAND_MODES, family_of, models_for
from pipeline.contract.families import FamilySpec, model_defaults
from pipeline.contract.jobs import MAX_SEED, check_size
from pipeline.contract.samplers import sampler_names

Range = app_commands.Range
F = TypeVar("F", bound=Callable[..., Any])
SIZES = (
    (512, 512), (768, 512), (512, 768), (640, 640), (768, 768), (912, 512), (512, 912),
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
    (768, 1344), (1536, 640), (640, 1536), (256, 256), (384, 384), (128, 128), (64, 64),
)  # fmt: skip


# -- autocomplete: at most 25 choices, filtered by what is typed -------------------------------


async def model_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The models allowed here; for a generation command, those whose family has its
    mode (no edit-only model in /imagine's list)."""
    services = interaction.client.services
    names = await models_for(services.config, _command(interaction))
    allowed = (await services.safety.settings(interaction.guild_id)).allowed_models
    return _choices([n for n in names if not allowed or n in allowed], current)


async def sampler_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The sampler names the chosen model's family takes (/settings: every name)."""
    family = await _chosen_family(interaction)
    return _choices(family.sampler_names() if family else sampler_names(), current)


async def size_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """Sizes the server's limits allow, in the chosen model's multiple, its default first."""
    config = interaction.client.services.config
    family = await _chosen_family(interaction)
    if family is None:
        return _choices(allowed_sizes(config), current)
    own = model_defaults(config.model(_model_typed(interaction)), family)
    default = (own.get("width", config.defaults.width), own.get("height", config.defaults.height))
    return _choices(allowed_sizes(config, default, family.size_multiple), current)


def _command(interaction: discord.Interaction) -> str:
    return interaction.command.name if interaction.command else ""


def _model_typed(interaction: discord.Interaction) -> str:
    """The model already chosen in the command being typed, else the default; a name no
    model has counts as the default (the command itself will say it is unknown)."""
    config = interaction.client.services.config
    typed = interaction.namespace.model
    names = {m.name for m in config.models}
    return typed if isinstance(typed, str) and typed in names else "default"


async def _chosen_family(interaction: discord.Interaction) -> type[FamilySpec] | None:
    """The family of the model chosen so far, for a generation command; None otherwise."""
    if _command(interaction) not in COMMAND_MODES:
        return None
    return await family_of(interaction.client.services.config, _model_typed(interaction))


async def lora_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The LoRAs this member may use: their own, shared ones, the server library."""
    db = interaction.client.services.db
    guild = str(interaction.guild_id) if interaction.guild_id else None
    rows = await db.call(store.list_loras, str(interaction.user.id), guild)
    return _choices([row["name"] for row in rows], current)


async def control_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The configured ControlNet units whose preprocessor is available."""
    from pipeline.contract.control import available_preprocessors, canonical_preprocessor

    config = interaction.client.services.config
    usable = set(available_preprocessors(config))
    names = [
        name
        for name, entry in config.controlnets.items()
        if canonical_preprocessor(entry.preprocessor) in usable
    ]
    return _choices(names, current)


def _choices(names: list[str], current: str) -> list[app_commands.Choice[str]]:
    typed = current.lower().strip()
    found = [n for n in names if typed in n.lower()] if typed else list(names)
    found.sort(key=lambda n: not n.lower().startswith(typed))  # prefix matches first
    return [app_commands.Choice(name=n, value=n) for n in found[:25]]


def allowed_sizes(
    config: Any, default: tuple[int, int] | None = None, multiple: int = 8
) -> list[str]:
    """The usual sizes that the server's limits allow (in a model's ``multiple``), its
    default (``default``, else `[defaults]`) first."""
    default = default or (config.defaults.width, config.defaults.height)
    sizes = [default] + [s for s in SIZES if s != default]
    ok = []
    for width, height in sizes:
        try:
            check_size(width, height, config.limits)
        except ValueError:
            continue
        if width % multiple == 0 and height % multiple == 0:
            ok.append(f"{width}x{height}")
    return ok


def parse_size(text: str, limits: Any = None) -> tuple[int, int]:
    """ "768x512" (or 768×512) → (768, 512), checked against ``limits`` when given (a
    job's size is checked where it is submitted: `bot.services.admission`)."""
    width, sep, height = text.lower().replace("×", "x").partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise UserError(f"size must look like 768x512, not {text!r}")
    size = int(width), int(height)
    if limits is not None:
        check_size(*size, limits)
    return size


# -- the shared options ------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    annotation: Any  # what discord.py turns into the option's type and limits
    default: Any
    description: str
    autocomplete: Callable[..., Any] | None = None


OPTIONS: dict[str, Option] = {
    "image": Option(discord.Attachment, inspect.Parameter.empty, "The photo to start from"),
    "prompt": Option(
        Range[str, 1, 6000], inspect.Parameter.empty, "What to draw; <lora:name:0.8> applies a LoRA"
    ),
    "strength": Option(
        Range[float, 0.05, 1.0],
        0.75,
        "How much to change: 0.05 keeps the photo, 1 ignores it (default 0.75)",
    ),
    "negative": Option(
        Range[str, 0, 6000] | None, None, "What to keep out of the image (negative prompt)"
    ),
    "model": Option(str | None, None, "Base model (default: the server's first)", model_choices),
    "sampler": Option(
        str | None,
        None,
        "Sampler, e.g. Euler a or DPM++ 2M Karras (default: the model's, else your /settings)",
        sampler_choices,
    ),
    "steps": Option(
        Range[int, 1, 150] | None,
        None,
        "Denoising steps: more is slower and finer (default: the model's, else your /settings)",
    ),
    "cfg": Option(
        Range[float, 0.0, 30.0] | None,
        None,
        "How closely to follow the prompt, the CFG scale (default: the model's, else /settings)",
    ),
    "guidance": Option(
        Range[float, 0.0, 100.0] | None,
        None,
        "Distilled CFG Scale, for the models that have one (see /models; default: the model's)",
    ),
    "seed": Option(
        Range[int, 0, MAX_SEED] | None,
        None,
        "Seed, to draw the same image again (random when empty)",
    ),
    "size": Option(
        str | None, None, "Width x height (default: the model's, else your /settings)", size_choices
    ),
    "count": Option(Range[int, 1, 4], 1, "How many images (default 1)"),
    "face_fix": Option(bool, False, "Repaint faces afterwards, ADetailer style"),
    "lora": Option(
        str | None,
        None,
        "One of your LoRAs (or a shared/server one), added as <lora:NAME:0.8>",
        lora_choices,
    ),
    # ControlNet and IP-Adapter (bot/cogs/control_options.py turns them into spec fields)
    "control_image": Option(
        discord.Attachment | None,
        None,
        "ControlNet: the pose, edges or photo to follow (default: the input photo)",
    ),
    "control": Option(
        str | None, None, "ControlNet unit (default: the server's first)", control_choices
    ),
    "control_weight": Option(
        Range[float, 0.0, 2.0] | None, None, "How strongly the control steers, 0-2 (default 1)"
    ),
    "reference": Option(
        discord.Attachment | None, None, "IP-Adapter: an image whose subject or style to follow"
    ),
    "reference_weight": Option(
        Range[float, 0.0, 2.0] | None, None, "How strongly the reference steers, 0-2 (default 1)"
    ),
}
# Options only one command has, declared here too so that each command's list reads whole.
OPTIONS |= {
    "mask": Option(
        discord.Attachment | None, None, "Same size as the photo: white = repaint, black = keep"
    ),
    "keep": Option(
        Literal["face", "background"] | None,
        None,
        "Without a mask: keep the face and repaint the rest, or keep the background",
    ),
    "direction": Option(
        Literal["left", "right", "up", "down", "all"],
        "all",
        "Which side to extend (default: all around)",
    ),
    "pixels": Option(Range[int, 8, 512], 128, "How far to extend, in pixels (multiple of 8)"),
}
# every generation command
STYLE = ("negative", "model", "sampler", "steps", "cfg", "guidance", "seed")
BATCH = ("count", "face_fix")  # the commands that may draw several images
CONTROL = ("control_image", "control", "control_weight", "reference", "reference_weight")


def generation_options(*names: str) -> Callable[[F], F]:
    """Give the command these options, in this order (shared ones and its own)."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        fixed = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]  # self, interaction
        own = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
        unlisted = set(own) - set(names)
        if unlisted:
            raise TypeError(f"{fn.__qualname__}: options {sorted(unlisted)} are not listed")
        options = [own.get(name) or _parameter(name) for name in names]
        fn.__signature__ = signature.replace(parameters=[*fixed, *options])  # type: ignore[attr-defined]
        shared = {n: OPTIONS[n].description for n in names if n in OPTIONS and n not in own}
        app_commands.describe(**shared)(fn)
        completes = {
            n: OPTIONS[n].autocomplete
            for n in names
            if n in OPTIONS and n not in own and OPTIONS[n].autocomplete
        }
        if completes:
            app_commands.autocomplete(**completes)(fn)
        return fn

    return decorate


def _parameter(name: str) -> inspect.Parameter:
    option = OPTIONS[name]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option.default, annotation=option.annotation
    )
