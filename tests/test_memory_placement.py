"""Each memory plan applied to the tiny SD 1.x and SDXL models on the CPU
(pipeline/models/memory.py): the images stay within a stated number of levels of the
plain full-precision run.

On the CPU the offload modes move weights from the CPU to the CPU, so they save nothing
here; what is tested is that diffusers' hooks (model CPU offload, group offload by
blocks, text encoders moved in to encode or run on the CPU) leave the images unchanged.
Sequential offload is not run: accelerate fails with an execution device of "cpu" on
this stack (a plain diffusers pipeline too; docs/DECISIONS.md, issue 26)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from pipeline.contract.config import config_from_dict
from pipeline.contract.jobs import GenerateSpec
from pipeline.contract.memory_plan import (
    GiB,
    MemoryPlanError,
    components_for,
    gpu_card,
    jobs_for,
    plan_memory,
)
from pipeline.generate.modes import run_generation
from pipeline.models.loading import ModelCache, load_model
from tests.test_generate import pixels

# Hooks that only move weights change nothing (the same kernels on the same values).
MOVED_LEVELS = 1
# fp8 (e4m3: 3 mantissa bits) storage with fp32 compute, 2 steps at 64²: the tiny models'
# random weights turn the rounding into visible noise (measured: SD max 22, mean 2.6;
# SDXL max 38, mean 3.6 levels). A trained model's images move less; this bounds ours.
FP8_MAX_LEVELS, FP8_MEAN_LEVELS = 48, 5.0

# Tiled decoding blends overlapping tiles, so seams differ from the whole decode; the
# tiny VAE's tile is 8 latents wide (a real one's 64), so its seams are most of the image
# (measured at 128²: SD max 58, mean 5.2; SDXL max 70, mean 5.8 levels).
TILED_MAX_LEVELS, TILED_MEAN_LEVELS = 80, 7.0

PLANS = [
    ("full", "offload"),
    ("full", "cpu"),
    ("fp8", "device"),
    ("offload", "offload"),
    ("group", "offload"),
    ("group", "cpu"),
]


def spec() -> GenerateSpec:
    return GenerateSpec(prompt="a photo of a cat", width=64, height=64, steps=2, seed=7)


def forced_plan(source: str, family: str, mode: str, text: str):
    """The plan a GPU worker would make for this mode, in float32 (the CPU's dtype)."""
    config = config_from_dict({"models": {"tiny": {"source": source, "memory": mode}}})
    model = config.models[0]
    components, where = components_for(model, family)
    assert where == "files"
    card = gpu_card("test card", 80 * GiB, 80 * GiB, compute_dtype="fp32")
    plan = plan_memory("tiny", family, components, card, jobs_for(config, model), mode)
    return model, dataclasses.replace(plan, text_encoders=text)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(request, tiny_sd, tiny_xl):
    source = str(tiny_sd if request.param == "sd1" else tiny_xl)
    model = config_from_dict({"models": {"tiny": {"source": source}}}).models[0]
    [[reference]] = run_generation(load_model(model, device="cpu"), [spec()])
    return request.param, source, pixels(reference)


@pytest.mark.parametrize(("mode", "text"), PLANS)
def test_each_plan_gives_the_full_precision_image_within_its_tolerance(tiny, mode, text):
    family, source, reference = tiny
    model, plan = forced_plan(source, family, mode, text)
    loaded = load_model(model, device="cpu", plan=plan)
    [[out]] = run_generation(loaded, [spec()])
    diff = np.abs(pixels(out) - reference)
    if "fp8" in mode:
        stored = {p.dtype for p in loaded.pipe.unet.parameters()}
        assert torch.float8_e4m3fn in stored  # the weights really are held in fp8
        assert diff.max() <= FP8_MAX_LEVELS and diff.mean() <= FP8_MEAN_LEVELS, (
            f"{family} fp8: max {diff.max()}, mean {diff.mean():.2f} levels"
        )
    else:
        assert diff.max() <= MOVED_LEVELS, f"{family} {mode}/{text}: {diff.max()} levels"


def test_vae_tiling_above_the_plans_threshold_stays_close(tiny):
    """A plan that lowers the tiling threshold below the image's size decodes in tiles
    (the tiny VAE's tile is 64², so a 128² image is four overlapping tiles, blended)."""
    family, source, _ = tiny
    model, plan = forced_plan(source, family, "full", "device")
    big = dataclasses.replace(spec(), width=128, height=128)
    [[whole]] = run_generation(load_model(model, device="cpu", plan=plan), [big])
    tiled_model = dataclasses.replace(model, vae_tiling_above=64 * 64)
    tiled_plan = dataclasses.replace(plan, vae_tiling_above=64 * 64)
    [[tiled]] = run_generation(load_model(tiled_model, device="cpu", plan=tiled_plan), [big])
    diff = np.abs(pixels(tiled) - pixels(whole))
    assert 0 < diff.max() <= TILED_MAX_LEVELS and diff.mean() <= TILED_MEAN_LEVELS, (
        f"{family} tiled: max {diff.max()}, mean {diff.mean():.2f} levels"
    )


def test_the_cpu_worker_applies_its_plan_and_logs_it(tiny_sd, caplog):
    config = config_from_dict({"models": {"tiny": {"source": str(tiny_sd), "memory": "fp8"}}})
    with caplog.at_level(logging.INFO, logger="pipeline.models.memory"):
        loaded = ModelCache(config, "cpu").get()
    assert torch.float8_e4m3fn in {p.dtype for p in loaded.pipe.unet.parameters()}
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan")]
    assert line.startswith("memory plan: tiny on CPU ") and "unet fp8 (" in line


def test_a_mode_the_cpu_worker_cannot_use_is_one_line(tiny_sd):
    config = config_from_dict({"models": {"tiny": {"source": str(tiny_sd), "memory": "group"}}})
    with pytest.raises(MemoryPlanError) as error:
        ModelCache(config, "cpu").get()
    assert str(error.value) == (
        "tiny: memory = 'group' cannot be used on CPU (it can use auto, full, fp8); "
        'set memory = "auto"'
    )


def test_doctor_prints_each_models_plan_for_the_cpu_worker(tiny_sd, tiny_xl, capsys):
    from pipeline.workers.doctor import _memory_plans

    config = config_from_dict(
        {
            "models": {
                "tiny": {"source": str(tiny_sd)},
                "tinyxl": {"source": str(tiny_xl), "memory": "fp8"},
                "elsewhere": {"source": "someone/not-downloaded", "family": "auto"},
            },
            "workers": {"devices": ["cpu"]},
        }
    )
    assert _memory_plans(config) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[ok  ] plan tiny on cpu: tiny on CPU ")
    assert "unet fp32 (0.0 GB)" in lines[0] and "; est. peak " in lines[0]
    assert lines[1].startswith("[ok  ] plan tinyxl on cpu: tinyxl on CPU ")
    assert "unet fp8 (0.0 GB)" in lines[1]
    assert lines[2].startswith("[warn] plan elsewhere on cpu: sizes unknown (model ")


def test_a_plan_that_cannot_fit_stops_the_worker_at_start(tiny_sd, blobs):
    """warm_up raises the one line as a DeviceError: LocalPool's worker sends it as
    "fatal" and the pool start fails with it, before any member's job."""
    from pipeline.contract.devices import DeviceError
    from pipeline.workers.runner import Runner

    config = config_from_dict(
        {
            "models": {"tiny": {"source": str(tiny_sd), "memory": "offload"}},
            "workers": {"devices": ["cpu"]},
        }
    )
    runner = Runner(config, device="cpu", blobs=blobs, name="w0")
    with pytest.raises(DeviceError, match=r"^tiny: memory = 'offload' cannot be used on CPU"):
        runner.warm_up()
