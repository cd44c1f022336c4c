"""What each mode does to a real photo (scikit-image's astronaut), on the tiny model.

The tiny model's VAE is trained on photos (`pipeline/models/train_tiny_vae.py`; half
of it on the astronaut, also at the sizes these tests use), so a photo survives the
encode/decode round trip and these tests can check more than sizes: low strength
stays close to the input (a photo the VAE never saw too) and higher strength moves
away from it, inpainting changes the masked part and nothing else, outpainting keeps
the original and upscaling keeps the picture. The UNet is random, so whatever it
draws is noise: the checks are about what is kept, never about what is drawn (which
is also why face fix, at denoise 0.4, is checked only for what it leaves alone:
tests/test_face_jobs.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from pipeline.contract.jobs import GenerateSpec
from pipeline.generate.modes import run_generation
from tests.conftest import png_of

# img2img at strength 0.05 of the astronaut at 128² comes back within 3.1 levels on
# average (the VAE's round trip: 1.8 with the latents' mode, train_tiny_vae prints it,
# plus the sampled latents' noise); a margin for other CPUs. The VAE learnt this photo
# at this size: a photo it never saw (chelsea, held out) comes back within 10.9.
ROUND_TRIP_LEVELS = 4
HELD_OUT_ROUND_TRIP_LEVELS = 12


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(photos.astronaut()).resize((128, 128), Image.LANCZOS)


def spec(**changes) -> GenerateSpec:
    values = {"prompt": "photo of a woman", "width": 128, "height": 128, "steps": 20, "seed": 5}
    return GenerateSpec(**{**values, **changes})


def pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.png)).convert("RGB")).astype(int)


def mean_levels(a: np.ndarray, b) -> float:
    return float(np.abs(a - np.asarray(b).astype(int)).mean())


def test_img2img_at_low_strength_returns_the_photo(sd, astronaut, blobs):
    source = blobs.put(png_of(astronaut))
    errors = {
        strength: mean_levels(
            pixels(
                run_generation(
                    sd, [spec(mode="img2img", image=source, strength=strength)], blobs=blobs
                )[0][0]
            ),
            astronaut,
        )
        for strength in (0.05, 0.5, 0.95)
    }
    assert errors[0.05] <= ROUND_TRIP_LEVELS, errors
    assert errors[0.05] < errors[0.5] < errors[0.95], errors  # more strength, further away


def test_img2img_at_low_strength_returns_a_photo_the_vae_never_saw(sd, blobs):
    cat = Image.fromarray(photos.chelsea()).resize((192, 128), Image.LANCZOS)
    job = spec(mode="img2img", image=blobs.put(png_of(cat)), strength=0.05, width=192)
    out = pixels(run_generation(sd, [job], blobs=blobs)[0][0])
    assert mean_levels(out, cat) <= HELD_OUT_ROUND_TRIP_LEVELS


def test_outpaint_keeps_the_photo_and_fills_the_new_side(sd, astronaut, blobs):
    job = spec(
        mode="outpaint",
        image=blobs.put(png_of(astronaut)),
        outpaint_direction="right",
        outpaint_pixels=64,
        prompt="",
    )
    out = pixels(run_generation(sd, [job], blobs=blobs)[0][0])
    assert out.shape == (128, 192, 3)
    original = np.asarray(astronaut).astype(int)
    assert np.array_equal(out[:, :96], original[:, :96])  # far from the seam: kept as is
    assert out[:, 128:].std() > 5  # the new side is drawn, not left blank


def test_upscale_keeps_the_picture(sd, astronaut, blobs):
    small = astronaut.resize((64, 64), Image.LANCZOS)
    job = spec(mode="upscale", image=blobs.put(png_of(small)), strength=0.05, width=64, height=64)
    out = pixels(run_generation(sd, [job], blobs=blobs)[0][0])
    assert out.shape == (128, 128, 3)
    # Measured 3.3 levels: the VAE learnt the astronaut at 128², so what the 64² copy
    # lost comes back; a photo it never saw would come back blurred.
    assert mean_levels(out, astronaut) <= ROUND_TRIP_LEVELS + 1
