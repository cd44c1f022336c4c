"""`/admin priority|stats|reload-loras`: for members who may manage the server.

Discord hides the group from everyone without Manage Server (`default_permissions`),
but a server can override that, so every command checks again on our side
(`Services.is_admin`: Manage Server, Administrator, or `discord.admin_role`).
"""

from __future__ import annotations

import time

import discord
from discord import app_commands

from bot import store
from bot.app import SDBot
from bot.cogs import SDCog
from bot.cogs.admin_safety import build
from bot.errors import UserError
from bot.services.loras import register_server_loras

DAY_S = 24 * 3600
ADMIN, SafetyAdmin = build()  # /admin and its settings, filters, roles, quotas, library


class Admin(SafetyAdmin, SDCog):
    admin = ADMIN  # one /admin group; settings, filters, roles, quotas… in admin_safety

    def _require_admin(self, interaction: discord.Interaction) -> None:
        if not self.services.is_admin(interaction):
            raise UserError("only server admins (Manage Server) can use /admin")

    @admin.command(name="priority")
    @app_commands.describe(
        job="the queued job's id (from /queue or its messages)",
        level="higher runs first; 0 is everyone's default",
    )
    async def priority(
        self, interaction: discord.Interaction, job: str, level: app_commands.Range[int, -10, 10]
    ) -> None:
        """Move a queued job ahead of (or behind) the fair order."""
        self._require_admin(interaction)
        row = await self.db.call(store.require_job, job)
        if row["status"] != store.JobStatus.QUEUED.value:
            raise UserError(f"job `{job}` is {row['status']}, not queued; only queued jobs move")
        await self.db.call(store.set_priority, job, level)
        await self._audit(interaction, "priority", f"job {job} → {level}")
        position = await self.db.call(store.queue_position, job)
        await interaction.response.send_message(
            f"Job `{job}` now has priority {level}: position {position}.", ephemeral=True
        )

    @admin.command(name="stats")
    async def stats(self, interaction: discord.Interaction) -> None:
        """Queue, jobs of the last 24 hours, members, LoRAs and workers."""
        self._require_admin(interaction)
        stats = await self.db.call(store.job_stats, time.time() - DAY_S)
        everything, recent = stats["by_status"], stats["recent"]

        def counts(by_status: dict) -> str:
            order = ("queued", "running", "done", "failed", "cancelled")
            return ", ".join(f"{by_status.get(s, 0)} {s}" for s in order)

        pool = self.services.pool
        lines = [
            f"**Queue**: {everything.get('queued', 0)} waiting, "
            f"{everything.get('running', 0)} running; "
            f"workers: {pool.free_workers()} free of {pool.capacity}",
            f"**Last 24 h**: {counts(recent)}",
            f"**All time**: {counts(everything)}; {stats['members']} members",
            f"**LoRAs**: {stats['personal_loras']} personal, "
            f"{stats['library_loras']} in the server library",
        ]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @admin.command(name="reload-loras")
    async def reload_loras(self, interaction: discord.Interaction) -> None:
        """Register LoRA files added to the server library folder since the bot started."""
        self._require_admin(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        guild_ids = {interaction.guild_id} if interaction.guild_id else set()
        added = await self.db.call(register_server_loras, self.blobs, self.config, guild_ids)
        await interaction.followup.send(
            f"Added {added} LoRA(s) from `{self.config.lora_dir}`; /lora list shows the library.",
            ephemeral=True,
        )


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Admin(bot, bot.services))
