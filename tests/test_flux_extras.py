"""Flux.1's extras on the tiny random-weight models: the XLabs and BFL control-LoRA key
layouts, ControlNets and Control models, and Redux as the `reference` image.

LoRA files are written in the key layout diffusers' own converters read
(`_convert_xlabs_flux_lora_to_diffusers`, `_convert_bfl_flux_control_lora_to_diffusers`)
and the reference is diffusers reading them: `load_lora_weights` + `fuse_lora` on the
tiny model where the converter takes the tiny model's sizes (XLabs), and the converter's
own output at the 12B layout where it hard-codes the 12B model's (BFL: 19 + 38 blocks,
width 3072).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.loras.cache import LoraCache
from pipeline.loras.formats import LoraError, map_lora, read_lora_file
from tests.test_flux_loras import (
    INNER,
    MLP,
    RANK,
    _compare,
    _diffusers_loader_and_fuse,
    _output,
    _pipe,
    flux_dir,  # noqa: F401  (the module's tiny Flux.1 dev)
    ours_applying,
    ref,
)

# --- LoRA key layouts ------------------------------------------------------------------


def _xlabs(path: Path, prefix: str) -> None:
    """An XLabs Flux.1 LoRA for the tiny model (`double_blocks.N.processor.qkv_lora1.down.
    weight` …, no alpha), in the names and shapes diffusers' XLabs converter reads: the
    qkv processors' `up` split in three, `proj_lora` on the single blocks' linear2."""
    g = torch.Generator().manual_seed(21)
    layers = {
        "double_blocks.0.processor.qkv_lora1": (3 * INNER, INNER),
        "double_blocks.0.processor.qkv_lora2": (3 * INNER, INNER),
        "double_blocks.0.processor.proj_lora1": (INNER, INNER),
        "double_blocks.0.processor.proj_lora2": (INNER, INNER),
        "single_blocks.0.processor.qkv_lora": (3 * INNER, INNER),
        "single_blocks.0.processor.proj_lora": (INNER, INNER + MLP),
    }
    tensors = {}
    for name, (out, inp) in layers.items():
        tensors[f"{prefix}{name}.down.weight"] = torch.randn(RANK, inp, generator=g) * 0.3
        tensors[f"{prefix}{name}.up.weight"] = torch.randn(out, RANK, generator=g) * 0.3
    save_file(tensors, str(path))


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_lora_equals_diffusers_loader_and_fuse(flux_dir, tmp_path, prefix):  # noqa: F811
    path = tmp_path / "xlabs_flux.safetensors"
    _xlabs(path, prefix)
    with pytest.raises(LoraError, match=r"^LoRA 'x' was made for Flux.1; this model is SDXL$"):
        read_lora_file(path, name="x", family="sdxl", max_bytes=1 << 30)
    base, theirs = _diffusers_loader_and_fuse(flux_dir, path)
    _, ours = ours_applying(flux_dir, path)
    _compare(base, theirs, ours)


def _output_of(pipe, rows: int = 1):
    return _output(pipe.transformer, rows)


# BFL's 12B Flux.1 layout, as `_convert_bfl_flux_control_lora_to_diffusers` reads it.
BFL_INNER, BFL_MLP, BFL_DOUBLE, BFL_SINGLE, BFL_HEAD = 3072, 12288, 19, 38, 128


def _bfl_layers(in_channels: int) -> dict[str, tuple[int, int]]:
    """BFL's layer → (out, in) of a FLUX.1 Canny/Depth control LoRA's every LoRA layer."""
    d, m = BFL_INNER, BFL_MLP
    layers = {
        "img_in": (d, in_channels),
        "txt_in": (d, 4096),
        "time_in.in_layer": (d, 256),
        "time_in.out_layer": (d, d),
        "vector_in.in_layer": (d, 768),
        "vector_in.out_layer": (d, d),
        "guidance_in.in_layer": (d, 256),
        "guidance_in.out_layer": (d, d),
        "final_layer.linear": (64, d),
        "final_layer.adaLN_modulation.1": (2 * d, d),
    }
    for i in range(BFL_DOUBLE):
        for stream in ("img", "txt"):
            at = f"double_blocks.{i}.{stream}_"
            layers |= {
                at + "mod.lin": (6 * d, d),
                at + "attn.qkv": (3 * d, d),
                at + "attn.proj": (d, d),
                at + "mlp.0": (m, d),
                at + "mlp.2": (d, m),
            }
    for i in range(BFL_SINGLE):
        at = f"single_blocks.{i}."
        layers |= {
            at + "modulation.lin": (3 * d, d),
            at + "linear1": (3 * d + m, d),
            at + "linear2": (d, d + m),
        }
    return layers


def _bfl_control_lora(path: Path, rank: int = 2) -> None:
    """A FLUX.1-Canny/Depth-dev-lora file in BFL's layout: `lora_A`/`lora_B` with B's bias
    on every layer, `img_in` reading 128 channels (latents + control latents), and the
    trained qk-norm scales; small values, rank 2, at the 12B model's shapes."""
    g = torch.Generator().manual_seed(31)
    tensors = {}
    for name, (out, inp) in _bfl_layers(128).items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.02
        tensors[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
        tensors[f"{name}.lora_B.bias"] = torch.randn(out, generator=g) * 0.02
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(BFL_DOUBLE) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(BFL_SINGLE)]
    for norm in norms:
        for which in ("query_norm", "key_norm"):
            tensors[f"{norm}.{which}.scale"] = 1 + torch.randn(BFL_HEAD, generator=g) * 0.1
    save_file(tensors, str(path))


# The layers whose values are compared (every layer's name is): each kind of mapping.
CHECKED = (
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.text_embedder.linear_1",
    "proj_out",
    "norm_out.linear",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.norm_added_k",
    f"transformer_blocks.{BFL_DOUBLE - 1}.attn.to_out.0",
    f"single_transformer_blocks.{BFL_SINGLE - 1}.proj_mlp",
    f"single_transformer_blocks.{BFL_SINGLE - 1}.attn.norm_q",
)


def _meta_12b_control_pipe(flux_dir: Path):  # noqa: F811
    """A FluxControlPipeline holding the 12B control transformer (in_channels 128, as
    FLUX.1-Canny-dev's) on the meta device: its module names and shapes, no weights."""
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    small = _pipe(flux_dir)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(in_channels=128, out_channels=64, guidance_embeds=True)
    parts = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return FluxControlPipeline(**{p: getattr(small, p) for p in parts}, transformer=transformer)


def test_bfl_control_lora_maps_as_diffusers_converter_reads_it(flux_dir, tmp_path):  # noqa: F811
    """Every layer of a BFL control LoRA lands where diffusers' converter puts it, and
    its ΔW (and Δbias, and the norms' new weights) equals what `fuse_lora` adds: B·A at
    scale 1 (no alpha), B's bias, the scale replacing the RMSNorm's weight. Checked on the
    layers that show each kind of mapping (ΔW at 12B sizes costs time): a part of a split
    qkv and linear1, the swapped final modulation, the norms, the embedders.

    One exception, in diffusers: for the final layer's modulation its converter swaps the
    (shift, scale) halves of lora_A's *rank* rows as well as lora_B's output rows, which
    pairs B's columns with other ranks' rows of A; BFL's layer is ΔW with its output
    halves swapped (`swap_scale_shift(B·A)`), so that layer's reference un-swaps A."""
    from diffusers import FluxPipeline
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    path = tmp_path / "flux1-canny-dev-lora.safetensors"
    _bfl_control_lora(path)
    converted = FluxPipeline.lora_state_dict(str(path))  # diffusers' reading of the file
    converted = converted[0] if isinstance(converted, tuple) else converted
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        module, _, param = key.removeprefix("transformer.").rpartition(".")
        if param == "weight" and not module.endswith(("lora_A", "lora_B")):  # a norm
            expected.setdefault(module, {})["set"] = tensor
        else:
            layer, _, factor = module.rpartition(".")
            expected.setdefault(layer, {})[f"{factor}.{param}"] = tensor
    pipe = _meta_12b_control_pipe(flux_dir)
    lora = read_lora_file(path, name="canny", family="flux", max_bytes=1 << 31)
    assert (lora.family, lora.format) == ("flux", "lora+set")
    mapped = map_lora(lora, pipe)
    assert mapped.unmatched == []
    assert {p for _, p in mapped.layers} == set(expected)
    modules = dict(pipe.transformer.named_modules())
    for path_ in CHECKED:
        delta = mapped.layers[("transformer", path_)]
        module, theirs = modules[path_], expected[path_]
        zero = torch.zeros(module.weight.shape)  # W = 0: W + ΔW is what the layer gets
        bias = torch.zeros(module.bias.shape) if getattr(module, "bias", None) is not None else None
        diff, diff_b = delta.delta(zero, bias)
        if "set" in theirs:
            torch.testing.assert_close(diff, theirs["set"], rtol=0, atol=0)
            continue
        down = theirs["lora_A.weight"]
        if path_ == "norm_out.linear":
            down = swap_scale_shift(down)
        torch.testing.assert_close(diff, theirs["lora_B.weight"] @ down, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(diff_b, theirs["lora_B.bias"], rtol=1e-6, atol=0)


def test_a_control_lora_on_a_model_without_the_control_input_is_refused(flux_dir, tmp_path):  # noqa: F811
    """A BFL Canny/Depth LoRA widens `img_in` to the control latents: on a dev model (64
    input channels) it is refused in one line, not applied without its input layer."""
    g = torch.Generator().manual_seed(2)
    tensors = {
        "img_in.lora_A.weight": torch.randn(RANK, 128, generator=g),
        "img_in.lora_B.weight": torch.randn(INNER, RANK, generator=g),
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(RANK, INNER, generator=g),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(INNER, RANK, generator=g),
    }
    path = tmp_path / "canny_lora.safetensors"
    save_file(tensors, str(path))
    pipe = _pipe(flux_dir)
    lora = ref(path)
    with (
        pytest.raises(
            LoraError,
            match=r"^LoRA 'canny_lora' is a Flux.1 Control LoRA \(Canny/Depth: its input reads 128 "
            r"channels, this model's 64\); it works on a Flux.1 control model",
        ),
        LoraCache(pipe, max_bytes=1 << 30).activate([lora]),
    ):
        pass


def _diffusers_image(pipe, **inputs):
    """The plain diffusers pipeline's image at the test jobs' settings (tests/test_flux.py's
    `spec`: 64², 4 steps, seed 7) and `inputs`."""
    from tests.test_flux import generators

    pipe.set_progress_bar_config(disable=True)
    settings = dict(prompt="a photo of a cat", width=64, height=64, num_inference_steps=4)
    return pipe(**{**settings, "generator": generators(), **inputs}).images[0]


# --- ControlNets ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_control(flux_dir, tmp_path_factory):  # noqa: F811
    """The tiny dev model with three ControlNet units: InstantX's layout, a Union
    (configured with tile_resample, its mode 1), XLabs' pixel-input layout."""
    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.control.apply import ControlCache
    from pipeline.families.flux_tiny import write_tiny_flux_controlnet
    from pipeline.models.loading import ModelCache
    from tests.conftest import png_of
    from tests.test_flux import photo

    root = tmp_path_factory.mktemp("flux_control")
    nets = {
        "instantx": write_tiny_flux_controlnet(flux_dir, root / "instantx"),
        "union": write_tiny_flux_controlnet(flux_dir, root / "union", union=True),
        "xlabs": write_tiny_flux_controlnet(flux_dir, root / "xlabs", hint=True),
    }
    units = {
        name: {"source": str(path), "family": "flux", "preprocessor": "none"}
        for name, path in nets.items()
    }
    units["union"]["preprocessor"] = "tile_resample"
    config = config_from_dict(
        {
            "models": {"flux": {"source": str(flux_dir), "family": "flux"}},
            "controlnets": units,
        }
    )
    model = ModelCache(config, "cpu").get()
    blobs = BlobStore(root / "blobs")
    image = photo(seed=4)
    return model, ControlCache(config), blobs, blobs.put(png_of(image), ".png"), image, nets


def _controlled(flux_control, unit, **changes):
    from pipeline.generate.modes import run_generation
    from tests.test_flux import image_of, spec

    model, cache, blobs, *_ = flux_control
    job = spec(control=(unit,), **changes)
    return image_of(run_generation(model, [job], blobs=blobs, control=cache)[0][0])


@pytest.mark.parametrize(
    "name,mode",
    [("instantx", None), ("union", 1), ("xlabs", None)],
    ids=["instantx", "union", "xlabs"],
)
def test_a_controlnet_unit_equals_flux_controlnet_pipeline(flux_control, flux_dir, name, mode):  # noqa: F811
    """A unit through our ControlNet path (its map, the family's stack) equals diffusers'
    FluxControlNetPipeline given the same control image (and the Union's mode number)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from pipeline.contract.control import ControlUnit
    from tests.conftest import level_difference
    from tests.test_flux import SAME_LEVELS

    sha, image, nets = flux_control[3], flux_control[4], flux_control[5]
    ours = _controlled(flux_control, ControlUnit(name, sha, weight=0.8))
    pipe = FluxControlNetPipeline.from_pretrained(
        flux_dir, controlnet=FluxControlNetModel.from_pretrained(nets[name])
    )
    theirs = _diffusers_image(
        pipe,
        control_image=image,
        control_mode=mode,
        controlnet_conditioning_scale=0.8,
        guidance_scale=3.5,
    )
    assert level_difference(ours, theirs) <= SAME_LEVELS
    without = _controlled(flux_control, ControlUnit(name, sha, weight=0.0))
    assert level_difference(ours, without) > 10  # the unit does something here


def test_a_controlnet_unit_on_img2img_equals_flux_controlnet_img2img_pipeline(
    flux_control, flux_dir
):  # noqa: F811
    from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetModel

    from pipeline.contract.control import ControlUnit
    from tests.conftest import level_difference, png_of
    from tests.test_flux import SAME_LEVELS, photo

    blobs, sha, image, nets = flux_control[2], flux_control[3], flux_control[4], flux_control[5]
    source = photo(seed=6)
    unit = ControlUnit("instantx", sha, weight=0.8)
    job = dict(mode="img2img", image=blobs.put(png_of(source), ".png"), strength=0.6)
    ours = _controlled(flux_control, unit, **job)
    pipe = FluxControlNetImg2ImgPipeline.from_pretrained(
        flux_dir, controlnet=FluxControlNetModel.from_pretrained(nets["instantx"])
    )
    theirs = _diffusers_image(
        pipe,
        image=source,
        strength=0.6,
        control_image=image,
        controlnet_conditioning_scale=0.8,
        guidance_scale=3.5,
    )
    assert level_difference(ours, theirs) <= SAME_LEVELS


def test_a_controlnet_unit_on_inpaint_equals_flux_controlnet_inpaint_pipeline(
    flux_control,
    flux_dir,  # noqa: F811
):
    from diffusers import FluxControlNetInpaintPipeline, FluxControlNetModel

    from pipeline.contract.control import ControlUnit
    from pipeline.generate.modes import paste_back
    from tests.conftest import level_difference
    from tests.test_flux import SAME_LEVELS, _mask, inpaint_job, photo

    blobs, sha, image, nets = flux_control[2], flux_control[3], flux_control[4], flux_control[5]
    source, mask = photo(seed=8), _mask()
    job = inpaint_job(blobs, source, mask, 0.9)
    unit = ControlUnit("instantx", sha, weight=0.8)
    fields = {k: getattr(job, k) for k in ("mode", "image", "mask", "strength", "mask_blur")}
    ours = _controlled(flux_control, unit, only_masked=False, **fields)
    pipe = FluxControlNetInpaintPipeline.from_pretrained(
        flux_dir, controlnet=FluxControlNetModel.from_pretrained(nets["instantx"])
    )
    painted = _diffusers_image(
        pipe,
        image=source,
        mask_image=mask,
        strength=0.9,
        control_image=image,
        controlnet_conditioning_scale=0.8,
        guidance_scale=3.5,
    )
    theirs = paste_back(source, painted, (0, 0, 64, 64), mask)
    assert level_difference(ours, theirs) <= SAME_LEVELS


def _texts_seen(net) -> tuple[list, object]:
    """What each call of a ControlNet is given as text (T5 states, CLIP's pooled
    vector), recorded by a forward pre-hook; and the hook's handle."""
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(), kwargs["pooled_projections"].clone()))

    return seen, net.register_forward_pre_hook(record, with_kwargs=True)


def test_a_controlnet_sees_each_step_s_text_under_prompt_editing(flux_control, flux_dir):  # noqa: F811
    """`a [cat:dog:0.5]` over 4 steps is "a cat" at steps 0–2 and "a dog" at step 3
    (A1111's prompt_parser: the first text whose end step the step has not passed). Our
    ControlNet is given, step by step, the texts diffusers' FluxControlNetPipeline gives
    its ControlNet when handed "a cat"'s embeddings and switched to "a dog"'s after step
    2 by `callback_on_step_end` (whose `prompt_embeds` the pipeline passes to the
    ControlNet and the transformer alike; CLIP's pooled vector, not among the callback's
    tensors, is switched in place); and the images are within 1 level."""
    import torch
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    from pipeline.contract.control import ControlUnit
    from tests.conftest import level_difference
    from tests.test_flux import generators

    model, cache, sha, image, nets = (flux_control[i] for i in (0, 1, 3, 4, 5))
    unit = ControlUnit("instantx", sha, weight=0.8)
    ours_net = cache.nets(model).get("instantx", model.pipe.transformer, model.family)
    ours_seen, hook = _texts_seen(ours_net)
    try:
        ours = _controlled(flux_control, unit, prompt="a [cat:dog:0.5]")
    finally:
        hook.remove()
    pipe = FluxControlNetPipeline.from_pretrained(
        flux_dir, controlnet=FluxControlNetModel.from_pretrained(nets["instantx"])
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cat, cat_pooled, _ = pipe.encode_prompt("a cat", "a cat", max_sequence_length=512)
        dog, dog_pooled, _ = pipe.encode_prompt("a dog", "a dog", max_sequence_length=512)
    pooled = cat_pooled.clone()

    def to_dog_after_step_2(pipe, step, timestep, tensors):
        if step != 2:
            return {}
        pooled.copy_(dog_pooled)
        return {"prompt_embeds": dog}

    theirs_seen, hook = _texts_seen(pipe.controlnet)
    try:
        theirs = pipe(
            prompt_embeds=cat,
            pooled_prompt_embeds=pooled,
            control_image=image,
            controlnet_conditioning_scale=0.8,
            guidance_scale=3.5,
            width=64,
            height=64,
            num_inference_steps=4,
            generator=generators(),
            callback_on_step_end=to_dog_after_step_2,
            callback_on_step_end_tensor_inputs=["prompt_embeds"],
        ).images[0]
    finally:
        hook.remove()
    assert len(ours_seen) == len(theirs_seen) == 4
    for step, ((text, vector), (their_text, their_vector)) in enumerate(
        zip(ours_seen, theirs_seen)
    ):
        assert torch.allclose(text, their_text, atol=1e-5), step
        assert torch.allclose(vector, their_vector, atol=1e-5), step
    assert not torch.allclose(ours_seen[3][0], ours_seen[0][0], atol=1e-3)  # it switched
    assert level_difference(ours, theirs) <= 1


def test_flux_controlnet_refusals(flux_control):
    from pipeline.contract.control import ControlUnit
    from pipeline.contract.jobs import JobError

    sha = flux_control[3]
    with pytest.raises(JobError, match=r"^Flux.1 ControlNets have no control mode 'My prompt"):
        _controlled(
            flux_control, ControlUnit("instantx", sha, control_mode="My prompt is more important")
        )
    with pytest.raises(
        JobError,
        match=r"^a Flux.1 union ControlNet needs to know the map's kind, and 'invert' is none "
        r"it knows: pick canny, tile_resample, depth, openpose$",
    ):
        _controlled(flux_control, ControlUnit("union", sha, preprocessor="invert"))


# --- Control models (Flux Tools Canny / Depth) ----------------------------------------


def test_a_canny_control_model_draws_from_the_photos_edges_as_flux_control_pipeline(tmp_path):
    """A configured FLUX.1-Canny-dev-shaped model (transformer in_channels 128) is the
    control variant: img2img gives it the photo, whose canny map is FluxControlPipeline's
    `control_image`; txt2img is refused in one line."""
    from diffusers import FluxControlPipeline
    from PIL import ImageOps

    from pipeline.contract.config import ConfigError, config_from_dict
    from pipeline.contract.families import family_of_model
    from pipeline.contract.jobs import JobError
    from pipeline.control.preprocessors import run_preprocessor
    from pipeline.families.flux_tiny import write_tiny_flux
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from tests.conftest import level_difference, png_of
    from tests.test_flux import SAME_LEVELS, Blobs, image_of, photo, spec

    folder = write_tiny_flux(tmp_path / "canny-dev", variant="control")
    config = config_from_dict({"models": {"canny": {"source": str(folder)}}})
    found = family_of_model(config.model("canny"))
    assert (found.label, found.variant, found.default_guidance) == (
        "Flux.1 Control",
        "control",
        10.0,
    )
    with pytest.raises(
        JobError, match=r"^Flux.1 Control models draw from a photo's edges or depth"
    ):
        found.check_job(spec())
    model = ModelCache(config, "cpu").get()
    blobs = Blobs()
    source = photo(seed=5)
    job = spec(mode="img2img", image=blobs.put(png_of(source)), strength=0.7)
    found.check_job(job)
    ours = image_of(run_generation(model, [job], blobs=blobs)[0][0])
    edges = run_preprocessor("canny", source, threshold_a=100, threshold_b=200)
    pipe = FluxControlPipeline.from_pretrained(folder)
    theirs = _diffusers_image(pipe, control_image=edges.resize((64, 64)), guidance_scale=10.0)
    assert level_difference(ours, theirs) <= SAME_LEVELS
    # The admin may name the preprocessor (a folder not called after its kind).
    values = {"source": str(folder), "control_preprocessor": "invert"}
    inverted = ModelCache(config_from_dict({"models": {"m": values}}), "cpu").get()
    ours = image_of(run_generation(inverted, [job], blobs=blobs)[0][0])
    theirs = _diffusers_image(pipe, control_image=ImageOps.invert(source), guidance_scale=10.0)
    assert level_difference(ours, theirs) <= SAME_LEVELS
    with pytest.raises(ConfigError, match=r"unknown control_preprocessor 'edges'; known: none"):
        config_from_dict({"models": {"m": {**values, "control_preprocessor": "edges"}}})


# --- Redux as the reference image -----------------------------------------------------


def test_redux_reference_equals_flux_prior_redux_feeding_flux_pipeline(flux_dir, tmp_path):  # noqa: F811
    """`reference` on Flux.1 is Redux, configured as an [ip_adapters] entry of family flux:
    equal to diffusers' FluxPriorReduxPipeline (given the base's text encoders, as
    diffusers documents Redux with a prompt) feeding FluxPipeline its prompt_embeds."""
    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    from pipeline.contract.config import config_from_dict
    from pipeline.contract.control import Reference
    from pipeline.control.apply import ControlCache
    from pipeline.families.flux_tiny import write_tiny_flux_redux
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from tests.conftest import level_difference, png_of
    from tests.test_flux import SAME_LEVELS, Blobs, image_of, photo, spec

    redux = write_tiny_flux_redux(tmp_path / "redux")
    config = config_from_dict(
        {
            "models": {"flux": {"source": str(flux_dir), "family": "flux"}},
            "ip_adapters": {"redux": {"source": str(redux), "family": "flux"}},
        }
    )
    model = ModelCache(config, "cpu").get()
    blobs, image = Blobs(), photo(seed=9)
    job = spec(reference=Reference("redux", (blobs.put(png_of(image)),), 0.9))
    cache = ControlCache(config)
    outputs = run_generation(model, [job], blobs=blobs, control=cache)[0]
    ours = image_of(outputs[0])
    base = FluxPipeline.from_pretrained(flux_dir)
    base.set_progress_bar_config(disable=True)
    encoders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    prior = FluxPriorReduxPipeline.from_pretrained(redux, **{e: getattr(base, e) for e in encoders})
    got = prior(
        image=image,
        prompt="a photo of a cat",
        prompt_embeds_scale=0.9,
        pooled_prompt_embeds_scale=0.9,
    )
    theirs = _diffusers_image(
        base,
        prompt=None,
        prompt_embeds=got.prompt_embeds,
        pooled_prompt_embeds=got.pooled_prompt_embeds,
        guidance_scale=3.5,
    )
    assert level_difference(ours, theirs) <= SAME_LEVELS
    plain = image_of(run_generation(model, [spec()], blobs=blobs, control=cache)[0][0])
    assert level_difference(ours, plain) > 0  # the tokens change the image (tiny model: a little)
    assert 'ControlNet 0: "Module: flux_redux, Model: redux [' in outputs[0].infotext


# --- LoRA slots on the transformer ------------------------------------------------------


def test_flux_loras_in_transformer_slots_equal_the_eager_path(flux_dir, tmp_path):  # noqa: F811
    """The compiled path's LoRA slots cover Flux.1's Linears: a kohya file (fused qkv and
    linear1, split into their modules' rows), an XLabs and a peft file run in the slots
    give the eager path's transformer output, solo and as a mixed batch of two."""
    from pipeline.loras import slots
    from tests.test_flux_loras import _kohya

    files = {
        "kohya": tmp_path / "kohya.safetensors",
        "linear1": tmp_path / "linear1.safetensors",
        "xlabs": tmp_path / "xlabs.safetensors",
    }
    _kohya(files["kohya"], single_linear1=False)
    _kohya(files["linear1"], single_linear1=True)
    _xlabs(files["xlabs"], "")
    eager_pipe, slot_pipe = _pipe(flux_dir), _pipe(flux_dir)
    bank = slots.install(slot_pipe.transformer, slots=3, max_rank=RANK, rows=4)
    eager = LoraCache(eager_pipe, max_bytes=1 << 30)
    cache = LoraCache(slot_pipe, max_bytes=1 << 30)
    base = _output_of(eager_pipe)
    for name, path in files.items():
        lora = ref(path, 0.8)
        with eager.activate([lora]):
            theirs = _output_of(eager_pipe)
        with cache.activate([lora]):
            ours = _output_of(slot_pipe)
        effect = (theirs - base).abs().max().item()
        assert effect > 1e-3, name
        assert (ours - theirs).abs().max().item() <= 1e-4 * effect, name
    assert bank.stats.eager == 0 and bank.stats.calls == len(files)
    # A mixed batch: row 0 with kohya, row 1 with linear1 + xlabs, in one call.
    per_sample = [[ref(files["kohya"])], [ref(files["linear1"]), ref(files["xlabs"], 0.5)]]
    with cache.activate_per_sample(per_sample, cfg=False):
        mixed = _output_of(slot_pipe, rows=2)
    for row, loras in enumerate(per_sample):
        with eager.activate(loras):
            alone = _output_of(eager_pipe, rows=2)[row]
        assert (mixed[row] - alone).abs().max().item() <= 1e-4 * alone.abs().max().item()
    assert bank.stats.eager == 0


def test_flux_lora_switches_run_the_compiled_transformer_without_recompiling(
    flux_dir,  # noqa: F811
    tmp_path,
):
    """A compile worker on Flux.1 (dynamo's `aot_eager` backend: the same capture and
    guards as inductor): after warming, jobs with a kohya and then an XLabs LoRA run the
    compiled transformer in its slots under the stance that raises on any recompile."""
    import hashlib

    from torch._dynamo.utils import counters

    from pipeline.contract.blobs import BlobStore
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.jobs import GenerateSpec, LoraRef
    from pipeline.generate import compiled
    from pipeline.loras.slots import bank_of
    from pipeline.workers.runner import Runner
    from tests.conftest import level_difference
    from tests.test_compiled import _png, warm_on_aot_eager
    from tests.test_flux_loras import _kohya

    config = config_from_dict(
        {
            "models": {"default": {"source": str(flux_dir), "family": "flux"}},
            "storage": {"data_dir": str(tmp_path / "data")},
            "workers": {"backend": "local", "devices": ["cpu"], "compile": True},
            "defaults": {"width": 64, "height": 64, "sampler": "Euler", "cfg_scale": 1.0},
        }
    )
    runner = Runner(config, device="cpu", blobs=BlobStore(config.storage.blobs), name="f")
    warm_on_aot_eager(runner)
    _kohya(tmp_path / "kohya.safetensors", single_linear1=True)
    _xlabs(tmp_path / "xlabs.safetensors", "")
    refs = []
    for name in ("kohya", "xlabs"):
        data = (tmp_path / f"{name}.safetensors").read_bytes()
        runner.blobs.put(data, ".safetensors")
        refs.append(LoraRef(name, hashlib.sha256(data).hexdigest(), 0.8))

    def job(**fields) -> GenerateSpec:
        values = dict(width=64, height=64, steps=2, seed=3, sampler="Euler", cfg_scale=1.0)
        return GenerateSpec(prompt="a photo of a cat", **{**values, **fields})

    model = runner._model("default")
    bank = bank_of(model.pipe.transformer)
    graphs, runs = counters["stats"]["unique_graphs"], model._compiled.runs
    plain = _png(runner, job())
    with compiled.no_recompiling():
        pngs = [_png(runner, job(loras=(ref,))) for ref in refs]
    assert counters["stats"]["unique_graphs"] == graphs
    assert model._compiled.runs == runs + 3 and bank.stats.calls == 2 and bank.stats.eager == 0
    assert all(level_difference(png, plain) > 0 for png in pngs)  # each LoRA did something


def test_redux_keeps_its_tokens_under_prompt_editing(flux_dir, tmp_path):  # noqa: F811
    """With a reference, a prompt edited over the steps still changes the text and keeps
    the image tokens: "[cat:dog:10]" (never switching) is "cat" with the same reference,
    and switching halfway differs from both."""
    from pipeline.contract.config import config_from_dict
    from pipeline.contract.control import Reference
    from pipeline.control.apply import ControlCache
    from pipeline.families.flux_tiny import write_tiny_flux_redux
    from pipeline.generate.modes import run_generation
    from pipeline.models.loading import ModelCache
    from tests.conftest import level_difference, png_of
    from tests.test_flux import Blobs, image_of, photo, spec

    redux = write_tiny_flux_redux(tmp_path / "redux")
    config = config_from_dict(
        {
            "models": {"flux": {"source": str(flux_dir), "family": "flux"}},
            "ip_adapters": {"redux": {"source": str(redux), "family": "flux"}},
        }
    )
    model, cache, blobs = ModelCache(config, "cpu").get(), ControlCache(config), Blobs()
    reference = Reference("redux", (blobs.put(png_of(photo(seed=9))),), 0.9)

    def image(prompt: str):
        job = spec(prompt=prompt, reference=reference)
        return image_of(run_generation(model, [job], blobs=blobs, control=cache)[0][0])

    cat, dog = image("a cat"), image("a dog")
    assert level_difference(image("a [cat:dog:10]"), cat) == 0
    half = image("a [cat:dog:0.5]")
    assert level_difference(half, cat) > 0 and level_difference(half, dog) > 0
