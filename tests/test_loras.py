"""LoRAs on the tiny models: weights, the cache, mixed batches equal separate runs, and
file checks. Files are made by the lycoris-lora library and by peft
(tests/lycoris_files.py); the per-format comparison with LyCORIS itself is in
tests/test_lora_formats.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipeline.contract.jobs import LoraRef
from pipeline.families.sd_tiny import write_tiny_model
from pipeline.loras.adapters import (
    LoraCache,
    LoraError,
    lora_hash,
    read_lora_file,
    resolve_lora_names,
)
from pipeline.prompts.encoding import encode_prompts
from tests.lycoris_files import write_diffusers_lora, write_lora

KINDS = ("lora", "locon", "loha", "lokr")
PROMPT = "a photo of a cat"


def _load(path: Path, xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging

    logging.disable_progress_bar()
    pipe_class = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = pipe_class.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "sd1": write_tiny_model(root / "sd1"),
        "sdxl": write_tiny_model(root / "sdxl", xl=True),
    }


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, models) -> Path:
    """Two LyCORIS-made files of every kind for each family, and a diffusers one (SD 1.x)."""
    root = tmp_path_factory.mktemp("loras")
    for family, path in models.items():
        pipe = _load(path, family == "sdxl")
        for kind in KINDS:
            for seed in (0, 1):
                write_lora(root / f"{family}-{kind}-{seed}.safetensors", pipe, kind, seed=seed)
        if family == "sd1":
            write_diffusers_lora(root / "sd1-peft-0.safetensors", pipe)
    return root


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipe_and_cache(models, family):
    pipe = _load(models[family], family == "sdxl")
    return pipe, LoraCache(pipe, max_bytes=1 << 30)


def ref(lora_dir: Path, stem: str, weight: float = 1.0) -> tuple[LoraRef, Path]:
    path = lora_dir / f"{stem}.safetensors"
    return LoraRef(stem, hashlib.sha256(path.read_bytes()).hexdigest(), weight), path


def generate(pipe, prompts: list[str], seeds: list[int], cfg: float = 5.0) -> np.ndarray:
    embeds = encode_prompts(pipe, prompts, ["blurry"] * len(prompts))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        **embeds,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=cfg,
        generator=generators,
        output_type="np",
    ).images


def test_weight_scales_the_effect(pipe_and_cache, lora_dir, family):
    pipe, cache = pipe_and_cache
    base = generate(pipe, [PROMPT], [1])
    images = {}
    for weight in (0.0, 0.5, 1.0, -1.0):
        with cache.activate([ref(lora_dir, f"{family}-locon-1", weight)]):
            images[weight] = generate(pipe, [PROMPT], [1])
    np.testing.assert_array_equal(images[0.0], base)  # weight 0 is the plain model
    assert 0 < np.abs(images[0.5] - base).max() < np.abs(images[1.0] - base).max() * 1.5
    assert np.abs(images[0.5] - images[1.0]).max() > 1e-4
    assert np.abs(images[-1.0] - images[1.0]).max() > 1e-3
    np.testing.assert_array_equal(generate(pipe, [PROMPT], [1]), base)  # nothing left behind


def test_cached_lora_is_not_loaded_again(pipe_and_cache, lora_dir, family):
    pipe, cache = pipe_and_cache
    lora = ref(lora_dir, f"{family}-loha-1")
    with cache.activate([lora]):
        first = generate(pipe, [PROMPT], [2])
    misses, hits = cache.stats()["misses"], cache.stats()["hits"]
    with cache.activate([lora]):
        second = generate(pipe, [PROMPT], [2])
    assert cache.stats()["misses"] == misses and cache.stats()["hits"] == hits + 1
    np.testing.assert_array_equal(first, second)


def test_mixed_batch_equals_separate_runs(pipe_and_cache, lora_dir, family):
    pipe, cache = pipe_and_cache
    per_sample = [
        [ref(lora_dir, f"{family}-lora-0", 0.8)],
        [],
        [ref(lora_dir, f"{family}-loha-0", 1.0), ref(lora_dir, f"{family}-lora-1", 0.5)],
        [ref(lora_dir, f"{family}-lokr-0", -0.7), ref(lora_dir, f"{family}-locon-0", 1.2)],
    ]
    prompts = [PROMPT, "a dog", "(red:1.3) sky, [night]", "a portrait of a woman"]
    seeds = [10, 11, 12, 13]
    alone = []
    for loras, prompt, seed in zip(per_sample, prompts, seeds):
        with cache.activate(loras):
            alone.append(generate(pipe, [prompt], [seed])[0])
    with cache.activate_per_sample(per_sample, cfg=True):
        batch = generate(pipe, prompts, seeds)
    np.testing.assert_allclose(batch, np.stack(alone), atol=1e-4)
    base = generate(pipe, prompts, seeds)
    assert all(np.abs(batch[i] - base[i]).max() > 1e-3 for i in (0, 2, 3))
    np.testing.assert_allclose(batch[1], base[1], atol=1e-4)


def test_mixed_batch_without_cfg(pipe_and_cache, lora_dir, family):
    pipe, cache = pipe_and_cache
    per_sample = [[ref(lora_dir, f"{family}-lora-1", 1.0)], [ref(lora_dir, f"{family}-loha-1")]]
    alone = []
    for loras in per_sample:
        with cache.activate(loras):
            alone.append(generate(pipe, [PROMPT], [5], cfg=1.0)[0])
    with cache.activate_per_sample(per_sample, cfg=False):
        batch = generate(pipe, [PROMPT, PROMPT], [5, 5], cfg=1.0)
    np.testing.assert_allclose(batch, np.stack(alone), atol=1e-4)


def test_wrong_family_is_named(lora_dir, family):
    other = "sd1" if family == "sdxl" else "sdxl"
    path = lora_dir / f"{other}-loha-0.safetensors"
    expected = {"sd1": "SD 1.x", "sdxl": "SDXL"}
    message = f"made for {expected[other]}; this model is {expected[family]}"
    with pytest.raises(LoraError, match=message):
        read_lora_file(path, name="x", family=family, max_bytes=1 << 30)


def test_not_a_lora(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file")
    with pytest.raises(LoraError, match="'notes' is not a LoRA file"):
        read_lora_file(text, name="notes", family="sd1", max_bytes=1 << 20)
    weights = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv.weight": torch.zeros(4, 4)}, str(weights))
    with pytest.raises(LoraError, match="'model' is not a LoRA file"):
        read_lora_file(weights, name="model", family="sd1", max_bytes=1 << 20)


def test_size_limit(lora_dir):
    path = lora_dir / "sd1-lora-0.safetensors"
    with pytest.raises(LoraError, match=r"LoRA 'big' is .* MB; the limit is 0\.0 MB"):
        read_lora_file(path, name="big", family="sd1", max_bytes=1000)


def test_lru_eviction_by_device_bytes(models, lora_dir):
    pipe = _load(models["sd1"], xl=False)
    loras = [ref(lora_dir, f"sd1-{kind}-0") for kind in ("lora", "loha", "peft")]
    sizes = []
    for lora in loras:  # what each occupies beside the model
        probe = LoraCache(pipe, max_bytes=1 << 30)
        with probe.activate([lora]):
            pass
        sizes.append(probe.stats()["bytes"])
    cache = LoraCache(pipe, max_bytes=sum(sizes) - 1)
    before = generate(pipe, [PROMPT], [4])
    for lora in loras[:2]:
        with cache.activate([lora]):
            pass
    with cache.activate([loras[0]]):  # touch the first: the second is now least recent
        pass
    with cache.activate([loras[2]]):
        pass
    stats = cache.stats()
    assert stats["loaded"] == 2 and stats["bytes"] == sizes[0] + sizes[2]
    assert f"lora_{loras[1][0].sha256[:16]}" not in cache.loaded()
    np.testing.assert_array_equal(generate(pipe, [PROMPT], [4]), before)
    with cache.activate([loras[1]]):
        pass
    assert cache.stats()["misses"] == stats["misses"] + 1


def test_lora_hash_is_a1111s(lora_dir):
    path = lora_dir / "sd1-lora-0.safetensors"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[8 + header :]).hexdigest()[:12]


def test_resolve_lora_names(lora_dir):
    resolved = resolve_lora_names("a cat <lora:SD1-Lora-0:0.7> <lora:sd1-loha-1>", lora_dir)
    assert [(r.name, r.weight, p.name) for r, p in resolved] == [
        ("SD1-Lora-0", 0.7, "sd1-lora-0.safetensors"),
        ("sd1-loha-1", 1.0, "sd1-loha-1.safetensors"),
    ]
    assert resolved[0][0].sha256 == hashlib.sha256(resolved[0][1].read_bytes()).hexdigest()
    with pytest.raises(LoraError, match="LoRA 'sd1-lroa-0' not found; closest: sd1-lora-0"):
        resolve_lora_names("<lora:sd1-lroa-0>", lora_dir)
