"""Every LyCORIS format, made by the lycoris-lora library itself, applied by sdbot equals
LyCORIS applying the same file (activations, and whole images for LoRA/LoHa/LoKr);
stacking and load order; half-precision mixed batches; bad files refused in one line."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.contract.jobs import JobError, LoraRef
from pipeline.loras.cache import LoraCache
from pipeline.loras.formats import LoraError, read_lora_file
from pipeline.prompts.encoding import encode_prompts
from tests.conftest import level_difference
from tests.lycoris_files import KINDS, make_lora, write_diffusers_lora

# LyCORIS's DoRA and BOFT scale non-linearly with the multiplier; A1111 (and sdbot)
# scale their ΔW linearly, so the two agree at weight 1.
NONLINEAR = {"lora-dora", "loha-dora", "lokr-dora", "boft"}
XL_KINDS = ("lora", "locon", "loha", "lokr", "loha-dora", "lokr-tucker")


def _pipe(path: Path, xl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def made(tiny_sd, tiny_xl, tmp_path_factory):
    """Every kind on SD 1.x, the SGM-named kinds on SDXL: written once per session."""
    root = tmp_path_factory.mktemp("lycoris")
    sd, xl = _pipe(tiny_sd, False), _pipe(tiny_xl, True)
    files = {("sd1", k): make_lora(root / f"sd1-{k}.safetensors", sd, k) for k in KINDS}
    for k in XL_KINDS:
        files[("sdxl", k)] = make_lora(root / f"sdxl-{k}.safetensors", xl, k, seed=1)
    return files


def ref(path: Path, weight: float = 1.0, name: str | None = None) -> tuple[LoraRef, Path]:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraRef(name or path.stem, sha, weight), path


def _activations(unet, encoders, xl: bool):
    """UNet and text-encoder outputs on fixed inputs."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 99, (2, 77), generator=generator)
    with torch.no_grad():
        states = [enc(ids, output_hidden_states=True).hidden_states[-2] for enc in encoders]
        context = torch.cat(states, dim=-1)
        latents = torch.randn(2, 4, 8, 8, generator=generator).to(unet.dtype)
        extra = {}
        if xl:
            pooled = encoders[1](ids).text_embeds
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": torch.ones(2, 6, dtype=unet.dtype),
            }
        out = unet(latents, torch.tensor([500, 500]), encoder_hidden_states=context, **extra)
    return [*states, out.sample]


@pytest.mark.parametrize(
    "family,kind", [("sd1", k) for k in KINDS] + [("sdxl", k) for k in XL_KINDS]
)
def test_activations_equal_lycoris_applying_the_file(made, tiny_sd, tiny_xl, family, kind):
    xl = family == "sdxl"
    pipe = _pipe(tiny_xl if xl else tiny_sd, xl)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if xl else [])
    base = _activations(pipe.unet, encoders, xl)
    weight = 1.0 if kind in NONLINEAR else 0.7
    m = made[(family, kind)]
    if kind == "dylora":
        lycoris = _dylora_as_lycoris_loads_it(m, tiny_sd, weight)
    else:
        m.network.set_multiplier(weight)
        lycoris = _activations(m.unet, m.text_encoders, xl)
    cache = LoraCache(pipe, max_bytes=1 << 30)
    lora = ref(m.path, weight)
    with cache.activate([lora]):
        ours = _activations(pipe.unet, encoders, xl)
    assert cache.notices([lora[0]]) == []  # every layer of the file was applied
    for b, theirs, mine in zip(base, lycoris, ours):
        effect = (theirs - b).abs().max().item()
        assert effect > 1e-3  # the adapter does something here
        assert (mine - theirs).abs().max().item() <= 1e-3 * effect
    after = _activations(pipe.unet, encoders, xl)
    assert all(torch.equal(a, b) for a, b in zip(after, base))  # nothing left behind


def test_diffusers_format_equals_peft_applying_it(tiny_sd, tmp_path):
    pipe = _pipe(tiny_sd, False)
    path = tmp_path / "diffusers_lora.safetensors"
    unet, encoder = write_diffusers_lora(path, pipe, seed=2)
    base = _activations(pipe.unet, [pipe.text_encoder], False)
    peft = _activations(unet, [encoder], False)
    with LoraCache(pipe, max_bytes=1 << 30).activate([ref(path, 1.0)]):
        ours = _activations(pipe.unet, [pipe.text_encoder], False)
    for b, theirs, mine in zip(base, peft, ours):
        effect = (theirs - b).abs().max().item()
        assert effect > 1e-3
        assert (mine - theirs).abs().max().item() <= 1e-3 * effect


def _dylora_as_lycoris_loads_it(m, tiny_sd, weight: float):
    """A saved DyLoRA is a LoRA of its full rank: LyCORIS's own loader (like A1111's) reads
    it with the LoCon module. Its conv `lora_up` is saved flat; LoCon wants (out, r, 1, 1)."""
    from lycoris.kohya import create_network_from_weights

    pipe = _pipe(tiny_sd, False)
    tensors = load_file(str(m.path))
    for key, tensor in tensors.items():
        down = tensors.get(key.replace("lora_up", "lora_down"))
        if key.endswith("lora_up.weight") and down is not None and down.ndim == 4:
            tensors[key] = tensor.reshape(*tensor.shape, 1, 1)
    # LyCORIS's loader finds layers by the model's own (transformers 5) module paths.
    tensors = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}
    network, _ = create_network_from_weights(
        weight, "", None, pipe.text_encoder, pipe.unet, weights_sd=tensors
    )
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    return _activations(pipe.unet, [pipe.text_encoder], False)


def _image(pipe, seed: int = 3):
    from PIL import Image

    return Image.fromarray(_run_image(pipe, seed))


def _run_image(pipe, seed: int) -> np.ndarray:
    images = pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=3,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_image_equals_diffusers_with_lycoris(made, tiny_sd, kind):
    from diffusers import StableDiffusionPipeline

    pipe = _pipe(tiny_sd, False)
    m = made[("sd1", kind)]
    m.network.set_multiplier(0.8)
    theirs = StableDiffusionPipeline(
        **{**pipe.components, "unet": m.unet, "text_encoder": m.text_encoders[0]}
    )
    theirs.set_progress_bar_config(disable=True)
    expected = _image(theirs)
    plain = _image(pipe)
    with LoraCache(pipe, max_bytes=1 << 30).activate([ref(m.path, 0.8)]):
        ours = _image(pipe)
    assert level_difference(ours, expected) <= 2
    assert level_difference(plain, expected) > 2


def test_any_load_order_and_stacking(made, tiny_sd):
    """A LoCon after a LoHa (peft used to fail here) and the reverse give the same image."""
    loha, locon = made[("sd1", "loha")].path, made[("sd1", "locon")].path
    images = []
    for order in ((loha, locon), (locon, loha)):
        pipe = _pipe(tiny_sd, False)
        cache = LoraCache(pipe, max_bytes=1 << 30)
        for path in order:  # load them one after the other
            with cache.activate([ref(path, 0.5)]):
                pass
        with cache.activate([ref(p, 0.5) for p in order]):
            images.append(_image(pipe))
        with cache.activate([ref(order[0], 0.5)]):
            single = _image(pipe)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert level_difference(images[0], single) > 2


@pytest.mark.parametrize("dtype,bound", [("float32", 1), ("float16", 2), ("bfloat16", 2)])
@pytest.mark.filterwarnings("ignore:There are modules")
def test_mixed_batch_equals_solo_runs_per_dtype(made, tiny_sd, dtype, bound):
    pipe = _pipe(tiny_sd, False).to(getattr(torch, dtype))
    cache = LoraCache(pipe, max_bytes=1 << 30)
    loras = {k: made[("sd1", k)].path for k in ("lora", "loha", "lokr", "locon")}
    per_sample = [
        [ref(loras["lora"], 0.8)],
        [],
        [ref(loras["loha"], 1.0), ref(loras["lokr"], 0.5)],
        [ref(loras["lokr"], -0.7), ref(loras["locon"], 1.2)],
    ]
    prompts = ["a cat", "a dog", "(red:1.3) sky", "a portrait"]

    def run(prompts, seeds):
        return pipe_images(pipe, prompts, seeds)

    alone = []
    for i, loras_i in enumerate(per_sample):
        with cache.activate(loras_i):
            alone.append(run([prompts[i]], [10 + i])[0])
    with cache.activate_per_sample(per_sample, cfg=True):
        batch = run(prompts, [10, 11, 12, 13])
    worst = max(level_difference(_pil(b), _pil(a)) for b, a in zip(batch, alone))
    # The same batch without LoRAs: its own rounding floor for this dtype and CPU (bf16's
    # 8-bit mantissa makes other matrix shapes differ by a few levels, LoRA or not).
    plain = run(prompts, [10, 11, 12, 13])
    plain_alone = [run([p], [10 + i])[0] for i, p in enumerate(prompts)]
    floor = max(level_difference(_pil(b), _pil(a)) for b, a in zip(plain, plain_alone))
    assert worst <= max(bound, floor), (
        f"{dtype}: a mixed-LoRA batch differs from its solo runs by {worst} levels "
        f"(without LoRAs: {floor})"
    )


def pipe_images(pipe, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """The pipeline's images (2 steps, 64², CFG 5, a fixed negative) as float arrays."""
    embeds = encode_prompts(pipe, prompts, ["blurry"] * len(prompts))
    return pipe(
        **embeds,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((image * 255).round().astype(np.uint8))


# --- partial files and bad input ----------------------------------------------------


def test_layers_that_do_not_fit_are_told_to_the_member(made, tiny_sd, tmp_path):
    tensors = load_file(str(made[("sd1", "lora")].path))
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    tensors["lora_te_text_model_strange.weird_tensor"] = torch.zeros(3)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    layers = len({k.split(".")[0] for k in tensors})
    cache = LoraCache(_pipe(tiny_sd, False), max_bytes=1 << 30)
    lora = ref(path, 1.0, name="Mixed")
    with cache.activate([lora]):
        pass
    assert cache.notices([lora[0]]) == [
        f"LoRA 'Mixed': 2 of {layers} layers do not fit this model and were left out"
    ]


def test_file_for_another_model_is_refused(made, tiny_sd, tmp_path):
    tensors = {k: v for k, v in load_file(str(made[("sdxl", "loha")].path)).items()}
    # cross-attention key/value layers read the text width, which SD 1.x and SDXL differ in
    tensors = {k: v for k, v in tensors.items() if "attn2_to_k" in k or "attn2_to_v" in k}
    path = tmp_path / "xl_cross_attention.safetensors"
    save_file(tensors, str(path))
    cache = LoraCache(_pipe(tiny_sd, False), max_bytes=1 << 30)
    message = r"^LoRA 'x' was made for SDXL; this model is SD 1.x$"
    with pytest.raises(LoraError, match=message), cache.activate([ref(path, 1.0, name="x")]):
        pass
    assert cache.loaded() == []


# Every kind whose layers carry their input width (IA3 and OFT scale or rotate outputs):
# with its text-encoder layers removed, only the UNet's keys and shapes tell its family.
OTHER_FAMILY_KINDS = [("sd1", k) for k in KINDS if k not in ("ia3", "diag-oft", "boft")]
OTHER_FAMILY_KINDS += [("sdxl", k) for k in XL_KINDS]


@pytest.mark.parametrize("made_for,kind", OTHER_FAMILY_KINDS)
def test_unet_only_file_for_the_other_family_is_refused_naming_both(
    made, tiny_sd, tiny_xl, tmp_path, made_for, kind
):
    # An SD 1.x LoHa on SDXL used to be applied to the 75 of its 83 layers whose shapes
    # happened to fit, with a "left out" notice.
    tensors = load_file(str(made[(made_for, kind)].path))
    tensors = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    path = tmp_path / f"{made_for}-{kind}-unet.safetensors"
    save_file(tensors, str(path))
    on_xl = made_for == "sd1"
    cache = LoraCache(_pipe(tiny_xl if on_xl else tiny_sd, on_xl), max_bytes=1 << 30)
    label = {"sd1": "SD 1.x", "sdxl": "SDXL"}
    message = rf"^LoRA 'x' was made for {label[made_for]}; this model is "
    message += label["sdxl" if on_xl else "sd1"] + "$"
    with pytest.raises(LoraError, match=message), cache.activate([ref(path, 1.0, name="x")]):
        pass
    assert cache.loaded() == []


def _bad_files(made, tmp_path) -> dict[str, tuple[Path, str]]:
    good = made[("sd1", "lora")].path.read_bytes()
    files = {}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) - 100])
    files["truncated"] = (truncated, r"^LoRA 'truncated' is truncated: its header needs")
    header = (
        b'{"a.lora_up.weight":{"dtype":"F32","shape":[50000,50000],"data_offsets":[0,10000000000]}}'
    )
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    files["huge"] = (huge, r"^LoRA 'huge' is truncated: its header needs 9536\.7 MB")
    nan = tmp_path / "nan.safetensors"
    tensors = load_file(str(made[("sd1", "lora")].path))
    first = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[first] = tensors[first].clone()
    tensors[first][0, 0] = float("inf")
    save_file(tensors, str(nan))
    files["nan"] = (nan, r"^LoRA 'nan' is damaged: 1 tensor\(s\) hold NaN or infinite values")
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, pickle)
    files["pickle"] = (
        pickle,
        r"^'pickle' is not a LoRA file \(not a readable .safetensors file\)$",
    )
    return files


@pytest.mark.parametrize("case", ["truncated", "huge", "nan", "pickle"])
def test_bad_files_are_refused_in_one_line(made, tiny_sd, tmp_path, case, capsys):
    path, message = _bad_files(made, tmp_path)[case]
    pipe = _pipe(tiny_sd, False)
    cache = LoraCache(pipe, max_bytes=1 << 40)
    capsys.readouterr()
    with (
        pytest.raises(LoraError, match=message) as info,
        cache.activate([ref(path, 1.0, name=case)]),
    ):
        pass
    assert "\n" not in str(info.value)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # no library output
    assert cache.loaded() == []
    with pytest.raises(LoraError):  # read directly too
        read_lora_file(path, name=case, family="sd1", max_bytes=1 << 40)


def test_nan_weight_in_a_tag_is_one_line():
    from pipeline.contract.prompt_syntax import extract_loras

    with pytest.raises(JobError, match=r"^LoRA 'x' weight") as info:
        extract_loras("a cat <lora:x:nan>")
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:There are modules")
def test_every_format_in_half_precision(made, tiny_sd):
    """fp16 and bf16 activations with each format stay close to the fp32 ones."""
    full = _pipe(tiny_sd, False)
    base32 = _activations(full.unet, [full.text_encoder], False)
    cache32 = LoraCache(full, max_bytes=1 << 30)
    loras = {kind: ref(made[("sd1", kind)].path, 0.8) for kind in KINDS}
    ours32 = {}
    for kind, lora in loras.items():
        with cache32.activate([lora]):
            ours32[kind] = _activations(full.unet, [full.text_encoder], False)
    for dtype in (torch.float16, torch.bfloat16):
        pipe = _pipe(tiny_sd, False).to(dtype)
        cache = LoraCache(pipe, max_bytes=1 << 30)
        base = _activations(pipe.unet, [pipe.text_encoder], False)
        floor = [(b.float() - b32).abs().max().item() for b, b32 in zip(base, base32)]
        for kind, lora in loras.items():
            with cache.activate([lora]):
                ours = _activations(pipe.unet, [pipe.text_encoder], False)
            for o, o32, b32, f in zip(ours, ours32[kind], base32, floor):
                effect = (o32 - b32).abs().max().item()
                error = (o.float() - o32).abs().max().item()
                assert error <= 4 * f + 0.05 * effect, f"{kind} in {dtype}: {error} vs {effect}"


def test_unloadable_algorithm_is_named(tmp_path):
    path = tmp_path / "tlora.safetensors"
    save_file({"lora_unet_conv_in.lambda_layer": torch.ones(1, 2)}, str(path))
    with pytest.raises(LoraError, match=r"^LoRA 't' uses T-LoRA \(LyCORIS tlora\), which"):
        read_lora_file(path, name="t", family="sd1", max_bytes=1 << 20)


def test_notices_travel_with_the_result_event():
    from pipeline.contract.jobs import Done, OutputImage, event_from_json, event_to_json

    done = Done("j1", images=(OutputImage(b"png", 1, "info", ("LoRA 'x': 1 of 3 layers…",)),))
    assert event_from_json(event_to_json(done)) == done
