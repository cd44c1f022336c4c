"""/imagine, /img2img, /inpaint, /outpaint, and the buttons under their results.

Every handler defers first (Discord allows 3 s; downloads and the database come
after), turns its options into a spec (Discord already kept them in their `Range`,
`Literal` and choices), then queues the job through `JobService.submit`
(bot/services/jobs.py), which checks the spec once with the server's current
limits — a client can send anything (`bot.services.admission`). The options
the four commands share are declared once, in `bot.cogs.options`.
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
from bot.cogs.control_options import discord_control
from bot.cogs.options import BATCH, CONTROL, STYLE, generation_options, parse_size
from bot.errors import UserError
from bot.plumbing.attachments import Photo, read_photo
from bot.plumbing.permissions import check_can_deliver
from bot.services.model_options import check_given, drop_lacking, family_of, pick_values
from bot.services.pasted import apply_pasted
from bot.views import render
from pipeline.contract.families import model_defaults
from pipeline.contract.images import working_size
from pipeline.contract.jobs import GenerateSpec, spec_from_dict

Range = app_commands.Range
VARIATION_STRENGTH = 0.6  # Midjourney-like "vary": same composition, new details
UPSCALE_STRENGTH = 0.35  # a hires pass: sharpen, don't repaint
UPSCALE_FACTOR = 2.0
# Spec fields a member's option sets as typed, over every default (field: option).
TYPED = {
    "negative_prompt": "negative",
    "steps": "steps",
    "cfg_scale": "cfg",
    "guidance": "guidance",
}


class Generate(SDCog):
    """Text-to-image, image-to-image, inpainting and outpainting."""

    # -- the commands ---------------------------------------------------------------------

    @app_commands.command()
    @generation_options("prompt", *STYLE, "size", *BATCH, "lora", *CONTROL)
    async def imagine(self, interaction: discord.Interaction, **options: Any) -> None:
        """Draw images from a text prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        prompt = options["prompt"]
        # Parameters pasted from Info or A1111 fill the options left unset (bot.services.pasted).
        names = [m.name for m in self.config.models]
        typed = options
        prompt, options, notice = apply_pasted(prompt, options, names)
        filled = {k for k, v in options.items() if v is not None and typed.get(k) is None}
        family = await family_of(self.config, options["model"] or "default")
        options, lacking = drop_lacking(family, options, filled)
        if lacking and notice:  # a paste from another family's image: not refused
            notice += f" Left out (the model has no such option): {', '.join(lacking)}."
        values = await self.common(interaction, prompt, options)
        if options.get("schedule"):  # a pasted sampler's schedule
            values["schedule"] = options["schedule"]
            family.resolve_sampler(values["sampler"], values["schedule"])
        extra, attached = await self.control(values, options)
        spec = GenerateSpec(mode="txt2img", **values, **extra)
        await self.services.jobs.submit(interaction, spec, photos=attached)
        if notice:
            await interaction.followup.send(notice, ephemeral=True)

    @app_commands.command()
    @app_commands.describe(
        keep="Keep the photo's pose (or depth) while the prompt changes the rest (ControlNet)"
    )
    @generation_options("image", "prompt", "strength", *STYLE, *BATCH, "keep", *CONTROL)
    async def img2img(
        self,
        interaction: discord.Interaction,
        *,
        keep: Literal["pose", "depth"] | None = None,
        **options: Any,
    ) -> None:
        """Redraw a photo following a prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        photo = await self.input_photo(interaction, options["image"])
        values = await self.common(interaction, options["prompt"], options, photo)
        extra, attached = await self.control(values, options, keep=keep, has_input=True)
        spec = GenerateSpec(mode="img2img", image=photo.sha256, **values, **extra)
        await self.services.jobs.submit(interaction, spec, photos=[photo, *attached])

    @app_commands.command()
    @app_commands.describe(
        image="The photo to repaint part of",
        strength="How much to change the repainted part (default 0.75)",
    )
    @generation_options("image", "prompt", "mask", "keep", "strength", *STYLE, *BATCH, *CONTROL)
    async def inpaint(self, interaction: discord.Interaction, **options: Any) -> None:
        """Repaint part of a photo: the white part of a mask, or all but the face."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        mask, keep = options["mask"], options["keep"]
        if mask is None and keep is None:
            raise UserError("attach a mask (white = repaint) or choose keep: face or background")
        photo = await self.input_photo(interaction, options["image"])
        photos = [photo]
        if mask is not None:
            mask_photo = await read_photo(mask, self.config, "mask")
            if mask_photo.size != photo.size:
                raise UserError(
                    f"the mask is {mask_photo.width}×{mask_photo.height} but the image is "
                    f"{photo.width}×{photo.height}; they must be the same size"
                )
            photos.append(mask_photo)
        values = await self.common(interaction, options["prompt"], options, photo)
        extra, attached = await self.control(values, options, has_input=True)
        spec = GenerateSpec(
            mode="inpaint",
            image=photo.sha256,
            mask=photos[1].sha256 if mask is not None else None,
            keep=None if mask is not None else keep,
            **values,
            **extra,
        )
        photos += attached
        await self.services.jobs.submit(interaction, spec, photos=photos)

    @app_commands.command()
    @app_commands.describe(
        image="The photo to extend",
        prompt="What the new area shows (default: nothing in particular)",
    )
    @generation_options("image", "prompt", "direction", "pixels", *STYLE)
    async def outpaint(
        self,
        interaction: discord.Interaction,
        *,
        prompt: Range[str, 0, 6000] = "",
        **options: Any,
    ) -> None:
        """Extend a photo beyond its borders."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        photo = await self.input_photo(interaction, options["image"])
        values = await self.common(interaction, prompt, options, photo)
        spec = GenerateSpec(
            mode="outpaint",
            image=photo.sha256,
            outpaint_direction=options["direction"],
            outpaint_pixels=options["pixels"],
            **values,
        )
        await self.services.jobs.submit(interaction, spec, photos=[photo])

    # -- shared option handling --------------------------------------------------------------

    async def input_photo(
        self, interaction: discord.Interaction, image: discord.Attachment
    ) -> Photo:
        """The command's input image; refused before the download when the queue is full
        or the result could not be posted here."""
        check_can_deliver(interaction)
        await self.services.jobs.check_queue_room(interaction.user.id)
        return await read_photo(image, self.config, "image")

    async def common(
        self,
        interaction: discord.Interaction,
        prompt: str,
        options: dict[str, Any],
        photo: Photo | None = None,
    ) -> dict[str, Any]:
        """The shared options → spec fields: the command's value, else what the chosen
        model decides itself (its family's defaults, its [models.NAME] keys), else the
        member's /settings, else the server's defaults (`bot.services.model_options`).
        An option the model's family lacks is refused naming the model; model and
        sampler are checked here; with an input ``photo``, the size is the photo's,
        scaled to the pixel budget."""
        config = self.config
        model = config.model(options["model"] or "default").name
        family = await family_of(config, model)
        check_given(family, model, options)
        mine = await self.db.call(store.get_settings, str(interaction.user.id))
        d = (await self.services.safety.settings(interaction.guild_id)).defaults  # the server's
        own = model_defaults(config.model(model), family)
        values = pick_values(own, mine, d, options["sampler"])
        values.update({k: options[o] for k, o in TYPED.items() if options.get(o) is not None})
        values["model"] = model
        family.resolve_sampler(values["sampler"], values["schedule"])  # names the valid ones
        guild_id = interaction.guild_id
        values["loras"] = await self.services.loras.resolve(
            prompt, interaction.user.id, guild_id, option=options.get("lora")
        )
        values["prompt"], values["seed"] = prompt, options["seed"]
        values.update({k: options[k] for k in ("strength", "count", "face_fix") if k in options})
        if options.get("size"):
            values["width"], values["height"] = parse_size(options["size"])
        if photo is not None:
            values["width"], values["height"] = self.work_size(photo, values)
        return values

    async def control(
        self, values: dict[str, Any], options: dict[str, Any], **where: Any
    ) -> tuple[dict[str, Any], list[Photo]]:
        """The ControlNet / IP-Adapter options → spec fields, and their attachments."""
        return await discord_control(
            self.config, values["model"], **{k: options[k] for k in CONTROL}, **where
        )

    def work_size(self, photo: Photo, values: dict[str, Any]) -> tuple[int, int]:
        budget = min(values["width"] * values["height"], self.config.limits.max_pixels)
        return working_size(photo.width, photo.height, budget)

    # -- result buttons -----------------------------------------------------------------------

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        mine = job["user_id"] == str(interaction.user.id)
        if spec.mode == "edit" and not mine and not self.services.is_admin(interaction):
            # The photos of an edit are the member's, never shown in the channel.
            raise UserError(
                "only the member who asked for this edit can reroll it: the photo is theirs"
            )
        loras = await self._loras_for(interaction, job, spec)
        await self.services.jobs.submit(
            interaction, dataclasses.replace(spec, seed=None, loras=loras)
        )

    async def vary(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        job, spec, image = await self._clicked_image(interaction, job_id, index)
        width, height = await self._image_size(image["sha256"])
        size = working_size(width, height, self.config.limits.max_pixels)
        await self._submit_edit(
            interaction, job, spec, image, size, mode="img2img", strength=VARIATION_STRENGTH
        )

    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        job, spec, image = await self._clicked_image(interaction, job_id, index)
        width, height = await self._image_size(image["sha256"])
        await self._submit_edit(
            interaction,
            job,
            spec,
            image,
            (width, height),
            mode="upscale",
            control=(),  # a hires pass of the result: no ControlNet, no reference
            reference=None,
            strength=UPSCALE_STRENGTH,
            upscale_factor=UPSCALE_FACTOR,
            **_same_image(image),
        )

    async def fix_faces(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        """Repaint the faces of one result (ADetailer); nothing is queued without a face
        (`bot.services.admission`)."""
        job, spec, image = await self._clicked_image(interaction, job_id, index)
        size = await self._image_size(image["sha256"])
        await self._submit_edit(
            interaction,
            job,
            spec,
            image,
            size,
            mode="facefix",
            control=(),
            reference=None,
            **_same_image(image),
        )

    async def _clicked_image(
        self, interaction: discord.Interaction, job_id: str, index: int
    ) -> tuple[dict, GenerateSpec, dict]:
        """A button under one result image: the job, its spec and that image."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        return job, spec, self._result_image(job, index)

    async def _submit_edit(
        self,
        interaction: discord.Interaction,
        job: dict,
        spec: GenerateSpec,
        image: dict,
        size: tuple[int, int],
        **changes: Any,
    ) -> None:
        """Queue the job's settings applied to one of its results, at ``size``."""
        width, height = size
        edit = dataclasses.replace(
            _as_edit(spec, image["sha256"]),
            width=width,
            height=height,
            loras=await self._loras_for(interaction, job, spec),
            **changes,
        )
        await self.services.jobs.submit(interaction, edit)

    async def show_info(
        self, interaction: discord.Interaction, job_id: str, index: int | None
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.db.call(store.require_job, job_id)
        await interaction.followup.send(render.info_text(job, index), ephemeral=True)

    async def delete_result(self, interaction: discord.Interaction, job_id: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job = await self.db.call(store.get_job, job_id)
        owner = job["user_id"] if job else None
        if str(interaction.user.id) != owner and not self.services.is_admin(interaction):
            raise UserError("only the member who asked for this image (or an admin) can delete it")
        if interaction.message is not None:
            await interaction.message.delete()
        await interaction.followup.send("Deleted.", ephemeral=True)

    async def _job_spec(self, job_id: str) -> tuple[dict, GenerateSpec]:
        job = await self.db.call(store.require_job, job_id)
        spec = spec_from_dict(job["spec"])
        if not isinstance(spec, GenerateSpec):
            raise UserError("that button only works on generated images")
        return job, spec

    def _result_image(self, job: dict, index: int) -> dict:
        images = (job.get("result") or {}).get("images") or []
        if not 0 <= index < len(images):
            raise UserError(f"job `{job['id']}` has no image {index + 1}")
        return images[index]

    async def _image_size(self, sha: str) -> tuple[int, int]:
        def size() -> tuple[int, int]:
            with Image.open(io.BytesIO(self.blobs.get(sha))) as image:
                return image.size  # header only: no decode

        return await asyncio.to_thread(size)

    async def _loras_for(
        self, interaction: discord.Interaction, job: dict, spec: GenerateSpec
    ) -> tuple:
        """Another member's click re-resolves the LoRAs: private ones stay private."""
        if job["user_id"] == str(interaction.user.id) or not spec.loras:
            return spec.loras
        tags = [(lora.name, lora.weight) for lora in spec.loras]
        return await self.services.loras.named(tags, interaction.user.id, interaction.guild_id)


def _same_image(image: dict) -> dict[str, Any]:
    """Redo one result image as it was: one image, its seed, no second face pass."""
    return {"count": 1, "face_fix": False, "seed": image.get("seed")}


def _as_edit(spec: GenerateSpec, image_sha: str) -> GenerateSpec:
    """The job's settings, applied to one of its results as a new input image (an
    edit's further photos and chosen face belong to the edit, not to its result)."""
    return dataclasses.replace(
        spec,
        image=image_sha,
        images=(),
        mask=None,
        keep=None,
        face=0,
        outpaint_direction=None,
        seed=None,
    )


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Generate(bot, bot.services))
