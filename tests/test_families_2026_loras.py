"""LoRA files for Z-Image, Qwen-Image and Flux.2 klein as people bring them, applied by our
ΔW path on the tiny models and checked against the reference applying the same file:

- ai-toolkit / ComfyUI (`diffusion_model.<module>.lora_A/B`), diffusers / peft
  (`transformer.<module>…`) and kohya / musubi-tuner (`lora_unet_<module with _>` with
  lora_down/lora_up/alpha): diffusers' own loader (`load_lora_weights`, which runs its
  `_convert_non_diffusers_*_lora_to_diffusers` converters) + `fuse_lora`;
- LoKr and LoHa, which diffusers loads for none of them: made by LyCORIS's own wrapper on
  the transformer (lycoris-lora 4.1 targets `ZImageTransformerBlock` and
  `QwenImageTransformerBlock` by name), saved by LyCORIS, compared with LyCORIS applying
  its network.

Within 1e-3 of the adapter's effect on the decoded image, as for SD and Flux.1.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.contract.jobs import LoraRef
from pipeline.loras.cache import LoraCache

RANK = 4


@pytest.fixture(scope="module")
def folders(tiny_2026) -> dict[str, Path]:
    """The tiny 2026 families' folders, shared with the other 2026 test module (conftest)."""
    return tiny_2026


def _pipe(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> torch.Tensor:
    """Two steps at 64² from a fixed seed, as floats (one step of the tiny Qwen-Image
    lands on its terminal sigma and gives NaN)."""
    with torch.no_grad():
        return pipe(
            prompt="a photo of a cat",
            num_inference_steps=2,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images


def _ref(path: Path) -> tuple[LoraRef, Path]:
    return LoraRef(path.stem, hashlib.sha256(path.read_bytes()).hexdigest(), 1.0), path


def _shapes(pipe, modules: list[str]) -> dict[str, tuple[int, int]]:
    named = dict(pipe.transformer.named_modules())
    return {m: tuple(named[m].weight.shape) for m in modules}


def _write(path: Path, shapes: dict[str, tuple[int, int]], layout: str) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for module, (out, inp) in shapes.items():
        down = torch.randn(RANK, inp, generator=g) * 0.3
        up = torch.randn(out, RANK, generator=g) * 0.3
        if layout == "kohya":
            key = "lora_unet_" + module.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
        else:
            prefix = {"ai-toolkit": "diffusion_model.", "peft": "transformer."}[layout]
            tensors |= {
                f"{prefix}{module}.lora_A.weight": down,
                f"{prefix}{module}.lora_B.weight": up,
            }
    save_file(tensors, str(path))


def _compare(base: torch.Tensor, theirs: torch.Tensor, ours: torch.Tensor) -> None:
    effect = (theirs - base).abs().max().item()
    assert effect > 1e-3  # the adapter does something here
    assert (ours - theirs).abs().max().item() <= 1e-3 * effect


MODULES = {
    "zimage": [
        "layers.0.attention.to_q",
        "layers.0.attention.to_out.0",
        "layers.1.feed_forward.w1",
    ],
    "qwen-image": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.img_mlp.net.2",
        "transformer_blocks.1.attn.add_k_proj",
    ],
    "flux2-klein": [
        "transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    ],
}
CASES = [
    ("zimage", "ai-toolkit"),
    ("zimage", "peft"),
    ("zimage", "kohya"),
    ("qwen-image", "ai-toolkit"),
    ("qwen-image", "kohya"),
    ("flux2-klein", "peft"),
]


@pytest.mark.parametrize("family, layout", CASES)
def test_lora_files_equal_diffusers_loader_and_fuse(folders, tmp_path, family, layout):
    reference = _pipe(folders[family])
    base = _image(reference)
    path = tmp_path / f"{family}_{layout}.safetensors"
    _write(path, _shapes(reference, MODULES[family]), layout)
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    theirs = _image(reference)
    pipe = _pipe(folders[family])
    cache = LoraCache(pipe, max_bytes=1 << 30)
    lora = _ref(path)
    with cache.activate([lora]):
        ours = _image(pipe)
    assert cache.notices([lora[0]]) == []  # every layer of the file was applied
    _compare(base, theirs, ours)
    assert torch.equal(_image(pipe), base)  # nothing left behind


@pytest.mark.parametrize("family", ["zimage", "qwen-image"])
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_lokr_and_loha_equal_lycoris_applying_them(folders, tmp_path, family, algo):
    import copy

    from tests.lycoris_files import randomised_transformer_network

    pipe = _pipe(folders[family])
    base = _image(pipe)
    original = pipe.transformer
    transformer = copy.deepcopy(original)
    network = randomised_transformer_network(transformer, algo)
    assert network.loras  # LyCORIS found the family's blocks by their class names
    pipe.transformer = transformer
    theirs = _image(pipe)
    pipe.transformer = original
    path = tmp_path / f"{family}_{algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    cache = LoraCache(pipe, max_bytes=1 << 30)
    lora = _ref(path)
    with cache.activate([lora]):
        ours = _image(pipe)
    assert cache.notices([lora[0]]) == []
    _compare(base, theirs, ours)
