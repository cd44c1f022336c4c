"""A member's own things: /settings, /queue, /cancel and /forget.

All answers are ephemeral: nobody else needs to see someone's settings or queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import discord
from discord import app_commands

from bot import store
from bot.app import SDBot
from bot.cogs import SDCog
from bot.cogs.options import parse_size, sampler_choices, size_choices
from bot.errors import UserError
from bot.plumbing.message_edits import http_error_text
from bot.views import render
from bot.views.buttons import forget_view
from pipeline.contract.blobs import BlobStore
from pipeline.contract.jobs import GenerateSpec
from pipeline.contract.samplers import resolve

log = logging.getLogger("sdbot")

Range = app_commands.Range
ACTIVE = ("queued", "running")


class Member(SDCog):
    """Your defaults, your queue, and deleting your data."""

    @app_commands.command()
    @app_commands.describe(
        sampler="Your default sampler",
        steps="Your default number of steps",
        cfg="Your default CFG scale",
        size="Your default size, e.g. 768x512",
        negative="Your default negative prompt",
        reset="Forget all your defaults and use the server's",
    )
    @app_commands.autocomplete(sampler=sampler_choices, size=size_choices)
    async def settings(
        self,
        interaction: discord.Interaction,
        sampler: str | None = None,
        steps: Range[int, 1, 150] | None = None,
        cfg: Range[float, 0.0, 30.0] | None = None,
        size: str | None = None,
        negative: Range[str, 0, 6000] | None = None,
        reset: bool = False,
    ) -> None:
        """Show or change your defaults for new images."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        user_id = str(interaction.user.id)
        if reset:
            await self.db.call(store.reset_settings, user_id)
        changes = self._checked_changes(sampler, steps, cfg, size, negative)
        if changes:
            await self.db.call(store.update_settings, user_id, **changes)
        mine = await self.db.call(store.get_settings, user_id)
        head = "Saved. " if changes or reset else ""
        await interaction.followup.send(head + self._describe(mine), ephemeral=True)

    def _checked_changes(
        self,
        sampler: str | None,
        steps: int | None,
        cfg: float | None,
        size: str | None,
        negative: str | None,
    ) -> dict:
        """Only the given options, each validated against the server's limits."""
        limits = self.config.limits
        changes: dict = {}
        if sampler is not None:
            resolve(sampler)
            changes["sampler"] = sampler
        if steps is not None:
            changes["steps"] = steps
        if cfg is not None:
            changes["cfg_scale"] = cfg
        if size is not None:
            changes["width"], changes["height"] = parse_size(size, limits)
        if negative is not None:
            changes["negative_prompt"] = negative
        # The same checks a job gets, so a saved default can never make jobs fail.
        probe = {k: v for k, v in changes.items() if k != "sampler"}
        GenerateSpec(prompt="", **probe).check(limits)
        return changes

    def _describe(self, mine: dict) -> str:
        d = self.config.defaults
        rows = [
            ("Sampler", mine.get("sampler"), f"{d.sampler} {d.schedule}".strip()),
            ("Steps", mine.get("steps"), d.steps),
            ("CFG scale", mine.get("cfg_scale"), d.cfg_scale),
            ("Size", _size(mine), f"{d.width}x{d.height}"),
            ("Negative prompt", mine.get("negative_prompt"), d.negative_prompt or "(none)"),
        ]
        lines = [
            f"**{name}**: {render.truncate(str(own), 300)}"
            if own is not None
            else f"**{name}**: {render.truncate(str(server), 300)} *(server default)*"
            for name, own, server in rows
        ]
        note = "\nA model with defaults of its own (see /models) uses them instead."
        return "Your defaults for new images:\n" + "\n".join(lines) + note

    @app_commands.command()
    async def queue(self, interaction: discord.Interaction) -> None:
        """Your recent jobs, with their status and place in the queue."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        user_id = str(interaction.user.id)
        jobs = await self.db.call(store.user_jobs, user_id, limit=10)
        positions = await self.db.call(store.queue_positions)
        quota = await self.services.safety.quota_line(interaction)  # what is left of quotas
        quota = f"\n{quota}" if quota else ""
        if not jobs:
            await interaction.followup.send(
                "You have no jobs yet: try /imagine." + quota, ephemeral=True
            )
            return
        lines = [_job_line(job, positions.get(job["id"])) for job in jobs]
        await interaction.followup.send(
            render.truncate("Your jobs, newest first:\n" + "\n".join(lines) + quota, 2000),
            ephemeral=True,
        )

    @app_commands.command()
    @app_commands.describe(job="Which job (default: your latest queued or running one)")
    async def cancel(self, interaction: discord.Interaction, job: str | None = None) -> None:
        """Cancel one of your queued or running jobs."""
        if job is None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            active = await self.db.call(
                store.user_jobs, str(interaction.user.id), limit=1, statuses=ACTIVE
            )
            if not active:
                raise UserError("you have no queued or running jobs")
            job = active[0]["id"]
        await self.services.jobs.cancel_for(interaction, job.strip())

    @cancel.autocomplete("job")
    async def _cancel_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        jobs = await self.db.call(
            store.user_jobs, str(interaction.user.id), limit=25, statuses=ACTIVE
        )
        typed = current.lower()
        return [
            app_commands.Choice(name=_choice_name(job), value=job["id"])
            for job in jobs
            if typed in job["id"] or typed in job["spec"].get("prompt", "").lower()
        ][:25]

    @app_commands.command()
    async def forget(self, interaction: discord.Interaction) -> None:
        """Delete everything the bot stores about you: jobs, images, settings, LoRAs."""
        await interaction.response.send_message(
            "This deletes **all** your jobs, images, settings and personal LoRAs, and the "
            "bot's messages with your images. It can't be undone.",
            view=forget_view(interaction.user.id),
            ephemeral=True,
        )

    async def forget_member(self, interaction: discord.Interaction, user_id: int) -> None:
        """The confirmation button under /forget."""
        if interaction.user.id != user_id:
            raise UserError("this button is for the member who asked /forget")
        await interaction.response.defer(ephemeral=True, thinking=True)
        uid = str(user_id)
        posted = await self.db.call(store.posted_messages, uid)
        removed = await self.db.call(store.forget_user, uid)
        for job_id in removed["running"]:
            await self.services.pool.cancel(job_id)  # rows are gone; just stop the work
        await asyncio.to_thread(_delete_files, self.blobs, removed["blobs"], removed["paths"])
        deleted = await self._delete_messages(posted)
        await interaction.followup.send(
            f"Done: deleted {removed['jobs']} job(s), {removed['loras']} LoRA(s), "
            f"{len(removed['blobs']) + len(removed['paths'])} file(s) and {deleted} message(s). "
            "The bot no longer stores anything about you.",
            ephemeral=True,
        )

    async def _delete_messages(self, posted: list[tuple[str, str]]) -> int:
        deleted = 0
        for channel_id, message_id in posted:
            channel = self.bot.get_partial_messageable(int(channel_id))
            try:
                await channel.get_partial_message(int(message_id)).delete()
                deleted += 1
            except (discord.NotFound, discord.Forbidden) as exc:  # gone already, or no access
                log.warning("/forget could not delete a message: %s", http_error_text(exc))
        return deleted


def _size(mine: dict) -> str | None:
    if "width" in mine and "height" in mine:
        return f"{mine['width']}x{mine['height']}"
    return None


def _job_line(job: dict, position: int | None) -> str:
    status = job["status"]
    if position:
        status = f"queued, position {position}"
    elif status == "failed" and job.get("error"):
        status = f"failed: {render.truncate(job['error'], 100)}"
    prompt = render.truncate(" ".join(job["spec"].get("prompt", "").split()), 60)
    return f"`{job['id']}` {status} — {prompt or '(no prompt)'}"


def _choice_name(job: dict) -> str:
    prompt = " ".join(job["spec"].get("prompt", "").split())
    return render.truncate(f"{job['id']} · {job['status']} · {prompt}", 100)


def _delete_files(store_: BlobStore, blobs: list[str], paths: list[str]) -> None:
    for sha in blobs:
        store_.delete(sha)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Member(bot, bot.services))
