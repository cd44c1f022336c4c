"""Personal models on the flow families (Flux.1 dev, Z-Image, Flux.2 klein, Qwen-Image), on
their tiny random-weight models: real diffusers + peft, a few steps each.

- **It learns.** Training at a high learning rate on two photos must lower the
  flow-matching loss on those same photos, measured before and after with fixed noise
  and fixed σ (`loss_on_images`: the same draws both times, so only the adapter differs).
- **Its LoRA file is what the user's tools read.** diffusers' own `load_lora_weights`
  loads the exported file into a fresh tiny pipeline and draws what our `<lora:…>` path
  draws with the same file (within 2 levels), and both differ clearly from the base
  model. LoKr/LoHa files (LyCORIS names, which diffusers does not load for these
  families) drawn by our path equal the sample peft's own adapter drew during training.
- **Its family is read from its keys:** on another family it is refused naming both.
- Progress events, cancel and yield/resume work as on the UNet families.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load as load_safetensors

from pipeline.contract.families.flux import FluxFill, FluxKontext, FluxSchnell
from pipeline.contract.families.qwen_image import QwenImageEdit
from pipeline.contract.jobs import JobError, Limits, LoraRef, TrainSpec
from pipeline.loras.cache import LoraCache
from pipeline.loras.formats import LoraError, read_lora_file
from pipeline.training.loop import (
    TrainingCancelled,
    TrainingPaused,
    TrainOptions,
    TrainPhotos,
    TrainResult,
    train_lora,
)
from pipeline.training.validation import loss_on_images
from tests.test_train import photos
from tests.test_train import spec as sd_spec

PROMPT = "photo of sks person"
LEVELS = 2  # the same weights through two loaders: rounding only (fp16 export)


@pytest.fixture(scope="module")
def folders(tiny_2026, tmp_path_factory) -> dict[str, Path]:
    from pipeline.families.flux_tiny import write_tiny_flux

    flux = write_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")
    names = ("zimage", "flux2-klein", "qwen-image")
    return {"flux": flux, **{name: tiny_2026[name] for name in names}}


def load(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def spec(**overrides) -> TrainSpec:
    """tests/test_train.py's spec, at 12 steps and no checkpoint on the way."""
    return sd_spec(**{"steps": 12, "alpha": 4.0, "checkpoint_every": 100, **overrides})


def run(pipe, train_spec: TrainSpec, checkpoint_dir: Path, **kwargs):
    kwargs = {"sample_steps": 2, "sample_prompts": [PROMPT], **kwargs}
    return train_lora(
        pipe,
        train_spec,
        TrainPhotos(photos(2), [], photos(1, seed=1)),
        TrainOptions(checkpoint_dir=checkpoint_dir, limits=Limits(), **kwargs),
    )


def draw(pipe) -> np.ndarray:
    """What train_lora draws for a sample: the spec's seed 0, 2 steps, 64×64, in levels."""
    image = pipe(
        prompt=[PROMPT],
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[torch.Generator("cpu").manual_seed(0)],
    ).images[0]
    return np.asarray(image).astype(int)


def ours(folder: Path, path: Path) -> np.ndarray:
    """The file through our `<lora:name:1>` path (the worker's LoRA cache)."""
    pipe = load(folder)
    lora = (LoraRef(path.stem, "0" * 64, 1.0), path)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    with cache.activate([lora]):
        image = draw(pipe)
    assert cache.notices([lora[0]]) == []  # every layer of the file was applied
    return image


def fit_loss(pipe) -> float:
    """The flow loss on the two training photos, fixed noise and σ."""
    return loss_on_images(pipe, photos(2), [PROMPT] * 2, resolution=64)


# The tiny klein adapts fewer, narrower layers: it moves at a higher rate in 12 steps.
LEARNING_RATES = {"flux2-klein": 3e-2}


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory) -> dict[str, tuple[TrainResult, list, float, float, Path]]:
    """One LoRA run per family, shared by the tests that read its outcome: (result,
    progress events, fit loss before, fit loss after, the exported file)."""
    runs = {}
    for family, folder in folders.items():
        pipe = load(folder)
        before = fit_loss(pipe)
        progress: list = []
        root = tmp_path_factory.mktemp(f"train-{family}")
        rate = LEARNING_RATES.get(family, 1e-2)
        # Flux.1's default is kohya's names (tests/test_flux_kohya_export.py); the file
        # diffusers loads at any width is the peft layout, asked for here.
        layout = {"flux_lora_layout": "diffusers"} if family == "flux" else {}
        result = run(
            pipe,
            spec(learning_rate=rate, **layout),
            root / "job",
            on_progress=lambda *event, events=progress: events.append(event),
        )
        assert isinstance(result, TrainResult)
        path = root / f"{family}_me.safetensors"
        path.write_bytes(result.safetensors)
        # The fit loss with the trained adapter, through the exported file (our path).
        with LoraCache(pipe, max_bytes=1 << 30).activate([(LoraRef("me", "0" * 64, 1.0), path)]):
            after = fit_loss(pipe)
        runs[family] = (result, progress, before, after, path)
    return runs


FAMILIES = ["flux", "zimage", "flux2-klein", "qwen-image"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_lower_the_loss_on_the_training_photos(trained, family):
    result, progress, before, after, _ = trained[family]
    assert [p[:2] for p in progress] == [(step, 12) for step in range(1, 13)]
    assert all(np.isfinite(p[2]) for p in progress)
    # Fixed noise and σ: only the adapter changed, and the same call twice gives the same
    # figure (the smallest drop seen: klein's, 2.4 %).
    assert after < 0.98 * before
    assert np.isfinite(result.base_loss) and np.isfinite(result.adapter_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_file_loads_in_diffusers_and_draws_what_our_path_draws(folders, trained, family):
    result, _, _, _, path = trained[family]
    tensors = load_safetensors(result.safetensors)
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert {k.rsplit(".", 2)[-2] for k in tensors} == {"lora_A", "lora_B"}
    assert result.metadata["ss_network_module"] == "networks.lora"
    assert result.metadata["ss_timestep_sampling"] == "sigmoid"
    reference = load(folders[family])
    base = draw(reference)
    reference.load_lora_weights(str(path))
    assert any(isinstance(m, BaseTunerLayer) for m in reference.transformer.modules())
    theirs = draw(reference)
    assert np.abs(theirs - base).mean() > 1.0  # the adapter changes the picture
    assert np.abs(ours(folders[family], path) - theirs).max() <= LEVELS
    # …and the sample drawn with peft's adapter during training is that picture too.
    assert np.abs(np.asarray(result.samples[0]).astype(int) - theirs).max() <= LEVELS


def test_flux_dev_trains_at_guidance_1_with_the_scripts_targets(trained):
    result, *_ = trained["flux"]
    tensors = load_safetensors(result.safetensors)
    modules = {k.rsplit(".", 2)[0].removeprefix("transformer.") for k in tensors}
    assert "transformer_blocks.0.attn.add_q_proj" in modules
    assert "transformer_blocks.0.ff_context.net.2" in modules
    assert "single_transformer_blocks.0.attn.to_v" in modules
    assert result.metadata["ss_guidance_scale"] == "1"
    assert result.metadata["ss_base_model_version"] == "flux1"


@pytest.mark.parametrize(
    "family, elsewhere, label, other",
    [
        ("flux", "sd1", "Flux.1", "SD 1.x"),
        ("flux", "zimage", "Flux.1", "Z-Image"),
        ("zimage", "flux2-klein", "Z-Image", "Flux.2 klein"),
        ("flux2-klein", "flux", "Flux.2 klein", "Flux.1"),
        ("qwen-image", "zimage", "Qwen-Image", "Z-Image"),
    ],
)
def test_the_file_is_refused_on_another_family_naming_both(
    trained, family, elsewhere, label, other
):
    path = trained[family][4]
    read_lora_file(path, name="me", family=family, max_bytes=1 << 30)  # its own: fine
    with pytest.raises(LoraError, match=f"^LoRA 'me' was made for {label}; this model is {other}$"):
        read_lora_file(path, name="me", family=elsewhere, max_bytes=1 << 30)


@pytest.mark.parametrize("family, method", [("flux", "lokr"), ("zimage", "loha")])
def test_lycoris_kinds_export_lycoris_names_our_path_applies(folders, tmp_path, family, method):
    pipe = load(folders[family])
    result = run(pipe, spec(method=method, learning_rate=3e-2), tmp_path / "job")
    tensors = load_safetensors(result.safetensors)
    assert tensors and all(k.startswith("lycoris_") for k in tensors)
    assert result.metadata["ss_network_module"] == "lycoris.kohya"
    path = tmp_path / f"{method}.safetensors"
    path.write_bytes(result.safetensors)
    sample = np.asarray(result.samples[0]).astype(int)
    assert np.abs(sample - draw(load(folders[family]))).max() > 4 * LEVELS  # it learnt
    assert np.abs(ours(folders[family], path) - sample).max() <= LEVELS


def test_cancel_and_yield_work_and_leave_the_pipe_clean(folders, tmp_path):
    pipe = load(folders["flux"])
    before = draw(pipe)
    with pytest.raises(TrainingCancelled):
        run(pipe, spec(steps=4), tmp_path / "cancelled", should_cancel=iter([0, 0, 1]).__next__)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())
    assert np.array_equal(draw(pipe), before)

    paused = run(
        pipe, spec(steps=4, checkpoint_every=2), tmp_path / "job", should_yield=lambda: True
    )
    assert paused == TrainingPaused(step=2)
    progress: list = []
    finished = run(
        pipe,
        spec(steps=4, checkpoint_every=2),
        tmp_path / "job",
        on_progress=lambda *a: progress.append(a[:2]),
    )
    assert isinstance(finished, TrainResult) and finished.steps == 4
    assert progress == [(3, 4), (4, 4)]  # resumed after the checkpoint at step 2
    assert np.array_equal(draw(pipe), before)


@pytest.mark.parametrize(
    "family, says",
    [
        (FluxSchnell, "Flux.1 schnell models cannot train personal models: it is step-distilled"),
        (FluxKontext, "Flux.1 Kontext models cannot train personal models: it edits images"),
        (FluxFill, "Flux.1 Fill models cannot train personal models: it fills masks"),
        (QwenImageEdit, "Qwen-Image-Edit models cannot train personal models: it edits"),
    ],
)
def test_models_that_cannot_train_are_refused_in_one_line(family, says):
    with pytest.raises(JobError, match=f"^{says}") as refused:
        family.check_training(512)
    assert "\n" not in str(refused.value)


def test_a_resolution_off_the_patch_size_and_text_encoder_training_are_refused(folders, tmp_path):
    pipe = load(folders["flux"])
    with pytest.raises(JobError, match="^Flux.1 models train at a multiple of 16 px, not 72$"):
        run(pipe, spec(resolution=72), tmp_path / "a")
    with pytest.raises(JobError, match="^Flux.1 personal models train the transformer only"):
        run(pipe, spec(train_text_encoder=True), tmp_path / "b")


def test_the_worker_trains_flux_dev_and_refuses_schnell(tmp_path):
    """The Runner as a worker runs it (tests/test_runner.py's pattern): Started, Progress
    with the loss, Done with the file and the samples; a schnell model is refused by its
    variant in one line."""
    import io

    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.jobs import Done, Failed, Progress, Started
    from pipeline.families.flux_tiny import write_tiny_flux
    from pipeline.workers.runner import Runner
    from tests.test_runner import make_config, run

    models = {v: write_tiny_flux(tmp_path / v, variant=v) for v in ("dev", "schnell")}
    config = make_config(models, tmp_path / "data")
    runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="test")
    blobs = []
    for image in photos(3):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        blobs.append(runner.blobs.put(buffer.getvalue(), ".png"))
    # In diffusers' layout (Flux.1's default is kohya's names: test_flux_kohya_export.py).
    job = spec(
        photos=tuple(blobs[:2]),
        test_photos=(blobs[2],),
        steps=2,
        model="dev",
        flux_lora_layout="diffusers",
    )
    events = run(runner, [("dev", job)])
    assert events[0] == Started("dev", worker="test")
    assert any(isinstance(e, Progress) and e.loss is not None for e in events)
    done = events[-1]
    assert isinstance(done, Done), done
    [(name, data)] = done.files
    assert name == "me.safetensors"
    assert all(k.startswith("transformer.") for k in load_safetensors(data))
    assert done.info["base_loss"] is not None and len(done.images) == 4  # the samples

    events = run(runner, [("schnell", replace(job, model="schnell"))])
    failed = events[-1]
    assert isinstance(failed, Failed)
    assert failed.message.startswith("Flux.1 schnell models cannot train personal models: ")


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_prior_preservation_trains_class_images_beside_the_photos(folders, tmp_path, family):
    """Class images drawn by the base model ride in the same step (Flux.1's T5 states are
    one length; Qwen-Image's captions keep theirs and are padded per step)."""
    pipe = load(folders[family])
    result = run(
        pipe,
        spec(steps=2, prior_preservation=True),
        tmp_path / "job",
        num_class_images=2,
        model_hash="tiny",
    )
    assert isinstance(result, TrainResult)
    cached = list((tmp_path / "class_images").rglob("*.png"))
    assert len(cached) == 2  # drawn once, kept for the next job on this model


@pytest.mark.parametrize("family, dtype", [("flux", "bfloat16"), ("zimage", "float16")])
def test_half_precision_models_train_with_fp32_adapters(folders, tmp_path, family, dtype):
    """The worker's dtype (`[workers] dtype`): the base in half precision, the adapter's
    weights fp32 (fp16 with the GradScaler), as on the UNet families."""
    pipe = DiffusionPipeline.from_pretrained(folders[family], torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    progress: list = []
    result = run(
        pipe,
        spec(steps=3),
        tmp_path / "job",
        on_progress=lambda *event: progress.append(event),
    )
    assert isinstance(result, TrainResult) and len(progress) == 3
    assert all(np.isfinite(p[2]) for p in progress)
    assert np.isfinite(result.base_loss) and np.isfinite(result.adapter_loss)
    assert pipe.transformer.dtype == getattr(torch, dtype)  # given back as it was
    tensors = load_safetensors(result.safetensors)
    assert tensors and all(t.dtype == torch.float16 for t in tensors.values())
