"""Generation on the tiny model: every mode, determinism, masks, previews, cancellation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter

from pipeline.contract.config import config_from_dict
from pipeline.contract.infotext import parse_infotext, read_infotext
from pipeline.contract.jobs import GenerateSpec, JobError
from pipeline.generate.modes import (
    GenerationCancelled,
    mask_crop_box,
    outpaint_canvas,
    run_generation,
)
from pipeline.models.loading import ModelCache
from tests.conftest import (
    BATCH_TOLERANCE_LEVELS,
    HALF_DTYPES,
    HALF_TOLERANCE_LEVELS,
    level_difference,
    png_of,
)


def spec(**changes) -> GenerateSpec:
    values = {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": 4, "seed": 7}
    return GenerateSpec(**{**values, **changes})


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.png)).convert("RGB")).astype(int)


def photo(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    noise = rng.integers(0, 40, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_txt2img_gives_the_requested_size_and_count(sd):
    [images] = run_generation(sd, [spec(width=96, height=64, count=2)])
    assert len(images) == 2
    assert [Image.open(io.BytesIO(i.png)).size for i in images] == [(96, 64), (96, 64)]
    assert [i.seed for i in images] == [7, 8]


def test_same_seed_gives_identical_pixels_and_other_seeds_differ(sd):
    first = run_generation(sd, [spec()])[0][0]
    again = run_generation(sd, [spec()])[0][0]
    other = run_generation(sd, [spec(seed=8)])[0][0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_a_batch_gives_the_same_images_as_separate_runs(sd):
    a, b = spec(prompt="a cat", seed=1), spec(prompt="a dog", seed=2, count=2)
    batched = run_generation(sd, [a, b])
    assert len(batched[0]) == 1 and len(batched[1]) == 2
    alone = run_generation(sd, [b])[0]
    for together, single in zip(batched[1], alone):
        assert level_difference(together.png, single.png) <= BATCH_TOLERANCE_LEVELS


def test_infotext_is_written_and_parses_back(sd):
    image = run_generation(sd, [spec(negative_prompt="blurry, dark", sampler="DPM++ 2M Karras")])[
        0
    ][0]
    info = parse_infotext(read_infotext(image.png))
    assert info["Prompt"] == "a photo of a cat"
    assert info["Negative prompt"] == "blurry, dark"
    assert info["Sampler"] == "DPM++ 2M" and info["Schedule type"] == "Karras"
    assert info["Steps"] == "4" and info["Seed"] == "7" and info["Size"] == "64x64"
    assert info["Model"] == "tiny" and len(info["Model hash"]) == 10
    assert "Denoising strength" not in info


def test_progress_events_and_previews(sd):
    events = []
    run_generation(sd, [spec(steps=4)], on_step=lambda *e: events.append(e), preview_every=2)
    assert [(step, total) for step, total, _ in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    previews = [p for _, _, p in events if p is not None]
    assert len(previews) == 2
    assert Image.open(io.BytesIO(previews[0])).format == "JPEG"


def test_cancellation_stops_between_steps(sd):
    seen = []
    with pytest.raises(GenerationCancelled):
        run_generation(
            sd,
            [spec(steps=10)],
            on_step=lambda s, t, p: seen.append(s),
            should_cancel=lambda: len(seen) >= 2,
        )
    assert seen == [1, 2]


def test_img2img_uses_the_input_and_strength(sd, blobs):
    source = blobs.put(png_of(photo()))
    weak = run_generation(sd, [spec(mode="img2img", image=source, strength=0.1)], blobs=blobs)
    strong = run_generation(sd, [spec(mode="img2img", image=source, strength=0.9)], blobs=blobs)
    original = np.asarray(photo()).astype(int)
    assert pixels(weak[0][0]).shape == (64, 64, 3)
    assert (
        np.abs(pixels(weak[0][0]) - original).mean()
        < np.abs(pixels(strong[0][0]) - original).mean()
    )
    info = parse_infotext(weak[0][0].infotext)
    assert info["Denoising strength"] == "0.1"


@pytest.mark.parametrize("only_masked", [True, False])
def test_inpaint_keeps_every_unmasked_pixel(sd, blobs, only_masked):
    # A real photo: the tiny VAE keeps photos, so the masked part changing is the inpaint.
    image = Image.fromarray(skimage.data.astronaut()).resize((96, 80), Image.LANCZOS)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (30, 20, 60, 50))
    job = spec(
        mode="inpaint",
        image=blobs.put(png_of(image)),
        mask=blobs.put(png_of(mask)),
        strength=1.0,
        only_masked=only_masked,
    )
    out = pixels(run_generation(sd, [job], blobs=blobs)[0][0])
    assert out.shape == (80, 96, 3)
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(job.mask_blur)))
    untouched = blurred == 0
    original = np.asarray(image).astype(int)
    assert np.array_equal(out[untouched], original[untouched])
    assert np.abs(out[35:45, 40:50] - original[35:45, 40:50]).mean() > 20  # repainted


def test_inpaint_with_an_inpainting_unet(tiny_inpaint, blobs):
    config = config_from_dict({"models": {"inp": {"source": str(tiny_inpaint)}}})
    model = ModelCache(config, "cpu").get()
    image, mask = photo(), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    job = spec(mode="inpaint", image=blobs.put(png_of(image)), mask=blobs.put(png_of(mask)))
    out = pixels(run_generation(model, [job], blobs=blobs)[0][0])
    assert np.array_equal(out[:4], np.asarray(image).astype(int)[:4])


def test_inpaint_refuses_a_mask_of_another_size_and_an_empty_mask(sd, blobs):
    image = blobs.put(png_of(photo()))
    wrong = blobs.put(png_of(Image.new("L", (32, 32), 255)))
    with pytest.raises(JobError, match="the mask is 32×32 but the image is 64×64"):
        run_generation(sd, [spec(mode="inpaint", image=image, mask=wrong)], blobs=blobs)
    empty = blobs.put(png_of(Image.new("L", (64, 64), 0)))
    with pytest.raises(JobError, match="the mask is empty"):
        run_generation(sd, [spec(mode="inpaint", image=image, mask=empty)], blobs=blobs)


@pytest.mark.parametrize(
    ("direction", "size"), [("left", (96, 64)), ("down", (64, 96)), ("all", (128, 128))]
)
def test_outpaint_enlarges_the_canvas(sd, blobs, direction, size):
    job = spec(
        mode="outpaint",
        image=blobs.put(png_of(photo())),
        outpaint_direction=direction,
        outpaint_pixels=32,
    )
    out = run_generation(sd, [job], blobs=blobs)[0][0]
    assert Image.open(io.BytesIO(out.png)).size == size


def test_outpaint_mask_is_white_outside_and_feathered_inside():
    canvas, mask = outpaint_canvas(photo(), "right", 32)
    m = np.asarray(mask)
    assert canvas.size == (96, 64) and mask.size == (96, 64)
    assert (m[:, 64:] == 255).all()
    assert (m[:, :40] == 0).all()  # far from the seam: the old image is kept
    assert 0 < m[10, 60] < 255  # the seam is feathered


def test_upscale_doubles_the_size(sd, blobs):
    job = spec(mode="upscale", image=blobs.put(png_of(photo())), strength=0.3)
    out = run_generation(sd, [job], blobs=blobs)[0][0]
    assert Image.open(io.BytesIO(out.png)).size == (128, 128)


def test_mask_crop_box_pads_and_keeps_the_aspect_ratio():
    mask = Image.new("L", (200, 100), 0)
    mask.paste(255, (90, 40, 110, 60))
    x0, y0, x1, y1 = mask_crop_box(mask, 10, (64, 64))
    assert (x1 - x0) == (y1 - y0) and x0 <= 80 and x1 >= 120
    assert 0 <= x0 and x1 <= 200 and 0 <= y0 and y1 <= 100


def test_sdxl_txt2img(xl):
    [images] = run_generation(xl, [spec(width=64, height=64)])
    assert Image.open(io.BytesIO(images[0].png)).size == (64, 64)
    again = run_generation(xl, [spec(width=64, height=64)])[0][0]
    # The same call twice in one process: the only place equality is exact.
    assert level_difference(images[0].png, again.png) == 0


def test_every_sampler_runs_two_steps(sd):
    from pipeline.contract.samplers import sampler_names

    for name in sampler_names():
        [images] = run_generation(sd, [spec(sampler=name, steps=2)])
        assert parse_infotext(images[0].infotext)["Seed"] == "7", name


def test_mixed_lora_batch_equals_each_job_alone_and_names_lora_hashes(sd, blobs, tmp_path):
    from pipeline.contract.jobs import LoraRef
    from pipeline.loras.adapters import LoraCache
    from tests.lycoris_files import write_lora

    refs = []
    for i, kind in enumerate(("kohya", "loha")):
        path = write_lora(tmp_path / f"l{i}.safetensors", sd.pipe, kind, seed=i)
        refs.append(LoraRef(f"style{i}", blobs.put(path.read_bytes(), ".safetensors"), 0.8))
    cache = LoraCache(sd.pipe, max_bytes=2**30)
    jobs = [spec(seed=1, loras=(refs[0],)), spec(seed=2, loras=(refs[1],)), spec(seed=3)]
    together = run_generation(sd, jobs, blobs=blobs, loras=cache)
    for job, batched in zip(jobs, together):
        alone = run_generation(sd, [job], blobs=blobs, loras=cache)[0][0]
        assert level_difference(batched[0].png, alone.png) <= BATCH_TOLERANCE_LEVELS
    plain = run_generation(sd, [spec(seed=1)], blobs=blobs, loras=cache)[0][0]
    assert np.abs(pixels(together[0][0]) - pixels(plain)).mean() > 1  # the LoRA did something
    info = parse_infotext(together[0][0].infotext)
    assert info["Lora hashes"].startswith("style0: ") and len(info["Lora hashes"]) == 20


@pytest.fixture(scope="module", params=HALF_DTYPES)
def half(request, tiny_sd):
    config = config_from_dict(
        {"models": {"tiny": {"source": str(tiny_sd)}}, "workers": {"dtype": request.param}}
    )
    return ModelCache(config, "cpu").get()


@pytest.fixture(scope="module")
def sd_loras(sd):
    from pipeline.loras.adapters import LoraCache

    return LoraCache(sd.pipe, max_bytes=2**30)


def test_every_mode_runs_in_half_precision_close_to_float32(sd, sd_loras, half, blobs, tmp_path):
    from pipeline.contract.jobs import LoraRef
    from pipeline.loras.adapters import LoraCache
    from tests.lycoris_files import write_lora

    dtype = str(half.dtype).removeprefix("torch.")
    image, mask = photo((80, 64)), Image.new("L", (80, 64), 0)
    mask.paste(255, (20, 16, 50, 40))
    source, mask_sha = blobs.put(png_of(image)), blobs.put(png_of(mask))
    lora = write_lora(tmp_path / "style.safetensors", sd.pipe, "kohya", seed=5)
    ref = LoraRef("style", blobs.put(lora.read_bytes(), ".safetensors"), 0.8)
    jobs = {
        "txt2img": spec(steps=2),
        "img2img": spec(steps=2, mode="img2img", image=source, strength=0.5),
        "inpaint": spec(steps=2, mode="inpaint", image=source, mask=mask_sha, strength=1.0),
        "outpaint": spec(steps=2, mode="outpaint", image=source, outpaint_pixels=16),
        "upscale": spec(steps=2, mode="upscale", image=source, strength=0.3),
        "lora": spec(steps=2, loras=(ref,)),
    }
    worst, mean = HALF_TOLERANCE_LEVELS[dtype]
    caches = {id(sd): sd_loras, id(half): LoraCache(half.pipe, max_bytes=2**30)}
    for mode, job in jobs.items():
        [[reference]] = run_generation(sd, [job], blobs=blobs, loras=caches[id(sd)])
        [[out]] = run_generation(half, [job], blobs=blobs, loras=caches[id(half)])
        a, b = pixels(out), pixels(reference)
        assert a.shape == b.shape, mode
        assert np.abs(a - b).max() <= worst and np.abs(a - b).mean() <= mean, (mode, dtype)
        if mode == "inpaint":  # unmasked pixels are the input's, exactly, in any dtype
            untouched = np.asarray(mask.filter(ImageFilter.GaussianBlur(job.mask_blur))) == 0
            assert np.array_equal(a[untouched], np.asarray(image).astype(int)[untouched])
    plain = pixels(run_generation(half, [jobs["txt2img"]])[0][0])
    with_lora = pixels(
        run_generation(half, [jobs["lora"]], blobs=blobs, loras=caches[id(half)])[0][0]
    )
    assert np.abs(with_lora - plain).mean() > 1  # the LoRA applied in half precision
    # Deriving the img2img/inpaint pipelines must not have cast the shared modules to fp32.
    assert {half.pipe.unet.dtype, half.pipe.vae.dtype, half.inpaint().unet.dtype} == {half.dtype}
