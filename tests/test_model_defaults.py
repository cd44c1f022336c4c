"""Per-model defaults and options in the contract (issue 23's bot part), torch-free:
what a configured model decides itself (`families.model_defaults`), the `[models.NAME]`
keys checked at load, the sampler names offered per family, and the one-line refusal
of an option a model lacks. Flux.1's variants are read from their Hub ids' names."""

from __future__ import annotations

import re

import pytest

from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.families import (
    FAMILIES,
    defaults_for,
    family_of_model,
    model_defaults,
    model_guidance,
)
from pipeline.contract.jobs import JobError

MODELS = {
    "sd": {"source": "stable-diffusion-v1-5/stable-diffusion-v1-5", "family": "sd1"},
    "dev": {"source": "black-forest-labs/FLUX.1-dev", "family": "flux", "steps": 20},
    "schnell": {"source": "black-forest-labs/FLUX.1-schnell", "family": "flux"},
    "kontext": {"source": "black-forest-labs/FLUX.1-Kontext-dev", "family": "flux"},
    "turbo": {"source": "Tongyi-MAI/Z-Image-Turbo", "family": "zimage"},
    "lightning": {"source": "x/sdxl-lightning", "family": "sdxl", "steps": 6, "cfg_scale": 1.5,
                  "sampler": "DPM++ SDE Karras"},
}  # fmt: skip


def _own(config, name: str) -> dict:
    model = config.model(name)
    return model_defaults(model, family_of_model(model))


def test_each_model_decides_its_own_defaults_and_config_keys_win() -> None:
    config = config_from_dict({"models": MODELS})
    assert _own(config, "sd") == {}  # SD: the member's /settings, then [defaults]
    assert _own(config, "schnell") == {
        "sampler": "Euler",
        "schedule": "Simple",
        "steps": 4,
        "cfg_scale": 1.0,
        "width": 1024,
        "height": 1024,
        "negative_prompt": "",
    }
    dev = _own(config, "dev")
    assert (dev["steps"], dev["guidance"]) == (20, 3.5)  # [models.dev] steps over 28
    assert _own(config, "kontext")["guidance"] == 2.5
    assert (_own(config, "turbo")["steps"], _own(config, "turbo")["cfg_scale"]) == (8, 1.0)
    # A sampler named in config carries its schedule in its name.
    assert _own(config, "lightning") == {
        "sampler": "DPM++ SDE Karras",
        "schedule": "Automatic",
        "steps": 6,
        "cfg_scale": 1.5,
    }
    cli = defaults_for(config, "lightning")  # what `sdbot generate` starts from
    assert (cli.sampler, cli.steps, cli.cfg_scale, cli.width) == ("DPM++ SDE Karras", 6, 1.5, 512)
    assert (model_guidance(config, "dev"), model_guidance(config, "schnell")) == (3.5, None)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"steps": 0}, "steps must be a whole number from 1 to 10000, not 0"),
        ({"steps": 2.5}, "steps must be a whole number from 1 to 10000, not 2.5"),
        ({"guidance": "high"}, "guidance must be a number from 0.0 to 100.0, not 'high'"),
        ({"cfg_scale": True}, "cfg_scale must be a number from 0.0 to 100.0, not True"),
        ({"sampler": "Eulr"}, "unknown sampler 'Eulr'. Did you mean Euler"),
        ({"schedule": "Sideways"}, "unknown schedule type 'Sideways'"),
        ({"colour": "red"}, "unknown key(s) colour"),
    ],
)
def test_a_models_own_defaults_are_checked_at_load(values: dict, error: str) -> None:
    with pytest.raises(ConfigError, match=r"\[models\.m\]: " + re.escape(error)):
        config_from_dict({"models": {"m": {"source": "x", **values}}})


def test_flow_names_load_too() -> None:  # "Euler Simple" is a flow model's name only
    config = config_from_dict({"models": {"m": {"source": "x", "sampler": "Euler Simple"}}})
    assert config.models[0].sampler == "Euler Simple"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_offered_sampler_name_is_one_the_family_takes(family: str) -> None:
    spec = FAMILIES[family]
    names = spec.sampler_names()
    assert names and len(names) == len(set(names))
    for name in names:
        spec.resolve_sampler(name)  # raises JobError for a name it cannot use


def test_an_option_the_family_lacks_is_refused_naming_the_model() -> None:
    schnell = family_of_model(config_from_dict({"models": MODELS}).model("schnell"))
    with pytest.raises(JobError, match=r"^model s \(Flux.1 schnell\) has no CFG scale option; "):
        schnell.check_option("cfg_scale", "s")
    with pytest.raises(JobError, match=r"^SD 1.x models have no Distilled CFG Scale option$"):
        FAMILIES["sd1"].check_option("guidance")
    FAMILIES["flux"].check_option("guidance", "dev")  # dev has one: no error


def test_an_option_left_out_takes_the_model_then_settings_then_the_server() -> None:
    from bot.services.model_options import pick_values
    from pipeline.contract.config import DefaultsConfig

    server = DefaultsConfig(sampler="DPM++ 2M", schedule="Karras", steps=25, cfg_scale=7.0)
    mine = {"steps": 30, "sampler": "Euler a", "negative_prompt": "blur"}
    config = config_from_dict({"models": MODELS})
    schnell = pick_values(_own(config, "schnell"), mine, server, None)
    assert (schnell["steps"], schnell["sampler"], schnell["schedule"]) == (4, "Euler", "Simple")
    assert (schnell["negative_prompt"], schnell["guidance"], schnell["width"]) == ("", None, 1024)
    sd = pick_values({}, mine, server, None)  # the member's /settings, then the server's
    assert (sd["steps"], sd["sampler"], sd["schedule"], sd["cfg_scale"]) == (
        30,
        "Euler a",
        "Automatic",
        7.0,
    )
    assert pick_values({}, {}, server, None)["schedule"] == "Karras"
    assert pick_values({"schedule": "Exponential"}, {}, server, None)["schedule"] == "Exponential"
    typed = pick_values(_own(config, "dev"), mine, server, "UniPC")  # the member's pick wins
    assert (typed["sampler"], typed["schedule"], typed["guidance"]) == ("UniPC", "Automatic", 3.5)
