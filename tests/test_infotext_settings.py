"""An image's parameters read back as settings: A1111's format, ours, and pasted on one line."""

from __future__ import annotations

import pytest

from bot.services.pasted import apply_pasted
from pipeline.contract.infotext import (
    format_infotext,
    generation_settings,
    looks_like_parameters,
    parse_infotext,
)
from pipeline.contract.jobs import JobError

# The example in the docstring of parse_generation_parameters, AUTOMATIC1111/
# stable-diffusion-webui modules/infotext_utils.py (v1.10, AGPL-3.0), verbatim.
A1111_DOCSTRING_EXAMPLE = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""  # noqa: E501

# What A1111 1.10's create_infotext writes for a txt2img with two LoRAs and an
# embedding: values with a comma or colon are JSON-quoted (its quote()).
A1111_PARAMETERS = (
    "masterpiece, best quality, a [cat:dog:0.5] in a garden, <lora:add_detail:0.6>, "
    "<lora:style_v2:0.8>\n"
    "Negative prompt: easynegative, lowres, (bad hands:1.2)\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "add_detail: 7c6bad76eb54, style_v2: 0d9bd1b873a7", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


def test_a1111_docstring_example():
    settings = generation_settings(A1111_DOCSTRING_EXAMPLE)
    assert settings.prompt.startswith("girl with an artist's beret")
    assert settings.prompt.endswith("(coquettish), detailed, intricate")
    assert settings.negative_prompt.endswith("(poorly drawn hands), messy drawing")
    assert settings.fields == {
        "steps": 20,
        "sampler": "Euler a",
        "cfg_scale": 7.0,
        "seed": 965400086,
        "width": 512,
        "height": 512,
    }
    assert settings.model_hash == "45dee52b" and settings.not_applied == []


def test_a1111_parameters_with_quoted_values_and_hashes():
    settings = generation_settings(A1111_PARAMETERS)
    assert settings.prompt.endswith("<lora:style_v2:0.8>")
    assert settings.negative_prompt == "easynegative, lowres, (bad hands:1.2)"
    assert settings.fields == {
        "steps": 20,
        "sampler": "DPM++ 2M",
        "schedule": "Karras",
        "cfg_scale": 7.0,
        "seed": 1,
        "width": 512,
        "height": 768,
    }
    assert settings.model == "v1-5-pruned-emaonly" and settings.model_hash == "6ce0161689"
    assert settings.lora_hashes == {"add_detail": "7c6bad76eb54", "style_v2": "0d9bd1b873a7"}
    assert settings.not_applied == ["Clip skip: 2", "TI hashes: easynegative: c74b4e810b03"]


def test_pasted_on_one_line_reads_the_same():
    one_line = A1111_PARAMETERS.replace("\n", " ")
    assert looks_like_parameters(one_line) and not looks_like_parameters("a cat, Steps: 3")
    assert generation_settings(one_line) == generation_settings(A1111_PARAMETERS)


def test_our_own_infotext_round_trips():
    params = {"Steps": 4, "Sampler": "Euler", "Schedule type": "Exponential", "CFG scale": 6.5}
    params.update({"Seed": 99, "Size": "64x96", "Model": "tiny", "ADetailer model": "haarcascade"})
    params["Lora hashes"] = "me: 0a1b2c3d4e5f"
    text = format_infotext("a (cat:1.2) AND dog:0.5", "blurry, [x:y:2]", params)
    settings = generation_settings(text)
    assert (settings.prompt, settings.negative_prompt) == (
        "a (cat:1.2) AND dog:0.5",
        "blurry, [x:y:2]",
    )
    assert settings.fields == {
        "steps": 4,
        "sampler": "Euler",
        "schedule": "Exponential",
        "cfg_scale": 6.5,
        "seed": 99,
        "width": 64,
        "height": 96,
        "face_fix": True,
    }
    assert settings.lora_hashes == {"me": "0a1b2c3d4e5f"}


def test_a_value_that_is_no_number_is_one_line():
    with pytest.raises(JobError, match="the parameters say Steps: 'many', which is not a number"):
        generation_settings("a cat\nSteps: many, Sampler: Euler, Seed: 1")


def test_quoting_follows_a1111():
    text = format_infotext("x", "", {"Steps": 1, "Model": "a:b", "Note": 'say "hi"', "Seed": 2})
    assert text.splitlines()[1] == 'Steps: 1, Model: "a:b", Note: "say \\"hi\\"", Seed: 2'
    assert parse_infotext(text)["Note"] == 'say "hi"'


def test_pasted_into_imagine_fills_only_the_options_left_unset():
    given = dict(negative=None, model=None, sampler=None, steps=None, cfg=3.0, seed=None)
    given.update(size=None, face_fix=False)
    prompt, options, notice = apply_pasted(A1111_PARAMETERS.replace("\n", " "), given, ["tiny"])
    assert prompt.startswith("masterpiece") and prompt.endswith("<lora:style_v2:0.8>")
    assert options["steps"] == 20 and options["cfg"] == 3.0  # the member's cfg wins
    assert (options["sampler"], options["schedule"]) == ("DPM++ 2M", "Karras")
    assert options["size"] == "512x768" and options["seed"] == 1
    assert options["negative"] == "easynegative, lowres, (bad hands:1.2)"
    assert options["model"] is None
    assert notice == (
        "Used the pasted parameters (negative prompt, steps, sampler, seed, size). "
        "Not applied here: Clip skip: 2; TI hashes: easynegative: c74b4e810b03; "
        "model v1-5-pruned-emaonly (not on this server)."
    )
    assert apply_pasted("a cat", given, ["tiny"]) == ("a cat", given, None)
