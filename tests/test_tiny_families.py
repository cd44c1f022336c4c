"""The tiny Flux.1, Z-Image, Qwen-Image and Flux.2 klein models: diffusers' own pipelines
load each folder the writer made and run every mode diffusers has for the family.

No family code of ours runs here: these tests prove the tiny models are real inputs
for the family modules (#23, #24) — the pipelines accept them, at a tiny size, in
seconds — and that their tokenizers read prompts as words.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZE = 64  # pixels: 8×8 latents, 4×4 tokens after 2×2 packing
STEPS = 2
PROMPT = "a photo of a cat"


def _photo(width: int = SIZE, height: int = SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 16:48] = 255  # white = repaint
    return Image.fromarray(mask)


# img2img: 4 steps at strength 0.5, inpaint: 3 at 0.75 — 2 denoising steps each.
IMG2IMG = dict(strength=0.5, num_inference_steps=4, height=SIZE, width=SIZE)
INPAINT = dict(strength=0.75, num_inference_steps=3, height=SIZE, width=SIZE)


def _img2img_and_inpaint(pipe, img2img_class, inpaint_class) -> None:
    """The family's img2img and inpaint pipelines, built from `pipe`'s components."""
    _run_twice(img2img_class.from_pipe(pipe), image=_photo(), **IMG2IMG)
    _run_twice(inpaint_class.from_pipe(pipe), image=_photo(), mask_image=_mask(), **INPAINT)


def _load(folder: Path, **components):
    import diffusers.utils.logging as diffusers_logging
    from diffusers import DiffusionPipeline

    diffusers_logging.set_verbosity_error()
    pipe = DiffusionPipeline.from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_twice(pipe, **call):
    """Run the same call twice; check shape, finiteness and that both are bit-identical."""
    import torch

    call.setdefault("num_inference_steps", STEPS)
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(0)
        result = pipe(
            prompt=PROMPT,
            generator=generator,
            output_type="pt",
            **call,
        )
        outputs.append(result.images)
    first, second = outputs
    assert first.shape == (1, 3, SIZE, SIZE)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    return first


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    from pipeline.models.tiny_families import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


@pytest.fixture(scope="module")
def flux(flux_dir):
    return _load(flux_dir)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    from pipeline.families.zimage_tiny import write_tiny_zimage

    return _load(write_tiny_zimage(tmp_path_factory.mktemp("zimage") / "turbo"))


@pytest.fixture(scope="module")
def qwen_image(tmp_path_factory):
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image

    return _load(write_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "image"))


def _load_qwen_edit(folder: Path):
    from pipeline.models.qwen_edit import load_qwen_processor

    return _load(folder, processor=load_qwen_processor(folder / "processor"))


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein

    return _load(write_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "4b"))


# --- Flux.1 -----------------------------------------------------------------------------


def test_flux_dev_txt2img_img2img_inpaint(flux):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    assert type(flux) is FluxPipeline
    assert flux.transformer.config.in_channels == 64 and flux.transformer.config.guidance_embeds
    _run_twice(flux, height=SIZE, width=SIZE, guidance_scale=3.5)
    _img2img_and_inpaint(flux, FluxImg2ImgPipeline, FluxInpaintPipeline)


def test_flux_schnell_has_no_guidance_and_a_fixed_shift(tmp_path):
    from diffusers import FluxPipeline

    from pipeline.models.tiny_families import write_tiny_flux

    pipe = _load(write_tiny_flux(tmp_path / "schnell", variant="schnell"))
    assert type(pipe) is FluxPipeline
    assert not pipe.transformer.config.guidance_embeds
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer_2.model_max_length == 256
    _run_twice(pipe, height=SIZE, width=SIZE, guidance_scale=0.0, max_sequence_length=256)


def test_flux_kontext_edits_an_input_image(tmp_path):
    from diffusers import FluxKontextInpaintPipeline, FluxKontextPipeline

    from pipeline.models.tiny_families import write_tiny_flux

    pipe = _load(write_tiny_flux(tmp_path / "kontext", variant="kontext"))
    assert type(pipe) is FluxKontextPipeline
    # Kontext resizes its input to a ~1 MP preset unless told not to: the tiny size
    # is kept with _auto_resize=False and max_area (see docs/DECISIONS.md).
    size = dict(height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False)
    edited = _run_twice(pipe, image=_photo(), guidance_scale=2.5, **size)
    other = _run_twice(pipe, image=_photo(seed=1), guidance_scale=2.5, **size)
    assert not np.array_equal(edited.numpy(), other.numpy())  # the input image is read
    inpaint = FluxKontextInpaintPipeline.from_pipe(pipe)
    _run_twice(inpaint, image=_photo(), mask_image=_mask(), strength=1.0, **size)


def test_flux_fill_takes_384_channels_and_a_mask(tmp_path):
    from diffusers import FluxFillPipeline

    from pipeline.models.tiny_families import write_tiny_flux

    pipe = _load(write_tiny_flux(tmp_path / "fill", variant="fill"))
    assert type(pipe) is FluxFillPipeline
    assert pipe.transformer.config.in_channels == 384  # as FLUX.1-Fill-dev's
    _run_twice(
        pipe, image=_photo(), mask_image=_mask(), height=SIZE, width=SIZE, guidance_scale=30.0
    )


def test_flux_redux_turns_a_reference_image_into_flux_prompt_embeddings(flux, tmp_path):
    import torch
    from diffusers import FluxPriorReduxPipeline

    from pipeline.models.tiny_families import write_tiny_flux_redux

    # The base model's text encoders go to Redux, as for Redux with a prompt.
    encoders = {name: getattr(flux, name) for name in ("text_encoder", "text_encoder_2")}
    encoders |= {name: getattr(flux, name) for name in ("tokenizer", "tokenizer_2")}
    redux = _load(write_tiny_flux_redux(tmp_path / "redux"), **encoders)
    assert type(redux) is FluxPriorReduxPipeline

    def embeddings(seed: int) -> dict:
        out = redux(image=_photo(seed=seed), prompt=PROMPT)
        return dict(prompt_embeds=out.prompt_embeds, pooled_prompt_embeds=out.pooled_prompt_embeds)

    first = embeddings(0)
    assert torch.equal(first["prompt_embeds"], embeddings(0)["prompt_embeds"])
    # 512 T5 tokens of the prompt, then the 16 SigLIP tokens of the image, T5-wide.
    assert first["prompt_embeds"].shape == (1, 512 + 16, flux.text_encoder_2.config.d_model)
    images = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(0)
        call = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pt")
        images.append(flux(**embeddings(seed), generator=generator, **call).images)
    assert images[0].shape == (1, 3, SIZE, SIZE) and torch.isfinite(images[0]).all()
    assert not torch.equal(images[0], images[1])  # the reference image is read


def test_flux_prompts_tokenize_to_words(flux):
    assert flux.tokenizer.tokenize(PROMPT) == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert flux.tokenizer(PROMPT).input_ids.__len__() == 5 + 2  # and start/end
    assert flux.tokenizer_2.tokenize(PROMPT) == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]
    assert len(flux.tokenizer_2(PROMPT).input_ids) == 5 + 1  # and </s>
    assert flux.tokenizer_2.tokenize("a zq") == ["▁a", "▁z", "q"]  # rare words: characters


# --- Z-Image ----------------------------------------------------------------------------


def test_zimage_txt2img_img2img_inpaint(zimage):
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

    assert type(zimage) is ZImagePipeline
    _run_twice(zimage, height=SIZE, width=SIZE, guidance_scale=1.0)
    _img2img_and_inpaint(zimage, ZImageImg2ImgPipeline, ZImageInpaintPipeline)


def test_zimage_prompt_goes_through_qwen3s_chat_template(zimage):
    tokenizer = zimage.tokenizer
    assert tokenizer.tokenize(PROMPT) == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat"]
    # enable_thinking=True (Z-Image's call): no empty thinking block.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    embeds, _ = zimage.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    # The pipeline keeps the unpadded tokens: 3 + 5 words + 5.
    assert embeds[0].shape == (13, zimage.text_encoder.config.hidden_size)


# --- Qwen-Image -------------------------------------------------------------------------


def test_qwen_image_txt2img_img2img_inpaint(qwen_image):
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline, QwenImagePipeline

    assert type(qwen_image) is QwenImagePipeline
    _run_twice(qwen_image, height=SIZE, width=SIZE, negative_prompt="blurry", true_cfg_scale=4.0)
    _img2img_and_inpaint(qwen_image, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline)


def test_qwen_image_template_is_dropped_where_the_pipeline_drops_it(qwen_image):
    template = qwen_image.prompt_template_encode
    prefix = template[: template.index("{}")]
    # The real tokenizer reads the system prompt as 34 tokens and the pipeline drops
    # that many: the tiny one must read it as words too, or it would drop the prompt.
    assert (
        len(qwen_image.tokenizer(prefix).input_ids) == qwen_image.prompt_template_encode_start_idx
    )
    embeds, _ = qwen_image.encode_prompt(PROMPT)
    # What is left: the 5 prompt words and "<|im_end|>\n<|im_start|>assistant\n".
    assert embeds.shape[1] == 5 + 5


def test_qwen_image_edit_resizes_inputs_to_the_area_it_is_given(tmp_path):
    from diffusers import QwenImageEditInpaintPipeline, QwenImageEditPipeline

    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.models.qwen_edit import edit_input_area

    pipe = _load_qwen_edit(write_tiny_qwen_image(tmp_path / "edit", variant="edit"))
    assert type(pipe) is QwenImageEditPipeline
    with edit_input_area(SIZE * SIZE):
        # No size given: the pipeline sizes the output from the input's area.
        edited = _run_twice(pipe, image=_photo(96, 96), negative_prompt=" ", true_cfg_scale=4.0)
        other = _run_twice(
            pipe, image=_photo(96, 96, seed=1), negative_prompt=" ", true_cfg_scale=4.0
        )
        inpaint = QwenImageEditInpaintPipeline.from_pipe(pipe)
        _run_twice(
            inpaint, image=_photo(), mask_image=_mask(), strength=1.0, height=SIZE, width=SIZE
        )
    assert not np.array_equal(edited.numpy(), other.numpy())  # the input image is read
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

    assert pipeline_qwenimage_edit.calculate_dimensions(1024 * 1024, 1.0)[:2] == (1024, 1024)


def test_qwen_image_edit_plus_takes_several_images(tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.models.qwen_edit import edit_input_area

    pipe = _load_qwen_edit(write_tiny_qwen_image(tmp_path / "plus", variant="edit-plus"))
    assert type(pipe) is QwenImageEditPlusPipeline
    with edit_input_area(SIZE * SIZE):
        two = _run_twice(pipe, image=[_photo(), _photo(seed=1)], height=SIZE, width=SIZE)
        three = _run_twice(
            pipe, image=[_photo(), _photo(seed=1), _photo(seed=2)], height=SIZE, width=SIZE
        )
    assert not np.array_equal(two.numpy(), three.numpy())


def test_qwen_edit_folder_has_the_hub_layout(tmp_path):
    import json

    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.models.qwen_edit import ImageOnlyQwen2VLProcessor, load_qwen_processor

    folder = write_tiny_qwen_image(tmp_path / "edit", variant="edit")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    processor = load_qwen_processor(folder / "processor")
    assert isinstance(processor, ImageOnlyQwen2VLProcessor)
    assert not hasattr(processor, "video_processor")
    inputs = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>" + PROMPT],
        images=[_photo()],
        return_tensors="pt",
    )
    # 64² → 56² (multiples of 28) → 4×4 patches of 14 px → 2×2 merged → 4 image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 4


def test_qwen_processor_loads_the_hubs_separate_files(tmp_path):
    """The Hub's Qwen-Image-Edit `processor/` holds what transformers writes for each
    part on its own (preprocessor_config.json, the tokenizer's files): that loads too."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from pipeline.models.qwen_edit import load_qwen_processor
    from pipeline.models.tiny_families.tokenizers import qwen_tokenizer

    folder = tmp_path / "processor"
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=56 * 56).save_pretrained(folder)
    qwen_tokenizer(qwen3=False).save_pretrained(folder)
    assert (folder / "preprocessor_config.json").exists()
    processor = load_qwen_processor(folder)
    inputs = processor(text=["<|image_pad|>"], images=[_photo(256, 256)], return_tensors="pt")
    # max_pixels from the file: 256² is cut to 56², 2×2 merged tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]


# --- Flux.2 klein -----------------------------------------------------------------------


def test_flux2_klein_txt2img_references_inpaint(klein):
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

    assert type(klein) is Flux2KleinPipeline
    assert klein.transformer.config.in_channels == 128
    plain = _run_twice(klein, height=SIZE, width=SIZE)
    referenced = _run_twice(klein, image=[_photo(), _photo(seed=1)], height=SIZE, width=SIZE)
    assert not np.array_equal(plain.numpy(), referenced.numpy())
    inpaint = Flux2KleinInpaintPipeline.from_pipe(klein)
    _run_twice(inpaint, image=_photo(), mask_image=_mask(), **INPAINT)


def test_flux2_klein_prompt_has_qwen3s_empty_thinking_block(klein):
    text = klein.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tokens = klein.tokenizer.tokenize(text)
    assert tokens[3:8] == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat"]
    assert len(tokens) == 3 + 5 + 5 + 4


# --- The files --------------------------------------------------------------------------


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_the_writers_write_the_same_files_every_time(flux_dir, tmp_path):
    from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.families.zimage_tiny import write_tiny_zimage
    from pipeline.models import tiny_families as tf

    assert _digest(tf.write_tiny_flux(tmp_path / "flux")) == _digest(flux_dir)
    # Z-Image's pad tokens start as torch.empty; the edit models add the processor.
    for writer, variant in [
        (write_tiny_zimage, {}),
        (write_tiny_qwen_image, {"variant": "edit-plus"}),
        (write_tiny_flux2_klein, {}),
    ]:
        first = writer(tmp_path / f"{writer.__name__}-a", **variant)
        second = writer(tmp_path / f"{writer.__name__}-b", **variant)
        assert _digest(first) == _digest(second), writer.__name__


# --- sdbot tiny-model -------------------------------------------------------------------


def test_sdbot_tiny_model_writes_each_family(tmp_path, capsys):
    from diffusers import FluxFillPipeline, FluxPriorReduxPipeline

    from bot.cli import main

    assert main(["tiny-model", str(tmp_path / "fill"), "--flux", "--fill", "--redux"]) == 0
    out = capsys.readouterr().out
    assert "tiny Flux.1 Fill" in out and "tiny FLUX.1-Redux" in out
    assert type(_load(tmp_path / "fill")) is FluxFillPipeline
    assert type(_load(tmp_path / "fill" / "redux")) is FluxPriorReduxPipeline


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kontext"], "--kontext is a Flux.1 variant: add --flux"),
        (["--zimage", "--schnell"], "--schnell is a Flux.1 variant: add --flux"),
        (["--qwen-image", "--plus"], "--plus is a Qwen-Image-Edit variant: add --qwen-edit"),
        (["--flux2-klein", "--xl"], "--xl is an SD option: leave it out with --flux2-klein"),
        (["--zimage", "--redux"], "--redux is Flux.1's reference-image model: add --flux"),
    ],
)
def test_sdbot_tiny_model_refuses_flags_of_another_family(tmp_path, capsys, flags, message):
    from bot.cli import main

    assert main(["tiny-model", str(tmp_path / "m"), *flags]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
