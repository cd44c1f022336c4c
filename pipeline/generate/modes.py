"""Run one generation job (or a batch of compatible ones) on a loaded model.

txt2img, img2img, inpaint (mask blur, "only masked" crop, unmasked pixels kept
exactly), outpaint (pad, feathered mask, inpaint), upscale (a 2× hires pass), the
keep-face / keep-background masks, and ADetailer-style face fix. Each mode reads top
to bottom; every image gets A1111 infotext. A per-step callback reports progress with
a cheap preview and checks for cancellation between steps.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageFilter

from pipeline.contract.config import EditConfig
from pipeline.contract.images import open_image
from pipeline.contract.infotext import VERSION, format_infotext, png_bytes
from pipeline.contract.jobs import GenerateSpec, JobError, OutputImage
from pipeline.faces import detection as faces
from pipeline.families import Family
from pipeline.generate import compiled
from pipeline.models.loading import LoadedModel

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, "bytes | None"], None]
OUTPAINT_FEATHER = 40  # px of the old image blended into the new area, as A1111 does
FACE_FIX_STRENGTH = 0.4  # ADetailer's default denoise
FACE_FIX_PADDING = 32
MAX_INPUT_PIXELS = 4096 * 4096


class GenerationCancelled(Exception):
    """The job's cancellation flag was set; raised between two denoising steps."""


class BlobSource(Protocol):
    def get(self, sha: str) -> bytes: ...
    def path(self, sha: str) -> Any: ...


@dataclass
class _Run:
    """What one pipeline call needs besides its images: progress and cancellation."""

    model: LoadedModel
    on_step: StepCallback | None
    should_cancel: Callable[[], bool] | None
    preview_every: int
    control: Any = None  # pipeline.control.apply.ControlCache: ControlNets, IP-Adapters
    size: tuple[int, int] = (0, 0)  # the call's width × height (packed latents' preview)

    def callback(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        if self.should_cancel is not None and self.should_cancel():
            raise GenerationCancelled()
        if self.on_step is not None:
            done = step + 1
            total = getattr(pipe, "num_timesteps", None) or done
            show = self.preview_every > 0 and (done % self.preview_every == 0)
            preview = None
            if show:
                latents = self.model.kind.preview_latents(kwargs["latents"], pipe, self.size)
                preview = latent_preview(latents, self.model.kind)
            self.on_step(done, total, preview)
        return {}


def run_generation(
    model: LoadedModel,
    specs: Sequence[GenerateSpec],
    *,
    blobs: BlobSource | None = None,
    loras: Any = None,
    on_step: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    preview_every: int = 4,
    control: Any = None,
    edit: EditConfig | None = None,
) -> list[list[OutputImage]]:
    """Run the specs (one, or several txt2img jobs sharing a batch key) as one call.

    Returns one list of images per spec, in order. Raises GenerationCancelled,
    JobError (bad input: message for the member) or ImageInputError. `edit`: the
    `[edit]` settings an edit job's identity retries follow (defaults without it).
    """
    specs = [spec if spec.seed is not None else spec.with_seed() for spec in specs]
    if not specs:
        return []
    # A few-step LoRA (Qwen-Image's Lightning) brings its steps and CFG where the job has
    # the family's defaults; jobs of a batch that now differ run as their own batches.
    changed = [model.kind.spec.with_lora_defaults(s, _lora_titles(blobs, s)) for s in specs]
    specs = [spec for spec, _ in changed]
    said = [notices for _, notices in changed]
    if len(specs) > 1 and len({s.batch_key() for s in specs}) > 1 and any(said):
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(specs):
            groups.setdefault(s.batch_key(), []).append(i)
        results: list[list[OutputImage]] = [[] for _ in specs]
        for members in groups.values():
            outputs = run_generation(
                model,
                [specs[i] for i in members],
                blobs=blobs,
                loras=loras,
                on_step=on_step,
                should_cancel=should_cancel,
                preview_every=preview_every,
                control=control,
                edit=edit,
            )
            for i, images in zip(members, outputs):
                results[i] = [_told(image, said[i]) for image in images]
        return results
    run = _Run(model, on_step, should_cancel, preview_every, control)
    if len(specs) > 1:
        keys = {spec.batch_key() for spec in specs}
        if len(keys) != 1 or "" in keys:
            raise JobError("only txt2img jobs with the same settings can share a batch")
    spec = specs[0]
    # A mode, sampler or setting the model's family lacks: one line naming the family.
    model.kind.spec.check_job(spec)
    model.kind.spec.resolve_sampler(spec.sampler, spec.schedule)
    if spec.mode == "edit":
        edited = _edit_outputs(run, spec, blobs, loras, edit or EditConfig())
        return [[_told(image, said[0]) for image in edited]]
    if spec.mode == "txt2img":
        results = txt2img(run, specs, blobs, loras)
    else:
        image = _input_image(spec.image, blobs, "image")
        modes = {
            "img2img": img2img,
            "inpaint": inpaint,
            "outpaint": outpaint,
            "upscale": upscale,
            "facefix": face_fix_only,
        }
        results = [modes[spec.mode](run, spec, image, blobs, loras)]
    if spec.face_fix:
        results = [
            [fix_faces(run, s, img, blobs, loras) for img in images]
            for s, images in zip(specs, results)
        ]
    hashes = {ref.sha256: lora_file_hash(blobs, ref.sha256) for s in specs for ref in s.loras}
    return [
        [
            _output(
                model,
                s,
                img,
                seed,
                hashes,
                told + _lora_notices(loras, s) + model.kind.prompt_notices(model.pipe, s),
                _control_infotext(control, s, model),
            )
            for img, seed in zip(images, s.seeds())
        ]
        for s, images, told in zip(specs, results, said)
    ]


def _lora_titles(blobs, spec: GenerateSpec) -> dict[str, tuple[str, ...]]:
    """Each LoRA file's own names for itself (kohya's `ss_output_name`, the model spec's
    title), which tell a distillation LoRA however the member named it."""
    if not spec.loras or blobs is None:
        return {}
    from safetensors import safe_open

    titles = {}
    for ref in spec.loras:
        try:
            with safe_open(str(blobs.path(ref.sha256)), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - an unreadable file is refused by the LoRA cache
            meta = {}
        titles[ref.sha256] = tuple(meta[k] for k in _LORA_TITLE_KEYS if meta.get(k))
    return titles


_LORA_TITLE_KEYS = ("ss_output_name", "modelspec.title", "name")


def _told(output: OutputImage, notices: tuple[str, ...]) -> OutputImage:
    from dataclasses import replace

    return replace(output, notices=notices + output.notices) if notices else output


def _edit_outputs(
    run: _Run, spec: GenerateSpec, blobs, loras, settings: EditConfig
) -> list[OutputImage]:
    """An edit job's images: each drawn until its person is kept (`generate/editing.py`),
    with its identity, tries and the edit's infotext fields."""
    from pipeline.generate.editing import run_edit

    photo = _input_image(spec.image, blobs, "image")
    edited = run_edit(run, spec, photo, blobs, loras, settings)
    model = run.model
    hashes = {ref.sha256: lora_file_hash(blobs, ref.sha256) for ref in spec.loras}
    notices = _lora_notices(loras, spec) + model.kind.prompt_notices(model.pipe, spec)
    return [
        dataclasses.replace(
            _output(model, spec, e.image, e.seed, hashes, notices + e.notices, e.infotext),
            identity=e.identity,
            tries=e.tries,
            input_face=e.input_face,
        )
        for e in edited
    ]


def _lora_notices(loras: Any, spec: GenerateSpec) -> tuple[str, ...]:
    """What the LoRA cache says the member must know about this job's LoRAs."""
    if loras is None or not spec.loras:
        return ()
    return tuple(loras.notices(spec.loras))


def _control_infotext(control, spec: GenerateSpec, model: LoadedModel) -> dict[str, str]:
    if not spec.control and spec.reference is None:
        return {}
    from pipeline.control.apply import control_infotext

    return control_infotext(control, spec, model.kind)


@contextmanager
def _control(run: _Run, pipe, kind: str, samples, blobs, width: int, height: int, **where):
    """The job's ControlNet units / IP-Adapter reference: the pipeline to call and its
    extra arguments (unchanged pipeline, no arguments, for jobs with neither)."""
    if not any(s.control or s.reference is not None for s in samples):
        yield pipe, {}
        return
    from pipeline.control.apply import applied

    with applied(run.control, run.model, pipe, kind, samples, blobs, width, height, **where) as got:
        yield got


@functools.lru_cache(maxsize=256)
def _lora_hash_of(path: str, sha: str) -> str:
    from pipeline.loras.adapters import lora_hash

    return lora_hash(path)


def lora_file_hash(blobs, sha: str) -> str:
    """A1111's "Lora hashes" value (Civitai's AutoV3), computed once per file."""
    return _lora_hash_of(str(blobs.path(sha)), sha)


# --- the modes ----------------------------------------------------------------------


def txt2img(run: _Run, specs: Sequence[GenerateSpec], blobs, loras) -> list[list[Image.Image]]:
    # 1. One sample per image: spec × count, each with its own seeded generator, so
    #    an image is the same whether it ran alone or in a batch.
    spec = specs[0]
    chunked = run.model.kind.prompt_chunks
    if len(specs) > 1 and chunked and len(counts := _chunk_counts(run.model, specs)) > 1:
        # Padding a shorter prompt with empty chunks would change its image: each chunk
        # count runs as its own batch, so every image equals the same job run alone.
        results: list[list[Image.Image]] = [[] for _ in specs]
        for members in counts.values():
            group = txt2img(run, [specs[i] for i in members], blobs, loras)
            for i, images in zip(members, group):
                results[i] = images
        return results
    samples = [(s, seed) for s in specs for seed in s.seeds()]
    per_sample = [s for s, _ in samples]
    # 2. ControlNet/IP-Adapter, sampler, LoRAs, prompt embeddings; 3. denoise and decode.
    with (
        _control(run, run.model.pipe, "txt2img", per_sample, blobs, spec.width, spec.height) as (
            pipe,
            extra,
        ),
        _sampler(run.model, pipe, spec, len(samples)),
        _loras(loras, per_sample, blobs, spec),
    ):
        conditioning = _encode(pipe, per_sample)
        images = _call(
            run,
            pipe,
            spec,
            conditioning,
            [seed for _, seed in samples],
            width=spec.width,
            height=spec.height,
            **extra,
        )
    return _split(images, [s.count for s in specs])


def _chunk_counts(model: LoadedModel, specs: Sequence[GenerateSpec]) -> dict[int, list[int]]:
    from pipeline.generate.conditioning import denoising_evaluations, plan_chunk_count

    spec = specs[0]  # batched specs share sampler, schedule and steps
    scheduler = model.kind.scheduler(model.scheduler_config, spec.sampler, spec.schedule, spec.mode)
    evaluations = denoising_evaluations(scheduler, spec.steps)
    groups: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(plan_chunk_count(model.pipe, spec, evaluations), []).append(i)
    return groups


def img2img(run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras) -> list[Image.Image]:
    source = image.resize((spec.width, spec.height), Image.LANCZOS)
    samples = [spec] * spec.count
    inputs = _img2img_input(run, spec, source)
    with _image_contexts(run, run.model.img2img(), "img2img", spec, image, blobs, loras) as (
        pipe,
        extra,
    ):
        return _call_for_spec(run, pipe, spec, samples, **inputs, **extra)


def _img2img_input(run: _Run, spec: GenerateSpec, source: Image.Image) -> dict[str, Any]:
    """img2img's input as the model reads it: the image denoised from at the spec's
    strength, or a control model's map of it (Flux.1 Canny/Depth: `control_image`)."""
    preprocessor = run.model.kind.input_control(run.model.config)
    if preprocessor is None:
        return {"image": source, "strength": spec.strength}
    from pipeline.contract.control import PREPROCESSORS
    from pipeline.control.preprocessors import fit, run_preprocessor

    _, low, high = PREPROCESSORS[preprocessor]
    depth_model = run.control.config.control.depth_model if run.control is not None else ""
    mapped = run_preprocessor(
        preprocessor, source, threshold_a=low, threshold_b=high, depth_model=depth_model
    )
    return {"control_image": fit(mapped, spec.width, spec.height, "Crop and Resize")}


def upscale(run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras) -> list[Image.Image]:
    """A hires pass: resize by the factor, then img2img at the spec's (low) strength."""
    width = _multiple_of_8(image.width * spec.upscale_factor)
    height = _multiple_of_8(image.height * spec.upscale_factor)
    big = GenerateSpec(**{**_fields(spec), "mode": "img2img", "width": width, "height": height})
    return img2img(run, big, image, blobs, loras)


def inpaint(
    run: _Run,
    spec: GenerateSpec,
    image: Image.Image,
    blobs,
    loras,
    mask: Image.Image | None = None,
    strength: float | None = None,
) -> list[Image.Image]:
    """Repaint the white part of the mask; every pixel where the (blurred) mask is 0
    is the input pixel, exactly."""
    # 1. The mask: given, uploaded, or built from the faces in the photo.
    if mask is None:
        mask = _mask_for(spec, image, blobs)
    # Face masks come feathered already; blurring again would reach into the kept face.
    feathered = spec.keep is not None and not spec.mask
    blur = 0 if feathered else spec.mask_blur
    blurred = mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask
    # 2. The region to repaint: a padded crop around the mask ("only masked"), or all.
    crop = mask_crop_box(mask, spec.only_masked_padding, (spec.width, spec.height))
    if not spec.only_masked:
        crop = (0, 0, image.width, image.height)
    region = image.crop(crop).resize((spec.width, spec.height), Image.LANCZOS)
    region_mask = blurred.crop(crop).resize((spec.width, spec.height), Image.LANCZOS)
    # 3. Inpaint the region at the processing size.
    samples = [spec] * spec.count
    with _image_contexts(
        run, run.model.inpaint(), "inpaint", spec, image, blobs, loras, crop=crop
    ) as (pipe, extra):
        painted = _call_for_spec(
            run,
            pipe,
            spec,
            samples,
            image=region,
            mask_image=region_mask,
            strength=strength or spec.strength,
            **extra,
        )
    # 4. Paste back through the blurred mask: where it is 0 the original stays.
    return [paste_back(image, p, crop, blurred) for p in painted]


def outpaint(run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras) -> list[Image.Image]:
    canvas, mask = outpaint_canvas(image, spec.outpaint_direction or "all", spec.outpaint_pixels)
    # The feathered mask already blends the seam; new content starts from noise.
    flat = GenerateSpec(**{**_fields(spec), "mask_blur": 0})
    return inpaint(run, flat, canvas, blobs, loras, mask=mask, strength=1.0)


def face_fix_only(
    run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras
) -> list[Image.Image]:
    """The "Fix faces" button: the face pass alone, on an earlier result."""
    return [fix_faces(run, spec, image, blobs, loras)]


def edit(run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras) -> list[Image.Image]:
    """Instruction editing (Qwen-Image-Edit, Flux.2 klein's reference images): the input
    image and the job's further ones, given to the family's edit pipeline as it reads
    them; the output has the job's size."""
    images = [image] + [_input_image(sha, blobs, "image") for sha in spec.images]
    samples = [spec] * spec.count
    pipe = run.model.derive("edit")
    with (
        run.model.kind.edit_inputs(images, spec.width, spec.height) as inputs,
        _sampler(run.model, pipe, spec),
        _loras(loras, samples, blobs, spec),
    ):
        return _call_for_spec(
            run, pipe, spec, samples, width=spec.width, height=spec.height, **inputs
        )


def fix_faces(run: _Run, spec: GenerateSpec, image: Image.Image, blobs, loras) -> Image.Image:
    """ADetailer: for each face, inpaint a padded crop at the family's default size (512²,
    SDXL 1024²) with denoise 0.4 and paste it back through a feathered mask. Nothing
    outside the crop changes."""
    boxes = faces.detect_faces(image)
    size = run.model.kind.spec.default_size
    for box in boxes:
        crop = faces.face_crop_box(box, image.size, FACE_FIX_PADDING)
        mask = Image.new("L", image.size, 0)
        mask.paste(faces.face_mask(image.size, [box]).crop(crop), crop[:2])
        face_spec = GenerateSpec(
            **{
                **_fields(spec),
                "mode": "inpaint",
                "count": 1,
                "width": size,
                "height": size,
                "only_masked": True,
                "only_masked_padding": FACE_FIX_PADDING,
                "mask_blur": 0,
                "control": (),  # the units' maps describe the whole image, not a face crop
            }
        )
        image = inpaint(run, face_spec, image, blobs, loras, mask=mask, strength=FACE_FIX_STRENGTH)[
            0
        ]
    return image


# --- masks and geometry -------------------------------------------------------------


def _mask_for(spec: GenerateSpec, image: Image.Image, blobs) -> Image.Image:
    if spec.mask:
        mask = open_image(_blob(blobs, spec.mask), max_pixels=MAX_INPUT_PIXELS, name="mask")
        if mask.size != image.size:
            raise JobError(
                f"the mask is {mask.width}×{mask.height} but the image is "
                f"{image.width}×{image.height}; they must be the same size"
            )
        mask = mask.convert("L")
    elif spec.keep:
        mask = faces.keep_mask(image.size, faces.detect_faces(image), spec.keep)
    else:
        raise JobError("inpaint needs a mask (white = repaint) or keep: face|background")
    if mask.getextrema()[1] == 0:
        raise JobError("the mask is empty: paint the area to repaint in white")
    return mask


def mask_crop_box(
    mask: Image.Image, padding: int, target: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The mask's bounding box grown by `padding`, widened to the target aspect ratio and
    kept inside the image (A1111's get_crop_region + expand_crop_region)."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox() or (0, 0, *mask.size)
    x0, y0, x1, y1 = box
    x0, y0 = max(x0 - padding, 0), max(y0 - padding, 0)
    x1, y1 = min(x1 + padding, mask.width), min(y1 + padding, mask.height)
    ratio = target[0] / target[1]
    width, height = x1 - x0, y1 - y0
    if width / height < ratio:  # too narrow: widen
        x0, x1 = _grow_span(x0, x1, round(height * ratio), mask.width)
    else:
        y0, y1 = _grow_span(y0, y1, round(width / ratio), mask.height)
    return x0, y0, x1, y1


def _grow_span(start: int, end: int, wanted: int, limit: int) -> tuple[int, int]:
    wanted = min(wanted, limit)
    extra = wanted - (end - start)
    start = max(start - extra // 2, 0)
    end = start + wanted
    if end > limit:
        start, end = limit - wanted, limit
    return start, end


def paste_back(
    original: Image.Image, painted: Image.Image, crop: tuple[int, int, int, int], mask: Image.Image
) -> Image.Image:
    width, height = crop[2] - crop[0], crop[3] - crop[1]
    canvas = original.copy()
    canvas.paste(painted.resize((width, height), Image.LANCZOS), crop[:2])
    return Image.composite(canvas, original, mask)


def outpaint_canvas(
    image: Image.Image, direction: str, pixels: int
) -> tuple[Image.Image, Image.Image]:
    """The enlarged canvas (new area filled by stretching the edge pixels, which gives the
    sampler the right colours to start from) and its feathered mask (255 = new area)."""
    left = pixels if direction in ("left", "all") else 0
    right = pixels if direction in ("right", "all") else 0
    top = pixels if direction in ("up", "all") else 0
    bottom = pixels if direction in ("down", "all") else 0
    array = np.asarray(image)
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded)
    mask = np.full(padded.shape[:2], 255, dtype=np.float32)
    h, w = array.shape[:2]
    feather = min(OUTPAINT_FEATHER, pixels, w // 4, h // 4)
    inner = np.zeros((h, w), dtype=np.float32)
    # Ramp from 0 (deep inside the old image) to 255 at the old edge, only on new sides.
    ys, xs = np.mgrid[0:h, 0:w]
    distances = [np.full((h, w), np.inf)]
    for pad, dist in ((left, xs), (right, w - 1 - xs), (top, ys), (bottom, h - 1 - ys)):
        if pad:
            distances.append(dist.astype(np.float32))
    nearest = np.minimum.reduce(distances)
    if feather > 0:
        inner = np.clip(1.0 - nearest / feather, 0.0, 1.0) * 255
    mask[top : top + h, left : left + w] = inner
    return canvas, Image.fromarray(mask.astype(np.uint8), "L")


def _multiple_of_8(value: float) -> int:
    return max(8, int(round(value / 8)) * 8)


# --- pieces shared by the modes ------------------------------------------------------


@contextmanager
def _sampler(
    model: LoadedModel, pipe, spec: GenerateSpec, images: int | None = None
) -> Iterator[None]:
    scheduler = model.kind.scheduler(model.scheduler_config, spec.sampler, spec.schedule, spec.mode)
    if hasattr(scheduler.config, "noise_sampler_seed"):
        # DPM++ SDE draws its Brownian noise from its own seed: tie it to the job's.
        scheduler = scheduler.from_config(scheduler.config, noise_sampler_seed=spec.seed)
    original = pipe.scheduler
    pipe.scheduler = scheduler
    # Memory by size: a large image decodes in tiles; a batch whose images add up to
    # more than that decodes one image at a time (slicing), so the VAE's activations
    # stay those of one image.
    pixels = spec.width * spec.height
    tiling = pixels > model.config.vae_tiling_above
    count = spec.count if images is None else images
    slicing = count > 1 and count * pixels > model.config.vae_tiling_above
    if tiling:
        pipe.vae.enable_tiling()
    if slicing:
        pipe.vae.enable_slicing()
    try:
        yield
    finally:
        pipe.scheduler = original
        if tiling:
            pipe.vae.disable_tiling()
        if slicing:
            pipe.vae.disable_slicing()


@contextmanager
def _loras(cache, samples: Sequence[GenerateSpec], blobs, spec: GenerateSpec) -> Iterator[None]:
    per_sample = [[(ref, blobs.path(ref.sha256)) for ref in s.loras] for s in samples]
    if not any(per_sample):
        yield
        return
    if cache is None:
        raise JobError("LoRAs are not available on this worker")
    if all(lst == per_sample[0] for lst in per_sample):
        with cache.activate(per_sample[0], images=len(samples)):
            yield
    else:
        with cache.activate_per_sample(per_sample, cfg=spec.cfg_scale > 1):
            yield


def _encode(pipe, samples: Sequence[GenerateSpec]) -> dict[str, Any]:
    # Encoded in _call, once the number of denoising evaluations (which prompt editing
    # and alternation count in) is known: pipeline.generate.conditioning.
    return {"samples": list(samples)}


@contextmanager
def _image_contexts(
    run: _Run, base, mode: str, spec: GenerateSpec, image: Image.Image, blobs, loras, **crop: Any
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """What img2img and inpaint both run inside: ControlNet/IP-Adapter read from the
    source `image` (and `crop`), the spec's sampler, its LoRAs; yields (pipe, extra)."""
    samples = [spec] * spec.count
    with (
        _control(
            run, base, mode, samples, blobs, spec.width, spec.height, source=image, **crop
        ) as (pipe, extra),
        _sampler(run.model, pipe, spec),
        _loras(loras, samples, blobs, spec),
    ):
        yield pipe, extra


def _call_for_spec(
    run: _Run, pipe, spec: GenerateSpec, samples: Sequence[GenerateSpec], **inputs: Any
) -> list[Image.Image]:
    """`_call` for one spec's samples with the spec's own seeds: what img2img, inpaint and
    edit each run inside their sampler and LoRA contexts (txt2img batches several specs)."""
    return _call(run, pipe, spec, _encode(pipe, samples), spec.seeds(), **inputs)


def _call(
    run: _Run,
    pipe,
    spec: GenerateSpec,
    conditioning: dict[str, Any],
    seeds: list[int],
    **inputs: Any,
) -> list[Image.Image]:
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    steps = spec.steps
    if inputs.get("strength"):
        # diffusers runs int(steps × strength) steps; at low strength that can be 0.
        steps = max(steps, math.ceil(1 / inputs["strength"]))
    kind = run.model.kind_of(pipe)
    run.size = (spec.width, spec.height)
    reference = inputs.pop("reference_tokens", None)  # Flux.1's Redux: prompt tokens
    with (
        torch.inference_mode(),
        kind.prompt_conditioning(
            pipe, conditioning["samples"], steps, inputs.get("strength")
        ) as embeds,
        kind.call_context(pipe, spec.width, spec.height),
        compiled.active(run.model, pipe),
    ):
        if reference is not None:
            embeds = kind.with_reference(pipe, embeds, *reference)
        result = pipe(
            **embeds,
            num_inference_steps=steps,
            **kind.guidance_arguments(spec),
            generator=generators,
            callback_on_step_end=run.callback,
            callback_on_step_end_tensor_inputs=["latents"],
            **kind.call_inputs(spec, inputs),
        )
    return result.images


def _split(images: list[Image.Image], counts: list[int]) -> list[list[Image.Image]]:
    out, start = [], 0
    for count in counts:
        out.append(images[start : start + count])
        start += count
    return out


def _fields(spec: GenerateSpec) -> dict[str, Any]:
    from dataclasses import asdict, fields

    values = asdict(spec)
    values["loras"] = spec.loras  # keep LoraRef objects, not dicts
    values["control"], values["reference"] = spec.control, spec.reference
    return {f.name: values[f.name] for f in fields(spec)}


def _blob(blobs, sha: str) -> bytes:
    if blobs is None:
        raise JobError("this job needs an input image but no blob store was given")
    return blobs.get(sha)


def _input_image(sha: str | None, blobs, name: str) -> Image.Image:
    if not sha:
        raise JobError(f"this job needs an input {name}")
    return open_image(_blob(blobs, sha), max_pixels=MAX_INPUT_PIXELS, name=name)


def latent_preview(latents: torch.Tensor, family: Family, max_side: int = 256) -> bytes | None:
    """The first sample's latents as a small JPEG, projected to RGB by the family's fixed
    matrix (A1111's "Approx cheap" preview: no model, one matmul); None for a family
    without factors."""
    factors, bias = family.preview_factors, family.preview_bias
    if not factors:
        return None
    latent = latents[0].detach().float().cpu()
    if latent.shape[0] != len(factors):  # 9-channel inpainting latents: noise channels first
        latent = latent[: len(factors)]
    rgb = torch.einsum("chw,cr->hwr", latent, torch.tensor(factors)) + torch.tensor(bias)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).byte().numpy()
    image = Image.fromarray(array, "RGB")
    scale = max_side / max(image.size)
    if scale > 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.BILINEAR
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def infotext_for(
    model: LoadedModel,
    spec: GenerateSpec,
    seed: int,
    size: tuple[int, int],
    lora_hashes: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    sampler, schedule = model.kind.spec.resolve_sampler(spec.sampler, spec.schedule)
    params: dict[str, Any] = {
        "Steps": spec.steps,
        "Sampler": sampler,
        "Schedule type": None if schedule == "Automatic" else schedule,
        "CFG scale": spec.cfg_scale,
        # Forge's name for a guidance-distilled model's embedded guidance (Flux.1)
        "Distilled CFG Scale": model.kind.spec.guidance_of(spec),
        "Seed": seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": model.hash,
        "Model": model.name,
        "Denoising strength": spec.strength if spec.mode in ("img2img", "inpaint") else None,
        "Mask blur": spec.mask_blur if spec.mode == "inpaint" else None,
        "Outpaint": f"{spec.outpaint_direction} {spec.outpaint_pixels}px"
        if spec.mode == "outpaint"
        else None,
        "Hires upscale": spec.upscale_factor if spec.mode == "upscale" else None,
        "ADetailer model": "haarcascade face" if spec.face_fix or spec.mode == "facefix" else None,
        "Lora hashes": ", ".join(
            f"{r.name}: {(lora_hashes or {}).get(r.sha256, r.sha256[:12])}" for r in spec.loras
        )
        or None,
        **(extra or {}),
        "Version": VERSION,
    }
    if spec.mode == "upscale":
        params["Denoising strength"] = spec.strength
    return format_infotext(spec.a1111_prompt(), spec.negative_prompt, params)


def _output(
    model: LoadedModel,
    spec: GenerateSpec,
    image: Image.Image,
    seed: int,
    lora_hashes: dict[str, str],
    notices: tuple[str, ...] = (),
    extra: dict[str, str] | None = None,
) -> OutputImage:
    text = infotext_for(model, spec, seed, image.size, lora_hashes, extra)
    return OutputImage(png=png_bytes(image, text), seed=seed, infotext=text, notices=notices)
