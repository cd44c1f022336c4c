"""The memory planner (a pure function) on a table of cards × every family's real sizes.

The sizes are the published configs counted on the meta device (bench/component_sizes.py,
pipeline/contract/families/published_sizes.py); one family is recounted here to show the table is
what the configs give. Also: sizes read from a tiny model's safetensors headers."""

from __future__ import annotations

import pytest

from pipeline.contract.config import ConfigError, config_from_dict
from pipeline.contract.memory_plan import (
    CPU_LADDER,
    FAMILY_MEMORY,
    GPU_LADDER,
    GiB,
    Jobs,
    MemoryPlanError,
    components_for,
    cpu_card,
    gpu_card,
    plan_memory,
    published_components,
)

CARDS_GB = (8, 12, 16, 24, 40, 48, 80)
# The server's default limits: one 1536² image, a call of 4 such images.
JOBS = Jobs(image_pixels=1536 * 1536, call_pixels=4 * 1536 * 1536, vae_tiling_above=1024 * 1024)
SMALL_JOBS = Jobs(image_pixels=1024 * 1024, call_pixels=1024 * 1024, vae_tiling_above=1024 * 1024)


def card(gb: float, free: float | None = None):
    return gpu_card(f"{gb} GB card", int(gb * GiB), int((free if free is not None else gb) * GiB))


def plan(family, gb, jobs=JOBS, setting="auto"):
    return plan_memory(family, family, published_components(family), card(gb), jobs, setting)


# Expected (denoiser mode, text encoders) per family and card, at the default limits.
EXPECTED = {
    "sd1": {gb: ("full", "device") for gb in CARDS_GB},
    "sdxl": {8: ("sequential", "sequential"), 12: ("full", "offload"),
             **{gb: ("full", "device") for gb in (16, 24, 40, 48, 80)}},
    "flux1": {8: ("group", "cpu"), 12: ("group", "offload"), 16: ("group", "offload"),
              24: ("fp8-offload", "offload"), 40: ("full", "device"), 48: ("full", "device"),
              80: ("full", "device")},
    "zimage": {12: ("group", "offload"), 16: ("fp8", "offload"), 24: ("full", "offload"),
               40: ("full", "device"), 48: ("full", "device"), 80: ("full", "device")},
    "qwen_image": {8: ("group", "cpu"), 12: ("group", "cpu"), 16: ("group", "cpu"),
                   24: ("group", "offload"), 40: ("fp8", "offload"), 48: ("fp8", "device"),
                   80: ("full", "device")},
    # klein at its measured 21 widths per token (DECISIONS "#26 (stop 29)"): the largest
    # job's activations take 9B off 8 GB's group offload and 4B off 12 GB's model offload.
    "flux2_klein_4b": {8: ("group", "cpu"), 12: ("fp8-offload", "offload"),
                       16: ("fp8", "offload"), 24: ("full", "device"), 40: ("full", "device"),
                       48: ("full", "device"), 80: ("full", "device")},
    "flux2_klein_9b": {8: ("sequential", "sequential"), 12: ("group", "cpu"),
                       16: ("group", "cpu"), 24: ("fp8-offload", "offload"),
                       40: ("full", "offload"), 48: ("full", "device"), 80: ("full", "device")},
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_family_on_each_card_gets_the_expected_plan(family):
    for gb in CARDS_GB:
        if gb not in EXPECTED[family]:
            with pytest.raises(MemoryPlanError):
                plan(family, gb)
            continue
        chosen = plan(family, gb)
        assert (chosen.mode, chosen.text_encoders) == EXPECTED[family][gb], (family, gb)
        assert chosen.peak <= chosen.card.budget <= chosen.card.total


@pytest.mark.parametrize("family", sorted(FAMILY_MEMORY))
@pytest.mark.parametrize("jobs", [JOBS, SMALL_JOBS])
def test_more_memory_never_gives_a_worse_plan(family, jobs):
    rank = {step: i for i, step in enumerate(GPU_LADDER)}
    previous = len(GPU_LADDER)
    for gb in (6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 141):
        try:
            chosen = plan(family, gb, jobs)
        except MemoryPlanError:
            assert previous == len(GPU_LADDER), f"{family} fitted a smaller card than {gb} GB"
            continue
        now = rank[chosen.mode, chosen.text_encoders]
        assert now <= previous, f"{family}: {gb} GB chose {chosen.mode} after a better plan"
        assert chosen.peak <= chosen.card.budget
        previous = now


def test_the_reason_names_the_card_the_parts_and_the_peak():
    chosen = plan("flux1", 24)
    assert chosen.reason.startswith("flux1 on 24 GB card 24.0 GB: transformer fp8 (")
    assert "with model CPU offload" in chosen.reason and "VAE tiled above 1024²" in chosen.reason
    assert chosen.reason.endswith(f"est. peak {chosen.peak / GiB:.1f} GB")
    fp8 = next(p for p in chosen.placements if p.component == "transformer")
    full = next(c for c in published_components("flux1") if c.name == "transformer")
    assert fp8.weights == "fp8" and fp8.bytes < 0.7 * full.params * 2


def test_fp8_weights_are_what_diffusers_casts():
    """Layerwise casting keeps norms and modulation layers in bf16: Flux's fp8 transformer is
    8.65 B fp8 + 3.25 B bf16 parameters, not 11.9 GB."""
    transformer = next(c for c in published_components("flux1") if c.name == "transformer")
    assert transformer.params == 11_901_408_320
    assert transformer.fp8_params == 8_653_744_128


def test_a_forced_plan_that_cannot_fit_is_one_line_naming_model_card_sizes():
    with pytest.raises(MemoryPlanError) as error:
        plan("flux1", 24, setting="full")
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(
        "flux1 does not fit 24 GB card 24.0 GB (24.0 GB free) with memory = 'full'"
    )
    assert "transformer 22.2 GB" in text and "a 40 GB card would do" in text
    assert 'memory = "auto" picks a plan that fits' in text


def test_a_model_that_fits_no_plan_names_the_smallest_card_that_would_do():
    with pytest.raises(MemoryPlanError) as error:
        plan("zimage", 8)
    assert "a 12 GB card would do" in str(error.value)
    assert plan("zimage", 12).fits


def test_free_memory_not_total_is_what_counts():
    assert plan("sdxl", 24).mode == "full"
    busy = plan_memory("sdxl", "sdxl", published_components("sdxl"), card(24, free=8), JOBS)
    assert (busy.mode, busy.text_encoders) == ("sequential", "sequential")


def test_the_cpu_worker_plans_against_ram_in_float32():
    comps = published_components("sd1")
    ram = cpu_card(24 * GiB, 20 * GiB)
    chosen = plan_memory("sd15", "sd1", comps, ram, JOBS)
    assert (chosen.mode, chosen.card.compute_dtype) == ("full", "fp32")
    assert (chosen.mode, chosen.text_encoders) in CPU_LADDER
    big = cpu_card(64 * GiB, 48 * GiB)
    flux = plan_memory("flux1", "flux1", published_components("flux1"), big, SMALL_JOBS)
    assert flux.mode == "fp8"  # 11.9 B in fp32 is 44 GB; fp8 storage (+ T5 17.7 GB) fits 48
    with pytest.raises(MemoryPlanError, match="needs about .* of free RAM"):
        plan_memory("qwen", "qwen_image", published_components("qwen_image"), ram, JOBS)


def test_the_vae_tiling_threshold_drops_when_the_decode_would_not_fit():
    roomy = plan("sdxl", 80)
    assert roomy.vae_tiling_above == 1024 * 1024  # the configured threshold
    tight = plan_memory("sdxl", "sdxl", published_components("sdxl"), card(12), JOBS)
    assert tight.vae_tiling_above <= 1024 * 1024


def test_the_published_table_is_what_the_configs_give():
    """SD 1.5 recounted from bench/configs on the meta device (seconds)."""
    import json
    from pathlib import Path

    from accelerate import init_empty_weights

    from bench.component_sizes import FAMILIES, build, meta_tensors
    from pipeline.contract.families.weight_sizes import size_of

    configs = Path(__file__).parents[1] / "bench" / "configs"
    for name, (kind, file, dtype) in FAMILIES["sd1"].items():
        with init_empty_weights():
            model = build(kind, json.loads((configs / file).read_text()))
        counted = size_of(name, meta_tensors(model, dtype), ("norm",) if name == "unet" else ())
        assert counted == next(c for c in published_components("sd1") if c.name == name)


def test_sizes_from_a_tiny_models_headers_match_its_modules(tiny_sd):
    import torch
    from diffusers import UNet2DConditionModel

    config = config_from_dict({"models": {"tiny": {"source": str(tiny_sd)}}})
    comps, where = components_for(config.models[0], "sd1")
    assert where == "files"
    assert {c.name for c in comps} == {"unet", "text_encoder", "vae"}
    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")
    size = next(c for c in comps if c.name == "unet")
    assert size.params == sum(p.numel() for p in unet.parameters())
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert size.fp8_params == sum(
        p.numel() for p in unet.parameters() if p.dtype == torch.float8_e4m3fn
    )


def test_the_memory_key_is_checked():
    ok = config_from_dict({"models": {"m": {"source": "x", "memory": "fp8"}}})
    assert ok.models[0].memory == "fp8"
    with pytest.raises(ConfigError, match=r"\[models.m\] memory must be one of auto, full"):
        config_from_dict({"models": {"m": {"source": "x", "memory": "tiny"}}})


def test_every_configurable_family_has_memory_figures_and_a_published_plan():
    """A model configured with `family = "flux"` (the registry's names, not the published
    tables' keys) is planned with its own family's figures."""
    from pipeline.contract.families import FAMILIES
    from pipeline.contract.families.memory import family_memory

    assert family_memory("flux") is FAMILY_MEMORY["flux1"]
    assert family_memory("qwen-image-edit-plus") is FAMILY_MEMORY["qwen_image"]
    assert family_memory("flux2-klein") is FAMILY_MEMORY["flux2_klein_4b"]
    for name, spec in FAMILIES.items():
        if name == "sd2":
            continue
        profile = spec.memory_profile or name
        assert profile in FAMILY_MEMORY, name
        chosen = plan_memory(
            name,
            name,
            published_components(profile),
            gpu_card("24 GB", 24 * GiB, 24 * GiB),
            SMALL_JOBS,
        )
        assert chosen.peak <= chosen.card.budget, name


# -- #26 (stop 29): what the estimate counts, per phase ---------------------------------


@pytest.mark.parametrize("family", sorted(FAMILY_MEMORY))
def test_the_peak_is_the_largest_phase_and_each_phase_is_named(family):
    chosen = plan(family, 80, SMALL_JOBS)
    assert [name for name, _ in chosen.phases] == ["encode", "denoise", "decode"]
    assert chosen.peak == max(size for _, size in chosen.phases)


def test_the_text_tokens_counted_are_the_prompt_limit_each_family_reads():
    """The joint-attention families attend over the prompt's tokens: the planner counts as
    many as the family's prompt encoder reads at most (its max_sequence_length)."""
    from pipeline.contract.families import FAMILIES
    from pipeline.contract.families.memory import family_memory

    for name, spec in FAMILIES.items():
        limit = getattr(spec, "max_prompt_tokens", None) or getattr(spec, "t5_tokens", None)
        if limit is None:  # SD 1.x / SDXL: 77 CLIP tokens in cross-attention, not counted
            continue
        assert family_memory(name).text_tokens == limit, name


def test_a_3d_vae_decode_counts_its_unfolded_convs_on_the_cpu_only():
    """Qwen-Image's VAE is a 3-D (video) one: on the CPU torch's slow_conv3d unfolds each
    conv's input (3×3×3 × width values per pixel; with the padded and cached frames 32
    widths); CUDA's convolutions do not."""
    qwen = published_components("qwen_image")
    flux = published_components("flux1")
    ram = cpu_card(512 * GiB, 512 * GiB)
    gpu = gpu_card("big", 512 * GiB, 512 * GiB, compute_dtype="fp32")

    def decode(family, components, where):
        chosen = plan_memory(family, family, components, where, SMALL_JOBS, "full")
        return dict(chosen.phases)["decode"]

    vae_width = FAMILY_MEMORY["qwen_image"].vae_width
    unfolded = 1024 * 1024 * vae_width * FAMILY_MEMORY["qwen_image"].vae_cpu_unfold * 4
    assert decode("qwen_image", qwen, ram) - decode("qwen_image", qwen, gpu) == pytest.approx(
        unfolded, rel=1e-6
    )
    assert decode("flux1", flux, ram) == decode("flux1", flux, gpu)


def test_a_forced_text_encoder_placement_plans_that_ladder_step():
    """bench_memory_plan measures every step of the ladder: (mode, text encoders) forced."""
    parts = published_components("flux1")
    chosen = plan_memory("flux1", "flux1", parts, card(80), SMALL_JOBS, "offload", "cpu")
    assert (chosen.mode, chosen.text_encoders) == ("offload", "cpu")
    moved = plan_memory("flux1", "flux1", parts, card(80), SMALL_JOBS, "offload")
    assert moved.text_encoders == "offload"
    assert dict(chosen.phases)["encode"] < dict(moved.phases)["encode"]  # T5 not on the card
    with pytest.raises(MemoryPlanError, match="text encoders 'cpu'"):  # not a ladder step
        plan_memory("flux1", "flux1", parts, card(80), SMALL_JOBS, "full", "cpu")
