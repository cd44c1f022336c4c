"""Z-Image, Qwen-Image, Qwen-Image-Edit(-Plus) and Flux.2 klein through our engine, on the
tiny random-weight models: recognised from their folders, every mode they have through
`run_generation` (the Runner's call) and `sdbot generate`, equal to plain diffusers' call
with the same inputs, and their refusals in one line naming the model."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.contract.jobs import GenerateSpec, JobError

SIZE = 64
PROMPT = "a photo of a cat"


class _Blobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def add(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        sha = hashlib.sha256(buffer.getvalue()).hexdigest()
        self.data[sha] = buffer.getvalue()
        return sha

    def get(self, sha: str) -> bytes:
        return self.data[sha]

    def path(self, sha: str):  # no LoRAs here
        raise KeyError(sha)


def _photo(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folders(tiny_2026) -> dict[str, Path]:
    """The tiny 2026 families' folders, shared with the other 2026 test module (conftest)."""
    return tiny_2026


@pytest.fixture(scope="module")
def models(folders):
    from pipeline.contract.config import ModelConfig
    from pipeline.models.loading import load_model

    return {
        name: load_model(ModelConfig(name=name, source=str(path))) for name, path in folders.items()
    }


def _spec(**values) -> GenerateSpec:
    base = dict(
        prompt=PROMPT, sampler="Euler", steps=2, cfg_scale=2.0, width=SIZE, height=SIZE, seed=7
    )
    return GenerateSpec(**{**base, **values})


def _pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.png)).convert("RGB"), dtype=np.int16)


def _plain(pipe, **call) -> np.ndarray:
    import torch

    with torch.inference_mode():
        image = pipe(generator=[torch.Generator("cpu").manual_seed(7)], **call).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_each_folder_is_recognised_as_its_family(folders, models):
    from pipeline.contract.families import detect_family
    from pipeline.families import of_pipe

    for name, folder in folders.items():
        assert detect_family(str(folder)) == name
        assert models[name].family == name and of_pipe(models[name].pipe).name == name


@pytest.mark.parametrize(
    "name, call",
    [
        ("zimage", dict(guidance_scale=2.0, negative_prompt=[""])),
        ("qwen-image", dict(true_cfg_scale=2.0, negative_prompt=[" "])),
        ("flux2-klein", dict(guidance_scale=2.0)),
    ],
)
def test_txt2img_equals_plain_diffusers(models, name, call):
    from pipeline.generate.modes import run_generation

    ours = _pixels(run_generation(models[name], [_spec()])[0][0])
    pipe = models[name].pipe
    plain = _plain(pipe, prompt=[PROMPT], num_inference_steps=2, width=SIZE, height=SIZE, **call)
    assert np.abs(ours - plain).max() <= 1  # levels: the PNG round trip only


def test_qwen_edit_plus_edits_with_two_images_as_diffusers_does(models):
    from pipeline.generate.modes import run_generation
    from pipeline.models.qwen_edit import edit_input_area

    blobs = _Blobs()
    first, second = _photo(0), _photo(1)
    spec = _spec(mode="edit", image=blobs.add(first), images=(blobs.add(second),))
    ours = _pixels(run_generation(models["qwen-image-edit-plus"], [spec], blobs=blobs)[0][0])
    with edit_input_area(SIZE * SIZE):
        plain = _plain(
            models["qwen-image-edit-plus"].pipe,
            image=[first, second],
            prompt=[PROMPT],
            negative_prompt=[" "],
            true_cfg_scale=2.0,
            num_inference_steps=2,
            width=SIZE,
            height=SIZE,
        )
    assert np.abs(ours - plain).max() <= 1


def test_klein_edits_with_reference_images(models):
    from pipeline.generate.modes import run_generation

    blobs = _Blobs()
    spec = _spec(mode="edit", image=blobs.add(_photo(0)))
    ours = _pixels(run_generation(models["flux2-klein"], [spec], blobs=blobs)[0][0])
    plain = _plain(
        models["flux2-klein"].pipe,
        image=[_photo(0)],
        prompt=[PROMPT],
        num_inference_steps=2,
        width=SIZE,
        height=SIZE,
        guidance_scale=2.0,
    )
    assert np.abs(ours - plain).max() <= 1


@pytest.mark.parametrize(
    "name, modes",
    [
        ("zimage", ["img2img", "inpaint", "outpaint"]),
        ("qwen-image", ["img2img", "inpaint"]),
        ("qwen-image-edit", ["edit", "inpaint"]),
        ("flux2-klein", ["inpaint"]),
    ],
)
def test_modes_keep_the_unmasked_pixels_and_the_size(models, name, modes):
    from pipeline.generate.modes import run_generation

    blobs = _Blobs()
    photo = _photo()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 16:48] = 255
    extra = {
        "img2img": {},
        "edit": {},
        "inpaint": dict(mask=blobs.add(Image.fromarray(mask)), mask_blur=0),
        "outpaint": dict(outpaint_direction="right", outpaint_pixels=16),
    }
    for mode in modes:
        spec = _spec(mode=mode, image=blobs.add(photo), strength=0.75, **extra[mode])
        pixels = _pixels(run_generation(models[name], [spec], blobs=blobs)[0][0])
        if mode == "outpaint":
            assert pixels.shape == (SIZE, SIZE + 16, 3)
        else:
            assert pixels.shape == (SIZE, SIZE, 3)
        if mode == "inpaint":  # every pixel outside the mask is the input's, exactly
            kept = mask == 0
            assert np.array_equal(pixels[kept], np.asarray(photo, dtype=np.int16)[kept])


def test_prompt_syntax_without_effect_is_said(models):
    from pipeline.generate.modes import run_generation

    out = run_generation(models["zimage"], [_spec(prompt="a (photo:1.3) of a cat BREAK red")])[0][0]
    assert any("(word:1.2) have no effect on Z-Image" in n for n in out.notices)
    assert any("BREAK has no effect on Z-Image" in n for n in out.notices)
    # The tiny transformer's positions stop at 256 tokens: ask the family what it says.
    model = models["zimage"]
    said = model.kind.prompt_notices(model.pipe, _spec(prompt=" ".join(["cat"] * 600)))
    assert "the prompt is 600 tokens; Z-Image reads the first 512, the rest was cut" in said


@pytest.mark.parametrize(
    "name, spec, message",
    [
        (
            "qwen-image-edit-plus",
            dict(mode="edit", image="a", images=("b", "c", "d")),
            "Qwen-Image-Edit-Plus models edit with at most 3 input images; this job gave 4",
        ),
        (
            "qwen-image-edit",
            dict(mode="edit", image="a", images=("b",)),
            "Qwen-Image-Edit models edit with at most 1 input image; this job gave 2",
        ),
        (
            "qwen-image-edit",
            dict(),
            "Qwen-Image-Edit models cannot txt2img; modes: edit, facefix, inpaint, outpaint",
        ),
        (
            "flux2-klein",
            dict(mode="img2img", image="a"),
            "Flux.2 klein models cannot img2img; modes: edit, facefix, inpaint, outpaint, txt2img",
        ),
        (
            "zimage",
            dict(width=72),
            "Z-Image models need a width that is a multiple of 16, but it is 72",
        ),
        (
            "zimage",
            dict(sampler="Euler a"),
            "Z-Image models cannot use the sampler 'Euler a' (did you mean Euler?); "
            "they take: Euler, DPM++ 2M, UniPC",
        ),
        (
            "flux2-klein",
            dict(negative_prompt="blurry"),
            "Flux.2 klein models have no negative prompt option",
        ),
        (
            "qwen-image",
            dict(prompt="a [cat:dog:0.5]"),
            "Qwen-Image models read the prompt as plain text: prompt editing [a:b:when] and "
            "alternation [a|b] are SD syntax; remove them",
        ),
    ],
)
def test_refusals_name_the_model_before_anything_runs(name, spec, message):
    from pipeline.contract.families import spec as family_spec

    with pytest.raises(JobError) as refused:
        family_spec(name).check_job(_spec(**spec))
    assert str(refused.value) == message


def test_a_zimage_lora_on_flux2_klein_is_refused_naming_both(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipeline.loras.formats import LoraError, read_lora_file

    # ai-toolkit's layout (`diffusion_model.` + diffusers' module names), as diffusers'
    # lora_conversion_utils reads Z-Image LoRAs.
    path = tmp_path / "zimage_style.safetensors"
    save_file(
        {
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 32),
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        str(path),
    )
    with pytest.raises(LoraError) as refused:
        read_lora_file(path, name="zimage_style", family="flux2-klein", max_bytes=1 << 20)
    assert (
        str(refused.value) == "LoRA 'zimage_style' was made for Z-Image; this model is Flux.2 klein"
    )


def test_a_klein_9b_file_configured_as_4b_is_refused():
    from pipeline.contract.families.flux2_klein import variant_mismatch

    assert variant_mismatch("k.safetensors", 3072, 3072) is None
    assert variant_mismatch("k.safetensors", 4096, 3072) == (
        "model file k.safetensors is Flux.2 klein 9B (width 4096) but its single_file_config "
        "is Flux.2 klein 4B (width 3072); give the configuration folder of the same model"
    )


def test_sdbot_generate_runs_the_new_families(folders, tmp_path):
    (tmp_path / "config.toml").write_text(
        f'[models.z]\nsource = "{folders["zimage"]}"\n'
        f'[models.plus]\nsource = "{folders["qwen-image-edit-plus"]}"\n'
        '[storage]\ndata_dir = "data"\n'
    )
    _photo(0).save(tmp_path / "a.png")
    _photo(1).save(tmp_path / "b.png")
    common = ["--steps", "2", "--seed", "3", "--width", "64", "--height", "64"]
    runs = [
        ["generate", PROMPT, "--model", "z", "--out", "z.png", *common],
        [
            "generate",
            "make it red",
            "--model",
            "plus",
            "--edit",
            "a.png",
            "--edit",
            "b.png",
            "--out",
            "e.png",
            *common,
        ],
    ]
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-m", "bot.cli", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={"PYTHONPATH": str(Path.cwd()), "HF_HUB_OFFLINE": "1", "PATH": ""},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "z.png").size == (64, 64)
    four = ["--edit", "a.png"] * 4
    refused = subprocess.run(
        [sys.executable, "-m", "bot.cli", "generate", "x", "--model", "plus", *four, *common],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(Path.cwd()), "HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=300,
    )
    assert refused.returncode != 0
    assert (
        "Qwen-Image-Edit-Plus models edit with at most 3 input images; this job gave 4"
        in refused.stderr
    )


class _Steps(list):
    def append_args(self, *args) -> None:
        self.append(args)


def test_progress_previews_where_the_family_has_factors(models):
    from pipeline.generate.modes import run_generation

    for name, has_preview in (("zimage", True), ("qwen-image", True), ("flux2-klein", True)):
        steps = _Steps()
        run_generation(models[name], [_spec()], on_step=steps.append_args, preview_every=1)
        assert [(done, total) for done, total, _ in steps] == [(1, 2), (2, 2)]
        previews = [p for _, _, p in steps if p is not None]
        assert len(previews) == (2 if has_preview else 0)
        if has_preview:
            assert Image.open(io.BytesIO(previews[0])).format == "JPEG"


def test_a_klein_9b_file_with_a_4b_configuration_is_refused_before_loading(folders, tmp_path):
    """The file's width is read from the key diffusers' single-file loader recognises
    Flux.2 by (`single_stream_modulation.lin.weight`, input width = the transformer's)."""
    import torch
    from safetensors.torch import save_file

    from pipeline.contract.config import ModelConfig
    from pipeline.contract.families import ModelError, detect_family
    from pipeline.models.loading import load_model

    path = tmp_path / "flux-2-klein-9b.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(3 * 4096, 4096)}, str(path))
    assert detect_family(str(path)) == "flux2-klein"
    model = ModelConfig(name="k", source=str(path), single_file_config=str(folders["flux2-klein"]))
    with pytest.raises(ModelError) as refused:
        load_model(model)
    assert str(refused.value) == (
        f"model file {path} is Flux.2 klein 9B (width 4096) but its single_file_config is "
        "a Flux.2 model (width 32); give the configuration folder of the same model"
    )


def test_a_zimage_transformer_file_loads_with_its_configuration(folders, models, tmp_path):
    """A Z-Image transformer file in the original (ComfyUI) layout — the names diffusers'
    `convert_z_image_transformer_checkpoint_to_diffusers` reads: fused `attention.qkv`,
    `attention.out`, `q_norm`/`k_norm`, `final_layer`, `x_embedder`, under
    `model.diffusion_model.` — is recognised and loaded beside the folder's text encoder
    and VAE, and draws what the folder draws."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.contract.config import ModelConfig
    from pipeline.contract.families import detect_family
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import load_model

    weights = load_file(
        str(folders["zimage"] / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    original = {}
    for key, tensor in weights.items():
        if ".attention.to_k.weight" in key or ".attention.to_v.weight" in key:
            continue
        if ".attention.to_q.weight" in key:
            parts = [weights[key.replace("to_q", x)] for x in ("to_q", "to_k", "to_v")]
            key, tensor = key.replace(".attention.to_q.", ".attention.qkv."), torch.cat(parts)
        for ours, theirs in (
            ("all_final_layer.2-1.", "final_layer."),
            ("all_x_embedder.2-1.", "x_embedder."),
            (".attention.to_out.0.", ".attention.out."),
            (".attention.norm_k.", ".attention.k_norm."),
            (".attention.norm_q.", ".attention.q_norm."),
        ):
            key = key.replace(ours, theirs)
        original["model.diffusion_model." + key] = tensor.contiguous()
    path = tmp_path / "z_image_turbo.safetensors"
    save_file(original, str(path))
    assert detect_family(str(path)) == "zimage"
    loaded = load_model(
        ModelConfig(name="zf", source=str(path), single_file_config=str(folders["zimage"]))
    )
    ours = _pixels(run_generation(loaded, [_spec()])[0][0])
    assert np.array_equal(ours, _pixels(run_generation(models["zimage"], [_spec()])[0][0]))


@pytest.mark.parametrize("name", ["zimage", "qwen-image"])
def test_jobs_batched_together_equal_each_alone(models, name):
    from pipeline.generate.modes import run_generation

    first, second = _spec(seed=1), _spec(prompt="a red house by the sea", seed=2)
    batched = run_generation(models[name], [first, second])
    alone = [run_generation(models[name], [spec])[0][0] for spec in (first, second)]
    for together, single in zip(batched, alone):
        assert np.abs(_pixels(together[0]) - _pixels(single)).max() <= 1


def test_the_runner_runs_an_edit_job_and_fails_a_refused_one_in_one_line(folders, tmp_path):
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import Done, Failed
    from pipeline.workers.runner import Runner

    config = config_from_dict(
        {
            "models": {"plus": {"source": str(folders["qwen-image-edit-plus"])}},
            "storage": {"data_dir": str(tmp_path / "data")},
        }
    )
    blobs = BlobStore(config.storage.blobs)
    shas = []
    for seed in (0, 1):
        buffer = io.BytesIO()
        _photo(seed).save(buffer, "PNG")
        shas.append(blobs.put(buffer.getvalue()))
    runner = Runner(config, device="cpu", blobs=blobs, name="test")
    edit = _spec(model="plus", mode="edit", image=shas[0], images=(shas[1],))
    four = _spec(model="plus", mode="edit", image=shas[0], images=(shas[1],) * 3)
    events: list = []
    runner.run([("e", edit), ("four", four)], events.append, lambda job_id: False)
    done = [e for e in events if isinstance(e, Done)]
    failed = [e for e in events if isinstance(e, Failed)]
    assert [e.job_id for e in done] == ["e"] and len(done[0].images) == 1
    assert [(e.job_id, e.message) for e in failed] == [
        ("four", "Qwen-Image-Edit-Plus models edit with at most 3 input images; this job gave 4")
    ]
