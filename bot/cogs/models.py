"""/models: what each model on this server is and starts from.

Per model: its family and variant, the modes it has (which commands it serves), the
defaults a job on it gets for options left out, and the options it takes — all asked
of its family's spec (`bot.services.model_options`), never by the family's name.
"""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands

from bot.app import SDBot
from bot.cogs import SDCog
from bot.services.model_options import defaults_of, describe, family_of
from bot.views import render


class Models(SDCog):
    """The models members can pick."""

    async def cog_load(self) -> None:
        # Read every model's family now, in the background: for `family = "auto"` on a Hub
        # id that may be a request, and autocomplete must answer within Discord's 3 s.
        self._warm = asyncio.create_task(self._read_families())

    async def cog_unload(self) -> None:
        self._warm.cancel()

    async def _read_families(self) -> None:
        for model in self.config.models:
            await family_of(self.config, model.name)

    @app_commands.command()
    async def models(self, interaction: discord.Interaction) -> None:
        """The models here: family, modes, and the defaults each starts from."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        settings = await self.services.safety.settings(interaction.guild_id)
        names = list(dict.fromkeys(m.name for m in self.config.models))
        if settings.allowed_models:
            names = [n for n in names if n in settings.allowed_models]
        parts = []
        for name in names:
            family = await family_of(self.config, name)
            own = await defaults_of(self.config, name)
            parts.append(describe(name, family, own, settings.defaults))
        head = f"Models here (the first is the default: {names[0]}):" if names else "No models."
        footer = (
            "Options you leave out take these; your /settings apply where the model "
            "leaves them to the server."
        )
        text = "\n\n".join([head, *parts, footer])
        await interaction.followup.send(render.truncate(text, 2000), ephemeral=True)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Models(bot, bot.services))
