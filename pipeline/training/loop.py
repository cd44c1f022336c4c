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

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as save_safetensors

from pipeline.contract.jobs import JobError, Limits, TrainSpec, spec_to_json

VERSION = "0.1.0"
ADAPTER = "sdbot_train"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_LR_RATIO = 0.1  # kohya: 1e-4 for the UNet, 1e-5 for the text encoder
MAX_GRAD_NORM = 1.0  # as the diffusers example
CHECKPOINT_FILE = "checkpoint.pt"
DEFAULT_CHUNK = 50  # steps between checkpoints when the spec asks for none
CLASS_BATCH = 4  # class images drawn per pipe call


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
    job_key = _job_key(spec, model_hash)
    every = spec.checkpoint_every if spec.checkpoint_every > 0 else DEFAULT_CHUNK
    started = time.monotonic()
    device = pipe.unet.device
    saved = _PipeState.capture(pipe)
    set_aside: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    tuners: list[Any] = []
    try:
        with _quiet(pipe):
            # A worker's LoRA cache keeps adapters in the pipe (most switched off); they
            # step out while we train, so the base model is really the base model.
            set_aside = _set_aside_adapters(pipe)

            # 2. Base-model work, before any adapter exists
            class_images: list[Image.Image] = []
            if spec.prior_preservation:
                cache = _class_image_dir(checkpoint_dir, model_hash or model_name, spec)
                class_images = _class_images(pipe, spec, cache, num_class_images, sample_steps)
            test_prompts = [instance_prompt] * len(test_images)
            base_loss = _held_out_loss(pipe, test_images, test_prompts, spec.resolution)
            instance = _encode_images(pipe, train_images, captions, spec)
            prior = _encode_images(pipe, class_images, [_class_prompt(spec)], spec)

            # 3. Adapters and optimizer
            _freeze(pipe)
            tuners = _add_adapters(pipe, spec)
            groups = _param_groups(pipe, spec)
            optimizer = torch.optim.AdamW(
                groups,
                betas=(0.9, 0.999),
                weight_decay=1e-2,
                eps=1e-8,
                fused=device.type == "cuda",
            )
            autocast_dtype = _autocast_dtype(device)
            scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
            if device.type == "cuda":
                pipe.unet.enable_gradient_checkpointing()  # memory for batch and resolution
            noise_scheduler = _noise_scheduler(pipe)
            generator = torch.Generator().manual_seed(spec.seed)

            # 4. Resume from this job's checkpoint, if any
            step, seconds_before = 0, 0.0
            checkpoint = _load_checkpoint(checkpoint_path, job_key)
            if checkpoint is not None:
                _restore_checkpoint(pipe, checkpoint, optimizer, scaler, generator)
                step, seconds_before = checkpoint["step"], checkpoint["seconds"]
            _set_training(pipe, spec, True)

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
                    state = _checkpoint_state(
                        pipe, job_key, step, seconds, optimizer, scaler, generator
                    )
                    _save_atomically(state, checkpoint_path)
                    if step < total and should_yield is not None and should_yield():
                        return TrainingPaused(step=step)
            _set_training(pipe, spec, False)

            # 6. Validation: the same held-out loss, now with the adapter
            adapter_loss = _held_out_loss(pipe, test_images, test_prompts, spec.resolution)
            got_worse = bool(adapter_loss > base_loss)

            # 7. Samples with the adapter
            prompts = sample_prompts or default_sample_prompts(spec)
            size = sample_size or spec.resolution
            samples = [_sample(pipe, p, spec.seed, sample_steps, size) for p in prompts]

            # 8. Export in kohya format
            seconds = seconds_before + time.monotonic() - started
            metadata = _metadata(
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


@torch.no_grad()
def loss_on_images(
    pipe: Any,
    images: list[Image.Image],
    captions: list[str],
    *,
    seed: int = 0,
    n_timesteps: int = 8,
    resolution: int | None = None,
) -> float:
    """Mean denoising loss of the pipe's current UNet (and adapters) on `images`.

    Fixed noise (from `seed`) and `n_timesteps` timesteps spread evenly over the
    schedule, so two calls differ only by what changed in the model: this is how
    the base model and the trained adapter are compared on held-out photos.
    """
    if not images:
        raise ValueError("loss_on_images needs at least one image")
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    resolution = resolution or min(images[0].size) // 8 * 8
    device = pipe.unet.device
    scheduler = _noise_scheduler(pipe)
    count = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, count - 1, n_timesteps + 2)[1:-1].round().long().to(device)
    latents = _latents(pipe.vae, _pixels(images, resolution))
    embeds, pooled = _encode_text(pipe, captions)
    time_ids = _time_ids(pipe, resolution, len(images))
    losses = []
    with _autocast(device):
        for i in range(len(images)):
            generator = torch.Generator().manual_seed(seed + i)
            noise = torch.randn((n_timesteps, *latents.shape[1:]), generator=generator)
            clean = latents[i : i + 1].expand(n_timesteps, -1, -1, -1)
            cond = _Cond(
                embeds[i : i + 1].expand(n_timesteps, -1, -1),
                None if pooled is None else pooled[i : i + 1].expand(n_timesteps, -1),
                None if time_ids is None else time_ids[:1].expand(n_timesteps, -1),
            )
            loss = _denoising_loss(pipe.unet, scheduler, clean, noise.to(device), timesteps, cond)
            losses.append(loss.mean().item())
    return float(np.mean(losses))


def default_sample_prompts(spec: TrainSpec) -> list[str]:
    who = f"{spec.token} {spec.subject}"
    return [
        f"photo of {who}",
        f"a painting of {who}",
        f"portrait of {who}, detailed, high quality",
        f"{who} in the city at night",
    ]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste images (all the size of the first) into a near-square grid."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "black")
    for i, image in enumerate(images):
        grid.paste(
            image.convert("RGB").resize((width, height)),
            (i % columns * width, i // columns * height),
        )
    return grid


def kohya_state_dict(pipe: Any, method: str, alpha: float) -> dict[str, torch.Tensor]:
    """The pipe's `ADAPTER` weights under kohya/LyCORIS key names, in fp16."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, model in _kohya_models(pipe):
        for path, layer in _adapter_layers(model):
            if prefix != "lora_unet_" and not path.startswith("text_model."):
                # transformers 5 flattened CLIPTextModel; kohya names keep `text_model`.
                path = f"text_model.{path}"
            name = prefix + path.replace(".", "_")
            for suffix, tensor in _layer_tensors(layer, method).items():
                tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", torch.float16)
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return tensors


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


def _job_key(spec: TrainSpec, model_hash: str) -> str:
    """A checkpoint belongs to one job: same spec on the same base model."""
    return hashlib.sha256(f"{spec_to_json(spec)}|{model_hash}".encode()).hexdigest()


# --- 2. base-model work: class images, cached latents and embeddings -----------------


@dataclass
class _Cond:
    """What the UNet is conditioned on, besides the noisy latents and timestep."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL
    time_ids: torch.Tensor | None = None  # SDXL

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


@dataclass
class _Encoded:
    """Training images, encoded once: VAE latents and (frozen encoder) embeddings."""

    latents: torch.Tensor  # (n, 4, h, w) on the device, already × scaling factor
    cond: _Cond | None  # None when the text encoder trains: encoded every step
    captions: list[str]


@torch.no_grad()
def _encode_images(
    pipe: Any, images: list[Image.Image], captions: list[str], spec: TrainSpec
) -> _Encoded | None:
    if not images:
        return None
    if len(captions) == 1:
        captions = captions * len(images)
    latents = _latents(pipe.vae, _pixels(images, spec.resolution))
    cond = None
    if not spec.train_text_encoder:
        embeds, pooled = _encode_text(pipe, captions)
        cond = _Cond(embeds, pooled, _time_ids(pipe, spec.resolution, len(images)))
    return _Encoded(latents, cond, captions)


def _pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Centre-square, resize and scale to [-1, 1], as the VAE expects."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE posterior means × scaling factor (no sampling: the same every step)."""
    with _vae_in_float32_if_needed(vae):
        chunks = [
            vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean
            for chunk in pixels.split(4)
        ]
    return torch.cat(chunks).float() * vae.config.scaling_factor


@contextmanager
def _vae_in_float32_if_needed(vae: Any) -> Iterator[None]:
    # The SDXL VAE overflows in fp16 (diffusers' `force_upcast`); fp16 → fp32 → fp16 is
    # lossless, so the pipe gets its weights back bit for bit.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def _is_xl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _encode_text(pipe: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the pipelines build them (SDXL: penultimate hidden states
    of both encoders, concatenated, and encoder 2's pooled output). Not under
    no_grad: when the text encoder trains, gradients flow through here."""
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    if _is_xl(pipe):
        encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
    embeds, pooled = [], None
    for tokenizer, encoder in encoders:
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoder.device)
        if _is_xl(pipe):
            output = encoder(ids, output_hidden_states=True)
            embeds.append(output.hidden_states[-2])
            pooled = output[0]
        else:
            embeds.append(encoder(ids)[0])
    return torch.cat(embeds, dim=-1), pooled


def _time_ids(pipe: Any, resolution: int, count: int) -> torch.Tensor | None:
    """SDXL micro-conditioning: original size, crop top-left, target size."""
    if not _is_xl(pipe):
        return None
    size = [resolution, resolution]
    ids = torch.tensor([size + [0, 0] + size], dtype=torch.float32)
    return ids.repeat(count, 1).to(pipe.unet.device)


def _class_prompt(spec: TrainSpec) -> str:
    return f"photo of a {spec.subject}"


def _class_image_dir(checkpoint_dir: Path, model_key: str, spec: TrainSpec) -> Path:
    """Class images depend only on the base model, subject and size: shared by jobs."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_key or 'model'}_{spec.subject}")
    return checkpoint_dir.parent / "class_images" / f"{safe}_{spec.resolution}"


def _class_images(
    pipe: Any, spec: TrainSpec, directory: Path, count: int, steps: int
) -> list[Image.Image]:
    """Prior-preservation images drawn by the base model, cached on disk (seed = index)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{i:04d}.png" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    for start in range(0, len(missing), CLASS_BATCH):
        seeds = missing[start : start + CLASS_BATCH]
        drawn = _sample_batch(pipe, _class_prompt(spec), seeds, steps, spec.resolution)
        for seed, image in zip(seeds, drawn, strict=True):
            temporary = paths[seed].with_suffix(".tmp")
            image.save(temporary, format="PNG")
            os.replace(temporary, paths[seed])  # a killed job never leaves half a PNG
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


@torch.no_grad()
def _held_out_loss(
    pipe: Any, images: list[Image.Image], prompts: list[str], resolution: int
) -> float:
    if not images:
        return float("nan")  # no held-out photos: nothing honest to report
    return loss_on_images(pipe, images, prompts, seed=0, resolution=resolution)


def _sample(pipe: Any, prompt: str, seed: int, steps: int, size: int) -> Image.Image:
    return _sample_batch(pipe, prompt, [seed], steps, size)[0]


@torch.no_grad()
def _sample_batch(
    pipe: Any, prompt: str, seeds: list[int], steps: int, size: int
) -> list[Image.Image]:
    """One image per seed; a generator per image makes each one (to ±1 level of
    rounding) what its seed draws alone, so the cache does not depend on batching."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    result = pipe(
        [prompt] * len(seeds),
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=generators,
    )
    return result.images


@contextmanager
def _quiet(pipe: Any) -> Iterator[None]:
    """No tqdm bars from the pipe while we train; the caller's setting comes back after."""
    had = "_progress_bar_config" in pipe.__dict__
    before = pipe.__dict__.get("_progress_bar_config")
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = before
        else:
            del pipe._progress_bar_config


# --- 3. adapters, optimizer and the pipe's state -------------------------------------


class _PipeState:
    """Everything training changes on the pipe's models, to put back afterwards.
    The UNet comes first."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.models = models
        self.training = [m.training for m in models]
        self.requires_grad = [(p, p.requires_grad) for m in models for p in m.parameters()]
        self.peft_config = [m.__dict__.get("peft_config", _MISSING) for m in models]
        self.peft_config_items = [
            dict(c) if isinstance(c, dict) else None for c in self.peft_config
        ]
        self.unet_checkpointing = models[0].is_gradient_checkpointing

    @classmethod
    def capture(cls, pipe: Any) -> _PipeState:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return cls([getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None])

    def restore(self, pipe: Any) -> None:
        for model, training, config, items in zip(
            self.models, self.training, self.peft_config, self.peft_config_items, strict=True
        ):
            model.train(training)
            if config is _MISSING:
                model.__dict__.pop("peft_config", None)
                continue
            if items is not None:
                config.clear()  # the same dict object, with exactly its old entries
                config.update(items)
            model.peft_config = config
        if pipe.unet.is_gradient_checkpointing and not self.unet_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


_MISSING = object()


def _trainable_models(pipe: Any, *, train_text: bool) -> list[tuple[str, torch.nn.Module]]:
    """(kind, model) pairs that get an adapter."""
    models = [("unet", pipe.unet)]
    if train_text:
        models.append(("text", pipe.text_encoder))
        if _is_xl(pipe):
            models.append(("text", pipe.text_encoder_2))
    return models


def _set_aside_adapters(pipe: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Swap every peft layer already in the pipe for its base layer; returns
    (parent, attribute, layer) to put back. The base layers are the very modules the
    set-aside layers wrap, so putting them back restores the pipe exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    moved: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                moved.append((parent, name, child))
                setattr(parent, name, child.get_base_layer())
            else:
                walk(child)

    for _, model in _trainable_models(pipe, train_text=True):
        walk(model)
    return moved


def _freeze(pipe: Any) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.requires_grad_(False)


def _adapter_config(spec: TrainSpec, targets: list[str]) -> Any:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if spec.method == "loha":
        return LoHaConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets)
    if spec.method == "lokr":
        return LoKrConfig(r=spec.rank, alpha=spec.alpha, target_modules=targets)
    # Gaussian A (and zero B), as the diffusers example initialises it.
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=targets
    )


def _add_adapters(pipe: Any, spec: TrainSpec) -> list[Any]:
    """Inject fresh adapters in place; returns the peft tuners that can unload them."""
    from peft import LoHaModel, LoKrModel, LoraModel

    tuner_class = {"lora": LoraModel, "loha": LoHaModel, "lokr": LoKrModel}[spec.method]
    tuners = []
    # Adapter initialisation is part of the run's seed; the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for kind, model in _trainable_models(pipe, train_text=spec.train_text_encoder):
            # The set-aside adapters' configs must not meet ours (_PipeState puts them back).
            model.__dict__.pop("peft_config", None)
            targets = UNET_TARGETS if kind == "unet" else TEXT_TARGETS
            tuners.append(tuner_class(model, _adapter_config(spec, targets), ADAPTER))
    for _, model in _trainable_models(pipe, train_text=spec.train_text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # fp32 master weights under autocast
    return tuners


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _param_groups(pipe: Any, spec: TrainSpec) -> list[dict[str, Any]]:
    groups = []
    for kind, model in _trainable_models(pipe, train_text=spec.train_text_encoder):
        lr = spec.learning_rate * (1.0 if kind == "unet" else TEXT_LR_RATIO)
        groups.append({"params": [p for _, p in _trainable(model)], "lr": lr})
    return groups


def _set_training(pipe: Any, spec: TrainSpec, training: bool) -> None:
    for _, model in _trainable_models(pipe, train_text=spec.train_text_encoder):
        model.train(training)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # CPU trains in fp32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device) -> Any:
    dtype = _autocast_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


def _noise_scheduler(pipe: Any) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


# --- 4. checkpoints ------------------------------------------------------------------


def _checkpoint_state(
    pipe: Any,
    job_key: str,
    step: int,
    seconds: float,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> dict[str, Any]:
    adapters = {
        f"{i}:{name}": param.detach().cpu().clone()
        for i, (_, model) in enumerate(_trainable_models(pipe, train_text=True))
        for name, param in _trainable(model)
    }
    return {
        "job": job_key,
        "step": step,
        "seconds": seconds,
        "adapters": adapters,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": generator.get_state(),
    }


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """Temp file + fsync + os.replace: a kill at any moment leaves the old or new file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _load_checkpoint(path: Path, job_key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("job") == job_key else None  # another job's: start afresh


def _restore_checkpoint(
    pipe: Any,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> None:
    with torch.no_grad():
        for i, (_, model) in enumerate(_trainable_models(pipe, train_text=True)):
            for name, param in _trainable(model):
                param.copy_(state["adapters"][f"{i}:{name}"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])


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


def _step_cond(pipe: Any, spec: TrainSpec, encoded: _Encoded, batch: list[int]) -> _Cond:
    if encoded.cond is not None:
        c = encoded.cond
        return _Cond(
            c.embeds[batch],
            None if c.pooled is None else c.pooled[batch],
            None if c.time_ids is None else c.time_ids[batch],
        )
    embeds, pooled = _encode_text(pipe, [encoded.captions[i] for i in batch])
    return _Cond(embeds, pooled, _time_ids(pipe, spec.resolution, len(batch)))


def _cat_cond(a: _Cond, b: _Cond) -> _Cond:
    def cat(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or y is None else torch.cat([x, y])

    return _Cond(
        torch.cat([a.embeds, b.embeds]), cat(a.pooled, b.pooled), cat(a.time_ids, b.time_ids)
    )


def _train_step(
    pipe: Any,
    spec: TrainSpec,
    instance: _Encoded,
    prior: _Encoded | None,
    batch: list[int],
    noise_scheduler: Any,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> float:
    device = pipe.unet.device
    latents = instance.latents[batch]
    with _autocast(device):
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
        losses = _denoising_loss(pipe.unet, noise_scheduler, latents, noise, timesteps, cond)
        losses = losses * _snr_weights(noise_scheduler, timesteps, spec.min_snr_gamma)
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


def _denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    cond: _Cond,
) -> torch.Tensor:
    """Per-sample MSE between the UNet's prediction and its target (ε or v)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, **cond.unet_kwargs()).sample
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def _snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), as in the diffusers examples."""
    if gamma <= 0:
        return torch.ones_like(timesteps, dtype=torch.float32)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


# --- 8. export -----------------------------------------------------------------------


def _kohya_models(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    models = [("lora_unet_", pipe.unet)]
    if _is_xl(pipe):
        models += [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
    else:
        models.append(("lora_te_", pipe.text_encoder))
    return models


def _adapter_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in _names(module):
            yield path, module


def _names(layer: Any) -> set[str]:
    names: set[str] = set()
    for attribute in layer.adapter_layer_names:
        names.update(getattr(layer, attribute).keys())
    return names


def _layer_tensors(layer: Any, method: str) -> dict[str, torch.Tensor]:
    """One layer's weights under LyCORIS/kohya names, scaled so that kohya's rule
    (delta × alpha / dim) gives exactly peft's delta (× alpha / r)."""
    if method == "lora":
        return {
            "lora_down.weight": layer.lora_A[ADAPTER].weight,
            "lora_up.weight": layer.lora_B[ADAPTER].weight,
        }
    if method == "loha":
        return {
            name: getattr(layer, name)[ADAPTER]
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        }
    tensors = {
        name: getattr(layer, name)[ADAPTER]
        for name in layer.adapter_layer_names
        if ADAPTER in getattr(layer, name)
    }
    if "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors:
        # Both Kronecker factors full: readers (A1111, ComfyUI, diffusers) then apply no
        # alpha/dim scale, but peft trained with alpha/r — bake it into w1.
        key = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        tensors[key] = tensors[key] * layer.scaling[ADAPTER]
    return tensors


def _metadata(
    pipe: Any,
    spec: TrainSpec,
    steps: int,
    model_name: str,
    model_hash: str,
    base_loss: float,
    adapter_loss: float,
    photos: int,
) -> dict[str, str]:
    lycoris = spec.method != "lora"
    text_lr = spec.learning_rate * TEXT_LR_RATIO if spec.train_text_encoder else 0.0
    metadata = {
        "ss_base_model_version": "sdxl_base_v1-0" if _is_xl(pipe) else "sd_v1",
        "ss_sd_model_name": model_name,
        "ss_output_name": spec.name,
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": f"{spec.alpha:g}",
        "ss_steps": str(steps),
        "ss_resolution": f"({spec.resolution}, {spec.resolution})",
        "ss_learning_rate": f"{spec.learning_rate:g}",
        "ss_unet_lr": f"{spec.learning_rate:g}",
        "ss_text_encoder_lr": f"{text_lr:g}",
        "ss_num_train_images": str(photos),
        "ss_min_snr_gamma": f"{spec.min_snr_gamma:g}",
        "sdbot_version": VERSION,
        "sdbot_base_model": model_name,
        "sdbot_base_model_hash": model_hash,
        "sdbot_method": spec.method,
        "sdbot_steps": str(steps),
        "sdbot_token": spec.token,
        "sdbot_subject": spec.subject,
        "sdbot_base_loss": f"{base_loss:.6g}",
        "sdbot_adapter_loss": f"{adapter_loss:.6g}",
    }
    if lycoris:
        metadata["ss_network_args"] = json.dumps({"algo": spec.method})
    return metadata
