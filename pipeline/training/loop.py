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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from pipeline.contract.jobs import JobError, Limits, TrainSpec
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
    autocast,
    autocast_dtype,
    denoising_loss,
    encode_images,
    encode_text,
    sdxl_time_ids,
    snr_weights,
    training_scheduler,
)
from pipeline.training.export import kohya_state_dict, metadata_of
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


# --- public entry points ----------------------------------------------------------


def train_lora(
    pipe: Any,
    spec: TrainSpec,
    train_images: list[Image.Image],
    captions: list[str],
    test_images: list[Image.Image],
    *,
    checkpoint_dir: Path,
    limits: Limits,
    on_progress: Callable[[int, int, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    should_yield: Callable[[], bool] | None = None,
    model_name: str = "",
    model_hash: str = "",
    sample_prompts: list[str] | None = None,
    sample_steps: int = 20,
    sample_size: int | None = None,
    num_class_images: int = 50,
) -> TrainResult | TrainingPaused:
    """Train `spec.method` on `train_images` and return the kohya file, or pause.

    Resumes from `checkpoint_dir/checkpoint.pt` when it holds a checkpoint of this same
    job (spec and base model). The caller owns `checkpoint_dir` and deletes it when the
    job is over: it holds weights learnt from the member's photos.
    """
    # 1. Check inputs
    total = spec.planned_steps(limits)
    _check_inputs(pipe, spec, train_images, captions, total)
    instance_prompt = f"photo of {spec.token} {spec.subject}"
    captions = list(captions) or [instance_prompt] * len(train_images)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    job_key = checkpoint_key(spec, model_hash)
    every = spec.checkpoint_every if spec.checkpoint_every > 0 else DEFAULT_CHUNK
    started = time.monotonic()
    device = pipe.unet.device
    saved = PipeState.capture(pipe)
    set_aside: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    tuners: list[Any] = []
    try:
        with quiet(pipe):
            # A worker's LoRA cache keeps adapters in the pipe (most switched off); they
            # step out while we train, so the base model is really the base model.
            set_aside = set_aside_adapters(pipe)

            # 2. Base-model work, before any adapter exists
            class_images: list[Image.Image] = []
            if spec.prior_preservation:
                cache = class_image_dir(checkpoint_dir, model_hash or model_name, spec)
                class_images = draw_class_images(pipe, spec, cache, num_class_images, sample_steps)
            test_prompts = [instance_prompt] * len(test_images)
            base_loss = held_out_loss(pipe, test_images, test_prompts, spec.resolution)
            instance = encode_images(pipe, train_images, captions, spec)
            prior = encode_images(pipe, class_images, [class_prompt(spec)], spec)

            # 3. Adapters and optimizer
            freeze(pipe)
            tuners = add_adapters(pipe, spec)
            groups = param_groups(pipe, spec)
            optimizer = torch.optim.AdamW(
                groups,
                betas=(0.9, 0.999),
                weight_decay=1e-2,
                eps=1e-8,
                fused=device.type == "cuda",
            )
            amp_dtype = autocast_dtype(device)
            scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
            if device.type == "cuda":
                pipe.unet.enable_gradient_checkpointing()  # memory for batch and resolution
            noise_scheduler = training_scheduler(pipe)
            generator = torch.Generator().manual_seed(spec.seed)

            # 4. Resume from this job's checkpoint, if any
            step, seconds_before = 0, 0.0
            checkpoint = load_checkpoint(checkpoint_path, job_key)
            if checkpoint is not None:
                restore_checkpoint(pipe, checkpoint, optimizer, scaler, generator)
                step, seconds_before = checkpoint["step"], checkpoint["seconds"]
            set_training(pipe, spec, True)

            # 5. Training loop, in chunks of `every` steps
            while step < total:
                if should_cancel is not None and should_cancel():
                    raise TrainingCancelled(f"training cancelled at step {step} of {total}")
                batch = _batch_indices(step, spec, len(instance.latents))
                loss = _train_step(
                    pipe,
                    spec,
                    instance,
                    prior,
                    batch,
                    noise_scheduler,
                    generator,
                    optimizer,
                    scaler,
                )
                step += 1
                if on_progress is not None:
                    on_progress(step, total, loss)
                if step % every == 0 or step == total:
                    seconds = seconds_before + time.monotonic() - started
                    state = checkpoint_state(
                        pipe, job_key, step, seconds, optimizer, scaler, generator
                    )
                    save_atomically(state, checkpoint_path)
                    if step < total and should_yield is not None and should_yield():
                        return TrainingPaused(step=step)
            set_training(pipe, spec, False)

            # 6. Validation: the same held-out loss, now with the adapter
            adapter_loss = held_out_loss(pipe, test_images, test_prompts, spec.resolution)
            got_worse = bool(adapter_loss > base_loss)

            # 7. Samples with the adapter
            prompts = sample_prompts or default_sample_prompts(spec)
            size = sample_size or spec.resolution
            samples = [sample(pipe, p, spec.seed, sample_steps, size) for p in prompts]

            # 8. Export in kohya format
            seconds = seconds_before + time.monotonic() - started
            metadata = metadata_of(
                pipe, spec, total, model_name, model_hash, base_loss, adapter_loss, len(captions)
            )
            tensors = kohya_state_dict(pipe, spec.method, spec.alpha)
            data = save_safetensors(tensors, metadata=metadata)
            return TrainResult(
                safetensors=data,
                metadata=metadata,
                base_loss=base_loss,
                adapter_loss=adapter_loss,
                got_worse=got_worse,
                samples=samples,
                steps=total,
                seconds=seconds,
            )
    finally:
        for tuner in tuners:
            tuner.unload()  # swaps every adapter layer back for its base layer
        for parent, name, layer in reversed(set_aside):
            setattr(parent, name, layer)
        saved.restore(pipe)


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


def _step_cond(pipe: Any, spec: TrainSpec, encoded: Encoded, batch: list[int]) -> Cond:
    if encoded.cond is not None:
        c = encoded.cond
        return Cond(
            c.embeds[batch],
            None if c.pooled is None else c.pooled[batch],
            None if c.time_ids is None else c.time_ids[batch],
        )
    embeds, pooled = encode_text(pipe, [encoded.captions[i] for i in batch])
    return Cond(embeds, pooled, sdxl_time_ids(pipe, spec.resolution, len(batch)))


def _cat_cond(a: Cond, b: Cond) -> Cond:
    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else torch.cat([x, y])

    return Cond(
        torch.cat([a.embeds, b.embeds]), cat(a.pooled, b.pooled), cat(a.time_ids, b.time_ids)
    )


def _train_step(
    pipe: Any,
    spec: TrainSpec,
    instance: Encoded,
    prior: Encoded | None,
    batch: list[int],
    noise_scheduler: Any,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> float:
    device = pipe.unet.device
    latents = instance.latents[batch]
    with autocast(device):
        cond = _step_cond(pipe, spec, instance, batch)
        if prior is not None:
            # Class images ride in the same forward pass (as in the diffusers example).
            prior_batch = torch.randint(
                len(prior.latents), (len(batch),), generator=generator
            ).tolist()
            latents = torch.cat([latents, prior.latents[prior_batch]])
            cond = _cat_cond(cond, _step_cond(pipe, spec, prior, prior_batch))
        noise = torch.randn(latents.shape, generator=generator).to(device)
        count = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (len(latents),), generator=generator).to(device)
        losses = denoising_loss(pipe.unet, noise_scheduler, latents, noise, timesteps, cond)
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
