"""Flux.1 LoRA files as people bring them, applied by our ΔW path on the tiny Flux.1 model
and checked against the reference applying the same file:

- kohya / sd-scripts (`lora_unet_double_blocks_…`): diffusers' own loader
  (`load_lora_weights`, which runs `_convert_kohya_flux_lora_to_diffusers`) + `fuse_lora`;
- kohya's single-block `linear1` (q, k, v and the MLP fused in one layer): diffusers
  hard-codes the 12B model's widths there (3072 ×3 + 12288), so the reference is BFL's
  own layer: ΔW added to the fused weight `cat(to_q, to_k, to_v, proj_mlp)`;
- diffusers / ai-toolkit / peft (`transformer.…lora_A/B`): diffusers' loader + fuse.

Within 1e-3 of the adapter's effect on the transformer's output, as for SD.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.contract.jobs import LoraRef
from pipeline.loras.cache import LoraCache
from pipeline.loras.formats import LoraError, read_lora_file

RANK = 4
INNER = 32  # the tiny transformer's 2 heads × 16
MLP = 4 * INNER


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    from pipeline.families.flux_tiny import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def _pipe(folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ref(path: Path, weight: float = 1.0) -> tuple[LoraRef, Path]:
    return LoraRef(path.stem, hashlib.sha256(path.read_bytes()).hexdigest(), weight), path


def _output(transformer, rows: int = 1) -> torch.Tensor:
    """The transformer's prediction on fixed inputs (16 packed latent tokens, 8 text)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(
            hidden_states=torch.randn(rows, 16, 64, generator=g),
            encoder_hidden_states=torch.randn(rows, 8, 32, generator=g),
            pooled_projections=torch.randn(rows, 32, generator=g),
            timestep=torch.tensor([0.6] * rows),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5] * rows),
            return_dict=False,
        )[0]


def _pair(g: torch.Generator, out: int, inp: int, alpha: float | None) -> dict[str, torch.Tensor]:
    layer = {
        "lora_down.weight": torch.randn(RANK, inp, generator=g) * 0.3,
        "lora_up.weight": torch.randn(out, RANK, generator=g) * 0.3,
    }
    if alpha is not None:
        layer["alpha"] = torch.tensor(alpha)
    return layer


def _kohya(path: Path, *, single_linear1: bool) -> dict[str, torch.Tensor]:
    """A kohya sd-scripts Flux.1 LoRA for the tiny model: the names and layouts diffusers'
    `_convert_kohya_flux_lora_to_diffusers` reads (`lora_unet_<BFL layer>` with
    lora_down/lora_up/alpha)."""
    g = torch.Generator().manual_seed(11)
    layers = {
        "double_blocks_0_img_attn_qkv": (3 * INNER, INNER),
        "double_blocks_0_txt_attn_qkv": (3 * INNER, INNER),
        "double_blocks_0_img_attn_proj": (INNER, INNER),
        "double_blocks_0_txt_attn_proj": (INNER, INNER),
        "double_blocks_0_img_mlp_0": (MLP, INNER),
        "double_blocks_0_img_mlp_2": (INNER, MLP),
        "double_blocks_0_txt_mlp_0": (MLP, INNER),
        "double_blocks_0_txt_mlp_2": (INNER, MLP),
        "single_blocks_0_linear2": (INNER, INNER + MLP),
    }
    if single_linear1:
        layers = {"single_blocks_0_linear1": (3 * INNER + MLP, INNER)}
    tensors = {}
    for name, (out, inp) in layers.items():
        for param, tensor in _pair(g, out, inp, alpha=2.0).items():
            tensors[f"lora_unet_{name}.{param}"] = tensor
    save_file(tensors, str(path))
    return tensors


def _diffusers_loader_and_fuse(folder: Path, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for files diffusers reads: the transformer's output before and after
    diffusers' own loader (`load_lora_weights`) + `fuse_lora` applies the file."""
    reference = _pipe(folder)
    base = _output(reference.transformer)
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    return base, _output(reference.transformer)


def _compare(base: torch.Tensor, theirs: torch.Tensor, ours: torch.Tensor) -> None:
    effect = (theirs - base).abs().max().item()
    assert effect > 1e-3  # the adapter does something here
    assert (ours - theirs).abs().max().item() <= 1e-3 * effect


def test_kohya_double_blocks_equal_diffusers_loader_and_fuse(flux_dir, tmp_path):
    path = tmp_path / "kohya_flux.safetensors"
    _kohya(path, single_linear1=False)
    base, theirs = _diffusers_loader_and_fuse(flux_dir, path)
    pipe, ours = ours_applying(flux_dir, path)
    _compare(base, theirs, ours)
    assert torch.equal(_output(pipe.transformer), base)  # nothing left behind


def ours_applying(folder: Path, path: Path) -> tuple[object, torch.Tensor]:
    """(the pipeline, its transformer's output) with the file applied by our ΔW path,
    every layer of it (no notice)."""
    pipe = _pipe(folder)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    lora = ref(path)
    with cache.activate([lora]):
        ours = _output(pipe.transformer)
    assert cache.notices([lora[0]]) == []  # every layer of the file was applied
    return pipe, ours


def test_kohya_single_block_linear1_is_split_at_the_models_widths(flux_dir, tmp_path):
    path = tmp_path / "kohya_linear1.safetensors"
    tensors = _kohya(path, single_linear1=True)
    reference = _pipe(flux_dir)
    base = _output(reference.transformer)
    block = reference.transformer.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    fused = torch.cat([p.weight for p in parts])  # BFL's linear1 (without its bias)
    down = tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    fused = fused + (2.0 / RANK) * up @ down  # kohya: alpha / rank
    with torch.no_grad():
        for part, rows in zip(parts, fused.split([INNER, INNER, INNER, MLP])):
            part.weight.copy_(rows)
    theirs = _output(reference.transformer)
    pipe = _pipe(flux_dir)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    with cache.activate([ref(path)]):
        ours = _output(pipe.transformer)
    _compare(base, theirs, ours)


def test_peft_transformer_lora_equals_diffusers_loader_and_fuse(flux_dir, tmp_path):
    """ai-toolkit and diffusers' trainers save `transformer.<module>.lora_A/B.weight`."""
    g = torch.Generator().manual_seed(5)
    modules = {
        "transformer_blocks.0.attn.to_q": (INNER, INNER),
        "transformer_blocks.0.attn.add_k_proj": (INNER, INNER),
        "transformer_blocks.0.ff.net.2": (INNER, MLP),
        "single_transformer_blocks.0.proj_mlp": (MLP, INNER),
        "single_transformer_blocks.0.attn.to_v": (INNER, INNER),
    }
    tensors = {}
    for name, (out, inp) in modules.items():
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, inp, generator=g) * 0.3
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.3
    path = tmp_path / "peft_flux.safetensors"
    save_file(tensors, str(path))
    base, theirs = _diffusers_loader_and_fuse(flux_dir, path)
    pipe = _pipe(flux_dir)
    with LoraCache(pipe, max_bytes=1 << 30).activate([ref(path)]):
        ours = _output(pipe.transformer)
    _compare(base, theirs, ours)


def test_a_flux_lora_on_sd_and_an_sd_lora_on_flux_are_refused_naming_both(tmp_path, tiny_sd):
    path = tmp_path / "flux_style.safetensors"
    _kohya(path, single_linear1=False)
    with pytest.raises(
        LoraError, match=r"^LoRA 'flux_style' was made for Flux.1; this model is SD 1.x$"
    ):
        read_lora_file(path, name="flux_style", family="sd1", max_bytes=1 << 30)
    sd = tmp_path / "sd_style.safetensors"
    g = torch.Generator().manual_seed(1)
    layer = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    down = torch.randn(RANK, 768, generator=g)  # SD 1.x's text width
    up = torch.randn(320, RANK, generator=g)
    save_file({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up}, str(sd))
    with pytest.raises(
        LoraError, match=r"^LoRA 'sd_style' was made for SD 1.x; this model is Flux.1$"
    ):
        read_lora_file(sd, name="sd_style", family="flux", max_bytes=1 << 30)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_lokr_and_loha_equal_lycoris_applying_them(flux_dir, tmp_path, algo):
    """LoKr/LoHa made by LyCORIS's own wrapper on the transformer (as SimpleTuner trains
    Flux.1 LyCORIS files: `lycoris_<module>.lokr_w1…`), saved by LyCORIS, applied by our
    ΔW path and compared with LyCORIS applying its network."""
    import copy

    from tests.lycoris_files import randomised_transformer_network

    base_pipe = _pipe(flux_dir)
    base = _output(base_pipe.transformer)
    transformer = copy.deepcopy(base_pipe.transformer)
    network = randomised_transformer_network(transformer, algo)
    theirs = _output(transformer)
    path = tmp_path / f"flux_{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    cache = LoraCache(base_pipe, max_bytes=1 << 30)
    lora = ref(path)
    with cache.activate([lora]):
        ours = _output(base_pipe.transformer)
    assert cache.notices([lora[0]]) == []
    _compare(base, theirs, ours)
