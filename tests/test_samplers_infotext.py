"""Sampler names → schedulers, and A1111 infotext written and read back."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.contract.infotext import format_infotext, parse_infotext, png_bytes, read_infotext
from pipeline.contract.jobs import JobError
from pipeline.contract.samplers import SAMPLERS, resolve, sampler_names
from pipeline.models.schedulers import build_scheduler


def test_every_reference_sampler_is_known():
    for name in [
        "Euler a",
        "Euler",
        "LMS",
        "Heun",
        "DPM2",
        "DPM2 a",
        "DPM++ 2M",
        "DPM++ 2M SDE",
        "DPM++ SDE",
        "DDIM",
        "PLMS",
        "UniPC",
        "LCM",
        "DEIS",
        "DDPM",
        "TCD",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "Euler a Exponential",
    ]:
        assert name in sampler_names()


def test_karras_spelling_sets_the_schedule():
    sampler, schedule = resolve("DPM++ 2M Karras")
    assert (sampler.name, schedule) == ("DPM++ 2M", "Karras")
    assert resolve("dpm++ 2m", "Exponential")[1] == "Exponential"


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(JobError) as error:
        resolve("Eular a")
    assert "Did you mean Euler a" in str(error.value)
    assert "DPM++ 2M SDE" in str(error.value)
    with pytest.raises(JobError, match="unknown schedule type"):
        resolve("Euler", "Wobbly")


def test_schedulers_are_built_from_the_model_config():
    base = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    karras = build_scheduler(base, "DPM++ 2M", "Karras")
    assert type(karras).__name__ == "DPMSolverMultistepScheduler"
    assert karras.config.use_karras_sigmas and karras.config.beta_end == 0.012
    sde = build_scheduler(base, "DPM++ 2M SDE")
    assert sde.config.algorithm_type == "sde-dpmsolver++"
    assert build_scheduler(base, "Euler", "SGM Uniform").config.timestep_spacing == "trailing"
    assert len(SAMPLERS) == 17


def test_infotext_has_the_a1111_format_and_parses_back():
    text = format_infotext(
        "a (cat:1.2), <lora:me:0.8>",
        "blurry, bad hands",
        {
            "Steps": 30,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 7.0,
            "Seed": 1234,
            "Size": "512x768",
            "Model hash": "6ce0161689",
            "Model": "v1-5",
            "Denoising strength": None,
            "Lora hashes": "me: 0a1b2c3d4e5f, you: 0123",
            "Version": "sdbot 0.1",
        },
    )
    assert text.splitlines() == [
        "a (cat:1.2), <lora:me:0.8>",
        "Negative prompt: blurry, bad hands",
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5, "
        'Lora hashes: "me: 0a1b2c3d4e5f, you: 0123", Version: sdbot 0.1',
    ]
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a (cat:1.2), <lora:me:0.8>"
    assert parsed["Negative prompt"] == "blurry, bad hands"
    assert parsed["Lora hashes"] == "me: 0a1b2c3d4e5f, you: 0123"
    assert parsed["Seed"] == "1234" and parsed["Schedule type"] == "Karras"
    assert "Denoising strength" not in parsed


def test_png_carries_the_parameters_chunk_even_for_unicode():
    text = format_infotext("猫, café", "", {"Steps": 4, "Sampler": "Euler", "Seed": 1})
    data = png_bytes(Image.new("RGB", (8, 8)), text)
    assert read_infotext(data) == text
    assert parse_infotext(read_infotext(data))["Prompt"] == "猫, café"
