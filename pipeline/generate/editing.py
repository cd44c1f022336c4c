"""/edit on the worker: an instruction edit whose person is measured on every result,
and drawn again when the person was lost (issue 25).

An edit job, top to bottom (`run_edit`):

1. The person: the photo's faces (`detection.detect_faces`), the one the member picked
   with `face: n` (numbered left to right) or else the largest, and its dlib descriptor
   (`faces/identity.py`). A photo without a face: nothing is measured or retried.
2. Draw: the family's edit pipeline (`modes.edit`: Qwen-Image-Edit, Flux.2 klein,
   Kontext) or, for a family without one (`FamilySpec.edit_route == "classic"`: SD 1.x,
   SDXL), the instruction as the prompt of an img2img, or with `keep` of an inpaint
   around the kept face or person, with the member's LoRAs as any job; one pipeline
   call per image.
3. Onto the photo (`align.align_to_input`): at the photo's size, registered where the
   family's model moves its picture (`FamilySpec.edit_registers`), the kept region
   composited with a feathered edge; then face fix when asked.
4. Measure the identity of the result's best-matching face against the photo's (both on
   copies of at most 1024 px).
5. Below `[edit] min_identity`, draw again with the next seed, at most `max_retries`
   times (A1111's "next seed"): image i of the job at try k draws with
   seed + i + k × count, so a retry never repeats another image's seed (with count 1:
   consecutive seeds). The best try is posted; its infotext carries its identity and
   tries, and a notice says which seeds were redrawn, or that the person was lost.

Progress counts every denoising call of the job (tries, face fix): the step never goes
back, and the total grows by a call's steps when that call begins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.contract.config import EditConfig
from pipeline.contract.jobs import MAX_SEED, GenerateSpec, JobError
from pipeline.faces import detection as faces
from pipeline.faces import identity
from pipeline.generate import align, modes

# Identity is measured on copies at most this large (photo and result alike): dlib reads
# a face as a 150 px chip, and its HOG fallback on a 16 MP result would take a minute.
MEASURE_MAX_SIDE = 1024


@dataclass(frozen=True)
class Person:
    """Whom an edit keeps: the photo's faces, those `keep` keeps, and the reference."""

    found: list[faces.FaceBox]  # every face in the photo, largest first
    kept: list[faces.FaceBox]  # what keep: face|background keeps (the chosen face, or all)
    reference: identity.FaceIdentity | None  # None: the photo shows no face


@dataclass(frozen=True)
class Try:
    """One drawing of one image of the job, on the photo, measured."""

    image: Image.Image
    seed: int
    score: identity.IdentityScore | None
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Edited:
    """One image of an edit job as posted: its best try and what the member is told."""

    image: Image.Image
    seed: int
    identity: float | None
    tries: int
    input_face: bool
    notices: tuple[str, ...]
    infotext: dict[str, Any]  # the edit's infotext fields


@dataclass(frozen=True)
class EditJob:
    """One edit job as it runs: the pipeline call's context (`modes._Run`), the spec,
    the member's photo, the blob store, the LoRA cache, and the person."""

    run: Any
    spec: GenerateSpec
    photo: Image.Image
    blobs: Any
    loras: Any
    person: Person

    @property
    def classic(self) -> bool:
        """Whether the model edits by the classic route (no instruction-editing pipeline)."""
        return self.run.model.kind.spec.edit_route == "classic"


def run_edit(
    run: Any,
    spec: GenerateSpec,
    photo: Image.Image,
    blobs: Any,
    loras: Any,
    settings: EditConfig,
) -> list[Edited]:
    """Every image of the edit job `spec` on `photo`, each redrawn while its person is lost."""
    # 1. The person, and how many tries an image may take.
    person = person_of(photo, spec)
    limit = 1 + settings.max_retries if person.reference is not None else 1
    if run.on_step is not None:
        run = dataclasses.replace(run, on_step=JobSteps(run.on_step))
    job = EditJob(run, spec, photo, blobs, loras, person)
    tries: list[list[Try]] = [[] for _ in range(spec.count)]
    pending = list(range(spec.count))
    for attempt in range(limit):
        # 2. Draw the images still pending, with this try's seeds.
        seeds = [try_seed(spec, i, attempt) for i in pending]
        drawn = _draw(job, seeds)
        # 3. On the photo, 4. measured.
        for i, seed, image in zip(pending, seeds, drawn):
            tries[i].append(_finish(job, image, seed))
        # 5. Redraw those that lost the person.
        pending = [i for i in pending if _lost(tries[i][-1], settings)]
        if not pending:
            break
    return [_edited(job, image_tries, settings) for image_tries in tries]


def try_seed(spec: GenerateSpec, index: int, attempt: int) -> int:
    """The seed image `index` draws with at try `attempt` (0: the job's own seeds)."""
    return (spec.seeds()[index] + attempt * spec.count) % (MAX_SEED + 1)


# ---------------------------------------------------------------- 1. the person


def person_of(photo: Image.Image, spec: GenerateSpec) -> Person:
    """The photo's faces and the person the edit keeps: `spec.face` (1..n, left to right),
    or the largest face. A face number the photo lacks is refused in one line."""
    found = faces.detect_faces(photo)
    if spec.face and spec.face > len(found):
        shows = "no face" if not found else f"{len(found)} face{'s' if len(found) > 1 else ''}"
        pick = f"; pick 1 to {len(found)}" if found else ""
        raise JobError(f"face {spec.face} was asked for, but the photo shows {shows}{pick}")
    if not found:
        return Person([], [], None)
    if spec.face:
        chosen = sorted(found, key=lambda box: box.center[0])[spec.face - 1]
        kept = [chosen]
    else:
        chosen, kept = found[0], found
    small, factor = measurable(photo)
    box = chosen.scaled(factor) if factor != 1.0 else chosen
    pixels = np.ascontiguousarray(np.asarray(small.convert("RGB")))
    return Person(found, kept, identity.FaceIdentity(identity.embed(pixels, box), box))


def measurable(image: Image.Image) -> tuple[Image.Image, float]:
    """The copy identity is measured on (at most MEASURE_MAX_SIDE), and its scale."""
    factor = min(1.0, MEASURE_MAX_SIDE / max(image.size))
    if factor == 1.0:
        return image, 1.0
    size = (round(image.width * factor), round(image.height * factor))
    return image.resize(size, Image.Resampling.LANCZOS), factor


# ---------------------------------------------------------------- 2. drawing


def _draw(job: EditJob, seeds: list[int]) -> list[Image.Image]:
    """One image per seed, each its own pipeline call: the edit pipelines read their
    input images per prompt (Qwen-Image-Edit's processor refuses two prompts over one
    image), and a retry's seed need not follow another's."""
    run, photo, blobs, loras = job.run, job.photo, job.blobs, job.loras
    images: list[Image.Image] = []
    for seed in seeds:
        one = dataclasses.replace(job.spec, seed=seed, count=1)
        if not job.classic:
            images += modes.edit(run, one, photo, blobs, loras)
        elif one.keep and job.person.kept:
            mask = faces.keep_mask(photo.size, job.person.kept, one.keep)  # as /inpaint keep:
            inpaint = dataclasses.replace(one, mode="inpaint")
            images += modes.inpaint(run, inpaint, photo, blobs, loras, mask=mask)
        else:
            img2img = dataclasses.replace(one, mode="img2img")
            images += modes.img2img(run, img2img, photo, blobs, loras)
    return images


# ---------------------------------------------------------------- 3. onto the photo, 4. measured


def _finish(job: EditJob, image: Image.Image, seed: int) -> Try:
    # The classic inpaint kept the region already; its img2img and every edit model's
    # result are mapped back onto the photo here.
    spec, person = job.spec, job.person
    keep = spec.keep if spec.keep and person.kept and not job.classic else "none"
    placed = align.align_to_input(
        job.photo,
        image,
        keep=keep,
        face_boxes=person.kept,
        registered=job.run.model.kind.spec.edit_registers,
    )
    image = placed.image
    if spec.face_fix:
        fixing = dataclasses.replace(spec, seed=seed)
        image = modes.fix_faces(job.run, fixing, image, job.blobs, job.loras)
    score = None
    if person.reference is not None:
        score = identity.identity_score(person.reference, measurable(image)[0])
    return Try(image, seed, score, placed.notices)


def _lost(attempt: Try, settings: EditConfig) -> bool:
    return attempt.score is not None and attempt.score.score < settings.min_identity


# ---------------------------------------------------------------- 5. what is posted


def _edited(job: EditJob, tries: list[Try], settings: EditConfig) -> Edited:
    spec, person = job.spec, job.person
    best = max(tries, key=lambda t: t.score.score if t.score is not None else 0.0)
    notices = [*_route_notices(job), *best.notices]
    if person.reference is None and spec.keep:
        notices.append(
            f"no face found in the photo, so nothing was kept (keep: {spec.keep} needs a "
            "face) and identity was not measured"
        )
    notices += _identity_notices(best, tries, settings)
    score = best.score.score if best.score is not None else None
    fields = {
        "Identity": best.score.infotext if best.score is not None else None,
        "Edit tries": len(tries),
        "Edit face": spec.face or None,
        "Edit keep": spec.keep,
        "Edit route": _route(job) if job.classic else None,
        "Denoising strength": spec.strength if job.classic else None,
    }
    return Edited(
        best.image, best.seed, score, len(tries), bool(person.found), tuple(notices), fields
    )


def _identity_notices(best: Try, tries: list[Try], settings: EditConfig) -> list[str]:
    """Which seeds lost the person and what they scored (the image's `identity` and
    `tries` fields say the rest, and the bot words them)."""
    lost = [t for t in tries if _lost(t, settings)]
    if not lost:
        return []
    seeds = ", ".join(str(t.seed) for t in lost)
    scores = ", ".join(_score(t) for t in lost)
    scored = (
        f"seed{'s' if len(lost) > 1 else ''} {seeds} scored {scores}, "
        f"below {settings.min_identity:g}"
    )
    if _lost(best, settings):
        shown = f"; seed {best.seed}'s result is shown" if len(tries) > 1 else ""
        return [f"the person could not be kept: {scored}{shown}"]
    return [f"{scored}: redrawn, seed {best.seed} scored {_score(best)}"]


def _score(attempt: Try) -> str:
    return f"{attempt.score.score:.2f}" if attempt.score is not None else "none"


def _route(job: EditJob) -> str:
    """The infotext's `Edit route` value for the classic route."""
    return "classic inpaint" if job.spec.keep and job.person.kept else "classic img2img"


def _route_notices(job: EditJob) -> list[str]:
    if not job.classic:
        return []
    how = f"the instruction as the prompt at denoising strength {job.spec.strength:g}"
    label = job.run.model.kind.label
    return [f"{label} has no instruction-editing model: edited by the classic route ({how})"]


# ---------------------------------------------------------------- progress


class JobSteps:
    """Progress over every denoising call of a job: the step keeps counting from one call
    to the next (tries, face fix) and the total grows by each call's steps as it begins,
    so neither ever goes back."""

    def __init__(self, on_step: Callable[[int, int, bytes | None], None]) -> None:
        self.on_step = on_step
        self.before = 0  # steps of the calls that have ended
        self.done = 0
        self.total = 0

    def __call__(self, done: int, total: int, preview: bytes | None) -> None:
        if done <= self.done:  # a new call began
            self.before += self.total
        self.done, self.total = done, total
        self.on_step(self.before + done, self.before + total, preview)
