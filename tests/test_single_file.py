"""A real single-file (LDM / A1111) checkpoint of the tiny model, loaded with from_single_file."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipeline.contract.config import ModelConfig
from pipeline.contract.jobs import GenerateSpec
from pipeline.generate.modes import run_generation
from pipeline.models.loading import LoadedModel, detect_family, load_model
from pipeline.models.single_file import export_single_file, unet_to_ldm, vae_to_ldm

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def folder_model(tiny_sd) -> LoadedModel:
    return load_model(ModelConfig("tiny", str(tiny_sd)), device="cpu")


@pytest.fixture(scope="module")
def checkpoint(folder_model, tmp_path_factory):
    return export_single_file(
        folder_model.pipe, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    )


@pytest.fixture(scope="module")
def file_model(checkpoint, tiny_sd, monkeypatch_module) -> LoadedModel:
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # the config must come from tiny_sd alone
    config = ModelConfig("ckpt", str(checkpoint), single_file_config=str(tiny_sd))
    return load_model(config, device="cpu")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_checkpoint_has_the_original_key_names(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as f:
        keys = set(f.keys())
        vae_q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in keys  # upsampler after attn
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in keys  # reversed up blocks
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    assert vae_q.shape == (64, 64, 1, 1)  # LDM's 1×1 conv attention, not diffusers' Linear
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in keys)


def test_family_is_detected_from_the_checkpoint(checkpoint):
    assert detect_family(str(checkpoint)) == "sd1"


def test_loaded_weights_equal_the_folder_weights(folder_model, file_model):
    assert file_model.family == "sd1"
    for name in COMPONENTS:
        expected = getattr(folder_model.pipe, name).state_dict()
        loaded = getattr(file_model.pipe, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        different = [k for k in expected if not torch.equal(loaded[k], expected[k])]
        assert not different, f"{name}: {different[:5]}"


def test_weights_come_from_the_file_not_the_config_folder(tiny_sd, tmp_path, monkeypatch):
    """diffusers must read every component from the checkpoint; tiny_sd gives configs only."""
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    with torch.no_grad():
        for name in COMPONENTS:
            for parameter in getattr(pipe, name).parameters():
                parameter.add_(1.0)  # now unlike the folder's weights
    shifted = export_single_file(pipe, tmp_path / "shifted.safetensors")
    config = ModelConfig("shifted", str(shifted), single_file_config=str(tiny_sd))
    loaded = load_model(config, device="cpu").pipe
    for name in COMPONENTS:
        expected = getattr(pipe, name).state_dict()
        assert all(
            torch.equal(v, expected[k]) for k, v in getattr(loaded, name).state_dict().items()
        )


def test_same_seed_gives_identical_pixels_from_folder_and_checkpoint(folder_model, file_model):
    spec = GenerateSpec("a photo of a cat", width=64, height=64, steps=3, seed=1)
    [[from_folder]] = run_generation(folder_model, [spec])
    [[from_file]] = run_generation(file_model, [spec])
    # The PNGs differ only in their infotext (model name and hash); the pixels must not.
    assert _rgb(from_file.png) == _rgb(from_folder.png)
    assert from_file.seed == from_folder.seed == 1


def _rgb(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def test_mapping_follows_the_config_not_sd15s_layout():
    """Three blocks with two layers each round-trip through diffusers' own converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
        sample_size=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
    )
    ldm = {
        "model.diffusion_model." + k: v
        for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()
    }
    ldm.update(
        {"first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    )
    for model, back in (
        (unet, convert_ldm_unet_checkpoint(ldm, dict(unet.config))),
        (vae, convert_ldm_vae_checkpoint(ldm, dict(vae.config))),
    ):
        expected = model.state_dict()
        assert back.keys() == expected.keys()
        assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_unknown_weights_are_refused_not_dropped():
    state = {"some_new_module.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="some_new_module"):
        unet_to_ldm(state, {"layers_per_block": 1, "up_block_types": ()})


def test_sdxl_checkpoint_round_trips_through_diffusers_converters(tiny_xl, tmp_path):
    """SDXL export, checked against diffusers' converters component by component.

    Not loaded as a pipeline: the tiny XL model's two text encoders both have hidden size
    32, and diffusers tells CLIP-L from OpenCLIP bigG by that width, so from_single_file
    would give text_encoder_2 CLIP-L's weights (real SDXL: 768 vs 1280, no confusion).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
    path = export_single_file(pipe, tmp_path / "xl.safetensors")
    assert detect_family(str(path)) == "sdxl"
    ldm = load_file(str(path))
    clip_l = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ldm).items()}
    open_clip = convert_open_clip_checkpoint(
        pipe.text_encoder_2, ldm, prefix="conditioner.embedders.1.model."
    )
    for module, back in (
        (pipe.unet, convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))),
        (pipe.vae, convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config))),
        (pipe.text_encoder, clip_l),
        (pipe.text_encoder_2, open_clip),
    ):
        expected = module.state_dict()
        assert back.keys() == expected.keys(), type(module).__name__
        assert all(torch.equal(back[k], expected[k]) for k in expected), type(module).__name__
