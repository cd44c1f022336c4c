"""One request, one check: where a job's spec is validated, and what is checked again.

**At submission, once.** Every job enters the queue through `JobService.submit`
(`bot.services.jobs`), which validates its spec there and only there, with the server's
current settings (`SafetyGate.before_generate` for generation, `before_train` and
`check_training_set` for training): the limits (``spec.check(settings.limits)``: the
server's, never looser than config.toml's), the model allowed here, the prompt filters,
the quota, the photos' NSFW check; then `family_questions` below (what the chosen
model's family lacks: a mode, a sampler, a size, more input images than it reads) and
`photo_questions` (a face where the job needs one, the size of an upscale's result).
The cogs only turn options into a spec (parsing, looking names up); nothing before
`submit` and nothing after it checks the spec's values again.

**While it waits, only what can change.** A queued job may wait minutes, a training
job may be requeued for hours. The dispatcher calls `still_runnable` just before a
worker gets the job, and it checks exactly the two things that can change meanwhile:

- an admin tightened the server's limits (`/admin settings limits.…`), or config.toml
  was tightened across a restart: the spec is checked against today's limits;
- a LoRA it uses was deleted (`/lora delete`, `/admin lora remove`, `/forget`).

A job that fails either ends as failed, with the one-line reason, and never reaches a
worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import sqlite_utils

from bot import store
from bot.errors import UserError
from bot.photo_helper.process import FaceProbe
from bot.plumbing.attachments import Photo
from bot.services.guild_settings import effective
from bot.services.model_options import family_of
from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import Config
from pipeline.contract.jobs import (
    GenerateSpec,
    JobError,
    JobSpec,
    Limits,
    TrainSpec,
    check_size,
)

NO_FACE_TO_FIX = "no face found in this image, so there is no face to fix"
NO_FACE_TO_KEEP = (
    "no face found in the photo, so keep: face has nothing to keep; "
    "attach a photo that shows the face, or choose keep: background or none"
)


async def family_questions(config: Config, spec: JobSpec) -> None:
    """JobError, naming the model's family, for what the chosen model cannot do (a Flux.1
    schnell job with 50 steps, a Qwen-Image-Edit job with four images or none, a personal
    model on Flux.1 schnell): the same check the worker makes, here so that nothing is
    queued."""
    family = await family_of(config, spec.model)
    if isinstance(spec, TrainSpec):
        family.check_training(spec.resolution)
    else:
        family.check_job(spec)


async def photo_questions(
    spec: GenerateSpec,
    limits: Limits,
    face_probe: FaceProbe,
    photos: Sequence[Photo],
    blobs: BlobStore,
) -> None:
    """The checks of a generation spec that need its input photo: the attached one
    (``photos[0]``), or for a button on a result, the stored image."""
    if spec.mode == "upscale":  # the result is upscale_factor times larger: it must fit too
        factor = spec.upscale_factor
        check_size(int(spec.width * factor), int(spec.height * factor), limits)
    # keep: face|background builds its mask from a face; face fix repaints faces; an
    # edit keeps a face, or measures the person that `face` picks.
    needs_face = (spec.mode == "inpaint" and spec.mask is None) or spec.mode == "facefix"
    edit_face = spec.mode == "edit" and (spec.keep == "face" or spec.face > 0)
    if not (needs_face or edit_face) or not spec.image:
        return
    png = photos[0].png if photos else await asyncio.to_thread(blobs.get, spec.image)
    if edit_face:
        faces = await face_probe.count_faces(png, limits.max_input_pixels)
        if faces == 0 and spec.keep == "face":
            raise UserError(NO_FACE_TO_KEEP)
        if spec.face > faces:
            raise UserError(
                f"the photo shows {faces or 'no'} face{'' if faces == 1 else 's'}, so there is "
                f"no face {spec.face} to pick (faces are numbered left to right)"
            )
    elif spec.mode == "inpaint":
        await face_probe.require_face(png, limits.max_input_pixels)
    elif await face_probe.count_faces(png, limits.max_input_pixels) == 0:
        raise UserError(NO_FACE_TO_FIX)


def still_runnable(db: sqlite_utils.Database, config: Config, row: dict, spec: JobSpec) -> None:
    """JobError when what changed while the job waited rules it out (see above)."""
    overrides = store.guild_settings(db, row.get("guild_id"))
    spec.check(effective(config, overrides).limits)
    for lora in getattr(spec, "loras", ()):
        if not store.lora_registered(db, lora.sha256):
            raise JobError(f"the LoRA {lora.name} was deleted after this job was queued")
