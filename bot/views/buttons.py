"""Buttons on progress and result messages, persistent across restarts.

Each button is a `discord.ui.DynamicItem` whose `custom_id` carries what it acts on
(`sdbot:reroll:<job>`, `sdbot:vary:<job>:<image>`…). They are registered once with
`bot.add_dynamic_items(*DYNAMIC_ITEMS)`, so a click on a message posted last week,
or before a restart, still reaches its handler; no view objects are kept around.
The handlers themselves live in the cogs and services (`bot.services`, reached through
the bot the click came to); these classes only parse ids and route clicks.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

from bot.errors import answer_error

if TYPE_CHECKING:
    from bot.app import SDBot

JOB = r"(?P<job>[0-9a-f]{1,32})"
INDEX = r"(?::(?P<index>\d{1,2}))?"


class _JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"sdbot:base:" + JOB):
    """A button about one job (and optionally one of its images)."""

    action = "base"
    label = ""
    style = discord.ButtonStyle.secondary
    emoji: str | None = None

    def __init__(self, job_id: str, index: int | None = None, *, row: int | None = None) -> None:
        self.job_id, self.index = job_id, index
        suffix = f":{index}" if index is not None else ""
        # Per-image buttons of a multi-image result: V1, V2…, U1, U2…
        label = self.label if index is None else f"{self.label[0]}{index + 1}"
        super().__init__(
            discord.ui.Button(
                label=label,
                style=self.style,
                emoji=self.emoji,
                custom_id=f"sdbot:{self.action}:{job_id}{suffix}",
            ),
            row=row,
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> _JobButton:
        index = match.groupdict().get("index")
        return cls(match["job"], int(index) if index is not None else None)

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        interaction.extras["job_id"] = self.job_id
        if getattr(interaction.client, "stopping", False):
            # The queue and database are closing: a click now would fail half-way.
            await interaction.response.send_message(
                "sdbot is restarting; try again in a minute.", ephemeral=True
            )
            return
        try:
            await self.act(interaction, interaction.client)
        except Exception as error:  # noqa: BLE001 - every failure gets an answer
            await answer_error(interaction, error, job_id=self.job_id)

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        raise NotImplementedError


def _generate(bot: SDBot) -> Any:
    cog = bot.get_cog("Generate")
    if cog is None:  # unloaded for maintenance
        raise RuntimeError("the Generate cog is not loaded")
    return cog


class CancelButton(_JobButton, template=r"sdbot:cancel:" + JOB):
    action, label, style = "cancel", "Cancel", discord.ButtonStyle.danger

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await bot.services.jobs.cancel_for(interaction, self.job_id)


class RerollButton(_JobButton, template=r"sdbot:reroll:" + JOB):
    action, label, emoji = "reroll", "Reroll", "🔄"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).reroll(interaction, self.job_id)


class VariationButton(_JobButton, template=r"sdbot:vary:" + JOB + INDEX):
    action, label = "vary", "Variations"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).vary(interaction, self.job_id, self.index or 0)


class UpscaleButton(_JobButton, template=r"sdbot:upscale:" + JOB + INDEX):
    action, label = "upscale", "Upscale"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).upscale(interaction, self.job_id, self.index or 0)


class FixFacesButton(_JobButton, template=r"sdbot:faces:" + JOB + INDEX):
    action, label = "faces", "Fix faces"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).fix_faces(interaction, self.job_id, self.index or 0)


class InfoButton(_JobButton, template=r"sdbot:info:" + JOB + INDEX):
    action, label, emoji = "info", "Info", "ℹ️"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).show_info(interaction, self.job_id, self.index)


class DeleteButton(_JobButton, template=r"sdbot:delete:" + JOB):
    action, label, emoji = "delete", "Delete", "🗑️"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        await _generate(bot).delete_result(interaction, self.job_id)


class CompareButton(_JobButton, template=r"sdbot:compare:" + JOB + INDEX):
    """/edit's results: the photo and the result side by side, with the identity score."""

    action, label, emoji = "compare", "Compare", "🔍"

    async def act(self, interaction: discord.Interaction, bot: SDBot) -> None:
        cog = bot.get_cog("Edit")
        if cog is None:  # unloaded for maintenance
            raise RuntimeError("the Edit cog is not loaded")
        await cog.compare(interaction, self.job_id, self.index or 0)


class ForgetButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"sdbot:forget:(?P<user>\d+)"
):
    """The confirmation under `/forget`; only the member who asked can press it."""

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        super().__init__(
            discord.ui.Button(
                label="Delete everything",
                style=discord.ButtonStyle.danger,
                custom_id=f"sdbot:forget:{user_id}",
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> ForgetButton:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        try:
            await interaction.client.get_cog("Member").forget_member(interaction, self.user_id)
        except Exception as error:  # noqa: BLE001 - every failure gets an answer
            await answer_error(interaction, error)


DYNAMIC_ITEMS = (
    CancelButton,
    RerollButton,
    VariationButton,
    UpscaleButton,
    FixFacesButton,
    InfoButton,
    DeleteButton,
    CompareButton,
    ForgetButton,
)


def progress_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def result_view(job_id: str, count: int, *, compare: bool = False) -> discord.ui.View:
    """Reroll, Variations, Upscale, Fix faces, Info, Delete (and /edit's Compare);
    per-image V1…/U1…/F1…/C1… rows for several images (Discord allows 5 buttons a row)."""
    view = discord.ui.View(timeout=None)
    if count <= 1:
        for item in (
            RerollButton(job_id, row=0),
            VariationButton(job_id, None, row=0),
            UpscaleButton(job_id, None, row=0),
            FixFacesButton(job_id, None, row=0),
            InfoButton(job_id, row=1),
            DeleteButton(job_id, row=1),
        ):
            view.add_item(item)
        if compare:
            view.add_item(CompareButton(job_id, None, row=1))
        return view
    for item in (
        RerollButton(job_id, row=0),
        InfoButton(job_id, row=0),
        DeleteButton(job_id, row=0),
    ):
        view.add_item(item)
    for index in range(min(count, 5)):
        view.add_item(VariationButton(job_id, index, row=1))
        view.add_item(UpscaleButton(job_id, index, row=2))
        view.add_item(FixFacesButton(job_id, index, row=3))
        if compare:
            view.add_item(CompareButton(job_id, index, row=4))
    return view


def forget_view(user_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton(user_id))
    return view
