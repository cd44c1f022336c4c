"""One model resolution for every command: "default", a configured name, a diffusers
folder or a single-file checkpoint; a bad name gets one line listing the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.model_names import resolve_model


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory) -> Path:
    from pipeline.models.single_file import export_folder

    return export_folder(tiny_sd, tmp_path_factory.mktemp("ckpt") / "one.safetensors")


def two_models(tiny_sd: Path):
    return config_from_dict(
        {"models": {"tiny": {"source": str(tiny_sd)}, "hub": {"source": "org/some-model"}}}
    )


def test_default_and_configured_names(tiny_sd):
    config = two_models(tiny_sd)
    assert resolve_model(config, "default") == (config, config.models[0])
    assert resolve_model(config, "hub") == (config, config.models[1])


def test_a_configured_folder_is_its_entry_under_any_spelling(tiny_sd, monkeypatch):
    config = two_models(tiny_sd)
    assert resolve_model(config, str(tiny_sd)) == (config, config.models[0])
    monkeypatch.chdir(tiny_sd.parent)
    assert resolve_model(config, f"./{tiny_sd.name}/") == (config, config.models[0])


def test_a_new_path_joins_the_config_in_front_once(tiny_sd, single_file):
    config = config_from_dict({"models": {"hub": {"source": "org/some-model"}}})
    for path, name in ((tiny_sd, tiny_sd.name), (single_file, "one")):
        with_it, model = resolve_model(config, str(path))
        assert model.name == name and model.source == str(path.resolve())
        assert with_it.models == (model, *config.models)  # also the default now
        assert resolve_model(with_it, str(path)) == (with_it, model)  # no second copy


def test_a_path_whose_stem_is_taken_by_another_model_gets_a_free_name(tiny_sd):
    config = config_from_dict({"models": {tiny_sd.name: {"source": "org/other"}}})
    _, model = resolve_model(config, str(tiny_sd))
    assert model.name == f"{tiny_sd.name}-2"


@pytest.mark.parametrize("requested", ["nope", "/no/such/model"])
def test_a_bad_name_lists_the_configured_models_once(tiny_sd, requested):
    with pytest.raises(ConfigError) as raised:
        resolve_model(two_models(tiny_sd), requested)
    assert str(raised.value) == f"unknown model {requested!r}; configured models: tiny, hub"
