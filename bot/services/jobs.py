"""The one path every job takes into the queue, and the way out (cancel)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import discord

from bot import store
from bot.plumbing.attachments import Photo, store_photos
from bot.plumbing.permissions import check_can_deliver
from bot.services.access import is_admin
from bot.services.admission import family_questions, photo_questions
from bot.services.database import DbThread, discord_id
from bot.services.dispatcher import Dispatcher
from bot.services.guild_settings import ServerSettings
from bot.services.messages import MessageBoards
from bot.services.safety import SafetyGate
from bot.views import render
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config
from pipeline.contract.jobs import GenerateSpec, JobSpec, TrainSpec, spec_to_dict


class JobService:
    """Submits and cancels members' jobs; each kind's board of messages announces them."""

    def __init__(
        self,
        config: Config,
        db: DbThread,
        blobs: BlobStore,
        dispatcher: Dispatcher,
        boards: MessageBoards,
        safety: SafetyGate,
    ) -> None:
        self.config = config
        self.db = db
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.boards = boards
        self.safety = safety

    async def check_queue_room(self, user_id: int) -> None:
        """Refuse early, before downloading photos, when the member's queue is full
        (`store.enqueue` checks again, atomically)."""
        cap = self.config.queue.max_queued_per_user
        if await self.db.call(store.queued_count, str(user_id)) >= cap:
            raise store.QueueFull(
                f"you already have {cap} jobs queued (the limit is {cap}); "
                "wait for one to finish or /cancel one"
            )

    async def submit(
        self,
        interaction: discord.Interaction,
        spec: JobSpec,
        photos: Sequence[Photo] = (),
        *,
        summary: str = "",
    ) -> dict:
        """Queue a job for the member (the interaction must be deferred) and tell them;
        every kind of job comes this way. ``summary`` opens the answer (/train's
        dataset report).

        The spec is checked here, once, against the server's current settings
        (`bot.services.admission`); only then are the photos stored, so a refused
        request leaves nothing behind.
        """
        check_can_deliver(interaction)  # before anything is stored or queued
        settings = await self.safety.settings_here(interaction)
        spec = await self._checked(interaction, spec, photos, settings)
        if photos:
            await asyncio.to_thread(store_photos, self.blobs, list(photos))
        row = await self.db.call(
            store.enqueue,
            user_id=str(interaction.user.id),
            guild_id=discord_id(interaction.guild_id),
            channel_id=discord_id(interaction.channel_id),
            kind=spec.kind,
            spec=spec_to_dict(spec),
            batch_key=spec.batch_key() if isinstance(spec, GenerateSpec) else "",
            max_attempts=self.config.workers.max_attempts,
            max_queued_per_user=self.config.queue.max_queued_per_user,
        )
        board = self.boards.of(spec.kind)
        board.upload_limits[row["id"]] = interaction.filesize_limit
        await self.safety.after_queue(interaction, row)
        position = await self.db.call(store.queue_position, row["id"])
        await board.announce(row, position)
        self.dispatcher.wake()
        text = render.queued_answer(row["id"], spec, position, self.config.limits, summary)
        await interaction.followup.send(text, ephemeral=True)
        return row

    async def _checked(
        self,
        interaction: discord.Interaction,
        spec: JobSpec,
        photos: Sequence[Photo],
        settings: ServerSettings,
    ) -> JobSpec:
        """The one check of a spec (see `bot.services.admission`); nothing after it
        re-checks what it checked."""
        if isinstance(spec, TrainSpec):
            spec.check(settings.limits)  # its photos and captions: check_training_set
            await family_questions(self.config, spec)
            return spec
        spec = spec.with_seed()
        spec = await self.safety.before_generate(interaction, spec, photos, settings)
        await family_questions(self.config, spec)
        await photo_questions(spec, settings.limits, self.safety.face_probe, photos, self.blobs)
        return spec

    async def cancel_for(self, interaction: discord.Interaction, job_id: str) -> None:
        """Cancel for the member (their own jobs; admins: any)."""
        if not interaction.response.is_done():  # /cancel without a job deferred already
            await interaction.response.defer(ephemeral=True, thinking=True)
        previous = await self.dispatcher.cancel(
            job_id, str(interaction.user.id), admin=is_admin(interaction, self.config)
        )
        if previous is store.JobStatus.RUNNING:
            # Ended at once when its worker was still fetching or loading the model.
            row = await self.db.call(store.get_job, job_id)
            if row is not None and row["status"] == store.JobStatus.CANCELLED.value:
                previous = store.JobStatus.CANCELLED
        text = {
            store.JobStatus.QUEUED: f"Cancelled `{job_id}`.",
            store.JobStatus.CANCELLED: f"Cancelled `{job_id}`.",
            store.JobStatus.RUNNING: f"Stopping `{job_id}`…",
        }.get(previous, f"`{job_id}` had already ended ({previous.value}).")
        await interaction.followup.send(text, ephemeral=True)
