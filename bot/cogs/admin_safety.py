"""What a public server's admins control, as `/admin`'s command groups:
`/admin filter add|remove|list` (`FilterGroup`) and `/admin lora add|remove|list|promote`
(`LibraryGroup`), on `AdminOnly`, the base every `/admin` group shares (the admin check,
the audit log, the ephemeral answer). `/admin settings|allow|quota|audit` are commands of
the `/admin` group itself (`bot.cogs.admin.AdminGroup`), with their helpers here.

Groups are classes, as in discord.py's and Red-DiscordBot's cogs: each instance holds the
services it needs and its commands are methods; the Admin cog makes one `/admin` per bot.
Every change is effective at once (settings are read per command) and written to the
audit log (`/admin audit`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands

from bot import store
from bot.errors import UserError
from bot.photo_helper.work import inspect_lora
from bot.services.guild_settings import PARSERS
from bot.services.prompt_filter import check_pattern, normalise_word
from bot.views.render import truncate

if TYPE_CHECKING:
    from bot.services import Services

QUOTA_HELP = "-1 removes the limit set here; 0 = unlimited"
ADMINS_ONLY = "Only server admins (Manage Server) can use /admin"
FilterKind = Literal["word", "regex"]
Pattern = app_commands.Range[str, 1, 200]


class AdminOnly(app_commands.Group):
    """What every `/admin` group shares. Discord hides `/admin` from members without
    Manage Server (`default_permissions`), but a server can override that, so each
    command is checked again here (`Services.is_admin`: Manage Server, Administrator, or
    `discord.admin_role`). Errors go to the tree's handler, which answers them."""

    def __init__(self, services: Services, *, parent: app_commands.Group | None = None) -> None:
        super().__init__(parent=parent)
        self.services = services

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # discord.py asks the group that holds a command (its binding) before running it.
        if not self.services.is_admin(interaction):
            raise app_commands.CheckFailure(ADMINS_ONLY)
        return True

    async def done(
        self, interaction: discord.Interaction, action: str, detail: str, answer: str
    ) -> None:
        """Record an admin action in the audit log and tell the admin what it did."""
        await self.services.db.call(
            store.audit, interaction.guild_id, str(interaction.user.id), action, detail
        )
        await self.answer(interaction, answer)

    async def answer_rows(
        self,
        interaction: discord.Interaction,
        rows: list[dict],
        empty: str,
        heading: str,
        line: Callable[[dict], str],
    ) -> None:
        """A list (filters, the library, the audit log): a heading and one line a row."""
        if not rows:
            await self.answer(interaction, empty)
            return
        await self.answer(interaction, heading + "\n" + "\n".join(line(r) for r in rows))

    async def answer(self, interaction: discord.Interaction, text: str) -> None:
        if interaction.response.is_done():
            await interaction.followup.send(truncate(text, 1900), ephemeral=True)
        else:
            await interaction.response.send_message(truncate(text, 1900), ephemeral=True)


class FilterGroup(AdminOnly, name="filter", description="Words and regexes refused in prompts"):
    @app_commands.command(name="add")
    @app_commands.describe(
        kind="word: a word or phrase (spacing, look-alike letters and accents are folded); "
        "regex: a regular expression on the folded prompt",
        pattern="the word, phrase or regular expression",
    )
    async def add(self, interaction: discord.Interaction, kind: FilterKind, pattern: Pattern):
        """Refuse prompts (and LoRA or training names) containing a word or matching a regex."""
        stored = normalise_word(pattern) if kind == "word" else check_pattern(pattern)
        by = str(interaction.user.id)
        await self.services.db.call(store.add_filter, interaction.guild_id, kind, stored, by)
        await self._changed(interaction, "add", kind, stored)

    @app_commands.command(name="remove")
    @app_commands.describe(kind="word or regex", pattern="as /admin filter list shows it")
    async def remove(self, interaction: discord.Interaction, kind: FilterKind, pattern: Pattern):
        """Take a filter off the list."""
        stored = normalise_word(pattern) if kind == "word" else pattern
        await self.services.db.call(store.remove_filter, interaction.guild_id, kind, stored)
        await self._changed(interaction, "remove", kind, stored)

    async def _changed(
        self, interaction: discord.Interaction, verb: str, kind: str, stored: str
    ) -> None:
        said = {"add": "Added", "remove": "Removed"}[verb]
        answer = f"{said} the {kind} filter `{stored}`."
        await self.done(interaction, f"filter {verb}", f"{kind} {stored!r}", answer)

    @app_commands.command(name="list")
    async def list_filters(self, interaction: discord.Interaction) -> None:
        """This server's prompt filters."""
        rows = await self.services.db.call(store.filters, interaction.guild_id)
        heading = f"{len(rows)} filter(s):"
        await self.answer_rows(interaction, rows, NO_FILTERS, heading, _filter_line)


class LibraryGroup(AdminOnly, name="lora", description="The server's LoRA library"):
    @app_commands.command(name="add")
    @app_commands.describe(file="a LoRA .safetensors (kohya, diffusers, LyCORIS)", name="its name")
    async def add(
        self,
        interaction: discord.Interaction,
        file: discord.Attachment,
        name: app_commands.Range[str, 1, 40],
    ) -> None:
        """Add a LoRA file to this server's library: everyone here can use it."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        data, info = await self._checked_file(interaction, file, name)
        sha = await asyncio.to_thread(self.services.blobs.put, data, ".safetensors")
        row = await self._add(
            interaction,
            name=name,
            method={"loha": "loha", "lokr": "lokr"}.get(info["format"], "lora"),
            base_model=info["family"],
            sha256=sha,
            size_bytes=len(data),
        )
        family = info["family"] or "unknown family"
        await self.done(
            interaction,
            "lora add",
            f"{name} ({info['format']}, {family})",
            f"Added **{row['name']}** to the library ({info['format']}, {family}, "
            f"{len(data) / 2**20:.1f} MB): use `<lora:{row['name']}:0.8>`.",
        )

    async def _checked_file(
        self, interaction: discord.Interaction, file: discord.Attachment, name: str
    ) -> tuple[bytes, dict[str, Any]]:
        """The attachment's bytes and format, or the one line saying what is wrong."""
        if not file.filename.lower().endswith(".safetensors"):
            raise UserError(f"{file.filename} is not a .safetensors file")
        limit_mb = self.services.config.loras.max_file_mb
        if file.size > limit_mb * 2**20:
            raise UserError(
                f"{file.filename} is {file.size / 2**20:.1f} MB; the limit is {limit_mb} MB"
            )
        filters = await self.services.safety.filters(interaction.guild_id)
        filters.check("LoRA name", name, markup=False)
        data = await _download_lora(file)
        info = await self.services.face_probe.run(inspect_lora, data, name)
        if "error" in info:
            raise UserError(info["error"])
        return data, info

    async def _add(self, interaction: discord.Interaction, **fields: Any) -> dict:
        """A library row (no owner, shared on this server): `add` and `promote` write one."""
        return await self.services.db.call(
            store.add_lora, owner_id=None, guild_id=str(interaction.guild_id), shared=True, **fields
        )

    @app_commands.command(name="remove")
    @app_commands.describe(name="the library LoRA")
    async def remove(self, interaction: discord.Interaction, name: str) -> None:
        """Take a LoRA out of this server's library."""
        row = self._find(await self._usable(interaction), name, _in_library, NOT_IN_LIBRARY)
        deleted = await self.services.db.call(
            store.delete_lora, row["id"], by_user=str(interaction.user.id), admin=True
        )
        for sha in deleted.get("unused_blobs", []):
            await asyncio.to_thread(self.services.blobs.delete, sha)
        answer = f"Removed **{row['name']}** from the library."
        await self.done(interaction, "lora remove", row["name"], answer)

    @app_commands.command(name="list")
    async def list_library(self, interaction: discord.Interaction) -> None:
        """This server's LoRA library."""
        rows = [r for r in await self._usable(interaction) if _in_library(r)]
        heading = f"{len(rows)} LoRA(s) in the library:"
        await self.answer_rows(interaction, rows, EMPTY_LIBRARY, heading, _library_line)

    @app_commands.command(name="promote")
    @app_commands.describe(
        name="a member's LoRA shared on this server", new_name="its library name"
    )
    async def promote(
        self,
        interaction: discord.Interaction,
        name: str,
        new_name: app_commands.Range[str, 1, 40] | None = None,
    ) -> None:
        """Copy a member's shared LoRA into the library (it stays if they delete theirs)."""
        source = self._find(await self._usable(interaction), name, _shared_here, NOT_SHARED)
        row = await self._add(
            interaction,
            name=new_name or source["name"],
            token=source.get("token"),
            method=source.get("method") or "lora",
            base_model=source.get("base_model"),
            sha256=source["sha256"],
            size_bytes=source["size_bytes"],
            metrics=source.get("metrics") or {},
        )
        await self.done(
            interaction,
            "lora promote",
            f"{source['name']} of <@{source['owner_id']}> → {row['name']}",
            f"**{row['name']}** is now in the server library.",
        )

    async def _usable(self, interaction: discord.Interaction) -> list[dict]:
        return await self.services.db.call(
            store.list_loras, str(interaction.user.id), str(interaction.guild_id)
        )

    @staticmethod
    def _find(rows: list[dict], name: str, where: Any, missing: str) -> dict:
        for row in rows:
            if row["name"].lower() == name.lower() and where(row):
                return row
        raise UserError(missing.format(name=name))


NO_FILTERS = "No prompt filters on this server."
EMPTY_LIBRARY = "The library is empty: /admin lora add adds one."
NOT_IN_LIBRARY = "no LoRA '{name}' in this server's library; /admin lora list shows them"
NOT_SHARED = "no LoRA '{name}' is shared on this server; its owner can /lora share it"


def _filter_line(row: dict) -> str:
    return f"• {row['kind']}: `{row['pattern']}`"


def _library_line(row: dict) -> str:
    size_mb = row["size_bytes"] / 2**20
    method, family = row.get("method") or "lora", row.get("base_model") or "?"
    return f"• **{row['name']}** — {method}, {family}, {size_mb:.1f} MB"


def _in_library(row: dict) -> bool:
    return row["scope"] == "server"


def _shared_here(row: dict) -> bool:
    return row["scope"] == "shared" or (row["scope"] == "own" and bool(row["shared"]))


async def _download_lora(file: discord.Attachment) -> bytes:
    try:
        return await file.read()
    except (discord.HTTPException, asyncio.TimeoutError):
        raise UserError(f"could not download {file.filename}; try attaching it again") from None


# -- helpers of /admin settings and /admin quota (commands of AdminGroup) -------------------


def setting_choices(current: str) -> list[app_commands.Choice[str]]:
    typed = current.lower()
    return [app_commands.Choice(name=k, value=k) for k in PARSERS if typed in k][:25]


def check_within_config(config: Any, key: str, value: Any) -> None:
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


def quota_text(given: dict[str, Any], current: dict[str, Any]) -> str:
    """Each quota of a member or role: its own value, the server default, or unlimited."""
    return ", ".join(
        f"{k.replace('_', ' ')}: {'server default' if v is None else v or 'unlimited'}"
        for k, v in {**dict.fromkeys(given), **current}.items()
    )
