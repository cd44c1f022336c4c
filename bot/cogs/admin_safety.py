"""`/admin settings|allow|quota|audit`, `/admin filter add|remove|list` and
`/admin lora add|remove|list|promote`: what a public server's admins control.

These are subcommands of the one `/admin` group; `build()` makes the group and the
`SafetyAdmin` mixin of the Admin cog (`bot.cogs.admin`). Every change is effective at
once (settings are read per command) and written to the audit log (`/admin audit`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any, Literal

import discord
from discord import app_commands

from bot import store
from bot.errors import UserError
from bot.photo_helper.work import inspect_lora
from bot.services.guild_settings import PARSERS, describe, effective, parse_setting
from bot.services.prompt_filter import check_pattern, normalise_word
from bot.views.render import truncate

QUOTA_HELP = "-1 removes the limit set here; 0 = unlimited"


def _setting_choices(current: str) -> list[app_commands.Choice[str]]:
    typed = current.lower()
    return [app_commands.Choice(name=k, value=k) for k in PARSERS if typed in k][:25]


def build() -> tuple[app_commands.Group, type]:
    """A fresh `/admin` group and the mixin whose commands hang off it. Called by
    `bot.cogs.admin` each time that extension loads (a reload, a second bot in one
    process): a group's commands are registered when the class body runs."""
    ADMIN = app_commands.Group(
        name="admin",
        description="Server admin: settings, filters, roles, quotas, the LoRA library, the queue",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )

    class SafetyAdmin:
        """Mixin for the Admin cog (which provides `bot` and `_require_admin`)."""

        filter_group = app_commands.Group(
            name="filter", description="Words and regexes refused in prompts", parent=ADMIN
        )
        lora_group = app_commands.Group(
            name="lora", description="The server's LoRA library", parent=ADMIN
        )

        async def _audit(self, interaction: discord.Interaction, action: str, detail: str) -> None:
            await self.db.call(  # type: ignore[attr-defined]
                store.audit, interaction.guild_id, str(interaction.user.id), action, detail
            )

        async def _answer(self, interaction: discord.Interaction, text: str) -> None:
            if interaction.response.is_done():
                await interaction.followup.send(truncate(text, 1900), ephemeral=True)
            else:
                await interaction.response.send_message(truncate(text, 1900), ephemeral=True)

        # -- settings -----------------------------------------------------------------------------

        async def _setting_autocomplete(
            self, interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            return _setting_choices(current)

        @ADMIN.command(name="settings")
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
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            if key is None or value is None:
                current = await services.safety.settings(interaction.guild_id)
                text = describe(services.config, current)
                if key is not None:
                    parse_setting(services.config, key, "default")  # unknown keys are named
                    text = "\n".join(line for line in text.splitlines() if f"`{key}`" in line)
                await self._answer(interaction, "**This server's settings**\n" + text)
                return
            parsed = parse_setting(services.config, key, value)
            if parsed is not None and key.startswith("limits."):
                _check_within_config(services.config, key, parsed)
            overrides = await services.db.call(
                store.set_guild_setting, interaction.guild_id, key, parsed
            )
            effective(services.config, overrides)  # must still make sense
            shown = "the default" if parsed is None else f"`{parsed}`"
            await self._audit(interaction, "settings", f"{key} = {shown}")
            await self._answer(interaction, f"`{key}` is now {shown} on this server.")

        # -- role gates and quotas ----------------------------------------------------------------

        @ADMIN.command(name="allow")
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
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            command = command.strip().lstrip("/").split()[0].lower() if command.strip() else ""
            tree = self.bot.tree  # type: ignore[attr-defined]
            names = {c.name for c in tree.get_commands()}
            if command not in names:
                raise UserError(f"there is no /{command}; commands: {', '.join(sorted(names))}")
            if command == "admin":
                raise UserError("/admin is for admins already (Manage Server)")
            roles = await services.db.call(
                store.allow_role, interaction.guild_id, command, str(role.id), allowed
            )
            await self._audit(
                interaction, "allow", f"/{command} {'+' if allowed else '-'}@{role.name}"
            )
            if roles:
                who = ", ".join(
                    (
                        interaction.guild.get_role(int(r)).name
                        if interaction.guild.get_role(int(r))
                        else r
                    )  # fmt: skip
                    for r in sorted(roles)
                )
                text = f"/{command} is now for: {who} (and admins)."
            else:
                text = f"/{command} is open to everyone again."
            await self._answer(interaction, text)

        @ADMIN.command(name="quota")
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
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            kind = "role" if isinstance(target, discord.Role) else "member"
            given = {
                "images_per_day": images_per_day,
                "gpu_seconds_per_day": gpu_seconds_per_day,
                "trainings_per_week": trainings_per_week,
            }
            changes = {k: (None if v == -1 else v) for k, v in given.items() if v is not None}
            key = f"{kind}:{target.id}"
            if changes:
                current = await services.db.call(
                    store.set_quota, interaction.guild_id, key, changes
                )
                detail = ", ".join(f"{k}={v}" for k, v in changes.items())
                await self._audit(interaction, "quota", f"{kind} {target.name}: {detail}")
            else:
                current = (await services.db.call(store.quotas, interaction.guild_id)).get(key, {})
            shown = ", ".join(
                f"{k.replace('_', ' ')}: {'server default' if v is None else v or 'unlimited'}"
                for k, v in {**dict.fromkeys(given), **current}.items()
            )
            await self._answer(interaction, f"Quotas of {target.mention}: {shown}.")

        # -- prompt filters -----------------------------------------------------------------------

        @filter_group.command(name="add")
        @app_commands.describe(
            kind="word: a word or phrase (spacing, look-alike letters and accents are folded); "
            "regex: a regular expression on the folded prompt",
            pattern="the word, phrase or regular expression",
        )
        async def filter_add(
            self,
            interaction: discord.Interaction,
            kind: Literal["word", "regex"],
            pattern: app_commands.Range[str, 1, 200],
        ) -> None:
            """Refuse prompts (and LoRA or training names) containing a word or matching a regex."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            stored = normalise_word(pattern) if kind == "word" else check_pattern(pattern)
            await self.db.call(  # type: ignore[attr-defined]
                store.add_filter, interaction.guild_id, kind, stored, str(interaction.user.id)
            )
            await self._audit(interaction, "filter add", f"{kind} {stored!r}")
            await self._answer(interaction, f"Added the {kind} filter `{stored}`.")

        @filter_group.command(name="remove")
        @app_commands.describe(kind="word or regex", pattern="as /admin filter list shows it")
        async def filter_remove(
            self,
            interaction: discord.Interaction,
            kind: Literal["word", "regex"],
            pattern: app_commands.Range[str, 1, 200],
        ) -> None:
            """Take a filter off the list."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            stored = normalise_word(pattern) if kind == "word" else pattern
            await self.db.call(  # type: ignore[attr-defined]
                store.remove_filter, interaction.guild_id, kind, stored
            )
            await self._audit(interaction, "filter remove", f"{kind} {stored!r}")
            await self._answer(interaction, f"Removed the {kind} filter `{stored}`.")

        @filter_group.command(name="list")
        async def filter_list(self, interaction: discord.Interaction) -> None:
            """This server's prompt filters."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            rows = await self.db.call(store.filters, interaction.guild_id)  # type: ignore[attr-defined]
            if not rows:
                await self._answer(interaction, "No prompt filters on this server.")
                return
            lines = [f"• {r['kind']}: `{r['pattern']}`" for r in rows]
            await self._answer(interaction, f"{len(rows)} filter(s):\n" + "\n".join(lines))

        # -- the LoRA library ----------------------------------------------------------------------

        @lora_group.command(name="add")
        @app_commands.describe(
            file="a LoRA .safetensors (kohya, diffusers, LyCORIS)", name="its name"
        )
        async def lora_add(
            self,
            interaction: discord.Interaction,
            file: discord.Attachment,
            name: app_commands.Range[str, 1, 40],
        ) -> None:
            """Add a LoRA file to this server's library: everyone here can use it."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            await interaction.response.defer(ephemeral=True, thinking=True)
            if not file.filename.lower().endswith(".safetensors"):
                raise UserError(f"{file.filename} is not a .safetensors file")
            limit_mb = services.config.loras.max_file_mb
            if file.size > limit_mb * 2**20:
                raise UserError(
                    f"{file.filename} is {file.size / 2**20:.1f} MB; the limit is {limit_mb} MB"
                )
            (await services.safety.filters(interaction.guild_id)).check(
                "LoRA name", name, markup=False
            )
            data = await _download_lora(file, services.config)
            info = await services.face_probe.run(inspect_lora, data, name)
            if "error" in info:
                raise UserError(info["error"])
            sha = await asyncio.to_thread(services.blobs.put, data, ".safetensors")
            row = await services.db.call(
                store.add_lora,
                owner_id=None,
                guild_id=str(interaction.guild_id),
                name=name,
                method={"loha": "loha", "lokr": "lokr"}.get(info["format"], "lora"),
                base_model=info["family"],
                sha256=sha,
                size_bytes=len(data),
                shared=True,
            )
            family = info["family"] or "unknown family"
            await self._audit(interaction, "lora add", f"{name} ({info['format']}, {family})")
            await self._answer(
                interaction,
                f"Added **{row['name']}** to the library ({info['format']}, {family}, "
                f"{len(data) / 2**20:.1f} MB): use `<lora:{row['name']}:0.8>`.",
            )

        @lora_group.command(name="remove")
        @app_commands.describe(name="the library LoRA")
        async def lora_remove(self, interaction: discord.Interaction, name: str) -> None:
            """Take a LoRA out of this server's library."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            row = await self._library_lora(interaction, name)
            deleted = await services.db.call(
                store.delete_lora, row["id"], by_user=str(interaction.user.id), admin=True
            )
            for sha in deleted.get("unused_blobs", []):
                await asyncio.to_thread(services.blobs.delete, sha)
            await self._audit(interaction, "lora remove", row["name"])
            await self._answer(interaction, f"Removed **{row['name']}** from the library.")

        @lora_group.command(name="list")
        async def lora_list(self, interaction: discord.Interaction) -> None:
            """This server's LoRA library."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            rows = [r for r in await self._usable(interaction) if r["scope"] == "server"]
            if not rows:
                await self._answer(interaction, "The library is empty: /admin lora add adds one.")
                return
            lines = [
                f"• **{r['name']}** — {r.get('method') or 'lora'}, {r.get('base_model') or '?'}, "
                f"{r['size_bytes'] / 2**20:.1f} MB"
                for r in rows
            ]
            await self._answer(
                interaction, f"{len(rows)} LoRA(s) in the library:\n" + "\n".join(lines)
            )

        @lora_group.command(name="promote")
        @app_commands.describe(
            name="a member's LoRA shared on this server", new_name="its library name"
        )
        async def lora_promote(
            self,
            interaction: discord.Interaction,
            name: str,
            new_name: app_commands.Range[str, 1, 40] | None = None,
        ) -> None:
            """Copy a member's shared LoRA into the library (it stays if they delete theirs)."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            services = self.services  # type: ignore[attr-defined]
            rows = await self._usable(interaction)
            found = [
                r
                for r in rows
                if r["name"].lower() == name.lower()
                and (r["scope"] == "shared" or (r["scope"] == "own" and r["shared"]))
            ]
            if not found:
                raise UserError(
                    f"no LoRA '{name}' is shared on this server; its owner can /lora share it"
                )
            source = found[0]
            row = await services.db.call(
                store.add_lora,
                owner_id=None,
                guild_id=str(interaction.guild_id),
                name=new_name or source["name"],
                token=source.get("token"),
                method=source.get("method") or "lora",
                base_model=source.get("base_model"),
                sha256=source["sha256"],
                size_bytes=source["size_bytes"],
                metrics=source.get("metrics") or {},
                shared=True,
            )
            await self._audit(
                interaction,
                "lora promote",
                f"{source['name']} of <@{source['owner_id']}> → {row['name']}",
            )
            await self._answer(interaction, f"**{row['name']}** is now in the server library.")

        async def _usable(self, interaction: discord.Interaction) -> list[dict]:
            return await self.db.call(  # type: ignore[attr-defined]
                store.list_loras, str(interaction.user.id), str(interaction.guild_id)
            )

        async def _library_lora(self, interaction: discord.Interaction, name: str) -> dict:
            for row in await self._usable(interaction):
                if row["scope"] == "server" and row["name"].lower() == name.lower():
                    return row
            raise UserError(
                f"no LoRA '{name}' in this server's library; /admin lora list shows them"
            )

        # -- audit --------------------------------------------------------------------------------

        @ADMIN.command(name="audit")
        async def audit(self, interaction: discord.Interaction) -> None:
            """The last 20 admin actions on this server."""
            self._require_admin(interaction)  # type: ignore[attr-defined]
            rows = await self.db.call(store.audit_log, interaction.guild_id)  # type: ignore[attr-defined]
            if not rows:
                await self._answer(interaction, "No admin actions recorded yet.")
                return
            lines = [
                f"`{datetime.fromtimestamp(r['created_at'], tz=timezone.utc):%m-%d %H:%M}` "
                f"<@{r['user_id']}> **{r['action']}** {r['detail']}"
                for r in rows
            ]
            await self._answer(
                interaction, "Recent admin actions (newest first):\n" + "\n".join(lines)
            )

    return ADMIN, SafetyAdmin


def _check_within_config(config: Any, key: str, value: Any) -> None:
    """A server may tighten the operator's limits, never loosen them."""
    name = key.split(".", 1)[1]
    ceiling = getattr(config.limits, name)
    looser = value < ceiling if name.startswith("min_") else value > ceiling
    if looser:
        raise UserError(
            f"`{key}` can be at most {ceiling} here (config.toml's limit)"
            if not name.startswith("min_")
            else f"`{key}` can be at least {ceiling} here (config.toml's limit)"
        )


async def _download_lora(file: discord.Attachment, config: Any) -> bytes:
    try:
        return await file.read()
    except (discord.HTTPException, asyncio.TimeoutError):
        raise UserError(f"could not download {file.filename}; try attaching it again") from None
