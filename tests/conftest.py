"""Shared fixtures: the tiny random-weight models, written once per test session."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest

# Tests never reach a network; make the Hub client fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two cores shared by the test process and its worker processes: with more than one
# intra-op thread each, the tiny model runs up to 100× slower from oversubscription.
# Set before torch loads, so spawned workers inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; several oversubscribe a shared CPU (up to
    100× slower), and one thread keeps CPU results bit-reproducible across processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet_libraries() -> None:
    try:
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from pipeline.families.sd_tiny import write_tiny_model

    _quiet_libraries()
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_xl(tmp_path_factory) -> Path:
    from pipeline.families.sd_tiny import write_tiny_model

    _quiet_libraries()
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "xl", xl=True)


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory) -> Path:
    from pipeline.families.sd_tiny import write_tiny_model

    _quiet_libraries()
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "inpaint", inpaint=True)


@pytest.fixture(scope="session")
def tiny_2026(tmp_path_factory) -> dict[str, Path]:
    """The tiny Z-Image, Qwen-Image (txt2img, Edit, Edit Plus) and Flux.2 klein folders, by
    family name: written once for the session and shared by the 2026 families' pipeline
    and LoRA tests (which only read them)."""
    from pipeline.families.flux2_klein_tiny import write_tiny_flux2_klein
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image
    from pipeline.families.zimage_tiny import write_tiny_zimage

    _quiet_libraries()
    root = tmp_path_factory.mktemp("families2026")
    return {
        "zimage": write_tiny_zimage(root / "zimage"),
        "qwen-image": write_tiny_qwen_image(root / "qwen"),
        "qwen-image-edit": write_tiny_qwen_image(root / "edit", variant="edit"),
        "qwen-image-edit-plus": write_tiny_qwen_image(root / "plus", variant="edit-plus"),
        "flux2-klein": write_tiny_flux2_klein(root / "klein"),
    }


@pytest.fixture(scope="session")
def tiny_edit(tmp_path_factory) -> Path:
    """A tiny Qwen-Image-Edit-Plus folder (edits with up to three photos): the editing
    model of the bot's end-to-end tests, known to the shared worker pool as "edit"."""
    from pipeline.families.qwen_image_tiny import write_tiny_qwen_image

    _quiet_libraries()
    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny") / "edit", variant="edit-plus")


@pytest.fixture(scope="session")
def tiny_control(tiny_sd, tmp_path_factory) -> dict:
    """A tiny ControlNet and IP-Adapter for the tiny SD model, as config tables (two units:
    canny, and a pose unit that takes its map as it is)."""
    from pipeline.families.sd_tiny_control import write_tiny_controlnet, write_tiny_ip_adapter

    root = tmp_path_factory.mktemp("tiny-control")
    net = str(write_tiny_controlnet(tiny_sd, root / "controlnet"))
    return {
        "controlnets": {
            "canny": {"source": net, "preprocessor": "canny", "kind": "edges"},
            "pose": {"source": net, "preprocessor": "none", "kind": "pose"},
        },
        "ip_adapters": {"tiny": {"source": str(write_tiny_ip_adapter(tiny_sd, root / "ip"))}},
    }


# The same job alone and in a batch runs the same math on other matrix shapes, for which
# BLAS may pick other kernels (seen: AVX2-only EPYC vs AVX-512 Xeon): the images may
# differ by rounding, never by content. Bit-exact equality holds only for the same call
# twice in one process.
BATCH_TOLERANCE_LEVELS = 2


def level_difference(a, b) -> int:
    """The largest difference in 8-bit levels between two images (PNG bytes or PIL)."""
    import numpy as np
    from PIL import Image

    def pixels(x):
        if isinstance(x, (bytes, bytearray)):
            x = Image.open(io.BytesIO(x))
        return np.asarray(x.convert("RGB"), dtype=np.int16)

    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape, f"sizes differ: {pa.shape} vs {pb.shape}"
    return int(np.abs(pa - pb).max())


@pytest.fixture(scope="module")
def sd(tiny_sd):
    """The tiny SD 1.x model loaded on the CPU, once per test module (modules may adapt
    it, e.g. with LoRA layers, so it is not shared across modules)."""
    from pipeline.contract.config import config_from_dict
    from pipeline.models.loading import ModelCache

    config = config_from_dict({"models": {"tiny": {"source": str(tiny_sd)}}})
    return ModelCache(config, "cpu").get()


@pytest.fixture(scope="module")
def xl(tiny_xl):
    """The tiny SDXL model loaded on the CPU, once per test module."""
    from pipeline.contract.config import config_from_dict
    from pipeline.models.loading import ModelCache

    config = config_from_dict({"models": {"tinyxl": {"source": str(tiny_xl)}}})
    return ModelCache(config, "cpu").get()


@pytest.fixture
def blobs(tmp_path):
    """An empty blob store for one test."""
    from pipeline.contract.blobs import BlobStore

    return BlobStore(tmp_path / "blobs")


def png_of(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def emulator():
    """A loopback Discord (tests/emulator.py) with discord.py pointed at it."""
    from tests.emulator import emulated_discord

    async with emulated_discord() as emu:
        yield emu
    emu.check_clean()


# Half precision vs float32 on the tiny model, in 8-bit levels (largest, mean), measured on
# every mode at 64², 2 steps: fp16 ≤ 3 / 0.2, bf16 ≤ 14 / 1.5 (bf16 keeps 8 mantissa bits).
# The bounds leave room for other CPUs; a dtype mix-up (NaN, black, noise) is far beyond.
HALF_TOLERANCE_LEVELS = {"float16": (6, 0.6), "bfloat16": (32, 2.5)}
HALF_DTYPES = tuple(HALF_TOLERANCE_LEVELS)
