"""/imagine, /img2img, /inpaint, /outpaint, and the buttons under their results.

Every handler defers first (Discord allows 3 s; downloads and the database come
after), validates at the edge (`Range`, `Literal`, autocomplete) and again on the
server with `GenerateSpec.check(config.limits)` — a client can send anything —
then queues the job through `JobService.submit` (bot/services/jobs.py). The options
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

from bot import render, store
from bot.app import SDBot
from bot.attachments import Photo, read_photo
from bot.cogs import SDCog
from bot.cogs.options import BATCH, STYLE, generation_options, parse_size
from bot.errors import UserError
from bot.pasted import apply_pasted
from pipeline.contract.images import working_size
from pipeline.contract.jobs import GenerateSpec, check_size, spec_from_dict
from pipeline.contract.samplers import resolve

Range = app_commands.Range
VARIATION_STRENGTH = 0.6  # Midjourney-like "vary": same composition, new details
UPSCALE_STRENGTH = 0.35  # a hires pass: sharpen, don't repaint
UPSCALE_FACTOR = 2.0
PROMPT = "What to draw; <lora:name:0.8> applies a LoRA"


class Generate(SDCog):
    """Text-to-image, image-to-image, inpainting and outpainting."""

    # -- the commands ---------------------------------------------------------------------

    @app_commands.command()
    @app_commands.describe(prompt=PROMPT)
    @generation_options(*STYLE, "size", *BATCH, "lora")
    async def imagine(
        self, interaction: discord.Interaction, prompt: Range[str, 1, 6000], **options: Any
    ) -> None:
        """Draw images from a text prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        # Parameters pasted from Info or A1111 fill the options left unset (bot.pasted).
        names = [m.name for m in self.config.models]
        prompt, options, notice = apply_pasted(prompt, options, names)
        if options["lora"]:
            prompt = f"{prompt} <lora:{options['lora'].strip()}:0.8>"
        values = await self.common(interaction, prompt, options)
        if options.get("schedule"):  # a pasted sampler's schedule
            values["schedule"] = options["schedule"]
            resolve(values["sampler"], values["schedule"])
        spec = GenerateSpec(prompt=prompt, mode="txt2img", **values)
        await self.services.jobs.submit(interaction, spec)
        if notice:
            await interaction.followup.send(notice, ephemeral=True)

    @app_commands.command()
    @app_commands.describe(
        image="The photo to start from",
        prompt=PROMPT,
        strength="How much to change: 0.05 keeps the photo, 1 ignores it (default 0.75)",
    )
    @generation_options(*STYLE, *BATCH)
    async def img2img(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 1, 6000],
        strength: Range[float, 0.05, 1.0] = 0.75,
        **options: Any,
    ) -> None:
        """Redraw a photo following a prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        photo = await self.input_photo(interaction, image)
        values = await self.common(interaction, prompt, options, photo)
        spec = GenerateSpec(
            prompt=prompt, mode="img2img", image=photo.sha256, strength=strength, **values
        )
        await self.services.jobs.submit(interaction, spec, photos=[photo])

    @app_commands.command()
    @app_commands.describe(
        image="The photo to repaint part of",
        prompt=PROMPT,
        mask="Same size as the photo: white = repaint, black = keep",
        keep="Without a mask: keep the face and repaint the rest, or keep the background",
        strength="How much to change the repainted part (default 0.75)",
    )
    @generation_options(*STYLE, *BATCH)
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 1, 6000],
        mask: discord.Attachment | None = None,
        keep: Literal["face", "background"] | None = None,
        strength: Range[float, 0.05, 1.0] = 0.75,
        **options: Any,
    ) -> None:
        """Repaint part of a photo: the white part of a mask, or all but the face."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        if mask is None and keep is None:
            raise UserError("attach a mask (white = repaint) or choose keep: face or background")
        photo = await self.input_photo(interaction, image)
        photos = [photo]
        if mask is not None:
            mask_photo = await read_photo(mask, self.config, "mask")
            if mask_photo.size != photo.size:
                raise UserError(
                    f"the mask is {mask_photo.width}×{mask_photo.height} but the image is "
                    f"{photo.width}×{photo.height}; they must be the same size"
                )
            photos.append(mask_photo)
        values = await self.common(interaction, prompt, options, photo)
        spec = GenerateSpec(
            prompt=prompt,
            mode="inpaint",
            image=photo.sha256,
            mask=photos[1].sha256 if mask is not None else None,
            keep=None if mask is not None else keep,
            strength=strength,
            **values,
        )
        spec.check(self.config.limits)  # cheap checks before the slow face check
        if mask is None:
            # Without a face the worker could build no mask: say so now, queue nothing.
            await self.services.face_probe.require_face(
                photo.png, self.config.limits.max_input_pixels
            )
        await self.services.jobs.submit(interaction, spec, photos=photos)

    @app_commands.command()
    @app_commands.describe(
        image="The photo to extend",
        prompt="What the new area shows (default: nothing in particular)",
        direction="Which side to extend (default: all around)",
        pixels="How far to extend, in pixels (multiple of 8)",
    )
    @generation_options(*STYLE)
    async def outpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 0, 6000] = "",
        direction: Literal["left", "right", "up", "down", "all"] = "all",
        pixels: Range[int, 8, 512] = 128,
        **options: Any,
    ) -> None:
        """Extend a photo beyond its borders."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        photo = await self.input_photo(interaction, image)
        values = await self.common(interaction, prompt, options, photo)
        spec = GenerateSpec(
            prompt=prompt,
            mode="outpaint",
            image=photo.sha256,
            outpaint_direction=direction,
            outpaint_pixels=pixels,
            **values,
        )
        await self.services.jobs.submit(interaction, spec, photos=[photo])

    # -- shared option handling --------------------------------------------------------------

    async def input_photo(
        self, interaction: discord.Interaction, image: discord.Attachment
    ) -> Photo:
        """The command's input image; refused before the download when the queue is full."""
        await self.services.jobs.check_queue_room(interaction.user.id)
        return await read_photo(image, self.config, "image")

    async def common(
        self,
        interaction: discord.Interaction,
        prompt: str,
        options: dict[str, Any],
        photo: Photo | None = None,
    ) -> dict[str, Any]:
        """The shared options → spec fields: the command's value, else the member's
        /settings, else the server's defaults. Model and sampler are checked here; with
        an input ``photo``, the size is the photo's, scaled to the pixel budget."""
        negative, model, sampler = options["negative"], options["model"], options["sampler"]
        steps, cfg = options["steps"], options["cfg"]
        config = self.config
        mine = await self.db.call(store.get_settings, str(interaction.user.id))
        d = config.defaults
        chosen_sampler = sampler or mine.get("sampler")
        values: dict[str, Any] = {
            "negative_prompt": d.negative_prompt if negative is None else negative,
            "model": config.model(model or "default").name,
            "sampler": chosen_sampler or d.sampler,
            # A sampler the member picked ("DPM++ 2M Karras") carries its own schedule.
            "schedule": "Automatic" if chosen_sampler else d.schedule,
            "steps": steps if steps is not None else mine.get("steps", d.steps),
            "cfg_scale": cfg if cfg is not None else mine.get("cfg_scale", d.cfg_scale),
            "width": mine.get("width", d.width),
            "height": mine.get("height", d.height),
        }
        if negative is None and "negative_prompt" in mine:
            values["negative_prompt"] = mine["negative_prompt"]
        resolve(values["sampler"], values["schedule"])  # JobError names the valid ones
        guild_id = interaction.guild_id
        values["loras"] = await self.services.loras.resolve(prompt, interaction.user.id, guild_id)
        values["seed"] = options["seed"]
        values.update({key: options[key] for key in ("count", "face_fix") if key in options})
        if options.get("size"):
            values["width"], values["height"] = parse_size(options["size"], config.limits)
        if photo is not None:
            values["width"], values["height"] = self.work_size(photo, values)
        return values

    def work_size(self, photo: Photo, values: dict[str, Any]) -> tuple[int, int]:
        budget = min(values["width"] * values["height"], self.config.limits.max_pixels)
        return working_size(photo.width, photo.height, budget)

    # -- result buttons -----------------------------------------------------------------------

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        loras = await self._loras_for(interaction, job, spec)
        await self.services.jobs.submit(
            interaction, dataclasses.replace(spec, seed=None, loras=loras)
        )

    async def vary(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        image = self._result_image(job, index)
        width, height = await self._image_size(image["sha256"])
        width, height = working_size(width, height, self.config.limits.max_pixels)
        spec = dataclasses.replace(
            _as_edit(spec, image["sha256"]),
            mode="img2img",
            strength=VARIATION_STRENGTH,
            width=width,
            height=height,
            loras=await self._loras_for(interaction, job, spec),
        )
        await self.services.jobs.submit(interaction, spec)

    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        image = self._result_image(job, index)
        width, height = await self._image_size(image["sha256"])
        # The result is UPSCALE_FACTOR times larger: it must fit the limits too.
        limits = self.config.limits
        check_size(int(width * UPSCALE_FACTOR), int(height * UPSCALE_FACTOR), limits)
        spec = dataclasses.replace(
            _as_edit(spec, image["sha256"]),
            mode="upscale",
            strength=UPSCALE_STRENGTH,
            upscale_factor=UPSCALE_FACTOR,
            width=width,
            height=height,
            count=1,
            face_fix=False,
            seed=image.get("seed"),
            loras=await self._loras_for(interaction, job, spec),
        )
        await self.services.jobs.submit(interaction, spec)

    async def fix_faces(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        """Repaint the faces of one result (ADetailer); nothing is queued without a face."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        job, spec = await self._job_spec(job_id)
        image = self._result_image(job, index)
        png = await asyncio.to_thread(self.blobs.get, image["sha256"])
        limit = self.config.limits.max_input_pixels
        if await self.services.face_probe.count_faces(png, limit) == 0:
            raise UserError("no face found in this image, so there is no face to fix")
        width, height = await self._image_size(image["sha256"])
        spec = dataclasses.replace(
            _as_edit(spec, image["sha256"]),
            mode="facefix",
            width=width,
            height=height,
            count=1,
            face_fix=False,
            seed=image.get("seed"),
            loras=await self._loras_for(interaction, job, spec),
        )
        await self.services.jobs.submit(interaction, spec)

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
        return await self.services.loras.resolve(
            spec.prompt, interaction.user.id, interaction.guild_id
        )


def _as_edit(spec: GenerateSpec, image_sha: str) -> GenerateSpec:
    """The job's settings, applied to one of its results as a new input image."""
    return dataclasses.replace(
        spec,
        image=image_sha,
        mask=None,
        keep=None,
        outpaint_direction=None,
        seed=None,
    )


async def setup(bot: SDBot) -> None:
    await bot.add_cog(Generate(bot, bot.services))
