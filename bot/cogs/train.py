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
from typing import Literal

import discord
from discord import app_commands

from bot.cogs import SDCog
from bot.errors import UserError
from bot.photo_helper.work import prepare_photos
from bot.plumbing.attachments import MiB, Photo, download
from bot.plumbing.permissions import check_can_deliver
from bot.services.personal import check_name_free, check_quota
from bot.services.training import train_spec, training_family, training_resolution

Attachment = discord.Attachment


class TrainCog(SDCog):
    """`/train`; its jobs' messages are `bot.services.messages.TrainingMessages`."""

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
        # 2. Download (size checked before), prepare in the helper process: each photo is
        # decoded there once, cropped, and (where the server checks photos) scored.
        attached = [photo1, photo2, photo3, photo4, photo5, photo6, photo7, photo8, photo9, photo10]
        photos = await self._download_photos([a for a in attached if a is not None])
        zip_data = await self._download_archive(archive) if archive else None
        model = services.config.model("default")
        resolution = await asyncio.to_thread(training_resolution, services.config, model)
        family = await asyncio.to_thread(training_family, model)
        settings = dict(
            resolution=resolution,
            min_side=services.config.training.min_side,
            subject=subject,
            max_photos=services.config.training.max_photos,
            min_photos=services.config.training.min_photos,
            token=None,
        )
        nsfw = await services.safety.photos_checked_here(interaction)
        prepared = await services.face_probe.run(prepare_photos, photos, zip_data, settings, nsfw)
        if "error" in prepared:
            raise UserError(prepared["error"])
        await services.safety.check_training_set(interaction, prepared)  # captions, NSFW
        # 3. Queue it like any job: the crops are stored once the spec passes its check.
        train, test = _crops(prepared["train"]), _crops(prepared["test"])
        spec = train_spec(
            services.config,
            name=name,
            photos=[p.sha256 for p in train],
            test_photos=[p.sha256 for p in test],
            captions=prepared["captions"],
            token=prepared["token"],
            subject=subject,
            model=model.name,
            method=method,
            steps=steps,
            resolution=resolution,
            family=family,
        )
        await services.jobs.submit(interaction, spec, [*train, *test], summary=prepared["summary"])

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


def _crops(prepared: list[dict]) -> list[Photo]:
    """The helper's crops, already PNGs with their sha256 and size: nothing to decode."""
    return [Photo(c["png"], c["sha256"], c["width"], c["height"]) for c in prepared]


async def setup(bot) -> None:
    await bot.add_cog(TrainCog(bot, bot.services))
