"""No commands: starts and stops the `/metrics` + `/healthz` listener (`bot.services.metrics`)
with the bot, when `[metrics] listen` is set."""

from __future__ import annotations

from discord.ext import commands

from bot.services.metrics import Metrics, MetricsServer


class Observability(commands.Cog):
    def __init__(self, bot, services) -> None:
        self.bot = bot
        self.services = services
        self.server: MetricsServer | None = None

    async def cog_load(self) -> None:
        if not self.services.config.metrics.listen:
            return
        metrics = Metrics(self.bot, self.services)
        metrics.watch()
        self.server = MetricsServer(metrics)
        await self.server.start()
        self.services.safety.metrics = metrics  # NSFW blocks and refusals

    async def cog_unload(self) -> None:
        if self.server is not None:
            await self.server.stop()


async def setup(bot) -> None:
    await bot.add_cog(Observability(bot, bot.services))
