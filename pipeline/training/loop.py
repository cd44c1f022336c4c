"""Train a personal model (LoRA, LoHa or LoKr) on a member's photos.

Shaped like diffusers' `examples/dreambooth/train_dreambooth_lora.py`, but as one
function a worker calls on the pipeline it already holds: `train_lora` reads top to
bottom — check inputs, base-model work (class images, held-out loss, cached latents
and text embeddings), add adapters, resume, the training loop, validation, samples,
export — and always leaves the pipeline exactly as it found it.

Our speed-up over the diffusers example: the VAE and (when frozen) the text
encoders run once per photo before the loop, not once per step.

The output is a `.safetensors` file in kohya/AUTOMATIC1111 key format
(`lora_unet_…`, `lora_te_…`), so it loads in A1111, ComfyUI and diffusers'
`load_lora_weights` (LoRA); LoHa/LoKr use LyCORIS' key names (`hada_w1_a…`,
`lokr_w1…`), which A1111 and ComfyUI read natively.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from pipeline.contract.jobs import JobError, Limits, TrainSpec
from pipeline.families import of_pipe
from pipeline.training.adapters import (
    PipeState,
    add_adapters,
    freeze,
    param_groups,
    quiet,
    set_aside_adapters,
    set_training,
)
from pipeline.training.checkpoints import (
    CHECKPOINT_FILE,
    checkpoint_key,
    checkpoint_state,
    load_checkpoint,
    restore_checkpoint,
    save_atomically,
)
from pipeline.training.denoising import (
    Cond,
    Encoded,
    denoising_loss,
    encode_images,
    encode_text,
    is_flow,
    micro_conditioning,
    snr_weights,
    training_scheduler,
)
from pipeline.training.export import kohya_state_dict, metadata_of
from pipeline.training.flow_matching import draw_flow, flow_losses
from pipeline.training.precision import Precision
from pipeline.training.samples import (
    class_image_dir,
    class_prompt,
    default_sample_prompts,
    draw_class_images,
    sample,
)
from pipeline.training.validation import held_out_loss

MAX_GRAD_NORM = 1.0  # as the diffusers example
DEFAULT_CHUNK = 50  # steps between checkpoints when the spec asks for none


class TrainingCancelled(Exception):
    """`should_cancel()` said stop. The checkpoint on disk (if any) is kept."""


@dataclass(frozen=True)
class TrainingPaused:
    """Training yielded the GPU after saving a checkpoint at `step`; call `train_lora`
    again with the same spec and checkpoint_dir to go on from there."""

    step: int


@dataclass
class TrainResult:
    safetensors: bytes  # kohya-format file
    metadata: dict[str, str]  # also stored in the file's header
    base_loss: float  # held-out denoising loss of the base model (nan: no test photos)
    adapter_loss: float  # the same with the trained adapter
    got_worse: bool
    samples: list[Image.Image] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0  # training time over all chunks of this job


@dataclass(frozen=True)
class TrainPhotos:
    """The prepared photos: what the adapter learns from, and what it is judged on."""

    train: list[Image.Image]
    captions: list[str] = field(default_factory=list)  # one per train photo; [] = the token
    test: list[Image.Image] = field(default_factory=list)  # held out, for validation


@dataclass(frozen=True)
class TrainOptions:
    """Where the job keeps its checkpoint, what it may ask of the caller, and how the
    class images and samples are drawn."""

    checkpoint_dir: Path
    limits: Limits
    on_progress: Callable[[int, int, float], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    should_yield: Callable[[], bool] | None = None
    model_name: str = ""
    model_hash: str = ""
    sample_prompts: list[str] | None = None
    sample_steps: int = 20
    sample_size: int | None = None
    num_class_images: int = 50


# --- the entry point ------------------------------------------------------------------


def train_lora(
    pipe: Any, spec: TrainSpec, photos: TrainPhotos, options: TrainOptions
) -> TrainResult | TrainingPaused:
    """Train `spec.method` on `photos.train` and return the kohya file, or pause.

    Resumes from `checkpoint_dir/checkpoint.pt` when it holds a checkpoint of this same
    job (spec and base model). The caller owns `checkpoint_dir` and deletes it when the
    job is over: it holds weights learnt from the member's photos.
    """
    job = _Job.start(pipe, spec, photos, options)  # 1. check inputs
    with _borrowed(pipe) as tuners:
        data = _base_model_work(job)  # 2. before any adapter exists
        trainer = _add_trainer(job, tuners)  # 3. adapters, optimizer
        step = _resume(job, trainer)  # 4. this job's checkpoint, if any
        paused = _train_steps(job, trainer, data, step)  # 5. in chunks
        if paused is not None:
            return paused
        adapter_loss = _validate(job)  # 6. the held-out loss again, with the adapter
        samples = _samples(job)  # 7. with the adapter
        return _export(job, data.base_loss, adapter_loss, samples)  # 8. kohya file


# --- the stages ------------------------------------------------------------------------


@dataclass
class _Job:
    pipe: Any
    spec: TrainSpec
    photos: TrainPhotos
    options: TrainOptions
    total: int  # planned steps
    captions: list[str]
    checkpoint_path: Path
    key: str  # which job a checkpoint belongs to
    started: float = field(default_factory=time.monotonic)
    seconds_before: float = 0.0  # training time in earlier chunks

    @classmethod
    def start(cls, pipe: Any, spec: TrainSpec, photos: TrainPhotos, options: TrainOptions) -> _Job:
        total = spec.planned_steps(options.limits)
        _check_inputs(pipe, spec, photos.train, photos.captions, total)
        checkpoint_dir = Path(options.checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            pipe=pipe,
            spec=spec,
            photos=photos,
            options=options,
            total=total,
            captions=list(photos.captions) or [_instance_prompt(spec)] * len(photos.train),
            checkpoint_path=checkpoint_dir / CHECKPOINT_FILE,
            key=checkpoint_key(spec, options.model_hash),
        )

    @property
    def test_prompts(self) -> list[str]:
        return [_instance_prompt(self.spec)] * len(self.photos.test)

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started


def _instance_prompt(spec: TrainSpec) -> str:
    return f"photo of {spec.token} {spec.subject}"


@contextmanager
def _borrowed(pipe: Any) -> Iterator[list[Any]]:
    """The pipe for training; whatever happens, it is given back exactly as it was.
    Yields the list the adapters' peft tuners go in, to be unloaded after."""
    saved = PipeState.capture(pipe)
    set_aside: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    tuners: list[Any] = []
    try:
        with quiet(pipe):
            # A worker's LoRA cache keeps adapters in the pipe (most switched off); they
            # step out while we train, so the base model is really the base model.
            set_aside = set_aside_adapters(pipe)
            yield tuners
    finally:
        for tuner in tuners:
            tuner.unload()  # swaps every adapter layer back for its base layer
        for parent, name, layer in reversed(set_aside):
            setattr(parent, name, layer)
        saved.restore(pipe)


@dataclass
class _Data:
    """What the base model made of the photos, before training."""

    base_loss: float
    instance: Encoded
    prior: Encoded | None  # class images' latents, with prior preservation


def _base_model_work(job: _Job) -> _Data:
    pipe, spec, options = job.pipe, job.spec, job.options
    class_images: list[Image.Image] = []
    if spec.prior_preservation:
        cache = class_image_dir(
            Path(options.checkpoint_dir), options.model_hash or options.model_name, spec
        )
        class_images = draw_class_images(
            pipe, spec, cache, options.num_class_images, options.sample_steps
        )
    base_loss = held_out_loss(pipe, job.photos.test, job.test_prompts, spec.resolution)
    instance = encode_images(pipe, job.photos.train, job.captions, spec)
    assert instance is not None  # _check_inputs: at least one photo
    prior = encode_images(pipe, class_images, [class_prompt(spec)], spec)
    return _Data(base_loss, instance, prior)


@dataclass
class _Trainer:
    optimizer: torch.optim.Optimizer
    precision: Precision
    scaler: torch.amp.GradScaler
    noise_scheduler: Any
    generator: torch.Generator


def _add_trainer(job: _Job, tuners: list[Any]) -> _Trainer:
    pipe, spec = job.pipe, job.spec
    denoiser = of_pipe(pipe).denoiser(pipe)
    device = denoiser.device
    freeze(pipe)
    tuners.extend(add_adapters(pipe, spec))
    optimizer = torch.optim.AdamW(
        param_groups(pipe, spec),
        betas=(0.9, 0.999),
        weight_decay=1e-2,
        eps=1e-8,
        fused=device.type == "cuda",
    )
    precision = Precision.of(pipe)
    if device.type == "cuda":
        denoiser.enable_gradient_checkpointing()  # memory for batch and resolution
    generator = torch.Generator().manual_seed(spec.seed)
    return _Trainer(
        optimizer, precision, precision.grad_scaler(), training_scheduler(pipe), generator
    )


def _resume(job: _Job, trainer: _Trainer) -> int:
    """The step to start from: 0, or where this job's checkpoint left off."""
    checkpoint = load_checkpoint(job.checkpoint_path, job.key)
    if checkpoint is None:
        return 0
    restore_checkpoint(job.pipe, checkpoint, trainer.optimizer, trainer.scaler, trainer.generator)
    job.seconds_before = checkpoint["seconds"]
    return checkpoint["step"]


def _train_steps(job: _Job, trainer: _Trainer, data: _Data, step: int) -> TrainingPaused | None:
    """Steps until the planned total, a checkpoint every `checkpoint_every` steps; after
    one, the caller may take the worker back (a pause)."""
    pipe, spec, options, total = job.pipe, job.spec, job.options, job.total
    every = spec.checkpoint_every if spec.checkpoint_every > 0 else DEFAULT_CHUNK
    set_training(pipe, spec, True)
    while step < total:
        if options.should_cancel is not None and options.should_cancel():
            raise TrainingCancelled(f"training cancelled at step {step} of {total}")
        batch = _batch_indices(step, spec, len(data.instance.latents))
        loss = _train_step(pipe, spec, data.instance, data.prior, batch, trainer)
        step += 1
        if options.on_progress is not None:
            options.on_progress(step, total, loss)
        if step % every == 0 or step == total:
            state = checkpoint_state(
                pipe,
                job.key,
                step,
                job.seconds(),
                trainer.optimizer,
                trainer.scaler,
                trainer.generator,
            )
            save_atomically(state, job.checkpoint_path)
            if step < total and options.should_yield is not None and options.should_yield():
                return TrainingPaused(step=step)
    set_training(pipe, spec, False)
    return None


def _validate(job: _Job) -> float:
    return held_out_loss(job.pipe, job.photos.test, job.test_prompts, job.spec.resolution)


def _samples(job: _Job) -> list[Image.Image]:
    spec, options = job.spec, job.options
    prompts = options.sample_prompts or default_sample_prompts(spec)
    size = options.sample_size or spec.resolution
    return [sample(job.pipe, p, spec.seed, options.sample_steps, size) for p in prompts]


def _export(
    job: _Job, base_loss: float, adapter_loss: float, samples: list[Image.Image]
) -> TrainResult:
    pipe, spec, options = job.pipe, job.spec, job.options
    metadata = metadata_of(
        pipe,
        spec,
        job.total,
        options.model_name,
        options.model_hash,
        base_loss,
        adapter_loss,
        len(job.captions),
    )
    tensors = kohya_state_dict(pipe, spec)
    return TrainResult(
        safetensors=save_safetensors(tensors, metadata=metadata),
        metadata=metadata,
        base_loss=base_loss,
        adapter_loss=adapter_loss,
        got_worse=bool(adapter_loss > base_loss),
        samples=samples,
        steps=job.total,
        seconds=job.seconds(),
    )


# --- 1. checks --------------------------------------------------------------------


def _check_inputs(
    pipe: Any, spec: TrainSpec, images: list[Image.Image], captions: list[str], total: int
) -> None:
    if not images:
        raise JobError("training needs at least one usable photo")
    if captions and len(captions) != len(images):
        raise JobError(f"{len(images)} photos but {len(captions)} captions")
    if spec.resolution % 8 or spec.resolution < 64:
        raise JobError(
            f"resolution must be a multiple of 8 and at least 64, but is {spec.resolution}"
        )
    if total < 1:
        raise JobError(f"training needs at least one step, but plans {total}")
    if spec.method not in ("lora", "loha", "lokr"):
        raise JobError(f"method must be lora, loha or lokr, not {spec.method!r}")
    family = of_pipe(pipe)
    family.spec.check_training(spec.resolution)
    if spec.train_text_encoder and is_flow(pipe):
        raise JobError(
            f"{family.label} personal models train the transformer only; its text encoders "
            "stay frozen (train_text_encoder must be off)"
        )


# --- 5. one training step ---------------------------------------------------------


def _batch_indices(step: int, spec: TrainSpec, count: int) -> list[int]:
    """Photos for `step`: epochs of seeded permutations, so a resumed run picks exactly
    what an uninterrupted one would, with no sampler state to save."""
    indices = []
    for position in range(step * spec.batch_size, (step + 1) * spec.batch_size):
        epoch, offset = divmod(position, count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(spec.seed + epoch))
        indices.append(int(order[offset]))
    return indices


def _step_cond(pipe: Any, spec: TrainSpec, encoded: Encoded, batch: list[int]) -> Any:
    if encoded.cond is not None:
        return encoded.cond.select(batch)
    embeds, pooled = encode_text(pipe, [encoded.captions[i] for i in batch])
    return Cond(embeds, pooled, micro_conditioning(pipe, spec.resolution, len(batch)))


def _train_step(
    pipe: Any,
    spec: TrainSpec,
    instance: Encoded,
    prior: Encoded | None,
    batch: list[int],
    trainer: _Trainer,
) -> float:
    denoiser = of_pipe(pipe).denoiser(pipe)
    noise_scheduler, generator = trainer.noise_scheduler, trainer.generator
    optimizer, scaler = trainer.optimizer, trainer.scaler
    latents = instance.latents[batch]
    with trainer.precision.autocast():
        cond = _step_cond(pipe, spec, instance, batch)
        if prior is not None:
            # Class images ride in the same forward pass (as in the diffusers example).
            prior_batch = torch.randint(
                len(prior.latents), (len(batch),), generator=generator
            ).tolist()
            latents = torch.cat([latents, prior.latents[prior_batch]])
            cond = cond.cat(_step_cond(pipe, spec, prior, prior_batch))
        if is_flow(pipe):
            noise, sigmas = draw_flow(pipe, noise_scheduler, latents, generator)
            losses = flow_losses(pipe, latents, noise, sigmas, cond, trainer.precision.dtype)
        else:
            device = denoiser.device  # (a walk over the modules in diffusers: once a step)
            noise = torch.randn(latents.shape, generator=generator).to(device)
            count = noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, count, (len(latents),), generator=generator).to(device)
            losses = denoising_loss(denoiser, noise_scheduler, latents, noise, timesteps, cond)
            losses = losses * snr_weights(noise_scheduler, timesteps, spec.min_snr_gamma)
        if prior is not None:
            instance_loss, prior_loss = losses.chunk(2)
            loss = instance_loss.mean() + 1.0 * prior_loss.mean()  # prior weight 1.0
        else:
            loss = losses.mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
