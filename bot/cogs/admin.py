"""`/admin`: for members who may manage the server.

`AdminGroup` is the `/admin` group: its own commands (`settings`, `allow`, `quota`,
`audit`, `priority`, `stats`, `reload-loras`) and its two subgroups, `/admin filter` and
`/admin lora` (`bot.cogs.admin_safety`). The Admin cog makes one group per bot when it
loads and takes it off the tree when it unloads.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import discord
from discord import app_commands

from bot import store
from bot.app import SDBot
from bot.cogs import SDCog
from bot.cogs.admin_safety import (
    QUOTA_HELP,
    AdminOnly,
    FilterGroup,
    LibraryGroup,
    check_within_config,
    quota_text,
    setting_choices,
)
from bot.errors import UserError
from bot.services import Services
from bot.services.guild_settings import describe, effective, parse_setting
from bot.services.loras import register_server_loras
from pipeline.contract.pool import describe_memory

DAY_S = 24 * 3600
MESSAGE_LIMIT = 2000  # characters of a Discord message
QUOTAS = ("images_per_day", "gpu_seconds_per_day", "trainings_per_week")


class AdminGroup(
    AdminOnly,
    name="admin",
    description="Server admin: settings, filters, roles, quotas, the LoRA library, the queue",
    default_permissions=discord.Permissions(manage_guild=True),
    guild_only=True,
):
    """`/admin` itself: its commands, and the `filter` and `lora` subgroups."""

    def __init__(self, services: Services, tree: app_commands.CommandTree) -> None:
        super().__init__(services)
        self.tree = tree  # /admin allow names the commands it knows
        # Discord lists the subgroups first, then these commands (the order it always had).
        own = self.commands
        for command in own:
            self.remove_command(command.name)
        FilterGroup(services, parent=self)
        LibraryGroup(services, parent=self)
        for command in own:
            self.add_command(command)

    # -- settings -----------------------------------------------------------------------------

    async def _setting_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return setting_choices(current)

    @app_commands.command(name="settings")
    @app_commands.describe(
        key="the setting (e.g. safety.policy); leave empty to see them all",
        value="its new value for this server; 'default' goes back to config.toml's",
    )
    @app_commands.autocomplete(key=_setting_autocomplete)
    async def settings(
        self,
        interaction: discord.Interaction,
        key: str | None = None,
        value: app_commands.Range[str, 1, 500] | None = None,
    ) -> None:
        """Show or change this server's settings (NSFW policy, limits, defaults, models…)."""
        config = self.services.config
        if key is None or value is None:
            text = describe(config, await self.services.safety.settings(interaction.guild_id))
            if key is not None:
                parse_setting(config, key, "default")  # unknown keys are named
                text = "\n".join(line for line in text.splitlines() if f"`{key}`" in line)
            await self.answer(interaction, "**This server's settings**\n" + text)
            return
        parsed = parse_setting(config, key, value)
        if parsed is not None and key.startswith("limits."):
            check_within_config(config, key, parsed)
        overrides = await self.services.db.call(
            store.set_guild_setting, interaction.guild_id, key, parsed
        )
        effective(config, overrides)  # must still make sense
        shown = "the default" if parsed is None else f"`{parsed}`"
        answer = f"`{key}` is now {shown} on this server."
        await self.done(interaction, "settings", f"{key} = {shown}", answer)

    # -- role gates and quotas ----------------------------------------------------------------

    @app_commands.command(name="allow")
    @app_commands.describe(
        command="the command, without the slash (imagine, img2img, train…)",
        role="the role that may use it",
        allowed="False takes the role off the list; an empty list means everyone",
    )
    async def allow(
        self,
        interaction: discord.Interaction,
        command: str,
        role: discord.Role,
        allowed: bool = True,
    ) -> None:
        """Only members with one of the listed roles may use a command (admins always may)."""
        command = command.strip().lstrip("/").split()[0].lower() if command.strip() else ""
        names = {c.name for c in self.tree.get_commands()}
        if command not in names:
            raise UserError(f"there is no /{command}; commands: {', '.join(sorted(names))}")
        if command == "admin":
            raise UserError("/admin is for admins already (Manage Server)")
        roles = await self.services.db.call(
            store.allow_role, interaction.guild_id, command, str(role.id), allowed
        )
        if roles:
            guild = interaction.guild
            found = {r: guild.get_role(int(r)) if guild else None for r in sorted(roles)}
            who = ", ".join(known.name if known else r for r, known in found.items())
            answer = f"/{command} is now for: {who} (and admins)."
        else:
            answer = f"/{command} is open to everyone again."
        detail = f"/{command} {'+' if allowed else '-'}@{role.name}"
        await self.done(interaction, "allow", detail, answer)

    @app_commands.command(name="quota")
    @app_commands.describe(
        target="a member or a role",
        images_per_day=QUOTA_HELP,
        gpu_seconds_per_day=QUOTA_HELP,
        trainings_per_week=QUOTA_HELP,
    )
    async def quota(
        self,
        interaction: discord.Interaction,
        target: discord.Member | discord.Role,
        images_per_day: app_commands.Range[int, -1, 1_000_000] | None = None,
        gpu_seconds_per_day: app_commands.Range[int, -1, 10_000_000] | None = None,
        trainings_per_week: app_commands.Range[int, -1, 1000] | None = None,
    ) -> None:
        """Set a member's or a role's quotas here (a member's own beat their roles')."""
        kind = "role" if isinstance(target, discord.Role) else "member"
        given = dict(zip(QUOTAS, (images_per_day, gpu_seconds_per_day, trainings_per_week)))
        changes = {k: (None if v == -1 else v) for k, v in given.items() if v is not None}
        key = f"{kind}:{target.id}"
        answer_for = f"Quotas of {target.mention}: "
        if not changes:
            current = (await self.services.db.call(store.quotas, interaction.guild_id)).get(key, {})
            await self.answer(interaction, answer_for + quota_text(given, current) + ".")
            return
        current = await self.services.db.call(store.set_quota, interaction.guild_id, key, changes)
        detail = ", ".join(f"{k}={v}" for k, v in changes.items())
        answer = answer_for + quota_text(given, current) + "."
        await self.done(interaction, "quota", f"{kind} {target.name}: {detail}", answer)

    # -- audit --------------------------------------------------------------------------------

    @app_commands.command(name="audit")
    async def audit(self, interaction: discord.Interaction) -> None:
        """The last 20 admin actions on this server."""
        rows = await self.services.db.call(store.audit_log, interaction.guild_id)
        heading = "Recent admin actions (newest first):"
        await self.answer_rows(interaction, rows, "No admin actions recorded yet.", heading, _audit)

    # -- the queue ----------------------------------------------------------------------------

    @app_commands.command(name="priority")
    @app_commands.describe(
        job="the queued job's id (from /queue or its messages)",
        level="higher runs first; 0 is everyone's default",
    )
    async def priority(
        self, interaction: discord.Interaction, job: str, level: app_commands.Range[int, -10, 10]
    ) -> None:
        """Move a queued job ahead of (or behind) the fair order."""
        db = self.services.db
        row = await db.call(store.require_job, job)
        if row["status"] != store.JobStatus.QUEUED.value:
            raise UserError(f"job `{job}` is {row['status']}, not queued; only queued jobs move")
        await db.call(store.set_priority, job, level)
        position = await db.call(store.queue_position, job)
        answer = f"Job `{job}` now has priority {level}: position {position}."
        await self.done(interaction, "priority", f"job {job} → {level}", answer)

    @app_commands.command(name="stats")
    async def stats(self, interaction: discord.Interaction) -> None:
        """Queue, jobs of the last 24 hours, members, LoRAs and workers."""
        stats = await self.services.db.call(store.job_stats, time.time() - DAY_S)
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
        memory = describe_memory(pool.workers())
        if memory:
            lines += ["**Memory** (loaded models):", *_fitting(lines, memory)]
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="reload-loras")
    async def reload_loras(self, interaction: discord.Interaction) -> None:
        """Register LoRA files added to the server library folder since the bot started."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        guild_ids = {interaction.guild_id} if interaction.guild_id else set()
        config = self.services.config
        added = await self.services.db.call(
            register_server_loras, self.services.blobs, config, guild_ids
        )
        await interaction.followup.send(
            f"Added {added} LoRA(s) from `{config.lora_dir}`; /lora list shows the library.",
            ephemeral=True,
        )


def _fitting(lines: list[str], items: list[str], limit: int = MESSAGE_LIMIT) -> list[str]:
    """`items` as "- item" lines, as many as fit below `lines` in one message; then how
    many were left out (many GPUs × models: /metrics lists them all)."""
    room = limit - len("\n".join(lines)) - 60  # the header and the "… more" line
    shown: list[str] = []
    for item in items:
        room -= len(item) + 3
        if room < 0:
            return [*shown, f"- … and {len(items) - len(shown)} more (see /metrics)"]
        shown.append(f"- {item}")
    return shown


def _audit(row: dict) -> str:
    when = datetime.fromtimestamp(row["created_at"], tz=timezone.utc)
    return f"`{when:%m-%d %H:%M}` <@{row['user_id']}> **{row['action']}** {row['detail']}"


class Admin(SDCog):
    """Puts one `/admin` group on the bot's tree (a fresh one per bot and per load)."""

    async def cog_load(self) -> None:
        self.group = AdminGroup(self.services, self.bot.tree)
        self.bot.tree.add_command(self.group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.group.name)


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Admin(bot, bot.services))
