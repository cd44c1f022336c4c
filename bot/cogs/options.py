"""The options /imagine, /img2img, /inpaint and /outpaint share, declared once.

A command names the shared options it takes with `@generation_options(...)` and
receives them in ``**options``. discord.py reads a command's options from its
signature, so the decorator writes the shared ones into ``__signature__`` after the
command's own parameters, in the order given, with their descriptions and their
autocomplete; what Discord shows (names, types, limits, descriptions, order) is
exactly what explicit parameters would give.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import discord
from discord import app_commands

from bot import store
from bot.errors import UserError
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
    names = [m.name for m in interaction.client.services.config.models]
    return _choices(names, current)


async def sampler_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _choices(sampler_names(), current)


async def size_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _choices(allowed_sizes(interaction.client.services.config), current)


async def lora_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The LoRAs this member may use: their own, shared ones, the server library."""
    db = interaction.client.services.db
    guild = str(interaction.guild_id) if interaction.guild_id else None
    rows = await db.call(store.list_loras, str(interaction.user.id), guild)
    return _choices([row["name"] for row in rows], current)


def _choices(names: list[str], current: str) -> list[app_commands.Choice[str]]:
    typed = current.lower().strip()
    found = [n for n in names if typed in n.lower()] if typed else list(names)
    found.sort(key=lambda n: not n.lower().startswith(typed))  # prefix matches first
    return [app_commands.Choice(name=n, value=n) for n in found[:25]]


def allowed_sizes(config: Any) -> list[str]:
    """The usual sizes that the server's limits allow, its default first."""
    default = (config.defaults.width, config.defaults.height)
    sizes = [default] + [s for s in SIZES if s != default]
    ok = []
    for width, height in sizes:
        try:
            check_size(width, height, config.limits)
        except ValueError:
            continue
        ok.append(f"{width}x{height}")
    return ok


def parse_size(text: str, limits: Any) -> tuple[int, int]:
    """ "768x512" (or 768×512) → (768, 512), checked against the limits."""
    width, sep, height = text.lower().replace("×", "x").partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise UserError(f"size must look like 768x512, not {text!r}")
    size = int(width), int(height)
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
    "negative": Option(
        Range[str, 0, 6000] | None, None, "What to keep out of the image (negative prompt)"
    ),
    "model": Option(str | None, None, "Base model (default: the server's first)", model_choices),
    "sampler": Option(
        str | None,
        None,
        "Sampler, e.g. Euler a or DPM++ 2M Karras (default: your /settings)",
        sampler_choices,
    ),
    "steps": Option(
        Range[int, 1, 150] | None,
        None,
        "Denoising steps: more is slower and finer (default: your /settings)",
    ),
    "cfg": Option(
        Range[float, 0.0, 30.0] | None,
        None,
        "How closely to follow the prompt, the CFG scale (default: your /settings)",
    ),
    "seed": Option(
        Range[int, 0, MAX_SEED] | None,
        None,
        "Seed, to draw the same image again (random when empty)",
    ),
    "size": Option(str | None, None, "Width x height (default: your /settings)", size_choices),
    "count": Option(Range[int, 1, 4], 1, "How many images (default 1)"),
    "face_fix": Option(bool, False, "Repaint faces afterwards, ADetailer style"),
    "lora": Option(
        str | None,
        None,
        "One of your LoRAs (or a shared/server one), added as <lora:NAME:0.8>",
        lora_choices,
    ),
}
STYLE = ("negative", "model", "sampler", "steps", "cfg", "seed")  # every generation command
BATCH = ("count", "face_fix")  # the commands that may draw several images


def generation_options(*names: str) -> Callable[[F], F]:
    """Give the command (whose last parameter is ``**options``) these shared options."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        shared = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=OPTIONS[name].default,
                annotation=OPTIONS[name].annotation,
            )
            for name in names
        ]
        fn.__signature__ = signature.replace(parameters=[*own, *shared])  # type: ignore[attr-defined]
        app_commands.describe(**{name: OPTIONS[name].description for name in names})(fn)
        completes = {n: OPTIONS[n].autocomplete for n in names if OPTIONS[n].autocomplete}
        if completes:
            app_commands.autocomplete(**completes)(fn)
        return fn

    return decorate
