"""`/lora list|info|rename|delete|share|export`: a member's personal models.

A member sees and uses their own LoRAs, the ones other members shared in this server,
and the server library (`loras.dir`); another member's private LoRA does not exist
for them: "not found", the same answer as for a name nobody uses.
"""

from __future__ import annotations

import asyncio
import io
from datetime import datetime, timezone
from typing import Any

import discord
from discord import app_commands

from bot import store
from bot.cogs import SDCog
from bot.errors import UserError
from bot.services.personal import validation_summary
from bot.views.render import truncate

SCOPE_LABEL = {"own": "yours", "shared": "shared", "server": "server library"}


class LoraCog(SDCog):
    lora = app_commands.Group(name="lora", description="Your personal models (LoRAs)")

    # -- helpers --------------------------------------------------------------------------

    async def _usable(self, interaction: discord.Interaction) -> list[dict]:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        return await self.db.call(store.list_loras, str(interaction.user.id), guild)

    async def _find(self, interaction: discord.Interaction, name: str) -> dict:
        guild = str(interaction.guild_id) if interaction.guild_id else None
        return await self.db.call(
            store.find_lora, name, user_id=str(interaction.user.id), guild_id=guild
        )

    async def _own(self, interaction: discord.Interaction, name: str) -> dict:
        """The member's own LoRA of that name (admins may also act on the library's)."""
        row = await self._find(interaction, name)
        if row["scope"] != "own" and not (row["scope"] == "server" and self._admin(interaction)):
            raise UserError(f"LoRA '{row['name']}' is not yours; only its owner can change it")
        return row

    def _admin(self, interaction: discord.Interaction) -> bool:
        return self.services.is_admin(interaction)

    async def _change(
        self, interaction: discord.Interaction, fn: Any, row: dict, *args: Any
    ) -> Any:
        """``fn(db, row id, *args)`` on the member's LoRA; the store checks the owner again."""
        by_user, admin = str(interaction.user.id), self._admin(interaction)
        return await self.db.call(fn, row["id"], *args, by_user=by_user, admin=admin)

    async def name_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        rows = await self._usable(interaction)
        typed = current.lower()
        names = [r["name"] for r in rows if typed in r["name"].lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    # -- commands -------------------------------------------------------------------------

    @lora.command(name="list")
    async def list_(self, interaction: discord.Interaction) -> None:
        """List the LoRAs you can use: yours, shared ones, and the server library."""
        rows = await self._usable(interaction)
        if not rows:
            await interaction.response.send_message(
                "You have no LoRAs yet. Train one with /train; server LoRAs appear here too.",
                ephemeral=True,
            )
            return
        lines = [
            f"• **{r['name']}** — {SCOPE_LABEL[r['scope']]}"
            + (", shared" if r["scope"] == "own" and r["shared"] else "")
            + (f", {r['method']}" if r.get("method") else "")
            + (f", trigger `{r['token']}`" if r.get("token") else "")
            for r in rows
        ]
        text = "Use one with `<lora:NAME:0.8>` in a prompt.\n" + "\n".join(lines)
        await interaction.response.send_message(truncate(text, 1900), ephemeral=True)

    @lora.command(name="info")
    @app_commands.describe(name="the LoRA's name")
    @app_commands.autocomplete(name=name_autocomplete)
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        """Show a LoRA's details and validation figures."""
        row = await self._find(interaction, name)
        created = datetime.fromtimestamp(row["created_at"], tz=timezone.utc)
        lines = [
            f"**{row['name']}** ({SCOPE_LABEL[row['scope']]})",
            f"Method: {row.get('method') or 'lora'}; base model: {row.get('base_model') or '?'}",
            f"Trigger word: `{row['token']}`" if row.get("token") else "",
            f"Size: {row['size_bytes'] / 2**20:.1f} MB; sha256 `{(row.get('sha256') or '')[:12]}`",
            f"Created: {created:%Y-%m-%d %H:%M} UTC; shared: {'yes' if row['shared'] else 'no'}",
            validation_summary(row.get("metrics") or {}) if row.get("metrics") else "",
            f"Use: `<lora:{row['name']}:0.8>`",
        ]
        text = "\n".join(line for line in lines if line)
        await interaction.response.send_message(text, ephemeral=True)

    @lora.command(name="rename")
    @app_commands.describe(name="the LoRA to rename", new_name="its new name")
    @app_commands.autocomplete(name=name_autocomplete)
    async def rename(
        self,
        interaction: discord.Interaction,
        name: str,
        new_name: app_commands.Range[str, 1, 40],
    ) -> None:
        """Rename one of your LoRAs."""
        row = await self._own(interaction, name)
        await self._change(interaction, store.rename_lora, row, new_name)
        await interaction.response.send_message(
            f"Renamed '{row['name']}' to '{new_name}': use `<lora:{new_name}:0.8>`.",
            ephemeral=True,
        )

    @lora.command(name="share")
    @app_commands.describe(name="your LoRA", shared="True: everyone here may use it")
    @app_commands.autocomplete(name=name_autocomplete)
    async def share(self, interaction: discord.Interaction, name: str, shared: bool) -> None:
        """Share one of your LoRAs with this server, or make it private again."""
        row = await self._own(interaction, name)
        await self._change(interaction, store.set_lora_shared, row, shared)
        state = "shared with this server" if shared else "private again"
        await interaction.response.send_message(f"'{row['name']}' is {state}.", ephemeral=True)

    @lora.command(name="delete")
    @app_commands.describe(name="your LoRA to delete (for good)")
    @app_commands.autocomplete(name=name_autocomplete)
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        """Delete one of your LoRAs and its file."""
        row = await self._own(interaction, name)
        deleted = await self._change(interaction, store.delete_lora, row)
        await asyncio.to_thread(self._delete_files, deleted)
        await interaction.response.send_message(f"Deleted '{row['name']}'.", ephemeral=True)

    def _delete_files(self, deleted: dict) -> None:
        for sha in deleted.get("unused_blobs", []):
            self.blobs.delete(sha)

    @lora.command(name="export")
    @app_commands.describe(name="the LoRA to download")
    @app_commands.autocomplete(name=name_autocomplete)
    async def export(self, interaction: discord.Interaction, name: str) -> None:
        """Download a LoRA's .safetensors (loads in AUTOMATIC1111, ComfyUI and diffusers)."""
        row = await self._find(interaction, name)
        if row["scope"] == "server" and not self._admin(interaction):
            raise UserError("server library LoRAs can only be exported by an admin")
        await interaction.response.defer(ephemeral=True, thinking=True)
        limit = interaction.filesize_limit
        if row["size_bytes"] > limit:
            raise UserError(
                f"'{row['name']}' is {row['size_bytes'] / 2**20:.1f} MB; this server's upload "
                f"limit is {limit / 2**20:.0f} MB, so it cannot be attached"
            )
        data = await asyncio.to_thread(self.blobs.get, row["sha256"])
        await interaction.followup.send(
            f"`{row['name']}.safetensors` (kohya format; trigger word `{row.get('token') or '-'}`)",
            file=discord.File(io.BytesIO(data), f"{row['name']}.safetensors"),
            ephemeral=True,
        )


async def setup(bot) -> None:
    await bot.add_cog(LoraCog(bot, bot.services))
