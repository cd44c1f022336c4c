"""/edit: change a photo by instruction and keep who is in it; and /edit's Compare button.

The command turns its options into a `GenerateSpec(mode="edit")` and queues it through
`JobService.submit` like every generation (`bot.services.admission` says what is checked
there: the model's family takes the edit mode and this many photos, `keep: face` finds a
face, every photo passes the NSFW check). Results come back on the generation board with
the usual buttons, the identity score of each (measured in the worker) and **Compare**:
the photo and the result side by side, drawn here from the two stored PNGs
(`pipeline.contract.compare`, Pillow only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from typing import Any, Literal

import discord
from discord import app_commands
from PIL import Image

from bot import store
from bot.app import SDBot
from bot.cogs import SDCog
from bot.cogs.options import _choices, generation_options
from bot.errors import UserError
from bot.plumbing.attachments import Photo, png_of, read_photo
from bot.plumbing.permissions import check_can_deliver
from bot.services.model_options import models_for
from bot.views import render
from pipeline.contract.blobs import BlobError
from pipeline.contract.compare import compare_picture
from pipeline.contract.families import defaults_for
from pipeline.contract.images import working_size
from pipeline.contract.jobs import MAX_FACES, GenerateSpec

Range = app_commands.Range
EMPTY_INSTRUCTION = "the instruction is empty; say what to change, e.g. 'make him 20 years older'"
NO_EDIT_MODEL = (
    "no model on this server can edit photos; an admin configures one (Qwen-Image-Edit, "
    "FLUX.1 Kontext, Flux.2 klein or an SD model) or allows one (/admin settings models.allowed)"
)


async def edit_model_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The models that edit (their family has the mode) and this server allows."""
    services = interaction.client.services
    names = await models_for(services.config, "edit")
    allowed = (await services.safety.settings(interaction.guild_id)).allowed_models
    return _choices([n for n in names if not allowed or n in allowed], current)


class Edit(SDCog):
    """Instruction editing of a member's photo, the person measured on every result."""

    @app_commands.command()
    @app_commands.describe(
        image="The photo to change",
        instruction="What to change, e.g. 'make him 20 years older'; <lora:name:0.8> applies "
        "a LoRA",
        image2="A second photo the instruction refers to (models that take several)",
        image3="A third photo (models that take several)",
        keep="Keep the face (or the background) of the photo exactly as it is",
        face="Which face is the person, numbered left to right (default: the largest)",
        model="Editing model (default: the server's)",
    )
    @app_commands.autocomplete(model=edit_model_choices)
    @generation_options(
        "image", "instruction", "image2", "image3", "keep", "face", "model", "seed", "count", "lora"
    )
    async def edit(
        self,
        interaction: discord.Interaction,
        *,
        instruction: Range[str, 1, 6000],
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        keep: Literal["face", "background", "none"] | None = None,
        face: Range[int, 1, MAX_FACES] | None = None,
        model: str | None = None,
        **options: Any,
    ) -> None:
        """Change a photo by instruction, keeping the person in it (identity measured)."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        instruction = instruction.strip()
        if not instruction:
            raise UserError(EMPTY_INSTRUCTION)
        chosen = await self.edit_model(interaction, model)
        check_can_deliver(interaction)
        await self.services.jobs.check_queue_room(interaction.user.id)
        photos = [
            await read_photo(attachment, self.config, name)
            for attachment, name in (
                (options["image"], "image"),
                (image2, "image2"),
                (image3, "image3"),
            )
            if attachment is not None
        ]
        values = await self.settings_for(interaction, chosen, photos[0])
        loras = await self.services.loras.resolve(
            instruction, interaction.user.id, interaction.guild_id, option=options["lora"]
        )
        spec = GenerateSpec(
            mode="edit",
            prompt=instruction,
            model=chosen,
            image=photos[0].sha256,
            images=tuple(photo.sha256 for photo in photos[1:]),
            keep=None if keep in (None, "none") else keep,
            face=face or 0,
            seed=options["seed"],
            count=options["count"],
            loras=loras,
            **values,
        )
        await self.services.jobs.submit(interaction, spec, photos=photos)

    async def edit_model(self, interaction: discord.Interaction, name: str | None) -> str:
        """The model an edit runs on: the member's choice (this server's allowed models are
        checked when it is submitted), else `[edit] default_model` where it is allowed, else
        the first configured model that edits and this server allows."""
        editing = await models_for(self.config, "edit")
        allowed = (await self.services.safety.settings(interaction.guild_id)).allowed_models
        usable = [n for n in editing if not allowed or n in allowed]
        if name:
            name = self.config.model(name).name  # an unknown name lists the configured ones
            if name not in editing:
                others = ", ".join(usable) or "none"
                raise UserError(
                    f"the model {name} cannot edit photos; models that edit here: {others}"
                )
            return name
        if not usable:
            raise UserError(NO_EDIT_MODEL)
        default = self.config.edit.default_model
        return default if default in usable else usable[0]

    async def settings_for(
        self, interaction: discord.Interaction, model: str, photo: Photo
    ) -> dict[str, Any]:
        """Sampler, steps, CFG and size: the model's own defaults (an edit model's family
        has them), else this server's; the size is the photo's within the pixel budget."""
        server = (await self.services.safety.settings(interaction.guild_id)).defaults
        config = dataclasses.replace(self.config, defaults=server)
        d = await asyncio.to_thread(defaults_for, config, model)
        budget = min(d.width * d.height, self.config.limits.max_pixels)
        width, height = working_size(photo.width, photo.height, budget)
        return {
            "negative_prompt": d.negative_prompt,
            "sampler": d.sampler,
            "schedule": d.schedule,
            "steps": d.steps,
            "cfg_scale": d.cfg_scale,
            "width": width,
            "height": height,
        }

    # -- the Compare button ---------------------------------------------------------------------

    async def compare(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        """The photo and one result side by side with its identity score, shown to the
        member who asked (or an admin): the photo is theirs, the channel never saw it."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.db.call(store.require_job, job_id)
        spec = job["spec"]
        if spec.get("mode") != "edit" or not spec.get("image"):
            raise UserError("Compare works on the results of /edit")
        if job["user_id"] != str(interaction.user.id) and not self.services.is_admin(interaction):
            raise UserError(
                "only the member who asked for this edit can compare it with their photo"
            )
        images = (job.get("result") or {}).get("images") or []
        if not 0 <= index < len(images):
            raise UserError(f"job `{job_id}` has no image {index + 1}")
        verdict = await self.services.safety.verdict(job, images, count=False)
        if index in verdict.blocked:
            raise UserError(
                "that image was withheld (flagged NSFW), so there is nothing to compare"
            )
        image = images[index]
        try:
            before, after = await asyncio.to_thread(
                lambda: (self.blobs.get(spec["image"]), self.blobs.get(image["sha256"]))
            )
        except BlobError:
            raise UserError(
                "the photo of this edit is no longer stored, so it cannot be compared"
            ) from None
        png = await asyncio.to_thread(_compare_png, before, after, image.get("identity"))
        base = f"sdbot-{job_id}-{image.get('seed')}-compare.png"
        name = verdict.filenames([base] * len(images))[index]  # a spoiler stays a spoiler
        uploads, note = await asyncio.to_thread(
            render.fit_uploads, [(name, png)], interaction.filesize_limit
        )
        words = render.identity_words(image, self.config.edit.min_identity)
        text = " · ".join(t for t in (f"Job `{job_id}`", words, note) if t)
        await interaction.followup.send(
            text,
            files=[discord.File(io.BytesIO(u.data), u.filename) for u in uploads],
            ephemeral=True,
        )


def _compare_png(before: bytes, after: bytes, identity: float | None) -> bytes:
    with Image.open(io.BytesIO(before)) as photo, Image.open(io.BytesIO(after)) as result:
        return png_of(compare_picture(photo, result, identity))


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Edit(bot, bot.services))
