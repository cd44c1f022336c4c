"""GGUF files (the transformer families' usual download) on a tiny FluxTransformer2DModel:
written by the `gguf` package as city96's converter writes them, loaded by diffusers'
`from_single_file(..., quantization_config=GGUFQuantizationConfig(...))`, and sized
from the header by the planner's reader (pipeline/contract/families/weight_sizes.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.contract.families.weight_sizes import READABLE_GGUF, gguf_problem, gguf_sizes
from pipeline.contract.memory_plan import GiB, gpu_card, plan_memory, published_components
from pipeline.generate.modes import run_generation
from tests.conftest import level_difference
from tests.gguf_files import write_gguf
from tests.test_memory_plan import JOBS

pytest.importorskip("gguf")

# Relative L2 error of the transformer's output against the float32 model, same inputs
# (measured: Q8_0 0.5 %, Q4_0 8.8 %).
REL_ERROR = {"Q8_0": 0.02, "Q4_0": 0.15}
CONFIG = dict(
    patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)  # fmt: skip


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gguf")
    model = FluxTransformer2DModel(**CONFIG).eval()
    model.save_pretrained(root / "transformer")
    return model, root


def run(model):
    torch.manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 32), encoder_hidden_states=torch.randn(1, 8, 32),
        pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )  # fmt: skip
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("quant", sorted(REL_ERROR))
def test_a_gguf_transformer_loads_in_diffusers_close_to_float32(flux, quant):
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    model, root = flux
    path = write_gguf(root / f"flux-{quant}.gguf", model.state_dict(), quant)
    loaded = FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(root / "transformer"),
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    assert "GGUFParameter" in {type(p).__name__ for p in loaded.parameters()}
    reference, out = run(model), run(loaded)
    error = ((out - reference).norm() / reference.norm()).item()
    assert error <= REL_ERROR[quant], f"{quant}: relative error {error:.4f}"
    assert gguf_problem(path) == ""


def test_the_planner_sizes_a_gguf_file_as_quantised(flux):
    model, root = flux
    path = write_gguf(root / "flux-sizes.gguf", model.state_dict(), "Q8_0")
    size = gguf_sizes(path)
    assert size.params == sum(p.numel() for p in model.parameters())
    assert size.stored_dtype == "gguf-Q8_0"
    quantised = sum(
        t.numel() for t in model.state_dict().values() if t.ndim == 2 and t.shape[1] % 32 == 0
    )
    # Q8_0: 32 values in 34 bytes (an fp16 scale per block); the rest F32.
    assert size.stored_bytes == quantised * 34 // 32 + (size.params - quantised) * 4


def test_a_gguf_transformer_is_planned_at_its_file_size():
    """Flux.1-dev as a Q8_0 file (11.8 GiB) instead of bf16 (22.2 GiB)."""
    parts = published_components("flux1")
    bf16 = next(c for c in parts if c.name == "transformer")
    q8 = type(bf16)("transformer", bf16.params, bf16.params * 34 // 32, "gguf-Q8_0")
    parts = tuple(q8 if c.name == "transformer" else c for c in parts)
    plan = plan_memory("flux-q8", "flux1", parts, gpu_card("24 GB card", 24 * GiB, 24 * GiB), JOBS)
    assert (plan.mode, plan.text_encoders) == ("full", "offload")
    transformer = next(p for p in plan.placements if p.component == "transformer")
    assert (transformer.weights, transformer.bytes) == ("gguf-Q8_0", q8.stored_bytes)
    assert "transformer gguf-Q8_0 (11.8 GB)" in plan.reason


def test_a_quantisation_diffusers_cannot_read_is_one_line(flux):
    """TQ1_0 (ternary) is written by the gguf package but not read by diffusers."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    model, root = flux
    path = write_gguf(root / "flux-tq1.gguf", model.state_dict(), "TQ1_0")
    import gguf

    code = gguf.GGMLQuantizationType.TQ1_0.value
    with pytest.raises(ValueError, match=f"quantization type: {code} which is unsupported"):
        load_gguf_checkpoint(str(path))  # diffusers' own refusal: numbers, on many lines
    line = gguf_problem(path)
    assert line.startswith("model file flux-tq1.gguf: GGUF quantisation TQ1_0 cannot be read")
    assert "\n" not in line


def test_the_readable_list_is_diffusers_own():
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    plain = {gguf.GGMLQuantizationType.F32.name, gguf.GGMLQuantizationType.F16.name}
    assert set(READABLE_GGUF) == {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | plain


# --- a GGUF transformer through the worker's path (`[models.X] source = the .gguf`) ------

# Largest difference in 8-bit levels between the tiny Flux.1 dev's image from its Q8_0
# GGUF transformer and from its float32 folder, same job (measured: 1 level at 64², 4 steps).
Q8_LEVELS = 4


def test_a_gguf_transformer_with_its_base_folder_generates_as_the_folder_does(tmp_path):
    """What an admin writes: source = the .gguf, single_file_config = a diffusers folder of
    the family for the text encoders and VAE; the image stays within Q8_0's rounding of
    the float32 folder's."""
    from diffusers import FluxTransformer2DModel

    from pipeline.families.flux_tiny import write_tiny_flux
    from tests.test_flux import _load, image_of, spec

    folder = write_tiny_flux(tmp_path / "dev")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    path = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", transformer.state_dict(), "Q8_0")
    quantised = _load(path, single_file_config=str(folder))
    assert "GGUFParameter" in {type(p).__name__ for p in quantised.pipe.transformer.parameters()}
    [[ours]] = run_generation(quantised, [spec()])
    [[full]] = run_generation(_load(folder), [spec()])
    assert level_difference(image_of(ours), image_of(full)) <= Q8_LEVELS


def test_the_bfl_layout_is_what_diffusers_converter_reads_at_full_width():
    """tests/gguf_files.bfl_flux_state_dict on Flux.1's full width (1+1 blocks, on the meta
    device: names and shapes, no memory): diffusers' detector calls it flux-dev, its
    converter gives back the transformer's own names and shapes, our recogniser takes it;
    the tensors city96's quantiser keeps in F32/F16 are there under those names."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    from pipeline.contract.families.flux import Flux
    from tests.gguf_files import KEEP_F16, KEEP_F32, bfl_flux_state_dict

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    ours = model.state_dict()
    bfl = bfl_flux_state_dict(ours)
    assert infer_diffusers_model_type(bfl) == "flux-dev"
    assert Flux.matches_checkpoint(list(bfl))
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 12288, 3072)
    for prefix in (*KEEP_F32, *KEEP_F16):
        assert any(k.startswith(prefix) for k in bfl), prefix


@pytest.mark.parametrize("guidance", [True, False])
def test_a_flux_gguf_is_dev_or_schnell_by_its_guidance_embedder_not_its_name(tmp_path, guidance):
    """A renamed GGUF keeps its variant: schnell has no guidance embedder (its defaults,
    4 steps and no negative prompt, follow from this)."""
    from diffusers import FluxTransformer2DModel

    from pipeline.contract.families.flux import variant_of
    from tests.gguf_files import bfl_flux_state_dict

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**CONFIG, "guidance_embeds": guidance})
    path = write_gguf(tmp_path / "my-favourite-model.gguf", bfl_flux_state_dict(model.state_dict()))
    assert variant_of(str(path)) == ("dev" if guidance else "schnell")
