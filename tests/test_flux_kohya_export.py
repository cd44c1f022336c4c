"""A Flux.1 personal model's LoRA under kohya's names (sd-scripts' `networks/lora_flux.py`),
the layout ComfyUI and Forge read, proven by the tools that read it:

- **At the 12B model's widths** (3072 wide, MLP 12288: the only widths diffusers' kohya
  converter splits the single blocks' `linear1` at), our training adapters on a
  full-width Flux.1 transformer cut to one double and one single block, exported, and the
  file read by diffusers' own `FluxPipeline.lora_state_dict` (its
  `_convert_kohya_flux_lora_to_diffusers`): every key maps, and every module's ΔW from
  the file (lora_B · lora_A, diffusers' scale folded in by the converter) equals our
  adapter's (B · A · alpha / r) within 1e-6 relative. The transformer lives on the meta
  device; only the adapters hold values (fp16-exact, so the file's fp16 is no rounding).
- **On the tiny model, trained**: the kohya file drawn through our `<lora:name:1>` path
  equals the diffusers-layout file of the same training through the same path within 1
  level, and the sample peft's adapter drew during training within 2.
- **The metadata sd-scripts writes for Flux** is there, and the file is read as Flux.1's
  (refused on another family naming both).
- **The compiled path's LoRA slots** take each fused part at the trained rank and give
  the eager path's output.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pipeline.contract.jobs import JobError, Limits
from pipeline.loras.formats import LoraError, read_lora_file
from pipeline.training.adapters import ADAPTER, add_adapters
from pipeline.training.export import kohya_state_dict
from tests.test_train_flow import draw, folders, load, ours, run, spec  # noqa: F401 - fixture

RANK = 4


def _full_width_pipe(folder):
    """The tiny folder's pipeline with a Flux.1 transformer at the real widths (24 heads of
    128, T5-XXL's 4096 context, CLIP-L's 768), one double and one single block, built on
    the meta device (no weights allocated)."""
    from diffusers import FluxTransformer2DModel

    pipe = load(folder)
    real = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56))
    real |= dict(joint_attention_dim=4096, pooled_projection_dim=768, out_channels=None)
    real |= dict(num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, **real})
    pipe.register_modules(transformer=transformer)
    return pipe


def _fill_adapters(transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Give every adapter our training added values (B non-zero, unlike a fresh LoRA), in
    fp16-exact numbers; returns each module's (A, B, alpha / r)."""
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(0)
    factors = {}
    for path, layer in transformer.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_A:
            continue
        for linear in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            linear.to_empty(device="cpu")
            values = torch.randn(linear.weight.shape, generator=g) * 0.05
            linear.weight.data = values.half().float()
        down, up = layer.lora_A[ADAPTER].weight.data, layer.lora_B[ADAPTER].weight.data
        factors[path] = (down, up, layer.scaling[ADAPTER])
    return factors


def test_at_the_real_widths_diffusers_reads_every_layer_as_we_trained_it(folders, tmp_path):
    from diffusers import FluxPipeline

    pipe = _full_width_pipe(folders["flux"])
    train_spec = spec(rank=RANK, alpha=8.0)
    add_adapters(pipe, train_spec)
    adapters = _fill_adapters(pipe.transformer)
    # The script's twelve targets: eight double-block modules of each stream's attention
    # and MLPs, and the single block's q, k, v.
    assert len(adapters) == 15

    tensors = kohya_state_dict(pipe, train_spec)
    names = {key.split(".")[0] for key in tensors}
    assert names == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_double_blocks_0_img_mlp_0",
        "lora_unet_double_blocks_0_img_mlp_2",
        "lora_unet_double_blocks_0_txt_attn_qkv",
        "lora_unet_double_blocks_0_txt_attn_proj",
        "lora_unet_double_blocks_0_txt_mlp_0",
        "lora_unet_double_blocks_0_txt_mlp_2",
        "lora_unet_single_blocks_0_linear1",
    }
    assert {key.split(".", 1)[1] for key in tensors} == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
    }
    # sd-scripts' split_qkv form: downs stacked, up block-diagonal, at the real widths.
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (
        3 * RANK,
        3072,
    )
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (
        3 * 3072 + 12288,
        4 * RANK,
    )

    path = tmp_path / "me.safetensors"
    save_file(tensors, str(path))
    theirs = FluxPipeline.lora_state_dict(str(path))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    modules = {key.rsplit(".", 2)[0] for key in theirs}
    assert {key.rsplit(".", 2)[1] for key in theirs} == {"lora_A", "lora_B"}
    # Every trained module is read back, plus the single block's MLP input (the part of
    # linear1 nobody trained: zeros).
    mlp = "single_transformer_blocks.0.proj_mlp"
    assert modules == {f"transformer.{m}" for m in [*adapters, mlp]}
    # diffusers found the fused layers sparse and split them back to rank-r parts.
    assert theirs["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (RANK, 3072)
    assert theirs[f"transformer.{mlp}.lora_B.weight"].shape == (12288, RANK)
    for module in modules:
        # ΔW one module at a time, in float32: the MLP's are 12288 × 3072.
        down = theirs[f"{module}.lora_A.weight"].float()
        up = theirs[f"{module}.lora_B.weight"].float()
        delta = up @ down  # the converter folds alpha / rank into the factors
        if module.endswith(mlp):
            assert not delta.any()
            continue
        ours_down, ours_up, scale = adapters[module.removeprefix("transformer.")]
        expected = ours_up @ ours_down * scale
        assert delta.shape == expected.shape
        assert (delta - expected).abs().max() <= 1e-6 * expected.abs().max()


@pytest.fixture(scope="module")
def both_layouts(folders, tmp_path_factory):
    """The same training (12 steps, same seed) on the tiny Flux.1 dev, exported in
    each layout: {layout: (result, file)}."""
    runs = {}
    for layout in ("kohya", "diffusers"):
        root = tmp_path_factory.mktemp(f"flux-{layout}")
        train_spec = spec(learning_rate=1e-2, flux_lora_layout=layout)
        result = run(load(folders["flux"]), train_spec, root / "job")
        path = root / f"me_{layout}.safetensors"
        path.write_bytes(result.safetensors)
        runs[layout] = (result, path)
    return runs


def test_the_kohya_file_draws_what_the_diffusers_layout_draws_through_our_path(
    folders, both_layouts
):
    result, kohya = both_layouts["kohya"]
    tensors = load_safetensors(result.safetensors)
    assert all(key.startswith("lora_unet_") for key in tensors)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in tensors
    image = ours(folders["flux"], kohya)
    base = draw(load(folders["flux"]))
    assert np.abs(image - base).mean() > 1.0  # the adapter changes the picture
    # The same adapter in diffusers' peft layout, through the same path: 1 level (fp16
    # rounding of different products only).
    assert np.abs(image - ours(folders["flux"], both_layouts["diffusers"][1])).max() <= 1
    # …and what peft's own adapter drew during training.
    assert np.abs(np.asarray(result.samples[0]).astype(int) - image).max() <= 2


def test_the_kohya_file_carries_the_metadata_sd_scripts_writes_for_flux(both_layouts):
    result, _ = both_layouts["kohya"]
    header = result.metadata
    assert header["ss_network_module"] == "networks.lora_flux"
    assert json.loads(header["ss_network_args"]) == {"split_qkv": "True"}
    assert header["ss_base_model_version"] == "flux1"
    assert header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "4"
    assert header["ss_guidance_scale"] == "1"
    assert header["ss_timestep_sampling"] == "sigmoid"
    assert header["ss_model_prediction_type"] == "raw"
    assert header["ss_model_type"] == "flux"
    assert header["modelspec.architecture"] == "flux-1-dev/lora"
    assert header["sdbot_layout"].startswith("kohya")
    for key in ("ss_output_name", "ss_steps", "ss_resolution", "ss_learning_rate"):
        assert header[key]
    path = both_layouts["kohya"][1]
    read_lora_file(path, name="me", family="flux", max_bytes=1 << 30)
    with pytest.raises(LoraError, match="^LoRA 'me' was made for Flux.1; this model is Z-Image$"):
        read_lora_file(path, name="me", family="zimage", max_bytes=1 << 30)
    # The peft file says it is one, and claims no kohya network module of Flux.
    peft = both_layouts["diffusers"][0].metadata
    assert peft["ss_network_module"] == "networks.lora"
    assert peft["sdbot_layout"].startswith("peft")


def test_a_layout_other_than_kohya_or_diffusers_is_refused(tmp_path):
    from bot.services.training import train_spec
    from pipeline.contract.config import ConfigError, config_from_dict

    models = {"models": {"flux": {"source": str(tmp_path)}}}
    with pytest.raises(ConfigError, match="flux_lora_layout must be 'kohya' or 'diffusers'"):
        config_from_dict({**models, "training": {"flux_lora_layout": "peft"}})
    config = config_from_dict({**models, "training": {"flux_lora_layout": "diffusers"}})
    kwargs = dict(photos=["a"], captions=["x"], token="sks", subject="person", model="flux")
    made = train_spec(config, name="me", method="lora", steps=0, resolution=512, **kwargs)
    assert made.flux_lora_layout == "diffusers"
    with pytest.raises(JobError, match="^flux_lora_layout must be kohya or diffusers, not 'x'$"):
        replace(made, flux_lora_layout="x").check(Limits())


def test_the_kohya_file_fits_the_compiled_paths_slots_at_its_trained_rank(folders, both_layouts):
    """The fused layers' ranks are n·r in the file, but each part's up is non-zero on its
    own r columns only: the LoRA slots take each module at rank r (a rank-16 personal
    model fits the default max_rank 32) and give the eager path's transformer output."""
    from pipeline.loras import slots
    from pipeline.loras.cache import LoraCache
    from tests.test_flux_loras import _output, ref

    path = both_layouts["kohya"][1]
    eager_pipe, slot_pipe = load(folders["flux"]), load(folders["flux"])
    bank = slots.install(slot_pipe.transformer, slots=1, max_rank=4, rows=4)
    base = _output(eager_pipe.transformer)
    with LoraCache(eager_pipe, max_bytes=1 << 30).activate([ref(path)]):
        theirs = _output(eager_pipe.transformer)
    with LoraCache(slot_pipe, max_bytes=1 << 30).activate([ref(path)]):
        ours = _output(slot_pipe.transformer)
    effect = (theirs - base).abs().max().item()
    assert effect > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-4 * effect
    assert bank.stats.eager == 0 and bank.stats.calls == 1
