"""Personal-model training on the tiny model: real diffusers + peft, a few steps each.

The exported files are checked the way other tools read them: diffusers'
`load_lora_weights` for LoRA, and for LoHa/LoKr an independent merge that follows
AUTOMATIC1111's rules (delta × alpha / dim, dim from the low-rank factor), compared
against the samples drawn with peft's adapter during training.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from pipeline.contract.jobs import JobError, Limits, TrainSpec
from pipeline.families.sd_tiny import write_tiny_model
from pipeline.training.checkpoints import CHECKPOINT_FILE
from pipeline.training.loop import (
    TrainingCancelled,
    TrainingPaused,
    TrainOptions,
    TrainPhotos,
    TrainResult,
    train_lora,
)
from pipeline.training.samples import make_grid
from pipeline.training.validation import loss_on_images
from tests.conftest import level_difference

PROMPT = "photo of sks person"
LIMITS = Limits()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("xl"), xl=True)


def load(directory: Path, xl: bool = False, dtype: str = "float32"):
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = cls.from_pretrained(directory, torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random blobs: more like photos than white noise, and the same every run."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((80, 64), Image.Resampling.BILINEAR))
    return images


def spec(**overrides) -> TrainSpec:
    values = dict(
        name="me",
        photos=("a", "b"),
        test_photos=("c",),
        steps=3,
        resolution=64,
        rank=4,
        alpha=2.0,
        learning_rate=1e-2,
        checkpoint_every=2,
    )
    return TrainSpec(**{**values, **overrides})


def run(
    pipe, train_spec: TrainSpec, checkpoint_dir: Path, **kwargs
) -> TrainResult | TrainingPaused:
    kwargs = {"sample_steps": 2, "sample_prompts": [PROMPT], **kwargs}
    return train_lora(
        pipe,
        train_spec,
        TrainPhotos(photos(2), [], photos(1, seed=1)),
        TrainOptions(checkpoint_dir=checkpoint_dir, limits=LIMITS, **kwargs),
    )


def draw(pipe, prompt: str = PROMPT) -> np.ndarray:
    """What train_lora draws for a sample: seed 0 (the spec's), 2 steps, 64×64."""
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator)
    return np.asarray(image.images[0]).astype(int)


def tensors_of(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_safetensors(result.safetensors)


def tuner_layers(pipe) -> int:
    models = (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    return sum(isinstance(m, BaseTunerLayer) for model in models if model for m in model.modules())


# --- an independent reader: AUTOMATIC1111's merge rules ------------------------------


def a1111_delta(weights: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w = {k: v.float() for k, v in weights.items()}
    alpha = w["alpha"].item()
    if "lora_down.weight" in w:
        dim = w["lora_down.weight"].shape[0]
        return w["lora_up.weight"] @ w["lora_down.weight"] * alpha / dim
    if "hada_w1_a" in w:
        dim = w["hada_w1_b"].shape[0]
        delta = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        return delta * alpha / dim
    dim = None
    w1 = w.get("lokr_w1")
    if w1 is None:
        w1, dim = w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w1_b"].shape[0]
    w2 = w.get("lokr_w2")
    if w2 is None:
        w2, dim = w["lokr_w2_a"] @ w["lokr_w2_b"], w["lokr_w2_b"].shape[0]
    scale = alpha / dim if dim is not None else 1.0  # both factors full: no scaling
    return torch.kron(w1, w2).reshape(shape) * scale


def merge_like_a1111(pipe, tensors: dict[str, torch.Tensor]) -> int:
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    modules |= {"lora_te_" + n.replace(".", "_"): m for n, m in pipe.text_encoder.named_modules()}
    modules |= {
        "lora_te_text_model_" + n.replace(".", "_"): m for n, m in pipe.text_encoder.named_modules()
    }
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        groups.setdefault(name, {})[suffix] = value
    with torch.no_grad():
        for name, weights in groups.items():
            weight = modules[name].weight
            weight += a1111_delta(weights, weight.shape)
    return len(groups)


# --- each method ---------------------------------------------------------------------

SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_each_method_trains_and_exports_a_kohya_file(sd_dir, tmp_path, method):
    pipe = load(sd_dir)
    base = draw(pipe)
    progress = []
    result = run(
        pipe,
        spec(method=method),
        tmp_path / "job",
        on_progress=lambda *args: progress.append(args),
        model_name="tiny",
        model_hash="abc123",
    )

    assert isinstance(result, TrainResult)
    assert [p[:2] for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert all(math.isfinite(p[2]) for p in progress)
    tensors = tensors_of(result)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert {k.split(".", 1)[1] for k in tensors} <= SUFFIXES[method]
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors
    assert any("_ff_net_0_proj." in k for k in tensors) and any("_ff_net_2." in k for k in tensors)

    with safe_open_bytes(result.safetensors, tmp_path) as file:
        header = file.metadata()
    assert header == result.metadata
    assert header["sdbot_method"] == method
    assert header["ss_network_module"] == ("networks.lora" if method == "lora" else "lycoris.kohya")
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2"
    assert header["ss_steps"] == header["sdbot_steps"] == "3"
    assert header["sdbot_token"] == "sks" and header["sdbot_version"] == "0.1.0"
    assert header["sdbot_base_model"] == "tiny" and header["sdbot_base_model_hash"] == "abc123"
    assert header["ss_base_model_version"] == "sd_v1"

    assert math.isfinite(result.base_loss) and math.isfinite(result.adapter_loss)
    assert result.got_worse == (result.adapter_loss > result.base_loss)
    assert result.steps == 3 and result.seconds > 0

    # The file, merged by A1111's rules, draws what peft's adapter drew during training.
    sample = np.asarray(result.samples[0]).astype(int)
    changed = np.abs(sample - base).mean()
    assert changed > 0.1  # the adapter really changed the image
    fresh = load(sd_dir)
    assert merge_like_a1111(fresh, tensors) > 0
    merged = draw(fresh)
    assert np.abs(merged - sample).max() <= 2
    assert np.abs(merged - sample).mean() < changed / 20


def safe_open_bytes(data: bytes, tmp_path: Path):
    path = tmp_path / "header.safetensors"
    path.write_bytes(data)
    return safe_open(path, framework="pt")


def test_lora_file_loads_in_diffusers_with_text_encoder_keys(sd_dir, tmp_path):
    pipe = load(sd_dir)
    base = draw(pipe)
    result = run(pipe, spec(train_text_encoder=True), tmp_path / "job")
    tensors = tensors_of(result)
    te_keys = [k for k in tensors if k.startswith("lora_te_")]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te_keys
    assert {k.split(".")[0].rsplit("_", 2)[-2] for k in te_keys} == {"q", "k", "v", "out"}

    path = tmp_path / "me.safetensors"
    path.write_bytes(result.safetensors)
    fresh = load(sd_dir)
    fresh.load_lora_weights(path)
    assert any(isinstance(m, BaseTunerLayer) for m in fresh.text_encoder.modules())
    loaded = draw(fresh)
    sample = np.asarray(result.samples[0]).astype(int)
    assert np.abs(loaded - base).mean() > 1.0
    assert np.abs(loaded - sample).max() <= 2


# --- the pipe is left as it was -----------------------------------------------------


def pipe_fingerprint(pipe) -> dict:
    models = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    return {
        name: (
            model.training,
            [(n, p.requires_grad, p.dtype) for n, p in model.named_parameters()],
            "peft_config" in model.__dict__,
        )
        for name, model in models.items()
    }


def test_pipe_is_unchanged_after_training(sd_dir, tmp_path):
    pipe = load(sd_dir)
    before, fingerprint = draw(pipe), pipe_fingerprint(pipe)
    result = run(pipe, spec(train_text_encoder=True), tmp_path / "job")
    assert isinstance(result, TrainResult)
    assert tuner_layers(pipe) == 0
    assert pipe_fingerprint(pipe) == fingerprint
    assert not pipe.unet.is_gradient_checkpointing
    assert np.array_equal(draw(pipe), before)


def test_cancel_raises_and_leaves_the_pipe_clean(sd_dir, tmp_path):
    pipe = load(sd_dir)
    before = draw(pipe)
    asked = []

    def should_cancel() -> bool:
        asked.append(1)
        return len(asked) > 2

    steps = []
    with pytest.raises(TrainingCancelled):
        run(
            pipe,
            spec(steps=10, train_text_encoder=True),
            tmp_path / "job",
            should_cancel=should_cancel,
            on_progress=lambda s, t, loss: steps.append(s),
        )
    assert steps == [1, 2]
    assert tuner_layers(pipe) == 0
    assert np.array_equal(draw(pipe), before)


def test_loras_already_in_the_pipe_step_aside_and_come_back(sd_dir, tmp_path):
    # A worker's LoRA cache leaves adapters in the pipe: one active, one switched off.
    pipe = load(sd_dir)
    first = run(pipe, spec(steps=2), tmp_path / "first")
    path = tmp_path / "first.safetensors"
    path.write_bytes(first.safetensors)
    pipe.load_lora_weights(path, adapter_name="cached_off")
    pipe.load_lora_weights(path, adapter_name="cached_on")
    pipe.set_adapters(["cached_on"])
    with_cached, layers, fingerprint = draw(pipe), tuner_layers(pipe), pipe_fingerprint(pipe)

    result = run(pipe, spec(steps=2, seed=5, train_text_encoder=True), tmp_path / "second")
    clean = run(load(sd_dir), spec(steps=2, seed=5, train_text_encoder=True), tmp_path / "clean")
    assert result.base_loss == clean.base_loss  # measured on the base model, not the LoRA
    assert_same_tensors(tensors_of(result), tensors_of(clean))
    assert np.array_equal(np.asarray(result.samples[0]), np.asarray(clean.samples[0]))

    assert tuner_layers(pipe) == layers and pipe_fingerprint(pipe) == fingerprint
    assert np.array_equal(draw(pipe), with_cached)
    assert pipe.unet.peft_config.keys() == {"cached_off", "cached_on"}


# --- chunks, checkpoints and resuming ----------------------------------------------


def test_yield_pauses_at_a_checkpoint_and_a_second_call_finishes(sd_dir, tmp_path):
    pipe = load(sd_dir)
    before = draw(pipe)
    train_spec = spec(steps=4)
    paused = run(pipe, train_spec, tmp_path / "job", should_yield=lambda: True)
    assert paused == TrainingPaused(step=2)
    assert (tmp_path / "job" / CHECKPOINT_FILE).exists()
    assert tuner_layers(pipe) == 0 and np.array_equal(draw(pipe), before)

    steps = []
    resumed = run(
        pipe, train_spec, tmp_path / "job", on_progress=lambda s, t, loss: steps.append(s)
    )
    assert steps == [3, 4] and resumed.steps == 4

    whole = run(load(sd_dir), train_spec, tmp_path / "uninterrupted")
    assert_same_tensors(tensors_of(resumed), tensors_of(whole))


def test_a_checkpoint_of_another_job_is_not_resumed(sd_dir, tmp_path):
    pipe = load(sd_dir)
    assert run(pipe, spec(steps=4), tmp_path / "job", should_yield=lambda: True).step == 2
    steps = []
    run(
        pipe,
        spec(steps=4, seed=7),
        tmp_path / "job",
        on_progress=lambda s, t, loss: steps.append(s),
    )
    assert steps == [1, 2, 3, 4]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-3, rtol=1e-2)


def _train_until_killed(model_dir: str, checkpoint_dir: str, marker: str) -> None:
    """Child process: trains, and parks forever once step 5 is done (after the
    checkpoint at step 4), so the parent can kill it at a known point."""
    torch.set_num_threads(1)

    def on_progress(step: int, total: int, loss: float) -> None:
        if step == 5:
            Path(marker).write_text("5")
            time.sleep(600)

    run(load(Path(model_dir)), spec(steps=6), Path(checkpoint_dir), on_progress=on_progress)


def test_resume_after_sigkill(sd_dir, tmp_path):
    checkpoint_dir, marker = tmp_path / "job", tmp_path / "at-step-5"
    context = multiprocessing.get_context("spawn")
    child = context.Process(
        target=_train_until_killed, args=(str(sd_dir), str(checkpoint_dir), str(marker))
    )
    child.start()
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.is_alive(), "the training process died on its own"
            assert time.monotonic() < deadline, "the training process never reached step 5"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    assert child.exitcode == -signal.SIGKILL
    saved = torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 4

    steps = []
    resumed = run(
        load(sd_dir), spec(steps=6), checkpoint_dir, on_progress=lambda s, t, loss: steps.append(s)
    )
    assert steps == [5, 6]
    whole = run(load(sd_dir), spec(steps=6), tmp_path / "uninterrupted")
    assert_same_tensors(tensors_of(resumed), tensors_of(whole))


# --- SDXL, prior preservation, validation ------------------------------------------


def test_sdxl_trains_and_its_lora_loads_in_diffusers(xl_dir, tmp_path):
    pipe = load(xl_dir, xl=True)
    base = draw(pipe)
    result = run(pipe, spec(steps=2, train_text_encoder=True), tmp_path / "job")
    tensors = tensors_of(result)
    prefixes = {k.split("_", 2)[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    assert result.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert math.isfinite(result.base_loss) and math.isfinite(result.adapter_loss)
    assert np.array_equal(draw(pipe), base) and tuner_layers(pipe) == 0

    path = tmp_path / "me.safetensors"
    path.write_bytes(result.safetensors)
    fresh = load(xl_dir, xl=True)
    fresh.load_lora_weights(path)
    assert np.abs(draw(fresh) - np.asarray(result.samples[0]).astype(int)).max() <= 2


def test_prior_preservation_caches_class_images(sd_dir, tmp_path):
    pipe = load(sd_dir)
    train_spec = spec(steps=2, prior_preservation=True)
    result = run(pipe, train_spec, tmp_path / "jobs" / "one", num_class_images=3, model_hash="abc")
    assert isinstance(result, TrainResult) and math.isfinite(result.adapter_loss)
    cached = sorted((tmp_path / "jobs" / "class_images").glob("*/*.png"))
    assert [p.name for p in cached] == ["0000.png", "0001.png", "0002.png"]
    assert "abc_person_64" in str(cached[0])
    stamps = [p.stat().st_mtime_ns for p in cached]
    run(pipe, train_spec, tmp_path / "jobs" / "two", num_class_images=3, model_hash="abc")
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # reused, not redrawn


def test_without_test_photos_the_losses_are_nan(sd_dir, tmp_path):
    result = train_lora(
        load(sd_dir),
        spec(steps=1),
        TrainPhotos(photos(2)),
        TrainOptions(checkpoint_dir=tmp_path / "job", limits=LIMITS, sample_steps=1),
    )
    assert math.isnan(result.base_loss) and math.isnan(result.adapter_loss)
    assert not result.got_worse
    assert len(result.samples) == 4 and result.samples[0].size == (64, 64)


def test_loss_on_images_is_repeatable_and_follows_the_prediction_type(sd_dir):
    pipe = load(sd_dir)
    images, captions = photos(2), [PROMPT, PROMPT]
    first = loss_on_images(pipe, images, captions, resolution=64)
    assert math.isfinite(first)
    assert loss_on_images(pipe, images, captions, resolution=64) == first
    assert loss_on_images(pipe, images, captions, resolution=64, seed=1) != first
    pipe.scheduler = type(pipe.scheduler).from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    assert loss_on_images(pipe, images, captions, resolution=64) != first


def test_v_prediction_model_trains(sd_dir, tmp_path):
    pipe = load(sd_dir)
    pipe.scheduler = type(pipe.scheduler).from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    losses = []
    run(pipe, spec(steps=2), tmp_path / "job", on_progress=lambda s, t, loss: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_bad_inputs_are_refused(sd_dir, tmp_path):
    pipe = load(sd_dir)
    options = TrainOptions(checkpoint_dir=tmp_path, limits=LIMITS)
    with pytest.raises(JobError, match="2 photos but 1 captions"):
        train_lora(pipe, spec(), TrainPhotos(photos(2), ["one"]), options)
    with pytest.raises(JobError, match="resolution"):
        train_lora(pipe, spec(resolution=60), TrainPhotos(photos(2)), options)


def test_make_grid():
    images = [Image.new("RGB", (16, 8), c) for c in ("red", "green", "blue")]
    grid = make_grid(images)
    assert grid.size == (32, 16)
    assert grid.getpixel((20, 2)) == (0, 128, 0) and grid.getpixel((2, 10)) == (0, 0, 255)
    assert grid.getpixel((20, 10)) == (0, 0, 0)


# --- half precision: fp16 and bf16 on the CPU, as a GPU worker trains -----------------

HALF = ["float16", "bfloat16"]
# The sample drawn with the adapter vs fp32's, in levels (seen: fp16 1, bf16 6-9).
SAMPLE_LEVELS = {"float16": 4, "bfloat16": 20}
_FP32: dict[str, tuple[TrainResult, list[float]]] = {}


def full_spec(method: str) -> TrainSpec:
    """Every part of training at once: prior preservation, the text encoder, validation."""
    return spec(method=method, prior_preservation=True, train_text_encoder=True)


def train_full(pipe, method: str, directory: Path) -> tuple[TrainResult, list[float]]:
    losses: list[float] = []
    result = run(
        pipe,
        full_spec(method),
        directory,
        num_class_images=2,
        on_progress=lambda s, t, loss: losses.append(loss),
    )
    return result, losses


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all the weights of two adapter files."""
    keys = [k for k in b if not k.endswith(".alpha")]
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in keys)
    return math.sqrt(num / sum(float(b[k].float().square().sum()) for k in keys))


def fp32_reference(sd_dir: Path, directory: Path, method: str) -> tuple[TrainResult, list[float]]:
    if method not in _FP32:
        _FP32[method] = train_full(load(sd_dir), method, directory)
    return _FP32[method]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
def test_each_method_trains_in_half_precision(sd_dir, tmp_path_factory, method, dtype):
    reference, reference_losses = fp32_reference(sd_dir, tmp_path_factory.mktemp("fp32"), method)
    pipe = load(sd_dir, dtype=dtype)
    before, fingerprint = draw(pipe), pipe_fingerprint(pipe)
    directory = tmp_path_factory.mktemp(dtype) / "job"
    result, losses = train_full(pipe, method, directory)

    # The same training as in fp32, to within half precision's rounding.
    assert losses == pytest.approx(reference_losses, rel=0.01)
    assert result.base_loss == pytest.approx(reference.base_loss, rel=0.01)
    assert result.adapter_loss == pytest.approx(reference.adapter_loss, rel=0.01)
    tensors = tensors_of(result)
    assert tensors.keys() == tensors_of(reference).keys()
    assert {v.dtype for v in tensors.values()} == {torch.float16}  # as kohya writes them
    assert relative_difference(tensors, tensors_of(reference)) < 0.05
    # Trainable weights stayed fp32; only fp16 needs (and saves) a loss scaler.
    saved = torch.load(directory / CHECKPOINT_FILE, weights_only=True)
    assert {v.dtype for v in saved["adapters"].values()} == {torch.float32}
    assert bool(saved["scaler"]) == (dtype == "float16")
    # Samples drawn with the adapter, in this dtype; the pipe is given back as it was.
    sample = np.asarray(result.samples[0]).astype(int)
    assert np.abs(sample - before).mean() > 0.1
    assert level_difference(result.samples[0], reference.samples[0]) <= SAMPLE_LEVELS[dtype]
    assert tuner_layers(pipe) == 0 and pipe_fingerprint(pipe) == fingerprint
    assert np.array_equal(draw(pipe), before)


@pytest.mark.parametrize(("first", "then"), [("float32", "float16"), ("float16", "bfloat16")])
def test_a_checkpoint_resumes_under_another_dtype(sd_dir, tmp_path, first, then):
    # A job paused on one worker may resume on another, configured with another dtype.
    train_spec = spec(steps=4)
    paused = run(load(sd_dir, dtype=first), train_spec, tmp_path / "job", should_yield=lambda: True)
    assert paused == TrainingPaused(step=2)
    steps = []
    resumed = run(
        load(sd_dir, dtype=then),
        train_spec,
        tmp_path / "job",
        on_progress=lambda s, t, loss: steps.append(s),
    )
    assert steps == [3, 4] and resumed.steps == 4
    assert math.isfinite(resumed.adapter_loss)
    saved = torch.load(tmp_path / "job" / CHECKPOINT_FILE, weights_only=True)
    assert bool(saved["scaler"]) == (then == "float16")
    whole = run(load(sd_dir, dtype=then), train_spec, tmp_path / "uninterrupted")
    assert relative_difference(tensors_of(resumed), tensors_of(whole)) < 0.05


@pytest.mark.parametrize("dtype", HALF)
def test_sdxl_trains_in_half_precision(xl_dir, tmp_path, dtype):
    pipe = load(xl_dir, xl=True, dtype=dtype)
    before = draw(pipe)
    losses = []
    result = run(
        pipe,
        spec(steps=2, train_text_encoder=True),
        tmp_path / "job",
        on_progress=lambda s, t, loss: losses.append(loss),
    )
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert {k.split("_", 2)[1] for k in tensors_of(result)} == {"unet", "te1", "te2"}
    assert math.isfinite(result.base_loss) and math.isfinite(result.adapter_loss)
    assert np.array_equal(draw(pipe), before) and tuner_layers(pipe) == 0
