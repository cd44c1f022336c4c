"""Who counts as a server admin for sdbot's admin-only actions."""

from __future__ import annotations

import discord

from pipeline.contract.config import Config


def is_admin(interaction: discord.Interaction, config: Config) -> bool:
    """Manage Server (or Administrator), or the configured admin role."""
    permissions = interaction.permissions
    if permissions.administrator or permissions.manage_guild:
        return True
    role = config.discord.admin_role
    roles = getattr(interaction.user, "roles", [])
    return bool(role) and any(r.name == role for r in roles)
