"""ControlNet preprocessors that need a model (openpose, seg_ofade20k), single-file
ControlNets in the original layout loaded offline, and prompt editing / AND with a unit.

The pose model is a tiny random-weight ViTPose (`VitPoseForPoseEstimation`), the person
detector a tiny RT-DETR, the segmentation model a tiny SegFormer with ADE20K's 150
classes: real transformers models and loaders, so the tests check sizes and that maps
are drawn in the reference colours, not what a random net predicts. The reference
colours below are copied from sd-webui-controlnet (`annotator/openpose/util.py`,
`draw_bodypose`) and mmsegmentation (`ade_palette()`, the table its `seg_ufade20k` /
`seg_ofade20k` and ControlNet 1.1's annotator paint with).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.control import ControlUnit, available_preprocessors, check_against_config
from pipeline.contract.infotext import parse_infotext
from pipeline.contract.jobs import JobError
from pipeline.control.pose import draw_bodypose, openpose_keypoints
from pipeline.control.preprocessors import run_preprocessor
from tests.conftest import BATCH_TOLERANCE_LEVELS, level_difference
from tests.test_control import control_setup, run, spec

ASTRONAUT = Image.fromarray(data.astronaut())  # 512×512, a person
CAT = Image.fromarray(data.chelsea())  # 451×300: another aspect ratio

# sd-webui-controlnet's draw_bodypose: limbs (1-based keypoint pairs) and colours (RGB).
REFERENCE_LIMBS = [
    [2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11],
    [2, 12], [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18],
]  # fmt: skip
REFERENCE_COLOURS = [
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
    [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
    [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
]  # fmt: skip
# A few of mmsegmentation's ade_palette() entries: wall, sky, person, flag (class 149).
ADE = {0: (120, 120, 120), 2: (6, 230, 230), 12: (150, 5, 61), 149: (92, 0, 255)}


def dimmed(colour) -> tuple[int, ...]:
    return tuple(int(c) for c in (np.array(colour) * 0.6).astype(np.uint8))


SKELETON_COLOURS = (
    {(0, 0, 0)} | {tuple(c) for c in REFERENCE_COLOURS} | {dimmed(c) for c in REFERENCE_COLOURS}
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipeline.families.sd_tiny_control import (
        write_tiny_person_detector,
        write_tiny_pose,
        write_tiny_segmentation,
    )

    root = tmp_path_factory.mktemp("control-models")
    return {
        "pose_model": str(write_tiny_pose(root / "pose")),
        "pose_detector": str(write_tiny_person_detector(root / "detector")),
        "segmentation_model": str(write_tiny_segmentation(root / "segmentation")),
    }


# --- openpose ------------------------------------------------------------------------

# A standing person (OpenPose order, x and y as fractions), ears not seen.
STANDING = [
    (0.50, 0.15), (0.50, 0.30), (0.35, 0.30), (0.25, 0.45), (0.20, 0.60), (0.65, 0.30),
    (0.75, 0.45), (0.80, 0.60), (0.42, 0.60), (0.40, 0.75), (0.38, 0.92), (0.58, 0.60),
    (0.60, 0.75), (0.62, 0.92), (0.46, 0.12), (0.54, 0.12), None, None,
]  # fmt: skip


def test_the_skeleton_is_drawn_in_the_reference_colours():
    size = 128
    canvas = draw_bodypose(np.zeros((size, size, 3), np.uint8), [STANDING])
    assert canvas.shape == (size, size, 3)
    pixel = lambda p: tuple(int(v) for v in canvas[int(p[1] * size), int(p[0] * size)])  # noqa: E731
    for point, colour in zip(STANDING, REFERENCE_COLOURS):
        if point is not None:  # each keypoint: a disc in its own colour
            assert pixel(point) == tuple(colour)
    for i, (a, b) in enumerate(REFERENCE_LIMBS[:13]):  # the body's limbs, at their middle
        one, two = STANDING[a - 1], STANDING[b - 1]
        middle = ((one[0] + two[0]) / 2, (one[1] + two[1]) / 2)
        assert pixel(middle) == dimmed(REFERENCE_COLOURS[i]), (i, a, b)
    drawn = {tuple(int(v) for v in c) for c in canvas.reshape(-1, 3)}
    assert drawn <= SKELETON_COLOURS
    # Limbs to the missing ears (14: right eye → right ear, 16: left eye → left ear)
    # are not drawn, and nothing else is in their colours.
    assert dimmed(REFERENCE_COLOURS[14]) not in drawn and dimmed(REFERENCE_COLOURS[16]) not in drawn
    assert draw_bodypose(np.zeros((8, 8, 3), np.uint8), []).max() == 0  # nobody: black


def test_coco_keypoints_become_openpose_keypoints():
    # COCO order: nose, eyes (l, r), ears (l, r), shoulders, elbows, wrists, hips, knees,
    # ankles (each left, right), in pixels of a 200×100 image.
    coco = np.array([[10 * i, 5 * i] for i in range(17)], dtype=float)
    scores = np.full(17, 0.9)
    scores[3] = 0.2  # the left ear: under 0.3, left out
    points = openpose_keypoints(coco, scores, 200, 100)
    assert len(points) == 18
    assert points[0] == (0.0, 0.0)  # nose
    assert points[1] == pytest.approx(((50 + 60) / 2 / 200, (25 + 30) / 2 / 100))  # neck
    assert points[2] == (60 / 200, 30 / 100)  # right shoulder = COCO 6
    assert points[5] == (50 / 200, 25 / 100)  # left shoulder = COCO 5
    assert points[17] is None and points[16] == (40 / 200, 20 / 100)  # ears: left, right
    scores[5] = 0.1  # one shoulder missing: no neck
    assert openpose_keypoints(coco, scores, 200, 100)[1] is None


@pytest.mark.parametrize("model", ["vitpose", "vitpose + detector", "vitpose++"])
def test_openpose_on_a_photo_draws_a_skeleton_of_the_photos_size(models, model, tmp_path):
    from pipeline.families.sd_tiny_control import write_tiny_pose

    detector = models["pose_detector"] if "detector" in model else ""
    source = models["pose_model"]
    if model == "vitpose++":  # mixture of experts: COCO's expert is picked
        source = str(write_tiny_pose(tmp_path / "plus", experts=2))
    pose = run_preprocessor("openpose", CAT, res=64, pose_model=source, pose_detector=detector)
    assert pose.size == (round(CAT.width * 64 / CAT.height), 64)
    colours = {tuple(int(v) for v in c) for c in np.asarray(pose).reshape(-1, 3)}
    assert colours <= SKELETON_COLOURS and len(colours) >= 2, colours  # black and a joint


# --- segmentation --------------------------------------------------------------------


def test_segmentation_paints_the_models_classes_in_the_ade20k_palette(models):
    from pipeline.control.preprocessors import _resize_with_pad
    from pipeline.control.segmentation import class_map, paint

    source = models["segmentation_model"]
    seg = run_preprocessor("seg_ufade20k", CAT, res=64, segmentation_model=source)
    assert seg.size == (round(CAT.width * 64 / CAT.height), 64)
    for cls, colour in ADE.items():
        assert tuple(paint(np.array([cls]))[0]) == colour
    # The map is the model's class of each pixel (at the processor resolution, as the
    # extension pads it), in that class's palette colour.
    padded, remove_pad = _resize_with_pad(np.asarray(CAT), 64)
    classes = remove_pad(class_map(padded, source))
    assert len(np.unique(classes)) > 3  # the random net still tells regions apart
    assert np.array_equal(np.asarray(seg), paint(classes))
    palette = {tuple(c) for c in paint(np.arange(150))}
    assert {tuple(c) for c in np.asarray(seg).reshape(-1, 3)} <= palette


# --- config, refusal, listing --------------------------------------------------------


def test_model_preprocessors_are_listed_only_when_configured_and_refused_by_name(models):
    units = {"source": "/nowhere", "preprocessor": "openpose"}
    tiny = {"tiny": {"source": "/nowhere"}}
    bare = config_from_dict(
        {
            "models": tiny,
            "controlnets": {"pose": units, "seg": {**units, "preprocessor": "seg_ofade20k"}},
        }
    )
    assert "openpose" not in available_preprocessors(bare)
    assert "seg_ofade20k" not in available_preprocessors(bare)
    for name, key in (("pose", "pose_model"), ("seg", "segmentation_model")):
        with pytest.raises(
            JobError, match=rf"needs a model and none is configured \(\[control\] {key}\)"
        ):
            check_against_config((ControlUnit(name, "a"),), None, bare, "sd1")
    with pytest.raises(JobError, match="preprocessor 'openpose' needs a model"):
        run_preprocessor("openpose", CAT)
    full = config_from_dict({"models": tiny, "control": models, "controlnets": {"pose": units}})
    assert {"openpose", "seg_ofade20k", "canny"} <= set(available_preprocessors(full))
    check_against_config((ControlUnit("pose", "a"),), None, full, "sd1")
    with pytest.raises(ConfigError, match="pose_detector is set but pose_model is not"):
        config_from_dict({"models": tiny, "control": {"pose_detector": "./detector"}})


# --- end to end: the CLI on the config `sdbot tiny-model` writes ---------------------------


def test_cli_generates_with_openpose_and_segmentation_units(tmp_path, capsys):
    from bot.cli import main
    from pipeline.contract.infotext import read_infotext

    model = tmp_path / "m"
    assert main(["tiny-model", str(model), "--controlnet", "--pose", "--segmentation"]) == 0
    photo = tmp_path / "photo.png"
    ASTRONAUT.resize((96, 96)).save(photo)
    out = tmp_path / "out.png"
    args = ["--config", str(model / "config.toml"), "generate", "a knight", "--seed", "3"]
    units = ["--control", f"pose:{photo}", "--control", f"seg:{photo}:0.7"]
    assert main([*args, "--steps", "2", "--out", str(out), *units]) == 0
    params = parse_infotext(read_infotext(out.read_bytes()))
    assert params["ControlNet 0"].startswith("Module: openpose, Model: pose [")
    assert params["ControlNet 1"].startswith("Module: seg_ofade20k, Model: seg [")
    assert "Weight: 0.7," in params["ControlNet 1"]
    plain = tmp_path / "plain.png"
    assert main([*args, "--steps", "2", "--out", str(plain)]) == 0
    assert level_difference(out.read_bytes(), plain.read_bytes()) > 10
    capsys.readouterr()


# --- single-file ControlNets, original layout, offline ------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_sd, tmp_path_factory):
    from diffusers import ControlNetModel

    from pipeline.families.sd_tiny_control import write_tiny_controlnet
    from tests.controlnet_files import write_original_controlnet

    root = tmp_path_factory.mktemp("single-file-controlnet")
    folder = write_tiny_controlnet(tiny_sd, root / "controlnet")
    net = ControlNetModel.from_pretrained(folder)
    files = {
        "prefixed": write_original_controlnet(net, root / "control_tiny.safetensors"),
        "bare": write_original_controlnet(net, root / "bare.safetensors", prefix=""),
    }
    garbage = root / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    lora = root / "lora.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_down.lora_up.weight": net.conv_in.weight.detach()}, str(lora))
    controlnets = {
        "folder": {"source": str(folder), "preprocessor": "canny"},
        **{name: {"source": str(path), "preprocessor": "canny"} for name, path in files.items()},
        "broken": {"source": str(garbage)},
        "lora": {"source": str(lora)},
    }
    config = config_from_dict(
        {"models": {"tiny": {"source": str(tiny_sd)}}, "controlnets": controlnets}
    )
    return control_setup(config, tmp_path_factory)


def test_original_layout_single_file_controlnets_load_offline_as_the_folder_does(setup):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py: no Hub
    sha = setup[4]["astronaut"]
    [[folder]] = run(setup, spec(control=(ControlUnit("folder", sha),)))
    for name in ("prefixed", "bare"):
        [[image]] = run(setup, spec(control=(ControlUnit(name, sha),)))
        assert level_difference(image.png, folder.png) <= 1, name
        assert f"Model: {name} [" in image.infotext


@pytest.mark.parametrize(
    "name, message",
    [
        ("broken", "ControlNet 'broken': broken.safetensors could not be read"),
        ("lora", "ControlNet 'lora': the file is not a ControlNet"),
    ],
)
def test_a_bad_single_file_is_refused_in_one_line(setup, name, message):
    with pytest.raises(JobError, match=message) as caught:
        run(setup, spec(control=(ControlUnit(name, setup[4]["cat"]),)))
    assert "\n" not in str(caught.value)


def test_a_single_file_controlnet_of_the_other_family_is_refused_by_name(tiny_xl, tmp_path, setup):
    import shutil

    from pipeline.control.units import ControlNetCache
    from pipeline.families.sd_tiny_control import write_tiny_controlnet

    # SDXL ControlNets ship as one diffusers-layout file (diffusion_pytorch_model renamed).
    folder = write_tiny_controlnet(tiny_xl, tmp_path / "xl")
    path = tmp_path / "controlnet-xl.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    config = config_from_dict(
        {"models": {"tiny": {"source": "/nowhere"}}, "controlnets": {"xl": {"source": str(path)}}}
    )
    cache = ControlNetCache(config, "cpu", setup[1].dtype)
    with pytest.raises(JobError, match="ControlNet 'xl' does not fit this model"):
        cache.get("xl", setup[1].pipe.unet, "sd1")


# --- prompt editing and AND with a ControlNet unit -------------------------------------


def test_prompt_editing_and_and_with_a_controlnet_alone_and_in_a_batch(setup):
    shas = setup[4]
    prompts = ["a photo of [a cat:a dog:0.5]", "a photo of a cat AND a red ball :0.8"]
    jobs = [
        # 3 steps: [a:b:0.5] switches after step int(0.5·3) = 1, as A1111 counts
        spec(prompt=prompt, seed=seed, steps=3, control=(ControlUnit("folder", shas[image]),))
        for prompt, seed, image in zip(prompts, (1, 2), ("astronaut", "cat"))
    ]
    together = run(setup, *jobs)
    for job, batched in zip(jobs, together):
        [[alone]] = run(setup, job)
        assert level_difference(batched[0].png, alone.png) <= BATCH_TOLERANCE_LEVELS
        [[plain]] = run(setup, dataclasses.replace(job, control=()))
        assert level_difference(alone.png, plain.png) > 10, job.prompt
        [[unedited]] = run(setup, dataclasses.replace(job, prompt="a photo of a cat"))
        assert level_difference(alone.png, unedited.png) > 0, job.prompt  # the syntax applied
        image = Image.open(io.BytesIO(alone.png))
        assert image.size == (64, 64)
        assert parse_infotext(alone.infotext)["ControlNet 0"].startswith("Module: canny")


def test_each_and_part_gets_the_controlnet_residuals_of_its_own_text(setup):
    # u + 0·(c_cat − u) + 1·(c_dog − u) = c_dog: the same as "a dog" alone, if the
    # ControlNet ran on the dog part's own text (as sd-webui-controlnet runs it inside the
    # UNet), not on the first part's; in every control mode.
    sha = setup[4]["astronaut"]
    for mode in ("Balanced", "ControlNet is more important"):
        unit = ControlUnit("folder", sha, control_mode=mode)
        [[both]] = run(setup, spec(prompt="a cat :0 AND a red dog", control=(unit,)))
        [[dog]] = run(setup, spec(prompt="a red dog", control=(unit,)))
        assert level_difference(both.png, dog.png) <= BATCH_TOLERANCE_LEVELS, mode
        [[cat]] = run(setup, spec(prompt="a cat", control=(unit,)))
        assert level_difference(both.png, cat.png) > 10, mode


def test_the_derived_config_of_an_sd15_controlnet_is_what_diffusers_makes_of_its_yaml():
    """A real SD 1.5 ControlNet's shapes (ControlNet's cldm.py: `input_hint_block` is
    conv(3→16), conv(16→16), conv(16→32, /2), conv(32→32), conv(32→96, /2), conv(96→96),
    conv(96→256, /2), zero conv(256→320), SiLU between) with the SD 1.5 UNet's config
    give the configuration diffusers derives from the original `cldm_v15.yaml`."""
    import json
    from pathlib import Path

    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from pipeline.control.controlnet_file import controlnet_config

    widths = [(16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (320, 256)]
    shapes = {
        f"control_model.input_hint_block.{2 * i}.weight": (o, c, 3, 3)
        for i, (o, c) in enumerate(widths)
    }
    shapes["control_model.input_blocks.0.0.weight"] = (320, 4, 3, 3)
    shapes["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] = (320, 768)
    root = Path(__file__).resolve().parent.parent
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():  # the SD 1.5 UNet's whole config, without its weights
        sd15 = json.loads((root / "bench/configs/sd15_unet.json").read_text())
        unet = UNet2DConditionModel.from_config(sd15).config
    ours = controlnet_config(shapes, unet, "canny")
    stage = {  # cldm_v15.yaml's control_stage_config (lllyasviel/ControlNet, models/)
        "in_channels": 4, "hint_channels": 3, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
        "context_dim": 768, "use_checkpoint": True, "legacy": False, "image_size": 32,
    }  # fmt: skip
    original = {
        "model": {
            "params": {
                "control_stage_config": {"params": stage},
                "unet_config": {"params": {**stage, "out_channels": 4}},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    # diffusers' create_controlnet_diffusers_config_from_ldm (0.42.1 calls its UNet helper
    # without the checkpoint, so it cannot run): these keys of the UNet's, and the hint's.
    unet_keys = [
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block",
        "cross_attention_dim", "attention_head_dim", "use_linear_projection",
        "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim", "transformer_layers_per_block",
    ]  # fmt: skip
    derived = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    theirs = {key: derived[key] for key in unet_keys}
    theirs["conditioning_channels"] = stage["hint_channels"]
    for key, value in theirs.items():
        mine = ours.get(key)
        assert (list(mine) if isinstance(mine, tuple) else mine) == (
            list(value) if isinstance(value, tuple) else value
        ), key
    assert ours["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
