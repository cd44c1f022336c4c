"""The Discord bot: a `commands.Bot`, the connection the services and cogs work through.

The launcher builds the services (`bot.services`: store, blobs, pool, dispatcher,
submitting, messages, …) and attaches them before the bot starts; `setup_hook`
loads the cogs, which take the services from there once, at setup.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import discord
from discord.ext import commands

from bot.cogs import EXTENSIONS
from bot.errors import SDCommandTree
from bot.plumbing.pacing import pace
from bot.services import Services
from bot.services.loras import register_server_loras
from bot.views.buttons import DYNAMIC_ITEMS
from pipeline.contract.config import Config

log = logging.getLogger("sdbot")


class SDBot(commands.Bot):
    def __init__(
        self,
        *,
        config: Config,
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            # Slash commands and buttons need no privileged intents, nor member lists.
            intents=discord.Intents(guilds=True),
            tree_cls=SDCommandTree,
            # Where Discord offers the commands (docs/DECISIONS.md, "Commands in DMs"):
            # server channels, and the bot's DMs unless [safety] dms = "refuse"; a stale
            # command arriving from a DM then gets bot.errors.DM_ANSWER.
            allowed_contexts=discord.app_commands.AppCommandContext(
                guild=True, dm_channel=config.safety.dms != "refuse", private_channel=False
            ),
            chunk_guilds_at_startup=False,
            member_cache_flags=discord.MemberCacheFlags.none(),
            max_messages=None,
            # A gap this long after the last GUILD_CREATE means "ready" (default 2 s).
            guild_ready_timeout=0.5,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
        )
        self.config = config
        self.services: Services  # attached by the launcher before start()
        self.ready_event: asyncio.Event | None = None
        self._first_ready = True
        self._stopped = False

    # -- start-up and shutdown ------------------------------------------------------------

    async def setup_hook(self) -> None:
        # Below Discord's global 50 requests/s, which discord.py only reacts to.
        self.pacer = pace(self.http)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        await self.services.dispatcher.start()
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Guild commands appear at once; global ones can take up to an hour."""
        if not self.config.discord.guild_ids:
            await self.tree.sync()
            return
        for guild_id in self.config.discord.guild_ids:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)

    async def on_ready(self) -> None:
        if self._first_ready:
            self._first_ready = False
            log.info("logged in as %s; serving %d guild(s)", self.user, len(self.guilds))
            guild_ids = {g.id for g in self.guilds} | set(self.config.discord.guild_ids)
            services = self.services
            await services.db.call(register_server_loras, services.blobs, self.config, guild_ids)
            await services.boards.deliver_missed()
        if os.environ.get("SDBOT_DEBUG_MODULES"):
            report_heavy_modules()
        if self.ready_event is not None:
            self.ready_event.set()

    @property
    def stopping(self) -> bool:
        return self._stopped

    async def close(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.services.stop()
        await super().close()


def report_heavy_modules() -> None:
    """Log whether this (the bot's) process loaded torch & co.: a hidden check for tests,
    switched on by the SDBOT_DEBUG_MODULES environment variable."""
    heavy = [m for m in ("torch", "diffusers", "transformers", "peft", "cv2") if m in sys.modules]
    log.warning("SDBOT_DEBUG_MODULES heavy modules in the bot process: %s", heavy or "none")
