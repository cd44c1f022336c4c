"""`/train`: a member's photos in, a personal LoRA out.

The command answers at once with the dataset report (which photos were used, which
were not and why) and the queue position; a public progress message shows step,
loss, ETA and a Cancel button; the result is a channel message with the sample images,
the validation figures and how to use the model. Training photos are deleted when
the job ends, whatever the outcome: only the prepared crops are ever stored, and
only until then.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot import store
from bot.cogs import SDCog
from bot.errors import UserError
from bot.photo_helper.work import prepare_photos
from bot.plumbing.attachments import MiB, download
from bot.plumbing.permissions import check_can_deliver
from bot.services.messages import JobMessages, _Tracked
from bot.services.personal import (
    check_name_free,
    check_quota,
    register_trained_lora,
    validation_summary,
)
from bot.services.training import train_spec, training_metrics, training_resolution
from bot.views import render
from pipeline.contract.jobs import Done, Event, Failed, TrainSpec, spec_to_dict

log = logging.getLogger(__name__)

Attachment = discord.Attachment


class TrainingMessages(JobMessages):
    """A training job's progress and result messages; deletes its photos at the end."""

    kind = "train"

    async def on_event(self, row: dict, event: Event) -> None:
        over = isinstance(event, Done) or row["status"] in ("failed", "cancelled")
        if over and not (isinstance(event, Failed) and row["status"] == "queued"):
            # First: the member's photos go as soon as the job is over, before the
            # (slower, Discord-bound) message updates.
            await asyncio.to_thread(delete_photos, self.blobs, row["spec"])
        await super().on_event(row, event)

    async def _post_result(self, row: dict, tracked: _Tracked) -> None:
        if row.get("message_id"):
            return  # posted before a restart: exactly once
        result = row.get("result") or {}
        info = result.get("info") or {}
        spec = row["spec"]
        # Also here: a result delivered after a restart never went through on_event.
        await asyncio.to_thread(delete_photos, self.blobs, spec)
        try:
            record = await self.db.call(_register_once, self, row)
        except store.StoreError as exc:
            await self._final_status(row, tracked, f"Trained, but not saved: {exc}")
            return
        files, note = await self._sample_files(row, result.get("images") or [])
        text = render.training_result_text(
            row["user_id"], spec, record, validation_summary(info), info
        )
        if note:
            text = render.truncate(f"{text}\n{note}", 2000)
        message = await self._channel(row).send(text, files=files)
        await self.db.call(store.set_job_messages, row["id"], message_id=str(message.id))
        await self._delete_progress(row, tracked)

    async def _sample_files(self, row: dict, samples: list[dict]) -> tuple[list, str]:
        """The sample images as attachments, and a note: they are results like any other,
        so the server's NSFW policy applies (withheld, or spoilers, in a channel that is not
        age-restricted) and Discord's upload limits are kept."""
        if not samples:
            return [], ""
        base = row["spec"]["name"]
        names = [f"{base}-sample-{i + 1}.png" for i in range(len(samples))]
        stored = await asyncio.to_thread(self._pngs, row, samples)
        pngs = [(name, data) for name, (_, data) in zip(names, stored)]
        verdict = await self.safety.verdict(row, samples) if self.safety else None
        if verdict is not None and verdict.blocked:
            withheld = [png for i, png in enumerate(pngs) if i in verdict.blocked]
            await self.safety.send_blocked(row, verdict, withheld)
            pngs = [png for i, png in enumerate(pngs) if i not in verdict.blocked]
        elif verdict is not None:
            pngs = list(zip(verdict.filenames([name for name, _ in pngs]), (d for _, d in pngs)))
        limit = self.upload_limits.get(row["id"]) or self._guild_limit(row)
        uploads, note = await asyncio.to_thread(render.fit_uploads, pngs, limit)
        if verdict is not None:
            note = " ".join(n for n in (verdict.note(len(samples)), note) if n)
        return [discord.File(io.BytesIO(u.data), u.filename) for u in uploads], note


def _register_once(db, bot, row: dict) -> dict:
    """Register the trained file; a retried post (after a restart) finds it registered."""
    existing = store.lora_of_job(db, row["id"])
    if existing:
        return existing
    spec, result = row["spec"], row.get("result") or {}
    [file] = result["files"]
    info = result.get("info") or {}
    metrics = training_metrics(info)
    return register_trained_lora(
        db,
        bot.blobs,
        bot.config,
        owner_id=row["user_id"],
        guild_id=row.get("guild_id"),
        name=spec["name"],
        token=spec["token"],
        method=spec["method"],
        base_model=spec["model"],
        sha256=file["sha256"],
        metrics=metrics,
        job_id=row["id"],
    )


def delete_photos(blobs, spec: dict) -> None:
    for sha in [*spec.get("photos", ()), *spec.get("test_photos", ())]:
        blobs.delete(sha)


class TrainCog(SDCog):
    def __init__(self, bot, services) -> None:
        super().__init__(bot, services)
        self.messages = services.boards.add(
            TrainingMessages(bot, config=self.config, db=self.db, blobs=self.blobs)
        )
        self._delivered_missed = False

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        # Models that finished training while the bot was down are delivered once.
        if not self._delivered_missed:
            self._delivered_missed = True
            await self.messages.deliver_missed()

    @app_commands.command(name="train")
    @app_commands.describe(
        name="a name for your model: you will write <lora:NAME:0.8>",
        photo1="a photo of the subject (3–20 photos in all; faces are found and cropped)",
        photo2="another photo",
        photo3="another photo",
        photo4="another photo",
        photo5="another photo",
        photo6="another photo",
        photo7="another photo",
        photo8="another photo",
        photo9="another photo",
        photo10="another photo",
        archive="a .zip of photos, instead of or besides the photo options",
        method="lora (default), or the LyCORIS variants loha / lokr",
        subject="what the photos show: person, man, woman, dog, cat, toy…",
        steps="training steps; 0 = about 100 per photo",
    )
    async def train(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, 40],
        photo1: Attachment,
        photo2: Attachment | None = None,
        photo3: Attachment | None = None,
        photo4: Attachment | None = None,
        photo5: Attachment | None = None,
        photo6: Attachment | None = None,
        photo7: Attachment | None = None,
        photo8: Attachment | None = None,
        photo9: Attachment | None = None,
        photo10: Attachment | None = None,
        archive: Attachment | None = None,
        method: Literal["lora", "loha", "lokr"] = "lora",
        subject: app_commands.Range[str, 1, 40] = "person",
        steps: app_commands.Range[int, 0, 3000] = 0,
    ) -> None:
        """Train a personal model (LoRA) from 3–20 photos of one person, pet or object."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        services, user = self.services, str(interaction.user.id)
        # 1. Cheap refusals first: where the result goes, name, quota, queue room.
        check_can_deliver(interaction)
        await services.db.call(check_name_free, user, name)
        await services.safety.before_train(interaction, name, subject)  # filters, quota, DMs
        await services.db.call(check_quota, services.config, user)
        await services.jobs.check_queue_room(interaction.user.id)
        # 2. Download (size checked before), prepare in the helper process.
        attached = [photo1, photo2, photo3, photo4, photo5, photo6, photo7, photo8, photo9, photo10]
        photos = await self._download_photos([a for a in attached if a is not None])
        zip_data = await self._download_archive(archive) if archive else None
        model = services.config.model("default")
        resolution = await asyncio.to_thread(training_resolution, services.config, model)
        settings = dict(
            resolution=resolution,
            min_side=services.config.training.min_side,
            subject=subject,
            max_photos=services.config.training.max_photos,
            min_photos=services.config.training.min_photos,
            token=None,
        )
        prepared = await services.face_probe.run(prepare_photos, photos, zip_data, settings)
        if "error" in prepared:
            raise UserError(prepared["error"])
        await services.safety.check_training_set(interaction, prepared)  # captions, NSFW
        # 3. Queue the job with the prepared crops as blobs.
        spec = await asyncio.to_thread(
            self._spec, prepared, name, model.name, method, subject, steps, resolution
        )
        row = await services.db.call(
            store.enqueue,
            user_id=user,
            guild_id=_str(interaction.guild_id),
            channel_id=_str(interaction.channel_id),
            kind="train",
            spec=spec_to_dict(spec),
            batch_key="",
            max_attempts=services.config.workers.max_attempts,
            max_queued_per_user=services.config.queue.max_queued_per_user,
        )
        position = await services.db.call(store.queue_position, row["id"])
        await self.messages.announce(row, position)
        services.dispatcher.wake()
        planned = spec.planned_steps(services.config.limits)
        await interaction.followup.send(
            render.truncate(
                f"{prepared['summary']}\n\nQueued training `{row['id']}` for '{name}' "
                f"({method}, {planned} steps, trigger word `{spec.token}`) — "
                f"{f'position {position}' if position else 'starting'}. "
                "Progress and the result will be posted in this channel.",
                1900,
            ),
            ephemeral=True,
        )

    def _spec(
        self,
        prepared: dict,
        name: str,
        model: str,
        method: str,
        subject: str,
        steps: int,
        resolution: int,
    ) -> TrainSpec:
        blobs = self.blobs
        photos = [blobs.put(png, ".png") for png in prepared["train"]]
        test_photos = [blobs.put(png, ".png") for png in prepared["test"]]
        try:
            return train_spec(
                self.config,
                name=name,
                photos=photos,
                test_photos=test_photos,
                captions=prepared["captions"],
                token=prepared["token"],
                subject=subject,
                model=model,
                method=method,
                steps=steps,
                resolution=resolution,
            )
        except Exception:
            delete_photos(blobs, {"photos": photos, "test_photos": test_photos})
            raise

    async def _download_photos(self, attachments: list[Attachment]) -> list[tuple[str, bytes]]:
        limit_mb = self.config.attachments.max_mb
        for attachment in attachments:  # refuse big files before downloading any
            if attachment.size > limit_mb * MiB:
                raise UserError(
                    f"{attachment.filename} is {attachment.size / MiB:.1f} MB; the limit is "
                    f"{limit_mb:g} MB per photo"
                )
        # Non-images and corrupt files are not refused here: the dataset report names them.
        return [(a.filename, await download(a, self.config, a.filename)) for a in attachments]

    async def _download_archive(self, archive: Attachment) -> bytes:
        if not archive.filename.lower().endswith(".zip"):
            raise UserError(f"the archive must be a .zip file, not {archive.filename}")
        return await download(archive, self.config, "archive")


def _str(value: int | None) -> str | None:
    return None if value is None else str(value)


async def setup(bot) -> None:
    await bot.add_cog(TrainCog(bot, bot.services))
