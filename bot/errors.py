"""Errors in three layers, as in RoboDanny.

1. Domain errors carry a message written for the member (JobError, StoreError,
   ImageInputError, BlobError, and :class:`UserError` for the bot's own checks).
   :func:`reply_for` turns one into a short ephemeral reply.
2. Each cog's ``cog_app_command_error`` (see :class:`bot.cogs.SDCog`) answers those
   and marks the interaction handled.
3. :func:`report_unexpected` — called from the tree's ``on_error`` and from button
   callbacks — logs the traceback with an error id (and the job id, when there is
   one) and tells the member that something went wrong, with the id. The bot keeps
   serving.
"""

from __future__ import annotations

import logging
import secrets

import discord
from discord import app_commands

from bot.plumbing.message_edits import http_error_text
from bot.store import StoreError
from pipeline.contract.blobs import BlobError
from pipeline.contract.config import ConfigError
from pipeline.contract.images import ImageInputError
from pipeline.contract.jobs import JobError

log = logging.getLogger("sdbot.errors")

HANDLED = "sdbot_error_handled"  # key in interaction.extras once a reply was sent


# What a command run in a DM gets (docs/DECISIONS.md, "Commands in DMs").
DM_ANSWER = (
    "sdbot's commands are turned off in DMs here: run them in a channel, thread or "
    "forum post of a server that has the bot."
)


class UserError(Exception):
    """A request the bot refuses; the message is shown to the member as is."""


# Every exception whose message was written for the member.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    JobError,
    StoreError,
    ImageInputError,
    BlobError,
    ConfigError,
)


def unwrap(error: BaseException) -> BaseException:
    """The exception a command raised, without discord.py's wrappers."""
    while isinstance(error, (app_commands.CommandInvokeError, app_commands.TransformerError)):
        original = getattr(error, "original", None) or error.__cause__
        if original is None:
            break
        error = original
    return error


def reply_for(error: BaseException) -> str | None:
    """The member-facing message for an expected error, or None for a bug."""
    error = unwrap(error)
    if isinstance(error, USER_ERRORS):
        return first_upper(str(error))
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.CheckFailure):
        return str(error) or "You can't use this command here."
    if isinstance(error, app_commands.TransformerError):
        return f"{error.value!r} isn't a valid value for this option."
    return None


def first_upper(text: str) -> str:
    return text[:1].upper() + text[1:] if text else "That didn't work."


async def tell(interaction: discord.Interaction, text: str) -> None:
    """An ephemeral answer, whether or not the interaction was already answered."""
    text = text[:2000]
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        # The token expired or Discord is down: nothing left to tell the member through.
        log.warning(
            "could not deliver an error message for interaction %s: %s",
            interaction.id,
            http_error_text(exc),
        )


async def answer_expected(interaction: discord.Interaction, error: BaseException) -> bool:
    """Reply to a domain error; False when the error is a bug for :func:`report_unexpected`."""
    text = reply_for(error)
    if text is None:
        return False
    interaction.extras[HANDLED] = True
    await tell(interaction, text)
    return True


async def report_unexpected(
    interaction: discord.Interaction, error: BaseException, *, job_id: str | None = None
) -> str:
    """Log the traceback under a fresh error id and tell the member; returns the id."""
    error = unwrap(error)
    error_id = secrets.token_hex(4)
    what = interaction.command.qualified_name if interaction.command else _custom_id(interaction)
    job = job_id or interaction.extras.get("job_id")
    log.error(
        "error %s in %s (user %s, job %s)",
        error_id,
        what,
        interaction.user.id,
        job or "-",
        exc_info=error,
    )
    interaction.extras[HANDLED] = True
    await tell(
        interaction,
        f"Something went wrong on our side (error id `{error_id}`). Try again; if it keeps "
        "happening, give the id to a server admin.",
    )
    return error_id


async def answer_error(
    interaction: discord.Interaction, error: BaseException, *, job_id: str | None = None
) -> None:
    """Layer 1 or 3, whichever fits: what button callbacks use."""
    if not await answer_expected(interaction, error):
        await report_unexpected(interaction, error, job_id=job_id)


def _custom_id(interaction: discord.Interaction) -> str:
    data = interaction.data or {}
    return str(data.get("custom_id") or data.get("name") or "interaction")


class SDCommandTree(app_commands.CommandTree):
    """The tree's ``on_error``: the last layer, for whatever no cog answered."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if interaction.extras.get(HANDLED):
            return
        await answer_error(interaction, error)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """While the bot shuts down its queue and database are closing: say so instead of
        failing half-way through a command."""
        if getattr(interaction.client, "stopping", False):
            await interaction.response.send_message(
                "sdbot is restarting; try again in a minute.", ephemeral=True
            )
            return False
        if interaction.guild_id is None and interaction.type is not discord.InteractionType.ping:
            # DMs follow config.toml's policy unless [safety] dms = "refuse" (then Discord is
            # not offered the commands there, and a stale one gets this line).
            config = getattr(interaction.client, "config", None)
            if config is None or config.safety.dms == "refuse":
                if interaction.type is discord.InteractionType.autocomplete:
                    await interaction.response.autocomplete([])
                else:
                    await interaction.response.send_message(DM_ANSWER, ephemeral=True)
                return False
        if interaction.type is discord.InteractionType.autocomplete:
            return True  # typing is not a command: no rate limit, no answer but choices
        services = getattr(interaction.client, "services", None)
        safety = getattr(services, "safety", None)  # rate limits and role gates
        refusal = await safety.check_command(interaction) if safety is not None else None
        if refusal:
            await interaction.response.send_message(refusal, ephemeral=True)
            return False
        return True
