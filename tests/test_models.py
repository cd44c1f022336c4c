"""Model loading: folders, families, derived pipelines sharing weights, clear errors."""

from __future__ import annotations

import pytest

from pipeline.contract.config import ModelConfig, config_from_dict
from pipeline.models.loading import ModelCache, ModelError, detect_family, load_model


def test_family_is_detected_from_the_folder(tiny_sd, tiny_xl):
    assert detect_family(str(tiny_sd)) == "sd1"
    assert detect_family(str(tiny_xl)) == "sdxl"


def test_model_is_loaded_once_and_derived_pipelines_share_its_weights(tiny_sd):
    cache = ModelCache(config_from_dict({"models": {"a": {"source": str(tiny_sd)}}}), "cpu")
    model = cache.get("default")
    assert cache.get("a") is model
    assert model.img2img().unet is model.pipe.unet
    assert model.inpaint().vae is model.pipe.vae
    assert model.img2img() is model.img2img()
    assert model.dtype.__str__() == "torch.float32" and model.device == "cpu"


def test_missing_folder_names_the_source(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=f"model folder {missing} does not exist"):
        load_model(ModelConfig("x", str(missing), family="sd1"), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelConfig("x", str(tmp_path / "m.safetensors")), device="cpu")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        load_model(ModelConfig("x", str(tmp_path / "junk")), device="cpu")


def test_corrupt_single_file_checkpoint(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelError, match="not a valid .safetensors file"):
        load_model(ModelConfig("x", str(bad)), device="cpu")


def test_uncached_hub_id_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        load_model(ModelConfig("x", "someone/some-model-that-is-not-cached"), device="cpu")


def test_unknown_model_name_lists_configured_ones(tiny_sd):
    config = config_from_dict({"models": {"a": {"source": str(tiny_sd)}}})
    with pytest.raises(ValueError, match="unknown model 'b'; configured models: a"):
        ModelCache(config, "cpu").get("b")


def _fake_checkpoint(path):
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (
                torch.zeros(77, 768)
            ),
        },
        str(path),
    )
    return path


def test_single_file_offline_without_its_config_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = _fake_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="Set single_file_config to a local diffusers folder"):
        load_model(ModelConfig("x", str(checkpoint)), device="cpu")


def test_single_file_is_read_with_the_given_config_and_mismatches_are_named(tmp_path, tiny_sd):
    checkpoint = _fake_checkpoint(tmp_path / "model.safetensors")
    config = ModelConfig("x", str(checkpoint), single_file_config=str(tiny_sd))
    with pytest.raises(ModelError, match=r"could not be loaded as a sd1 pipeline: .*shape"):
        load_model(config, device="cpu")
