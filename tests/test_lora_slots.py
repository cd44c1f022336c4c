"""LoRA slots (`pipeline.loras.slots`), uncompiled: a UNet with slots gives the images of
today's eager path (`pipeline.loras.batch`) solo and in a mixed batch, per dtype, with
LyCORIS-made files; what does not fit a slot runs the eager path and says why. The
compiled "no recompile" proof is in tests/test_compiled.py.

Tolerances (8-bit levels): fp32 ≤ 1 and fp16 ≤ 2 against the eager path (the slot path
adds x·downᵀ·upᵀ beside W·x, the eager path multiplies by W + ΔW: other rounding).
bf16's 8-bit mantissa moves the tiny model's image by several levels from fp32 with or
without LoRAs; there the slot path must stay as close to the fp32 image as the eager path
does (+ 2), and both within that floor + 4: a LoCon on every conv adds its own bf16
rounding (measured over five seeds of the files: floor 4, eager 6–8, slots 6–8).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.contract.jobs import LoraRef
from pipeline.loras import slots
from pipeline.loras.cache import LoraCache, adapter_name
from tests.conftest import level_difference
from tests.lycoris_files import make_lora
from tests.test_lora_formats import _pil
from tests.test_lora_formats import pipe_images as run

MAX_RANK = 3  # the files are rank 2 (padded in their slot) and one rank 4 (too big)
BOUND = {"float32": 1, "float16": 2}
PROMPTS = ["a cat", "a dog", "(red:1.3) sky", "a portrait"]


def _pipe(path: Path, dtype: str = "float32", with_slots: bool = False):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    if with_slots:
        slots.install(pipe.unet, slots=4, max_rank=MAX_RANK, rows=8)
    return pipe


@pytest.fixture(scope="module")
def files(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slot-loras")
    pipe = _pipe(tiny_sd)
    made = {
        "lora": ("lora", 0, 2),  # attention + text encoder
        "lora-b": ("lora", 1, 2),
        "locon": ("locon", 2, 2),  # every conv, conv_in/out, time embedding, text MLPs
        "locon-tucker": ("locon-tucker", 3, 2),
        "loha": ("loha", 4, 2),
        "lora-rank4": ("lora", 5, 4),
    }
    return {
        name: make_lora(root / f"{name}.safetensors", pipe, kind, seed=seed, rank=rank).path
        for name, (kind, seed, rank) in made.items()
    }


def ref(files, name: str, weight: float = 1.0) -> tuple[LoraRef, Path]:
    path = files[name]
    return LoraRef(name, hashlib.sha256(path.read_bytes()).hexdigest(), weight), path


def diff(a, b) -> int:
    return level_difference(_pil(a), _pil(b))


@pytest.fixture(scope="module")
def fp32(tiny_sd, files):
    """The fp32 eager pipeline and its cache: the reference images."""
    pipe = _pipe(tiny_sd)
    return pipe, LoraCache(pipe, max_bytes=1 << 30)


MIXED = [
    [("lora", 0.8)],
    [],
    [("lora-b", 1.0), ("locon-tucker", 0.5)],
    [("locon", -0.7)],
]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.filterwarnings("ignore:There are modules")
def test_slots_equal_the_eager_path_solo_and_mixed(tiny_sd, files, fp32, dtype):
    eager_pipe = fp32[0] if dtype == "float32" else _pipe(tiny_sd, dtype)
    eager = fp32[1] if dtype == "float32" else LoraCache(eager_pipe, max_bytes=1 << 30)
    pipe = _pipe(tiny_sd, dtype, with_slots=True)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    bank = slots.bank_of(pipe.unet)
    solo_kinds = ("lora", "locon", "locon-tucker") if dtype == "float32" else ("locon",)
    per_sample = [[ref(files, n, w) for n, w in sample] for sample in MIXED]
    # Solo jobs, then the mixed batch of 4 (one call), all in slots.
    solo = {}
    for name in solo_kinds:
        for which, (p, c) in (("eager", (eager_pipe, eager)), ("slots", (pipe, cache))):
            with c.activate([ref(files, name, 0.8)]):
                solo[name, which] = run(p, ["a cat"], [1])[0]
    alone = []
    for i, loras in enumerate(per_sample):
        with cache.activate(loras):
            alone.append(run(pipe, [PROMPTS[i]], [10 + i])[0])
    with cache.activate_per_sample(per_sample, cfg=True):
        mixed = run(pipe, PROMPTS, [10, 11, 12, 13])
    assert bank.stats.eager == 0 and bank.stats.calls == len(solo_kinds) + 3 + 1
    assert bank.stats.hits > 0  # a LoRA met again stays in its slot
    plain = run(pipe, ["a cat"], [1])[0]
    for name in solo_kinds:
        assert diff(solo[name, "slots"], plain) > 5, f"{name} did nothing"
    # Each sample of the mixed batch equals the same job alone.
    worst_mixed = max(diff(b, a) for b, a in zip(mixed, alone))
    assert worst_mixed <= BOUND.get(dtype, 2), (dtype, worst_mixed)
    if dtype in BOUND:
        for name in solo_kinds:
            gap = diff(solo[name, "slots"], solo[name, "eager"])
            assert gap <= BOUND[dtype], (dtype, name, gap)
        with eager.activate_per_sample(per_sample, cfg=True):
            eager_mixed = run(eager_pipe, PROMPTS, [10, 11, 12, 13])
        worst = max(diff(s, e) for s, e in zip(mixed, eager_mixed))
        assert worst <= BOUND[dtype], (dtype, worst)
        return
    # bf16: against the fp32 eager image, within bf16's own floor (no LoRA vs fp32).
    floor = diff(run(fp32[0], ["a cat"], [1])[0], plain)
    for name in solo_kinds:
        with fp32[1].activate([ref(files, name, 0.8)]):
            reference = run(fp32[0], ["a cat"], [1])[0]
        gaps = {which: diff(solo[name, which], reference) for which in ("eager", "slots")}
        assert gaps["slots"] <= gaps["eager"] + 2, (name, gaps, floor)
        assert max(gaps.values()) <= floor + 4, (name, gaps, floor)


@pytest.mark.filterwarnings("ignore:There are modules")
def test_what_does_not_fit_runs_the_eager_path_and_says_why(tiny_sd, files, fp32):
    pipe = _pipe(tiny_sd, with_slots=True)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    bank = slots.bank_of(pipe.unet)
    eager_pipe, eager = fp32
    cases = {
        "loha": [ref(files, "loha", 0.8)],
        "rank": [ref(files, "lora-rank4", 0.8)],
        "mixed": [ref(files, "lora", 0.8), ref(files, "loha", 0.5)],  # one needs eager
    }
    for name, loras in cases.items():
        with cache.activate(loras):
            got = run(pipe, ["a cat"], [1])[0]
        with eager.activate(loras):
            want = run(eager_pipe, ["a cat"], [1])[0]
        assert diff(got, want) <= BOUND["float32"], name
    # Five different UNet LoRAs in one call: more than the 4 slots.
    five = [[ref(files, n, 0.5)] for n in ("lora", "lora-b", "locon", "locon-tucker")]
    five.append([ref(files, "lora-rank4", 0.5)])
    with cache.activate_per_sample(five, cfg=True):
        pass
    assert bank.stats.calls == 0 and bank.stats.eager == len(cases) + 1
    reasons = {"loha", f"rank 4 > max_rank {MAX_RANK}", "5 UNet LoRAs > 4 slots"}
    assert set(bank.stats.reasons) == reasons
    # Nothing was left in the slots' scale rows: the next job without LoRAs is plain.
    assert not bank.scale.any()
    np.testing.assert_array_equal(run(pipe, ["a cat"], [1])[0], run(pipe, ["a cat"], [1])[0])
    assert diff(run(pipe, ["a cat"], [1])[0], run(eager_pipe, ["a cat"], [1])[0]) == 0


def test_slot_lru_evicts_the_least_recently_used_and_keeps_the_call_s_own(tiny_sd, files):
    pipe = _pipe(tiny_sd)
    bank = slots.install(pipe.unet, slots=2, max_rank=MAX_RANK, rows=4)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    a, b, c = (ref(files, n) for n in ("lora", "lora-b", "locon"))
    for loras in ([a], [b], [a], [c]):  # c evicts b (a was used more recently)
        with cache.activate(loras):
            assert bank.scale.any()
    assert list(bank._lru) == [adapter_name(a[0].sha256), adapter_name(c[0].sha256)]
    assert bank.stats.fills == 3 and bank.stats.hits == 1
    slots.uninstall(pipe.unet)
    assert slots.bank_of(pipe.unet) is None and type(pipe.unet.conv_in) is torch.nn.Conv2d


def test_slot_keys_are_parsed_and_checked():
    from pipeline.contract.config import ConfigError, config_from_dict

    base = {"models": {"default": {"source": "x"}}}
    loras = config_from_dict(base).loras
    assert (loras.slots, loras.max_rank) == (4, 32)
    assert config_from_dict({**base, "loras": {"slots": 0}}).loras.slots == 0
    for bad in ({"slots": -1}, {"max_rank": 0}, {"slots": True}, {"max_rank": 65}):
        with pytest.raises(ConfigError, match="loras.(slots|max_rank) must be a whole number"):
            config_from_dict({**base, "loras": bad})


def test_sdxl_mixed_batch_in_slots_equals_the_eager_path(tiny_xl, tmp_path):
    """SDXL: kohya's SGM-named files, the added-embedding layers, two text encoders."""
    from diffusers import StableDiffusionXLPipeline

    def pipe():
        loaded = StableDiffusionXLPipeline.from_pretrained(tiny_xl)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    eager_pipe, slot_pipe = pipe(), pipe()
    bank = slots.install(slot_pipe.unet, slots=4, max_rank=MAX_RANK, rows=8)
    files = {
        kind: make_lora(tmp_path / f"{kind}.safetensors", eager_pipe, kind, seed=seed).path
        for kind, seed in (("lora", 0), ("locon", 1))
    }
    per_sample = [[ref(files, "lora", 0.8)], [ref(files, "locon", 1.0)], []]
    images = []
    for p in (eager_pipe, slot_pipe):
        with LoraCache(p, max_bytes=1 << 30).activate_per_sample(per_sample, cfg=True):
            images.append(run(p, ["a cat"] * 3, [1, 2, 3]))
    assert bank.stats.calls == 1 and bank.stats.eager == 0
    assert max(diff(s, e) for s, e in zip(images[1], images[0])) <= BOUND["float32"]
    assert diff(images[1][1], run(slot_pipe, ["a cat"], [2])[0]) > 5  # the LoCon acted
