"""One cog per user-facing area. The launcher lists them explicitly in `EXTENSIONS`.

`SDCog` is what they share: the injected bot (config, store, blobs, queue) and the
middle layer of error handling — a domain error raised by any command becomes a
short ephemeral reply naming the problem and the limit (see `bot.errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import answer_expected

if TYPE_CHECKING:
    from bot.app import SDBot

EXTENSIONS = (
    "bot.cogs.generate",
    "bot.cogs.member",
    "bot.cogs.train",
    "bot.cogs.loras",
    "bot.cogs.admin",
)


class SDCog(commands.Cog):
    def __init__(self, bot: SDBot) -> None:
        self.bot = bot

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        # Bugs fall through to the tree's on_error, which logs them with an error id.
        await answer_expected(interaction, error)
