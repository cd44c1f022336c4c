"""/imagine, /img2img, /inpaint, /outpaint, and the buttons under their results.

Every handler defers first (Discord allows 3 s; downloads and the database come
after), validates at the edge (`Range`, `Literal`, autocomplete) and again on the
server with `GenerateSpec.check(config.limits)` — a client can send anything —
then queues the job through `JobService.submit` (bot/services/jobs.py).
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
from bot.errors import UserError
from pipeline.contract.images import working_size
from pipeline.contract.jobs import MAX_SEED, GenerateSpec, check_size, spec_from_dict
from pipeline.contract.samplers import resolve, sampler_names

Range = app_commands.Range
VARIATION_STRENGTH = 0.6  # Midjourney-like "vary": same composition, new details
UPSCALE_STRENGTH = 0.35  # a hires pass: sharpen, don't repaint
UPSCALE_FACTOR = 2.0
SIZES = (
    (512, 512), (768, 512), (512, 768), (640, 640), (768, 768), (912, 512), (512, 912),
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
    (768, 1344), (1536, 640), (640, 1536), (256, 256), (384, 384), (128, 128), (64, 64),
)  # fmt: skip

COMMON_OPTIONS = {
    "negative": "What to keep out of the image (negative prompt)",
    "model": "Base model (default: the server's first)",
    "sampler": "Sampler, e.g. Euler a or DPM++ 2M Karras (default: your /settings)",
    "steps": "Denoising steps: more is slower and finer (default: your /settings)",
    "cfg": "How closely to follow the prompt, the CFG scale (default: your /settings)",
    "seed": "Seed, to draw the same image again (random when empty)",
    "count": "How many images (default 1)",
    "face_fix": "Repaint faces afterwards, ADetailer style",
}
LORA_OPTION = "One of your LoRAs (or a shared/server one), added as <lora:NAME:0.8>"
PROMPT = "What to draw; <lora:name:0.8> applies a LoRA"


# -- autocomplete: at most 25 choices, filtered by what is typed -------------------------------


async def model_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    names = [m.name for m in interaction.client.services.config.models]
    return _choices(names, current)


async def sampler_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _choices(sampler_names(), current)


async def size_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    return _choices(allowed_sizes(interaction.client.services.config), current)


async def lora_choices(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    """The LoRAs this member may use: their own, shared ones, the server library."""
    db = interaction.client.services.db
    guild = str(interaction.guild_id) if interaction.guild_id else None
    rows = await db.call(store.list_loras, str(interaction.user.id), guild)
    return _choices([row["name"] for row in rows], current)


def _choices(names: list[str], current: str) -> list[app_commands.Choice[str]]:
    typed = current.lower().strip()
    found = [n for n in names if typed in n.lower()] if typed else list(names)
    found.sort(key=lambda n: not n.lower().startswith(typed))  # prefix matches first
    return [app_commands.Choice(name=n, value=n) for n in found[:25]]


def allowed_sizes(config: Any) -> list[str]:
    """The usual sizes that the server's limits allow, its default first."""
    default = (config.defaults.width, config.defaults.height)
    sizes = [default] + [s for s in SIZES if s != default]
    ok = []
    for width, height in sizes:
        try:
            check_size(width, height, config.limits)
        except ValueError:
            continue
        ok.append(f"{width}x{height}")
    return ok


def parse_size(text: str, limits: Any) -> tuple[int, int]:
    """ "768x512" (or 768×512) → (768, 512), checked against the limits."""
    width, sep, height = text.lower().replace("×", "x").partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise UserError(f"size must look like 768x512, not {text!r}")
    size = int(width), int(height)
    check_size(*size, limits)
    return size


class Generate(SDCog):
    """Text-to-image, image-to-image, inpainting and outpainting."""

    # -- the commands ---------------------------------------------------------------------

    @app_commands.command()
    @app_commands.describe(
        prompt=PROMPT,
        size="Width x height (default: your /settings)",
        lora=LORA_OPTION,
        **COMMON_OPTIONS,
    )
    @app_commands.autocomplete(
        model=model_choices, sampler=sampler_choices, size=size_choices, lora=lora_choices
    )
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: Range[str, 1, 6000],
        negative: Range[str, 0, 6000] | None = None,
        model: str | None = None,
        sampler: str | None = None,
        steps: Range[int, 1, 150] | None = None,
        cfg: Range[float, 0.0, 30.0] | None = None,
        seed: Range[int, 0, MAX_SEED] | None = None,
        size: str | None = None,
        count: Range[int, 1, 4] = 1,
        face_fix: bool = False,
        lora: str | None = None,
    ) -> None:
        """Draw images from a text prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        if lora:
            prompt = f"{prompt} <lora:{lora.strip()}:0.8>"
        values = await self.common(interaction, prompt, negative, model, sampler, steps, cfg)
        if size:
            values["width"], values["height"] = parse_size(size, self.config.limits)
        spec = GenerateSpec(
            prompt=prompt, mode="txt2img", seed=seed, count=count, face_fix=face_fix, **values
        )
        await self.services.jobs.submit(interaction, spec)

    @app_commands.command()
    @app_commands.describe(
        image="The photo to start from",
        prompt=PROMPT,
        strength="How much to change: 0.05 keeps the photo, 1 ignores it (default 0.75)",
        **COMMON_OPTIONS,
    )
    @app_commands.autocomplete(model=model_choices, sampler=sampler_choices)
    async def img2img(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 1, 6000],
        strength: Range[float, 0.05, 1.0] = 0.75,
        negative: Range[str, 0, 6000] | None = None,
        model: str | None = None,
        sampler: str | None = None,
        steps: Range[int, 1, 150] | None = None,
        cfg: Range[float, 0.0, 30.0] | None = None,
        seed: Range[int, 0, MAX_SEED] | None = None,
        count: Range[int, 1, 4] = 1,
        face_fix: bool = False,
    ) -> None:
        """Redraw a photo following a prompt."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.services.jobs.check_queue_room(interaction.user.id)
        photo = await read_photo(image, self.config, "image")
        values = await self.common(interaction, prompt, negative, model, sampler, steps, cfg)
        values["width"], values["height"] = self.work_size(photo, values)
        spec = GenerateSpec(
            prompt=prompt,
            mode="img2img",
            image=photo.sha256,
            strength=strength,
            seed=seed,
            count=count,
            face_fix=face_fix,
            **values,
        )
        await self.services.jobs.submit(interaction, spec, photos=[photo])

    @app_commands.command()
    @app_commands.describe(
        image="The photo to repaint part of",
        prompt=PROMPT,
        mask="Same size as the photo: white = repaint, black = keep",
        keep="Without a mask: keep the face and repaint the rest, or keep the background",
        strength="How much to change the repainted part (default 0.75)",
        **COMMON_OPTIONS,
    )
    @app_commands.autocomplete(model=model_choices, sampler=sampler_choices)
    async def inpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 1, 6000],
        mask: discord.Attachment | None = None,
        keep: Literal["face", "background"] | None = None,
        strength: Range[float, 0.05, 1.0] = 0.75,
        negative: Range[str, 0, 6000] | None = None,
        model: str | None = None,
        sampler: str | None = None,
        steps: Range[int, 1, 150] | None = None,
        cfg: Range[float, 0.0, 30.0] | None = None,
        seed: Range[int, 0, MAX_SEED] | None = None,
        count: Range[int, 1, 4] = 1,
        face_fix: bool = False,
    ) -> None:
        """Repaint part of a photo: the white part of a mask, or all but the face."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        if mask is None and keep is None:
            raise UserError("attach a mask (white = repaint) or choose keep: face or background")
        await self.services.jobs.check_queue_room(interaction.user.id)
        photo = await read_photo(image, self.config, "image")
        photos = [photo]
        if mask is not None:
            mask_photo = await read_photo(mask, self.config, "mask")
            if mask_photo.size != photo.size:
                raise UserError(
                    f"the mask is {mask_photo.width}×{mask_photo.height} but the image is "
                    f"{photo.width}×{photo.height}; they must be the same size"
                )
            photos.append(mask_photo)
        values = await self.common(interaction, prompt, negative, model, sampler, steps, cfg)
        values["width"], values["height"] = self.work_size(photo, values)
        spec = GenerateSpec(
            prompt=prompt,
            mode="inpaint",
            image=photo.sha256,
            mask=photos[1].sha256 if mask is not None else None,
            keep=None if mask is not None else keep,
            strength=strength,
            seed=seed,
            count=count,
            face_fix=face_fix,
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
        **{k: COMMON_OPTIONS[k] for k in ("negative", "model", "sampler", "steps", "cfg", "seed")},
    )
    @app_commands.autocomplete(model=model_choices, sampler=sampler_choices)
    async def outpaint(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, 0, 6000] = "",
        direction: Literal["left", "right", "up", "down", "all"] = "all",
        pixels: Range[int, 8, 512] = 128,
        negative: Range[str, 0, 6000] | None = None,
        model: str | None = None,
        sampler: str | None = None,
        steps: Range[int, 1, 150] | None = None,
        cfg: Range[float, 0.0, 30.0] | None = None,
        seed: Range[int, 0, MAX_SEED] | None = None,
    ) -> None:
        """Extend a photo beyond its borders."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.services.jobs.check_queue_room(interaction.user.id)
        photo = await read_photo(image, self.config, "image")
        values = await self.common(interaction, prompt, negative, model, sampler, steps, cfg)
        values["width"], values["height"] = self.work_size(photo, values)
        spec = GenerateSpec(
            prompt=prompt,
            mode="outpaint",
            image=photo.sha256,
            outpaint_direction=direction,
            outpaint_pixels=pixels,
            seed=seed,
            **values,
        )
        await self.services.jobs.submit(interaction, spec, photos=[photo])

    # -- shared option handling --------------------------------------------------------------

    async def common(
        self,
        interaction: discord.Interaction,
        prompt: str,
        negative: str | None,
        model: str | None,
        sampler: str | None,
        steps: int | None,
        cfg: float | None,
    ) -> dict[str, Any]:
        """Options → spec fields: the command's value, else the member's /settings,
        else the server's defaults. Model and sampler are checked here."""
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
