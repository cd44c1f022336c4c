"""Can the bot deliver here? Checked from the interaction before anything is queued.

Every interaction carries ``app_permissions``: the bot's permissions in the channel
it came from (Discord's interactions docs, "Interaction Object"). A job whose
result could never be posted is refused at once, with the permission named,
instead of running and failing at the end (and again at every restart).

Commands work in server channels, threads and forum posts, and in the bot's DMs
unless `[safety] dms = "refuse"` (see docs/DECISIONS.md, "Commands in DMs").
"""

from __future__ import annotations

import discord

from bot.errors import UserError

THREAD_TYPES = (
    discord.ChannelType.public_thread,
    discord.ChannelType.private_thread,
    discord.ChannelType.news_thread,
)


def in_thread(interaction: discord.Interaction) -> bool:
    channel = interaction.channel
    return getattr(channel, "type", None) in THREAD_TYPES


def missing_post_permissions(interaction: discord.Interaction) -> list[str]:
    """The permissions the bot lacks to post a result here, by their names in Discord's UI."""
    perms = interaction.app_permissions
    send = (
        ("send_messages_in_threads", "Send Messages in Threads")
        if in_thread(interaction)
        else ("send_messages", "Send Messages")
    )
    needed = [
        ("view_channel", "View Channel"),
        send,
        ("attach_files", "Attach Files"),
        ("embed_links", "Embed Links"),
    ]
    return [label for flag, label in needed if not getattr(perms, flag)]


def check_can_deliver(interaction: discord.Interaction) -> None:
    """Raise a UserError naming what is missing when the result could not be posted here."""
    # A DM reaches here only when [safety] dms allows DMs (bot.errors answers the rest);
    # Discord's app_permissions there are the bot's in its DM channel.
    missing = missing_post_permissions(interaction)
    if missing:
        names = " and ".join(f"**{name}**" for name in missing)
        plural = "permissions" if len(missing) > 1 else "permission"
        raise UserError(
            f"I can't post results in this channel: I'm missing the {names} {plural} here. "
            "Ask a server admin to grant it, or run the command in another channel."
        )
