"""The 2026 families' extras on the tiny random-weight models (issue 24's "Left"):
progress previews for Qwen-Image(-Edit) and Flux.2 klein, ControlNet for Z-Image and
Qwen-Image, Z-Image Omni's edit mode, the Lightning LoRA defaults, and the memory planner
applied to the flow families' tiny models."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.contract.jobs import GenerateSpec

WIDTH, HEIGHT = 96, 64  # not square: a preview must keep the image's aspect
PROMPT = "a photo of a cat"


class _Blobs:
    """Input photos by sha256, as the Runner's blob store hands them to a job."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.files: dict[str, Path] = {}

    def add(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        sha = hashlib.sha256(buffer.getvalue()).hexdigest()
        self.data[sha] = buffer.getvalue()
        return sha

    def add_file(self, path: Path) -> str:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        self.files[sha] = path
        return sha

    def get(self, sha: str) -> bytes:
        return self.data[sha]

    def path(self, sha: str) -> Path:
        return self.files[sha]


def _photo(seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _spec(**values) -> GenerateSpec:
    base = dict(
        prompt=PROMPT, sampler="Euler", steps=2, cfg_scale=2.0, width=WIDTH, height=HEIGHT, seed=7
    )
    return GenerateSpec(**{**base, **values})


def _pixels(output) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(output.png)).convert("RGB"), dtype=np.int16)


def _plain(pipe, **call) -> np.ndarray:
    """Plain diffusers' call with the job's seed: the reference our engine must equal."""
    import torch

    with torch.inference_mode():
        image = pipe(generator=[torch.Generator("cpu").manual_seed(7)], **call).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def models(tiny_2026):
    from pipeline.contract.config import ModelConfig
    from pipeline.models.loading import load_model

    return {
        name: load_model(ModelConfig(name=name, source=str(path)))
        for name, path in tiny_2026.items()
    }


# --- 1. progress previews ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, mode",
    [
        ("qwen-image", "txt2img"),
        ("qwen-image-edit-plus", "edit"),
        ("flux2-klein", "txt2img"),
        ("flux2-klein", "edit"),
        ("zimage", "txt2img"),
    ],
)
def test_a_progress_event_carries_a_jpeg_preview_of_the_images_aspect(models, name, mode):
    from pipeline.generate.modes import run_generation

    blobs = _Blobs()
    extra = dict(mode="edit", image=blobs.add(_photo())) if mode == "edit" else {}
    events: list = []
    run_generation(
        models[name],
        [_spec(**extra)],
        blobs=blobs,
        on_step=lambda *event: events.append(event),
        preview_every=1,
    )
    assert [(done, total) for done, total, _ in events] == [(1, 2), (2, 2)]
    for _, _, preview in events:
        image = Image.open(io.BytesIO(preview))
        assert image.format == "JPEG"
        # 12×8 latents upscaled to 256 on the long side: 256×171 (the image's 3:2)
        assert image.size == (256, round(256 * HEIGHT / WIDTH))


def test_packed_latents_are_unpacked_as_the_pipelines_own_decoders_unpack_them(models):
    """The preview's [batch, channels, h, w] is what the pipeline hands its VAE: Qwen-Image's
    `_unpack_latents` (its frame axis dropped), klein's position-id scatter and unpatchify
    (then 32 channels at h/8 × w/8)."""
    import torch

    qwen, klein = models["qwen-image"], models["flux2-klein"]
    tokens = (HEIGHT // 16) * (WIDTH // 16)
    packed = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(0))
    theirs = qwen.pipe._unpack_latents(packed, HEIGHT, WIDTH, qwen.pipe.vae_scale_factor)
    ours = qwen.kind.preview_latents(packed, qwen.pipe, (WIDTH, HEIGHT))
    assert torch.equal(ours, theirs[:, :, 0])

    packed = torch.randn(1, tokens, 128, generator=torch.Generator().manual_seed(1))
    ids = klein.pipe._prepare_latent_ids(torch.zeros(1, 128, HEIGHT // 16, WIDTH // 16))
    scattered = klein.pipe._unpack_latents_with_ids(packed, ids)
    theirs = klein.pipe._unpatchify_latents(scattered)
    ours = klein.kind.preview_latents(packed, klein.pipe, (WIDTH, HEIGHT))
    assert ours.shape == (1, 32, HEIGHT // 8, WIDTH // 8)
    assert torch.equal(ours, theirs)
