"""ControlNet and IP-Adapter on the tiny models, with real photos from skimage.data.

The tiny ControlNet is diffusers' `ControlNetModel.from_unet` of the tiny UNet, the tiny
IP-Adapter is saved in the original h94 key layout and read by diffusers'
`load_ip_adapter`, the depth model is a tiny DPT run by transformers'
`pipeline("depth-estimation")`: the same loaders a real download goes through.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data, filters

from pipeline.contract.blobs import BlobStore
from pipeline.contract.config import config_from_dict
from pipeline.contract.control import (
    ControlUnit,
    Reference,
    check_against_config,
    units_from_infotext,
)
from pipeline.contract.infotext import controlnet_units, parse_infotext
from pipeline.contract.jobs import GenerateSpec, JobError, Limits, spec_from_json, spec_to_json
from pipeline.control.apply import ControlCache
from pipeline.control.preprocessors import fit, run_preprocessor
from pipeline.generate.modes import run_generation
from pipeline.models.loading import ModelCache
from tests.conftest import BATCH_TOLERANCE_LEVELS, level_difference, png_of

ASTRONAUT = Image.fromarray(data.astronaut())  # 512×512 RGB
CAT = Image.fromarray(data.chelsea())  # 451×300 RGB: another aspect ratio


def _config(model_dir, extras, family="sd1", name="tiny"):
    return config_from_dict(
        {
            "models": {name: {"source": str(model_dir), "family": family}},
            "control": {"depth_model": str(extras / "depth")},
            "controlnets": {
                "canny": {"source": str(extras / "controlnet"), "preprocessor": "canny"},
                "lines": {"source": str(extras / "controlnet"), "preprocessor": "lineart_standard"},
                "depth": {"source": str(extras / "controlnet"), "preprocessor": "depth"},
                "xl-canny": {"source": "/nowhere", "family": "sdxl", "preprocessor": "canny"},
            },
            "ip_adapters": {"tiny": {"source": str(extras / "ip_adapter")}},
        }
    )


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    from pipeline.families.sd_tiny_control import (
        write_tiny_controlnet,
        write_tiny_depth,
        write_tiny_ip_adapter,
    )

    extras = tmp_path_factory.mktemp("control")
    write_tiny_controlnet(tiny_sd, extras / "controlnet")
    write_tiny_ip_adapter(tiny_sd, extras / "ip_adapter")
    write_tiny_depth(extras / "depth")
    return control_setup(_config(tiny_sd, extras), tmp_path_factory)


def control_setup(config, tmp_path_factory):
    """(config, the loaded model, its ControlCache, blobs, {photo: sha}) for `run`; the
    astronaut and the cat (another aspect ratio) stored as control images."""
    model = ModelCache(config, "cpu").get()
    blobs = BlobStore(tmp_path_factory.mktemp("blobs"))
    shas = {
        "astronaut": blobs.put(png_of(ASTRONAUT), ".png"),
        "cat": blobs.put(png_of(CAT), ".png"),
    }
    return config, model, ControlCache(config), blobs, shas


def spec(**changes) -> GenerateSpec:
    values = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 2, "seed": 7}
    return GenerateSpec(**{**values, **changes})


def run(setup, *specs, loras=None):
    config, model, cache, blobs, _ = setup
    return run_generation(model, list(specs), blobs=blobs, control=cache, loras=loras)


def one(setup, job) -> bytes:
    return run(setup, job)[0][0].png


# --- preprocessors on a real photo ---------------------------------------------------


def _edges(image: Image.Image, size: int) -> np.ndarray:
    # Sobel of a lightly smoothed photo: lineart_standard works at a coarse scale (σ 6).
    grey = np.asarray(image.convert("L").resize((size, size)), dtype=float) / 255
    return filters.sobel(filters.gaussian(grey, 2))


@pytest.mark.parametrize("name", ["canny", "lineart_standard", "scribble_xdog"])
def test_edge_preprocessors_draw_where_the_photo_has_edges(name):
    thresholds = {"canny": (100, 200), "scribble_xdog": (32, -1)}.get(name, (-1, -1))
    result = run_preprocessor(
        name, ASTRONAUT, res=128, threshold_a=thresholds[0], threshold_b=thresholds[1]
    )
    assert result.size == (128, 128)  # shorter side = processor resolution
    lines = np.asarray(result.convert("L"), dtype=float)
    sobel = _edges(ASTRONAUT, 128)
    strong, flat = sobel > np.percentile(sobel, 90), sobel < np.percentile(sobel, 30)
    assert lines[strong].mean() > 2.5 * lines[flat].mean() + 5, name


def test_map_preprocessors_sizes_and_values():
    invert = run_preprocessor("invert", CAT)
    assert np.array_equal(np.asarray(invert), 255 - np.asarray(CAT))
    tile = run_preprocessor("tile_resample", CAT, threshold_a=2.0)
    assert tile.size == (CAT.width // 2, CAT.height // 2)
    assert run_preprocessor("none", CAT).size == CAT.size
    scribble = np.asarray(run_preprocessor("scribble", CAT, res=128, threshold_a=32))
    assert set(np.unique(scribble)) <= {0, 255}
    assert scribble.shape[:2] == (128, round(CAT.width * 128 / CAT.height))


def test_depth_preprocessor_runs_the_configured_model(setup):
    config = setup[0]
    depth = run_preprocessor("depth", CAT, res=64, depth_model=config.control.depth_model)
    array = np.asarray(depth)
    assert depth.size == (round(CAT.width * 64 / CAT.height), 64)
    assert np.array_equal(array[..., 0], array[..., 1])  # a grey map
    assert int(array.max()) - int(array.min()) > 100  # scaled to (nearly) the full range


def test_resize_modes_fit_another_aspect_ratio():
    wide = Image.new("RGB", (200, 100), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 20, 100))  # a white stripe at the left edge
    crop = np.asarray(fit(wide, 64, 64, "Crop and Resize"))
    assert crop.shape == (64, 64, 3) and crop[:, 0].max() == 0  # the edge was cropped off
    stretch = np.asarray(fit(wide, 64, 64, "Just Resize"))
    assert stretch[:, 0].min() == 255 and stretch[:, 3].min() > 200  # 20/200 of the width
    filled = np.asarray(fit(wide, 64, 64, "Resize and Fill"))
    assert filled[0, 32].tolist() == [0, 0, 0]  # padded with the border's median colour
    assert filled[32, 0].min() > 200  # the whole image is inside


# --- ControlNet ----------------------------------------------------------------------


def test_controlnet_changes_the_image_weight_0_and_guidance_end_0_equal_none(setup):
    sha = setup[4]["astronaut"]
    plain = one(setup, spec())
    controlled = one(setup, spec(control=(ControlUnit("canny", sha),)))
    assert level_difference(plain, controlled) > 10
    assert (
        level_difference(plain, one(setup, spec(control=(ControlUnit("canny", sha, weight=0.0),))))
        <= 1
    )
    unit = ControlUnit("canny", sha, guidance_start=0.0, guidance_end=0.0)
    assert level_difference(plain, one(setup, spec(control=(unit,)))) <= 1
    two = one(setup, spec(control=(ControlUnit("canny", sha), ControlUnit("lines", sha))))
    assert level_difference(two, controlled) > 10
    soft = ControlUnit("canny", sha, control_mode="My prompt is more important")
    assert level_difference(one(setup, spec(control=(soft,))), controlled) > 0


def test_batch_with_the_same_units_and_different_control_images(setup):
    shas = setup[4]
    jobs = [
        spec(seed=1, control=(ControlUnit("canny", shas["astronaut"]),)),
        spec(seed=2, control=(ControlUnit("canny", shas["cat"]),)),
    ]
    assert jobs[0].batch_key() == jobs[1].batch_key() != ""
    together = run(setup, *jobs)
    for job, batched in zip(jobs, together):
        assert level_difference(batched[0].png, one(setup, job)) <= BATCH_TOLERANCE_LEVELS


def test_img2img_and_inpaint_with_the_input_photo_as_control_and_a_reference(setup):
    shas = setup[4]
    base = spec(mode="img2img", image=shas["cat"], strength=0.6)
    plain = one(setup, base)
    unit = ControlUnit("depth", None)  # no image: the input photo, through the depth model
    both = dataclasses.replace(base, control=(unit,), reference=Reference("tiny", (shas["cat"],)))
    assert level_difference(plain, one(setup, both)) > 10
    mask = Image.new("L", CAT.size, 0)
    mask.paste(255, (100, 50, 300, 250))
    mask_sha = setup[3].put(png_of(mask), ".png")
    painted = one(setup, dataclasses.replace(both, mode="inpaint", mask=mask_sha))
    result = np.asarray(Image.open(io.BytesIO(painted)).convert("RGB"), dtype=int)
    assert result.shape == (CAT.height, CAT.width, 3)
    outside = np.asarray(CAT, dtype=int)[:40]  # far from the mask: the photo, exactly
    assert np.array_equal(result[:40], outside)


# --- IP-Adapter ----------------------------------------------------------------------


def test_ip_adapter_changes_the_image_and_weight_0_equals_none(setup):
    sha = setup[4]["astronaut"]
    plain = one(setup, spec())
    steered = one(setup, spec(reference=Reference("tiny", (sha,))))
    assert level_difference(plain, steered) > 10
    assert level_difference(plain, one(setup, spec(reference=Reference("tiny", (sha,), 0.0)))) <= 1
    two = one(setup, spec(reference=Reference("tiny", (sha, setup[4]["cat"]))))  # averaged
    assert level_difference(two, steered) > 0
    assert level_difference(plain, one(setup, spec())) == 0  # switched off again afterwards


def test_controlnet_and_ip_adapter_with_a_lora_in_a_batch(setup, tmp_path):
    from pipeline.contract.jobs import LoraRef
    from pipeline.loras.adapters import LoraCache
    from tests.lycoris_files import write_lora

    _, model, _, blobs, shas = setup
    path = write_lora(tmp_path / "style.safetensors", model.pipe, "kohya", seed=0)
    lora = LoraRef("style", blobs.put(path.read_bytes(), ".safetensors"), 0.8)
    loras = LoraCache(model.pipe, max_bytes=2**30)
    reference = Reference("tiny", (shas["astronaut"],), 0.7)
    jobs = [
        spec(seed=1, loras=(lora,), reference=reference, control=(ControlUnit("canny", sha),))
        for sha in (shas["astronaut"], shas["cat"])
    ]
    together = run(setup, *jobs, loras=loras)
    for job, batched in zip(jobs, together):
        alone = run(setup, job, loras=loras)[0][0]
        assert level_difference(batched[0].png, alone.png) <= BATCH_TOLERANCE_LEVELS
    without_lora = run(setup, dataclasses.replace(jobs[0], loras=()), loras=loras)[0][0]
    assert level_difference(together[0][0].png, without_lora.png) > 0  # the LoRA applied


# --- infotext ------------------------------------------------------------------------


def test_infotext_round_trip(setup):
    sha = setup[4]["astronaut"]
    unit = ControlUnit(
        "canny",
        sha,
        weight=0.8,
        guidance_start=0.1,
        guidance_end=0.9,
        control_mode="ControlNet is more important",
    )
    [[image]] = run(setup, spec(control=(unit,), reference=Reference("tiny", (sha,), 0.5)))
    params = parse_infotext(image.infotext)
    assert params["ControlNet 0"].startswith("Module: canny, Model: canny [")
    cn, ip = controlnet_units(image.infotext)
    assert [cn, ip] == units_from_infotext(params)
    assert cn["Weight"] == "0.8" and cn["Threshold A"] == "100.0" and cn["Threshold B"] == "200.0"
    assert cn["Guidance Start"] == "0.1" and cn["Guidance End"] == "0.9"
    assert cn["Control Mode"] == "ControlNet is more important"
    assert cn["Resize Mode"] == "Crop and Resize" and cn["Processor Res"] == "512"
    assert ip["Module"] == "ip-adapter_clip_sd15" and ip["Weight"] == "0.5"
    assert ip["Model"].startswith("tiny [") and len(ip["Model"]) == len("tiny [12345678]")
    assert params["Seed"] == "7"  # the pairs after it still parse


def test_old_specs_parse_and_new_ones_round_trip():
    old = '{"kind": "generate", "prompt": "a cat", "steps": 4}'
    assert spec_from_json(old).control == () and spec_from_json(old).reference is None
    job = spec(
        control=(ControlUnit("canny", "ab" * 32, weight=0.5),), reference=Reference("t", ("c",))
    )
    assert spec_from_json(spec_to_json(job)) == job
    assert set(job.blob_refs()) == {"ab" * 32, "c"}


# --- bad input: one line each, nothing run -------------------------------------------


@pytest.mark.parametrize(
    "job, message",
    [
        (spec(control=(ControlUnit("canny", "a", weight=2.5),)), "weight must be between 0 and 2"),
        (
            spec(control=(ControlUnit("canny", "a", guidance_start=0.6, guidance_end=0.2),)),
            "guidance end 0.2 is before guidance start 0.6",
        ),
        (
            spec(control=tuple(ControlUnit("canny", "a") for _ in range(4))),
            "4 ControlNet units in one job; the limit is 3",
        ),
        (spec(control=(ControlUnit("canny", None),)), "needs a control image"),
        (spec(reference=Reference("tiny", ("a",), -1.0)), "weight must be between 0 and 2"),
    ],
)
def test_bad_values_are_refused_by_name(job, message):
    with pytest.raises(JobError, match=message):
        job.check(Limits())


def test_unknown_unit_other_family_and_unconfigured_preprocessor(setup):
    config = setup[0]
    cases = [
        ((ControlUnit("nope", "a"),), None, "unknown ControlNet unit 'nope'; configured units"),
        ((ControlUnit("xl-canny", "a"),), None, "'xl-canny' is for SDXL but the model is SD 1.x"),
        ((), Reference("other", ("a",)), "unknown IP-Adapter 'other'"),
    ]
    for units, reference, message in cases:
        with pytest.raises(JobError, match=message):
            check_against_config(units, reference, config, "sd1")
    bare = dataclasses.replace(config, control=dataclasses.replace(config.control, depth_model=""))
    with pytest.raises(JobError, match="preprocessor 'depth' needs a model and none is configured"):
        check_against_config((ControlUnit("depth", "a"),), None, bare, "sd1")
    # The worker refuses the other family too, before loading anything.
    with pytest.raises(JobError, match="is for SDXL"):
        one(setup, spec(control=(ControlUnit("xl-canny", setup[4]["cat"]),)))


# --- SDXL ----------------------------------------------------------------------------


def test_sdxl_controlnet_and_ip_adapter(tiny_xl, tmp_path):
    from pipeline.families.sd_tiny_control import write_tiny_controlnet, write_tiny_ip_adapter

    write_tiny_controlnet(tiny_xl, tmp_path / "controlnet")
    write_tiny_ip_adapter(tiny_xl, tmp_path / "ip_adapter")
    config = config_from_dict(
        {
            "models": {"xl": {"source": str(tiny_xl)}},
            "controlnets": {
                "canny": {"source": str(tmp_path / "controlnet"), "family": "sdxl"},
            },
            "ip_adapters": {"tiny": {"source": str(tmp_path / "ip_adapter"), "family": "sdxl"}},
        }
    )
    model = ModelCache(config, "cpu").get()
    blobs = BlobStore(tmp_path / "blobs")
    sha = blobs.put(png_of(ASTRONAUT), ".png")
    cache = ControlCache(config)

    def go(job):
        return run_generation(model, [job], blobs=blobs, control=cache)[0][0]

    plain = go(spec())
    both = go(spec(control=(ControlUnit("canny", sha),), reference=Reference("tiny", (sha,))))
    assert level_difference(plain.png, both.png) > 10
    assert "Module: ip-adapter_clip_sdxl" in both.infotext
    img2img = go(spec(mode="img2img", image=sha, control=(ControlUnit("canny", None),)))
    assert Image.open(io.BytesIO(img2img.png)).size == (64, 64)


# --- the CLI, on the config `sdbot tiny-model` writes -----------------------------------


def test_cli_tiny_model_config_generates_with_control_and_reference(tmp_path, capsys):
    from bot.cli import main
    from pipeline.contract.infotext import read_infotext

    model = tmp_path / "m"
    assert main(["tiny-model", str(model), "--controlnet", "--ip-adapter"]) == 0
    photo = tmp_path / "photo.png"
    ASTRONAUT.save(photo)
    config = str(model / "config.toml")
    out = tmp_path / "out.png"
    args = ["--config", config, "generate", "a cat", "--out", str(out), "--seed", "3"]
    assert main([*args, "--control", f"canny:{photo}", "--reference", str(photo)]) == 0
    params = parse_infotext(read_infotext(out.read_bytes()))
    assert params["ControlNet 0"].startswith("Module: canny, Model: canny [")
    assert params["ControlNet 1"].startswith("Module: ip-adapter_clip_sd15, Model: tiny [")
    capsys.readouterr()
    bad = [
        (["--control", f"nope:{photo}"], "unknown ControlNet unit 'nope'"),
        (["--control", f"canny:{photo}:3"], "weight must be between 0 and 2"),
        (["--control", f"canny:{photo}:1:0.9:0.1"], "guidance end 0.1 is before guidance start"),
        (["--reference", config], "is not an image"),
        (["--control", "canny"], "give an image (NAME:IMAGE) or an --image"),
    ]
    for extra, message in bad:
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_controlnets_load_once_and_the_least_recently_used_is_evicted(setup):
    from pipeline.control.units import ControlNetCache

    config, model = setup[0], setup[1]
    unet = model.pipe.unet
    cache = ControlNetCache(config, "cpu", model.dtype)
    first = cache.get("canny", unet, "sd1")
    assert cache.get("canny", unet, "sd1") is first and cache.loads == 1
    size = sum(p.numel() * p.element_size() for p in first.parameters())
    cache.max_bytes = int(size * 1.5)  # room for one
    cache.get("lines", unet, "sd1")
    assert cache.loads == 2
    cache.get("lines", unet, "sd1")
    assert cache.loads == 2
    assert cache.get("canny", unet, "sd1") is not first and cache.loads == 3  # was evicted
