"""One cog per user-facing area. The launcher lists them explicitly in `EXTENSIONS`.

`SDCog` is what they share: the services the launcher built (config, the database
thread, blobs, submitting, LoRAs, messages; see `bot.services`), handed to each cog at
setup; the Discord client for channels and other cogs; and the middle layer of error
handling — a domain error raised by any command becomes a short ephemeral reply
naming the problem and the limit (see `bot.errors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import answer_expected

if TYPE_CHECKING:
    from bot.app import SDBot
    from bot.services import Services

EXTENSIONS = (
    "bot.cogs.generate",
    "bot.cogs.edit",
    "bot.cogs.member",
    "bot.cogs.train",
    "bot.cogs.loras",
    "bot.cogs.admin",
    "bot.cogs.observability",
    "bot.cogs.models",
)


class SDCog(commands.Cog):
    def __init__(self, bot: SDBot, services: Services) -> None:
        self.bot = bot  # the Discord connection: channels, other cogs
        self.services = services
        self.config = services.config
        self.db = services.db  # `await self.db.call(store.get_job, job_id)`
        self.blobs = services.blobs

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        # Bugs fall through to the tree's on_error, which logs them with an error id.
        await answer_expected(interaction, error)
