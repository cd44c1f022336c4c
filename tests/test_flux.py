"""Flux.1 through our engine on the tiny random-weight models (dev, schnell, Kontext, Fill):
recognition (checked against diffusers' own detector and a GGUF written by the `gguf`
package), every mode equal to the plain diffusers pipeline called with the same inputs,
flow samplers with the model's shift, prompts as Flux reads them, and the refusals."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.contract.config import config_from_dict
from pipeline.contract.families import defaults_for, detect_family, family_of_model, lora_family
from pipeline.contract.infotext import parse_infotext, read_infotext
from pipeline.contract.jobs import GenerateSpec, JobError
from pipeline.generate.modes import paste_back, run_generation
from pipeline.models.loading import ModelCache
from tests.conftest import level_difference, png_of

# A plain prompt through our engine is the pipeline's own call: bit-equal on one machine.
SAME_LEVELS = 0


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory) -> dict[str, Path]:
    from pipeline.families.flux_tiny import write_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {v: write_tiny_flux(root / v, variant=v) for v in ("dev", "schnell", "kontext", "fill")}


def _load(source: Path, family: str = "auto", **extra):
    config = config_from_dict(
        {"models": {"flux": {"source": str(source), "family": family, **extra}}}
    )
    return ModelCache(config, "cpu").get()


@pytest.fixture(scope="module")
def dev(flux_dirs):
    return _load(flux_dirs["dev"], "flux")


def spec(**changes) -> GenerateSpec:
    values = dict(prompt="a photo of a cat", width=64, height=64, steps=4, seed=7, sampler="Euler")
    values.update(cfg_scale=1.0)
    return GenerateSpec(**{**values, **changes})


def image_of(output) -> Image.Image:
    return Image.open(io.BytesIO(output.png)).convert("RGB")


def photo(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8))


class Blobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        from pipeline.contract.blobs import sha256_hex

        sha = sha256_hex(data)
        self.data[sha] = data
        return sha

    def get(self, sha: str) -> bytes:
        return self.data[sha]

    def path(self, sha: str):
        raise KeyError(sha)


def generators(seed: int = 7) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


def plain(pipeline: str, folder: Path, prompt: str = "a photo of a cat", **inputs) -> Image.Image:
    """The plain diffusers pipeline's image for the test jobs' settings (64², 4 steps,
    seed 7) and `inputs`."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(width=64, height=64, num_inference_steps=4, generator=generators())
    return pipe(prompt=prompt, **{**settings, **inputs}).images[0]


def inpaint_job(
    blobs: Blobs, source: Image.Image, mask: Image.Image, strength: float
) -> GenerateSpec:
    """The whole image inpainted without blur: what the plain pipeline's call does."""
    return spec(
        mode="inpaint",
        image=blobs.put(png_of(source)),
        mask=blobs.put(png_of(mask)),
        strength=strength,
        mask_blur=0,
        only_masked=False,
    )


# --- recognition ---------------------------------------------------------------------


def test_each_variant_folder_is_flux_with_its_defaults(flux_dirs):
    labels = {}
    for variant, folder in flux_dirs.items():
        assert detect_family(str(folder)) == "flux"
        model = config_from_dict({"models": {"m": {"source": str(folder)}}}).model("m")
        found = family_of_model(model)
        labels[variant] = (found.label, found.default_steps, found.default_guidance)
    assert labels == {
        "dev": ("Flux.1", 28, 3.5),
        "schnell": ("Flux.1 schnell", 4, None),
        "kontext": ("Flux.1 Kontext", 28, 2.5),
        "fill": ("Flux.1 Fill", 28, 30.0),
    }
    config = config_from_dict({"models": {"m": {"source": str(flux_dirs["schnell"])}}})
    defaults = defaults_for(config, "m")
    assert (defaults.sampler, defaults.schedule, defaults.steps, defaults.width) == (
        "Euler",
        "Simple",
        4,
        1024,
    )


def _checkpoint(path: Path, *, prefix: str = "", guidance: bool = True, in_channels: int = 64):
    """A single file with the tensor names and shapes BFL's Flux.1 files have where
    diffusers' detector looks (values are zeros: only names and shapes are read)."""
    from safetensors.torch import save_file

    names = {
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "single_blocks.0.linear1.weight": (21504, 3072),
        "img_in.weight": (3072, in_channels),
    }
    if guidance:
        names["guidance_in.in_layer.bias"] = (3072,)
    tensors = {
        prefix + k: torch.zeros(1, *s[1:]) if len(s) > 1 else torch.zeros(1)
        for k, s in names.items()
    }
    tensors[prefix + "img_in.weight"] = torch.zeros(1, in_channels)
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize(
    "prefix,guidance,in_channels,variant",
    [
        ("", True, 64, "dev"),
        ("model.diffusion_model.", True, 64, "dev"),
        ("", False, 64, "schnell"),
        ("model.diffusion_model.", True, 384, "fill"),
    ],
)
def test_a_single_file_transformer_is_known_as_diffusers_knows_it(
    tmp_path, prefix, guidance, in_channels, variant
):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from pipeline.contract.families.flux import variant_of

    path = tmp_path / "flux1-model.safetensors"
    tensors = _checkpoint(path, prefix=prefix, guidance=guidance, in_channels=in_channels)
    assert infer_diffusers_model_type(tensors) == f"flux-{variant}"  # the reference
    assert detect_family(str(path)) == "flux"
    assert variant_of(str(path)) == variant


def test_gguf_transformers_are_recognised_and_other_ggufs_refused(tmp_path):
    import gguf

    from pipeline.contract.families import ModelError

    def write(path: Path, arch: str, names: list[str]) -> None:
        writer = gguf.GGUFWriter(str(path), arch)
        for name in names:
            writer.add_tensor(name, np.zeros((4, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    flux = tmp_path / "flux1-dev-Q8_0.gguf"
    write(
        flux,
        "flux",
        ["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"],
    )
    assert detect_family(str(flux)) == "flux"
    llama = tmp_path / "llama.gguf"
    write(llama, "llama", ["blk.0.attn_q.weight"])
    with pytest.raises(ModelError, match=r"is a GGUF of llama, not a transformer of a family"):
        detect_family(str(llama))
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(ModelError, match=r"is not a valid GGUF file"):
        detect_family(str(not_gguf))


def test_a_transformer_file_without_a_base_is_refused_in_one_line(tmp_path):
    from pipeline.contract.families import ModelError

    path = tmp_path / "flux1-dev.safetensors"
    _checkpoint(path)
    with pytest.raises(ModelError, match=r"is a Flux.1 transformer alone: set single_file_config"):
        _load(path)


def test_flux_lora_files_are_known_by_their_keys():
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 3072)}
    peft = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (16, 3072)}
    bfl = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (16, 3072)}
    assert {lora_family(k) for k in (kohya, peft, bfl)} == {"flux"}


# --- every mode, equal to the plain diffusers call ---------------------------------


def test_txt2img_equals_flux_pipeline_with_progress_and_packed_previews(dev, flux_dirs):
    events = []
    [[ours]] = run_generation(
        dev, [spec()], on_step=lambda d, t, p: events.append((d, t, p)), preview_every=2
    )
    theirs = plain("FluxPipeline", flux_dirs["dev"], guidance_scale=3.5)
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    assert [(d, t) for d, t, _ in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    preview = Image.open(io.BytesIO(events[1][2]))
    assert preview.size == (256, 256)  # 8×8 latents unpacked from 16 tokens × 64, upscaled
    info = parse_infotext(ours.infotext)
    assert (info["Sampler"], info["CFG scale"], info["Distilled CFG Scale"]) == (
        "Euler",
        "1",
        "3.5",
    )


def test_a_batch_of_jobs_equals_each_job_alone(dev):
    jobs = [spec(seed=1), spec(prompt="a [dog:cat:0.5] on a sofa", seed=2, count=2)]
    batched = run_generation(dev, jobs)
    alone = [run_generation(dev, [job])[0] for job in jobs]
    for got, want in zip(batched, alone):
        assert [level_difference(image_of(a), image_of(b)) for a, b in zip(got, want)] == [0] * len(
            want
        )


def test_distilled_and_true_cfg_are_the_pipelines_guidance_and_true_cfg_scale(dev, flux_dirs):
    job = spec(guidance=5.0, cfg_scale=2.0, negative_prompt="blurry")
    [[ours]] = run_generation(dev, [job])
    theirs = plain(
        "FluxPipeline",
        flux_dirs["dev"],
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        guidance_scale=5.0,
    )
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    assert ours.notices == ()
    # A negative prompt without CFG > 1 changes nothing, and the member is told.
    [[told]] = run_generation(dev, [spec(negative_prompt="blurry")])
    [[plain_job]] = run_generation(dev, [spec()])
    assert level_difference(image_of(told), image_of(plain_job)) == 0
    assert any("negative prompt had no effect" in n for n in told.notices)


def test_img2img_equals_flux_img2img_pipeline(dev, flux_dirs):
    blobs = Blobs()
    source = photo()
    job = spec(mode="img2img", image=blobs.put(png_of(source)), strength=0.6)
    [[ours]] = run_generation(dev, [job], blobs=blobs)
    theirs = plain(
        "FluxImg2ImgPipeline", flux_dirs["dev"], image=source, strength=0.6, guidance_scale=3.5
    )
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS


def _mask() -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def test_inpaint_is_flux_inpaint_pipeline_pasted_back_through_the_mask(dev, flux_dirs):
    blobs = Blobs()
    source, mask = photo(), _mask()
    [[ours]] = run_generation(dev, [inpaint_job(blobs, source, mask, 0.9)], blobs=blobs)
    painted = plain(
        "FluxInpaintPipeline",
        flux_dirs["dev"],
        image=source,
        mask_image=mask,
        strength=0.9,
        guidance_scale=3.5,
    )
    theirs = paste_back(source, painted, (0, 0, 64, 64), mask)
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    kept = np.asarray(image_of(ours))[:8, :8]  # outside the mask: the input's own pixels
    assert np.array_equal(kept, np.asarray(source)[:8, :8])


def test_outpaint_runs_through_the_inpaint_pipeline(dev):
    blobs = Blobs()
    source = photo()
    job = spec(
        mode="outpaint",
        image=blobs.put(png_of(source)),
        outpaint_direction="right",
        outpaint_pixels=32,
    )
    [[wide]] = run_generation(dev, [job], blobs=blobs)
    assert image_of(wide).size == (96, 64)
    assert np.array_equal(np.asarray(image_of(wide))[:, :8], np.asarray(source)[:, :8])


def test_fill_model_inpaints_as_flux_fill_pipeline(flux_dirs):
    fill = _load(flux_dirs["fill"])
    assert fill.kind.label == "Flux.1 Fill"
    blobs = Blobs()
    source, mask = photo(), _mask()
    [[ours]] = run_generation(fill, [inpaint_job(blobs, source, mask, 1.0)], blobs=blobs)
    painted = plain(
        "FluxFillPipeline", flux_dirs["fill"], image=source, mask_image=mask, guidance_scale=30.0
    )
    theirs = paste_back(source, painted, (0, 0, 64, 64), mask)
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    with pytest.raises(JobError, match=r"^Flux.1 Fill models cannot txt2img"):
        run_generation(fill, [spec()])


def test_a_fill_model_configured_beside_dev_does_its_inpainting(flux_dirs):
    both = _load(flux_dirs["dev"], inpaint_source=str(flux_dirs["fill"]))
    blobs = Blobs()
    job = inpaint_job(blobs, photo(), _mask(), 1.0)
    [[ours]] = run_generation(both, [job], blobs=blobs)
    [[alone]] = run_generation(_load(flux_dirs["fill"]), [job], blobs=blobs)
    assert level_difference(image_of(ours), image_of(alone)) <= SAME_LEVELS
    assert parse_infotext(ours.infotext)["Distilled CFG Scale"] == "3.5"  # the job's model's


def test_kontext_edits_the_input_image_as_flux_kontext_pipeline(flux_dirs):
    kontext = _load(flux_dirs["kontext"])
    blobs = Blobs()
    source = photo()
    job = spec(prompt="make the cat red", mode="img2img", image=blobs.put(png_of(source)))
    [[ours]] = run_generation(kontext, [job], blobs=blobs)
    theirs = plain(
        "FluxKontextPipeline",
        flux_dirs["kontext"],
        prompt="make the cat red",
        image=source,
        guidance_scale=2.5,
    )
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    with pytest.raises(JobError, match=r"^Flux.1 Kontext edits an image: give it an input image"):
        run_generation(kontext, [spec()])


def test_kontext_takes_edit_jobs_as_the_same_kontext_call(flux_dirs):
    """/edit on a Kontext model: mode edit runs FluxKontextPipeline on the photo, the image
    its img2img draws (at Kontext's preferred size), handed back at the photo's size (a
    photo without a face: nothing measured, one try)."""
    kontext = _load(flux_dirs["kontext"])
    blobs = Blobs()
    source = blobs.put(png_of(photo()))
    job = spec(prompt="make it red", image=source)
    [[edited]] = run_generation(kontext, [replace(job, mode="edit")], blobs=blobs)
    [[img2img]] = run_generation(kontext, [replace(job, mode="img2img")], blobs=blobs)
    back = image_of(img2img).resize(photo().size, Image.Resampling.LANCZOS)
    assert level_difference(image_of(edited), back) == 0
    assert (edited.identity, edited.tries) == (None, 1)


def test_schnell_runs_four_steps_without_guidance_and_refuses_what_it_cannot(flux_dirs):
    schnell = _load(flux_dirs["schnell"])
    [[ours]] = run_generation(schnell, [spec()])
    theirs = plain(
        "FluxPipeline", flux_dirs["schnell"], guidance_scale=0.0, max_sequence_length=256
    )
    assert level_difference(image_of(ours), theirs) <= SAME_LEVELS
    assert "Distilled CFG Scale" not in parse_infotext(ours.infotext)
    with pytest.raises(JobError, match=r"^Flux.1 schnell is distilled for 1–4 steps; 50 is more"):
        run_generation(schnell, [spec(steps=50)])
    with pytest.raises(JobError, match=r"^Flux.1 schnell has no classifier-free guidance"):
        run_generation(schnell, [spec(negative_prompt="blurry")])


# --- samplers, sizes, prompts --------------------------------------------------------


def test_sampler_names_map_to_flow_schedulers_with_the_models_shift(dev):
    kind, config = dev.kind, dev.scheduler_config
    euler = kind.scheduler(config, "Euler", "Simple", "txt2img")
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert euler.config.use_dynamic_shifting and euler.config.max_shift == 1.15
    dpm = kind.scheduler(config, "DPM++ 2M", "Automatic", "txt2img")
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.config.use_flow_sigmas and dpm.config.prediction_type == "flow_prediction"
    assert dpm.config.use_dynamic_shifting
    karras = kind.scheduler(config, "Euler Karras", "Automatic", "txt2img")
    assert karras.config.use_karras_sigmas
    for sampler in ("DPM++ 2M", "UniPC", "Euler Karras"):
        [[image]] = run_generation(dev, [spec(sampler=sampler)])
        assert image_of(image).size == (64, 64)
    with pytest.raises(
        JobError,
        match=r"^Flux.1 models cannot use the sampler 'Euler a' \(did you mean Euler\?\); "
        r"they take: Euler, DPM\+\+ 2M, UniPC$",
    ):
        run_generation(dev, [spec(sampler="Euler a")])
    blobs = Blobs()
    with pytest.raises(JobError, match=r"'DPM\+\+ 2M' works for text-to-image only"):
        run_generation(
            dev,
            [spec(sampler="DPM++ 2M", mode="img2img", image=blobs.put(png_of(photo())))],
            blobs=blobs,
        )


def test_a_size_not_a_multiple_of_16_is_refused_with_the_nearest(dev):
    with pytest.raises(
        JobError, match=r"^Flux.1 sizes must be multiples of 16, not 72×64; try 64×64$"
    ):
        run_generation(dev, [spec(width=72)])


def test_prompt_editing_changes_the_text_over_the_steps(dev):
    [[cat]] = run_generation(dev, [spec(prompt="a cat")])
    [[dog]] = run_generation(dev, [spec(prompt="a dog")])
    [[never]] = run_generation(dev, [spec(prompt="a [cat:dog:10]")])
    [[half]] = run_generation(dev, [spec(prompt="a [cat:dog:0.5]")])
    assert level_difference(image_of(never), image_of(cat)) == 0
    assert level_difference(image_of(half), image_of(cat)) > 0
    assert level_difference(image_of(half), image_of(dog)) > 0
    assert half.notices == ()


def test_what_flux_does_not_read_is_told_with_the_result(dev):
    [[plain]] = run_generation(dev, [spec(prompt="a red cat, sky")])
    [[marked]] = run_generation(dev, [spec(prompt="a (red:1.3) cat BREAK AND sky")])
    notices = " | ".join(marked.notices)
    assert len(marked.notices) == 2  # weights are applied (Forge's T5 emphasis)
    assert "BREAK has no effect on Flux.1" in notices
    assert "AND has no effect on Flux.1" in notices
    assert plain.notices == ()
    long = " ".join(["cat"] * 600)
    [[cut]] = run_generation(dev, [spec(prompt=long)])
    assert any("CLIP tokens; Flux.1 reads 77, the rest was cut" in n for n in cut.notices)
    assert any("T5 tokens; Flux.1 reads 512, the rest was cut" in n for n in cut.notices)


def _t5_states(model, prompt: str) -> torch.Tensor:
    with (
        torch.inference_mode(),
        model.kind.prompt_conditioning(model.pipe, [spec(prompt=prompt)], 4, None) as kw,
    ):
        return kw["prompt_embeds"][0].float()


def test_emphasis_scales_t5_as_forge_does(dev):
    """Forge's "Original" emphasis: each token's T5 state times its weight, then the whole
    rescaled to the old mean (EOS and padding keep weight 1), computed here on diffusers'
    own T5 states of the plain prompt; a weight on one word changes that word's state
    most, and keeps the mean. (The tiny transformer
    barely reads its context: a weight of 3 moves its image by 0.01 level, so this is
    checked on the states the transformer is given.)"""
    plain = _t5_states(dev, "a photo of a cat")
    words = len(dev.pipe.tokenizer_2("a photo of a cat", add_special_tokens=False)["input_ids"])
    weights = torch.ones(plain.shape[0])
    weights[:words] = 1.1
    forge = plain * weights[:, None] * (plain.mean() / (plain * weights[:, None]).mean())
    assert torch.allclose(_t5_states(dev, "(a photo of a cat)"), forge, atol=1e-5)
    weighted = _t5_states(dev, "a photo of a (cat:1.5)")
    cat = len(dev.pipe.tokenizer_2("a photo of a ", add_special_tokens=False)["input_ids"])
    change = (weighted - plain).abs().amax(dim=-1)
    assert change.argmax().item() == cat  # the token of "cat"
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
    [[image]] = run_generation(dev, [spec(prompt="a photo of a (cat:1.5)")])
    assert image.notices == ()


def test_sdbot_generate_runs_flux_and_reads_its_infotext_back(tmp_path, flux_dirs):
    (tmp_path / "config.toml").write_text(
        f'[models.flux]\nsource = "{flux_dirs["dev"]}"\nfamily = "flux"\n'
        '[storage]\ndata_dir = "data"\n'
    )

    def sdbot(*args: str) -> subprocess.CompletedProcess:
        env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd()), "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, "-m", "bot.cli", "generate", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=240,
        )

    made = sdbot(
        "a photo of a cat",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--guidance",
        "4.5",
        "--seed",
        "3",
        "--out",
        "a.png",
    )
    assert made.returncode == 0, made.stderr
    info = parse_infotext(read_infotext((tmp_path / "a.png").read_bytes()))
    assert (info["Sampler"], info["Schedule type"], info["Distilled CFG Scale"], info["Steps"]) == (
        "Euler",
        "Simple",
        "4.5",
        "3",
    )
    again = sdbot("--from-png", "a.png", "--out", "b.png")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    refused = sdbot("a cat", "--width", "72", "--height", "64")
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines()[-1].endswith("not 72×64; try 64×64")


def test_the_shared_flow_pieces_equal_diffusers(dev):
    """The pieces issue 24's families reuse: shift and dynamic shift as diffusers' flow
    Euler and Flux pipeline compute them, logit-normal σ as diffusers' training utils."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from pipeline.families.flow import dynamic_shift, logit_normal_sigmas, shift_sigmas

    fixed = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1.0, 1 / 1000, 1000)
    assert torch.allclose(shift_sigmas(unshifted, 3.0), fixed.sigmas[:1000], atol=1e-6)
    config = dev.scheduler_config
    mu = calculate_shift(
        1024,
        config["base_image_seq_len"],
        config["max_image_seq_len"],
        config["base_shift"],
        config["max_shift"],
    )
    assert dynamic_shift(config, 1024) == pytest.approx(np.exp(mu))
    ours = logit_normal_sigmas(8, torch.Generator().manual_seed(0))
    theirs = compute_density_for_timestep_sampling(
        "logit_normal", 8, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(ours, theirs)
