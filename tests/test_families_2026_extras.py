"""The 2026 families' extras on the tiny random-weight models (issue 24's "Left"):
progress previews for Qwen-Image(-Edit) and Flux.2 klein, ControlNet for Z-Image and
Qwen-Image, Z-Image Omni's edit mode, the Lightning LoRA defaults, and the memory planner
applied to the flow families' tiny models."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.contract.jobs import GenerateSpec
from tests.test_families_2026 import _Blobs as _ImageBlobs
from tests.test_families_2026 import _pixels, _plain
from tests.test_memory_placement import PLANS

WIDTH, HEIGHT = 96, 64  # not square: a preview must keep the image's aspect
PROMPT = "a photo of a cat"


class _Blobs(_ImageBlobs):
    """Input photos by sha256 (test_families_2026's), and LoRA files by sha256."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, Path] = {}

    def add_file(self, path: Path) -> str:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        self.files[sha] = path
        return sha

    def path(self, sha: str) -> Path:
        return self.files[sha]


def _photo(seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _spec(**values) -> GenerateSpec:
    base = dict(
        prompt=PROMPT, sampler="Euler", steps=2, cfg_scale=2.0, width=WIDTH, height=HEIGHT, seed=7
    )
    return GenerateSpec(**{**base, **values})


@pytest.fixture(scope="module")
def models(tiny_2026):
    from pipeline.contract.config import ModelConfig
    from pipeline.models.loading import load_model

    return {
        name: load_model(ModelConfig(name=name, source=str(path)))
        for name, path in tiny_2026.items()
    }


# --- 1. progress previews ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mode",
    [
        ("qwen-image", "txt2img"),
        ("qwen-image-edit-plus", "edit"),
        ("flux2-klein", "txt2img"),
        ("flux2-klein", "edit"),
        ("zimage", "txt2img"),
    ],
)
def test_a_progress_event_carries_a_jpeg_preview_of_the_images_aspect(models, name, mode):
    from pipeline.generate.modes import run_generation

    blobs = _Blobs()
    extra = dict(mode="edit", image=blobs.add(_photo())) if mode == "edit" else {}
    events: list = []
    run_generation(
        models[name],
        [_spec(**extra)],
        blobs=blobs,
        on_step=lambda *event: events.append(event),
        preview_every=1,
    )
    assert [(done, total) for done, total, _ in events] == [(1, 2), (2, 2)]
    for _, _, preview in events:
        image = Image.open(io.BytesIO(preview))
        assert image.format == "JPEG"
        # 12×8 latents upscaled to 256 on the long side: 256×171 (the image's 3:2)
        assert image.size == (256, round(256 * HEIGHT / WIDTH))


def test_packed_latents_are_unpacked_as_the_pipelines_own_decoders_unpack_them(models):
    """The preview's [batch, channels, h, w] is what the pipeline hands its VAE: Qwen-Image's
    `_unpack_latents` (its frame axis dropped), klein's position-id scatter and unpatchify
    (then 32 channels at h/8 × w/8)."""
    import torch

    qwen, klein = models["qwen-image"], models["flux2-klein"]
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    packed = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(0))
    theirs = qwen.pipe._unpack_latents(packed, HEIGHT, WIDTH, qwen.pipe.vae_scale_factor)
    ours = qwen.kind.preview_latents(packed, qwen.pipe, (WIDTH, HEIGHT))
    assert torch.equal(ours, theirs[:, :, 0])

    packed = torch.randn(1, tokens, 128, generator=torch.Generator().manual_seed(1))
    ids = klein.pipe._prepare_latent_ids(torch.zeros(1, 128, HEIGHT // 16, WIDTH // 16))
    scattered = klein.pipe._unpack_latents_with_ids(packed, ids)
    theirs = klein.pipe._unpatchify_latents(scattered)
    ours = klein.kind.preview_latents(packed, klein.pipe, (WIDTH, HEIGHT))
    assert ours.shape == (1, 32, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(ours, theirs)


# --- 2. ControlNet for Z-Image and Qwen-Image ------------------------------------------


@pytest.fixture(scope="module")
def control(tiny_2026, tmp_path_factory):
    """Tiny Z-Image and Qwen-Image ControlNets (made by diffusers' classes beside each
    tiny model) as `[controlnets]` units, the worker's ControlCache, and a control map."""
    from pipeline.contract.config import config_from_dict
    from pipeline.control.apply import ControlCache
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_controlnet
    from pipeline.families.zimage_tiny import write_tiny_zimage_controlnet

    root = tmp_path_factory.mktemp("controlnets-2026")
    zimage = write_tiny_zimage_controlnet(tiny_2026["zimage"], root / "zimage")
    qwen = write_tiny_qwen_controlnet(tiny_2026["qwen-image"], root / "qwen")
    units = {
        "z": {"source": str(zimage), "family": "zimage", "preprocessor": "none"},
        "q": {"source": str(qwen), "family": "qwen-image", "preprocessor": "none"},
    }
    config = config_from_dict(
        {"models": {"z": {"source": str(tiny_2026["zimage"])}}, "controlnets": units}
    )
    blobs = _Blobs()
    maps = {"first": _photo(3), "second": _photo(4)}
    return {
        "cache": ControlCache(config),
        "blobs": blobs,
        "shas": {name: blobs.add(image) for name, image in maps.items()},
        "maps": maps,
        "folders": {"zimage": zimage, "qwen-image": qwen},
    }


def _unit(name: str, image: str, **values):
    from pipeline.contract.control import ControlUnit

    return ControlUnit(name=name, image=image, **values)


@pytest.mark.parametrize(
    "name, unit, call",
    [
        (
            "zimage",
            dict(weight=0.8),  # Z-Image's pipeline has no guidance window
            dict(negative_prompt=[""], guidance_scale=2.0, controlnet_conditioning_scale=0.8),
        ),
        (
            "qwen-image",
            dict(weight=0.7, guidance_end=0.5),
            dict(
                negative_prompt=[" "],
                true_cfg_scale=2.0,
                controlnet_conditioning_scale=0.7,
                control_guidance_start=0.0,
                control_guidance_end=0.5,
            ),
        ),
    ],
)
def test_a_controlnet_unit_equals_diffusers_controlnet_pipeline(models, control, name, unit, call):
    import diffusers

    from pipeline.generate.modes import run_generation

    model, prefix = models[name], {"zimage": "ZImage", "qwen-image": "QwenImage"}[name]
    spec = _spec(control=(_unit(name[0], control["shas"]["first"], **unit),))
    ours = _pixels(
        run_generation(model, [spec], blobs=control["blobs"], control=control["cache"])[0][0]
    )
    # diffusers' own classes, as its docs call them
    net = getattr(diffusers, f"{prefix}ControlNetModel").from_pretrained(control["folders"][name])
    pipe = getattr(diffusers, f"{prefix}ControlNetPipeline").from_pipe(model.pipe, controlnet=net)
    plain = _plain(
        pipe,
        prompt=[PROMPT],
        control_image=control["maps"]["first"],
        num_inference_steps=2,
        width=WIDTH,
        height=HEIGHT,
        **call,
    )
    assert np.abs(ours - plain).max() <= 1  # levels: the PNG round trip only
    without = _pixels(run_generation(model, [_spec()])[0][0])
    assert np.abs(ours - without).max() > 8  # the unit did something


def test_controlnet_infotext_names_the_unit_on_the_new_families(models, control):
    from pipeline.generate.modes import run_generation

    unit = _unit("z", control["shas"]["first"])
    out = run_generation(
        models["zimage"], [_spec(control=(unit,))], blobs=control["blobs"], control=control["cache"]
    )[0][0]
    assert 'ControlNet 0: "Module: none, Model: z [' in out.infotext


@pytest.mark.parametrize(
    "name, values, message",
    [
        (
            "zimage",
            dict(control=("z", "z")),
            "Z-Image models take at most 1 ControlNet unit per job; this job gave 2",
        ),
        (
            "zimage",
            dict(control=(("z", dict(guidance_end=0.5)),)),
            "Z-Image ControlNets act on every step: unit 'z' cannot set guidance start/end",
        ),
        (
            "qwen-image",
            dict(control=("q", "q")),
            "Qwen-Image models take at most 1 ControlNet unit per job; this job gave 2",
        ),
        (
            "qwen-image",
            dict(control=(("q", dict(control_mode="My prompt is more important")),)),
            "Qwen-Image ControlNets have no control modes (they are SD's); unit 'q' must use "
            "Balanced",
        ),
        (
            "qwen-image",
            dict(control=("q",), mode="img2img", image="a"),
            "Qwen-Image ControlNets work for txt2img only; this job is img2img",
        ),
        (
            "qwen-image-edit",
            dict(control=("q",), mode="edit", image="a"),
            "Qwen-Image-Edit models have no control option",
        ),
        (
            "flux2-klein",
            dict(control=("q",)),
            "Flux.2 klein models have no control option",
        ),
    ],
)
def test_controlnet_jobs_a_family_cannot_run_are_refused_in_one_line(name, values, message):
    from pipeline.contract.families import spec as family_spec
    from pipeline.contract.jobs import JobError

    units = []
    for unit in values.pop("control"):
        unit_name, settings = (unit, {}) if isinstance(unit, str) else unit
        units.append(_unit(unit_name, "sha", **settings))
    with pytest.raises(JobError) as refused:
        family_spec(name).check_job(_spec(control=tuple(units), **values))
    assert str(refused.value) == message


def test_a_controlnet_of_another_family_or_a_single_file_is_refused_by_name(
    models, control, tmp_path
):
    import shutil

    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import JobError
    from pipeline.control.units import ControlNetCache

    one_file = tmp_path / "qwen-controlnet.safetensors"
    shutil.copy(control["folders"]["qwen-image"] / "diffusion_pytorch_model.safetensors", one_file)
    config = config_from_dict(
        {
            "models": {"z": {"source": "/nowhere"}},
            "controlnets": {
                "file": {"source": str(one_file), "family": "qwen-image"},
                "wide": {"source": str(control["folders"]["qwen-image"]), "family": "zimage"},
            },
        }
    )
    cache = ControlNetCache(config, "cpu", models["zimage"].dtype)
    transformer = models["qwen-image"].pipe.transformer
    with pytest.raises(JobError) as refused:
        cache.get("file", transformer, "qwen-image")
    assert str(refused.value) == (
        "ControlNet 'file' is one file; Qwen-Image ControlNets load from a diffusers folder "
        "or Hub id: give its folder as the unit's source"
    )
    with pytest.raises(JobError, match="ControlNet 'wide' could not be loaded|does not fit"):
        cache.get("wide", models["zimage"].pipe.transformer, "zimage")


# --- 3. Z-Image Omni: txt2img and editing with reference images ------------------------


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    from pipeline.contract.config import ModelConfig
    from pipeline.families.zimage_tiny import write_tiny_zimage_omni
    from pipeline.models.loading import load_model

    folder = write_tiny_zimage_omni(tmp_path_factory.mktemp("omni") / "omni")
    config = ModelConfig(name="omni", source=str(folder))
    return {
        "folder": folder,
        "fp32": load_model(config),
        # diffusers' Omni pipeline encodes its input images in bfloat16 (the dtype it is
        # published and run in): the reference for equality
        "bf16": load_model(config, dtype="bfloat16"),
    }


def test_an_omni_folder_is_its_own_family_taking_zimage_loras(omni):
    from pipeline.contract.families import detect_family
    from pipeline.contract.families import spec as family_spec
    from pipeline.families import of_pipe

    assert detect_family(str(omni["folder"])) == "zimage-omni"
    assert omni["fp32"].family == "zimage-omni" and of_pipe(omni["fp32"].pipe).name == "zimage-omni"
    assert family_spec("zimage-omni").takes_loras_of("zimage")


def test_omni_txt2img_equals_plain_diffusers(omni):
    from pipeline.generate.modes import run_generation

    model = omni["fp32"]
    ours = _pixels(run_generation(model, [_spec()])[0][0])
    assert np.abs(ours - _omni_plain(model.pipe)).max() <= 1


def _omni_plain(pipe, **images) -> np.ndarray:
    """`ZImageOmniPipeline` called as our job calls it (CFG 2, an empty negative)."""
    call = dict(prompt=[PROMPT], negative_prompt=[""], guidance_scale=2.0)
    return _plain(pipe, num_inference_steps=2, width=WIDTH, height=HEIGHT, **call, **images)


def test_omni_edits_with_reference_images_as_diffusers_does(omni):
    from pipeline.generate.modes import run_generation

    blobs = _Blobs()
    first, second = _photo(0), _photo(1)
    spec = _spec(mode="edit", image=blobs.add(first), images=(blobs.add(second),))
    model = omni["bf16"]
    ours = _pixels(run_generation(model, [spec], blobs=blobs)[0][0])
    assert np.abs(ours - _omni_plain(model.pipe, image=[first, second])).max() <= 1
    # On an fp32 model too (diffusers' own call fails there: bf16 images, fp32 VAE); the
    # references change the image.
    edited = _pixels(run_generation(omni["fp32"], [spec], blobs=blobs)[0][0])
    drawn = _pixels(run_generation(omni["fp32"], [_spec()])[0][0])
    assert edited.shape == (HEIGHT, WIDTH, 3) and np.abs(edited - drawn).max() > 8


@pytest.mark.parametrize(
    "values, message",
    [
        (
            dict(mode="img2img", image="a"),
            "Z-Image Omni models cannot img2img; modes: edit, txt2img",
        ),
        (
            dict(mode="edit", image="a", images=("b", "c", "d")),
            "Z-Image Omni models edit with at most 3 input images; this job gave 4",
        ),
    ],
)
def test_omni_refuses_what_it_lacks_in_one_line(values, message):
    from pipeline.contract.families import spec as family_spec
    from pipeline.contract.jobs import JobError

    with pytest.raises(JobError) as refused:
        family_spec("zimage-omni").check_job(_spec(**values))
    assert str(refused.value) == message


# --- 4. Lightning LoRA defaults --------------------------------------------------------


@pytest.fixture(scope="module")
def lightning(models, tmp_path_factory):
    """A LoRA for the tiny Qwen-Image saved by diffusers' own `save_lora_weights` (peft's
    adapter on the transformer) under lightx2v's file name, and the same file carrying
    the name in kohya's `ss_output_name` metadata only."""
    import torch
    from diffusers import QwenImagePipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from pipeline.contract.jobs import LoraRef
    from pipeline.loras.cache import LoraCache

    root = tmp_path_factory.mktemp("lightning")
    transformer = QwenImagePipeline.from_pretrained(Path(models["qwen-image"].source)).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    QwenImagePipeline.save_lora_weights(
        root,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        weight_name="Qwen-Image-Lightning-4steps-V1.0.safetensors",
    )
    named = root / "Qwen-Image-Lightning-4steps-V1.0.safetensors"
    titled = root / "fast.safetensors"
    save_file(
        load_file(str(named)),
        str(titled),
        metadata={"ss_output_name": "Qwen-Image-Lightning-8steps"},
    )
    blobs = _Blobs()
    refs = {
        "named": LoraRef(named.stem, blobs.add_file(named)),
        "titled": LoraRef("fast", blobs.add_file(titled)),
    }
    return {
        "blobs": blobs,
        "refs": refs,
        "cache": LoraCache(models["qwen-image"].pipe, max_bytes=1 << 30),
    }


def _qwen(**values) -> GenerateSpec:
    """A job with Qwen-Image's defaults (40 steps, true CFG 4) unless told otherwise."""
    return _spec(**{"steps": 40, "cfg_scale": 4.0, **values})


def test_a_lightning_lora_brings_its_steps_and_cfg_unless_the_job_chose_them():
    from pipeline.contract.families import spec as family_spec
    from pipeline.contract.jobs import LoraRef

    qwen = family_spec("qwen-image-edit-plus")  # the edit models take Qwen-Image's LoRAs
    named = LoraRef("Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16", "a")
    job, said = qwen.with_lora_defaults(_qwen(loras=(named,)), {})
    assert (job.steps, job.cfg_scale) == (4, 1.0)
    assert said == (
        "LoRA 'Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16' is made for 4 steps at CFG 1: "
        "the job ran so (set steps or CFG to change it)",
    )
    # Known by its file's own title, however the member named it; no count: 8 steps.
    titled = LoraRef("fast", "b")
    job, _ = qwen.with_lora_defaults(_qwen(loras=(titled,)), {"b": ("qwen lightning",)})
    assert (job.steps, job.cfg_scale) == (8, 1.0)
    # Explicit settings win, and the member is told what the LoRA is made for.
    job, said = qwen.with_lora_defaults(_qwen(loras=(named,), steps=12), {})
    assert (job.steps, job.cfg_scale) == (12, 1.0)
    assert said == (
        "LoRA 'Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16' is made for 4 steps at CFG 1; "
        "your 12 steps were kept",
    )
    # The LoRA's own settings chosen: nothing to say. No Lightning LoRA, or another family:
    # nothing changes.
    assert qwen.with_lora_defaults(_qwen(loras=(named,), steps=4, cfg_scale=1.0), {})[1] == ()
    plain = _qwen(loras=(LoraRef("my-style", "c"),))
    assert qwen.with_lora_defaults(plain, {}) == (plain, ())
    zimage = _spec(steps=8, cfg_scale=1.0, loras=(named,))
    assert family_spec("zimage").with_lora_defaults(zimage, {}) == (zimage, ())


def test_a_lightning_lora_job_runs_as_if_its_steps_had_been_given(models, lightning):
    from pipeline.generate.modes import run_generation

    model, blobs, cache = models["qwen-image"], lightning["blobs"], lightning["cache"]
    named, titled = lightning["refs"]["named"], lightning["refs"]["titled"]
    out = run_generation(model, [_qwen(loras=(named,))], blobs=blobs, loras=cache)[0][0]
    assert "Steps: 4," in out.infotext and "CFG scale: 1," in out.infotext
    assert out.notices[0].startswith(f"LoRA '{named.name}' is made for 4 steps at CFG 1")
    given = run_generation(
        model, [_qwen(loras=(named,), steps=4, cfg_scale=1.0)], blobs=blobs, loras=cache
    )[0][0]
    assert _pixels(given).tolist() == _pixels(out).tolist()  # the same call: bit-exact
    assert given.notices == ()
    # Recognised by the file's metadata; in a batch with a plain job, each runs as alone.
    plain = _qwen(seed=3)
    batch = run_generation(model, [_qwen(loras=(titled,)), plain], blobs=blobs, loras=cache)
    assert "Steps: 8," in batch[0][0].infotext and "Steps: 40," in batch[1][0].infotext
    alone = run_generation(model, [plain], blobs=blobs, loras=cache)[0][0]
    assert np.abs(_pixels(batch[1][0]) - _pixels(alone)).max() <= 2  # BATCH_TOLERANCE_LEVELS


# --- 5. the memory planner on the flow families' tiny models ---------------------------


@pytest.fixture(scope="module", params=["flux", "zimage", "qwen-image", "flux2-klein"])
def planned(request, tiny_2026, tmp_path_factory):
    """(family, folder, its image at full precision with no plan) for each flow family."""
    from pipeline.contract.config import config_from_dict
    from pipeline.families.flux_tiny import write_tiny_flux
    from pipeline.models.loading import load_model

    family = request.param
    if family == "flux":
        folder = write_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")
    else:
        folder = tiny_2026[family]
    model = config_from_dict({"models": {"tiny": {"source": str(folder)}}}).models[0]
    from pipeline.generate.modes import run_generation

    [[reference]] = run_generation(load_model(model, device="cpu"), [_spec()])
    return family, str(folder), _pixels(reference)


@pytest.mark.parametrize(("mode", "text"), PLANS)
def test_each_memory_plan_on_a_flow_family_keeps_the_image(planned, mode, text):
    """The plans test_memory_placement.py runs on tiny SD, on the transformers: diffusers'
    layerwise casting, model/group offload and the text encoders' hooks (Qwen3, Qwen2.5-VL,
    T5 beside CLIP). Measured max/mean levels for fp8: Flux.1 8/0.5, Z-Image 18/1.1,
    Qwen-Image 4/0.3, klein 12/0.8 — within SD's bound."""
    import torch

    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import load_model
    from tests.test_memory_placement import (
        FP8_MAX_LEVELS,
        FP8_MEAN_LEVELS,
        MOVED_LEVELS,
        forced_plan,
    )

    family, source, reference = planned
    model, plan = forced_plan(source, family, mode, text)
    loaded = load_model(model, device="cpu", plan=plan)
    [[out]] = run_generation(loaded, [_spec()])
    diff = np.abs(_pixels(out) - reference)
    if mode == "fp8":
        stored = {p.dtype for p in loaded.kind.denoiser(loaded.pipe).parameters()}
        assert torch.float8_e4m3fn in stored  # the transformer really is held in fp8
        assert diff.max() <= FP8_MAX_LEVELS and diff.mean() <= FP8_MEAN_LEVELS, (
            f"{family} fp8: max {diff.max()}, mean {diff.mean():.2f} levels"
        )
    else:
        assert diff.max() <= MOVED_LEVELS, f"{family} {mode}/{text}: {diff.max()} levels"
