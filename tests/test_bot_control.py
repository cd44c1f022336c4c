"""End to end: ControlNet and IP-Adapter options through the real bot, the loopback
Discord emulator and a real worker process running the tiny models. Nothing is mocked."""

from __future__ import annotations

import pytest
import pytest_asyncio
from PIL import Image
from skimage import data as photos

from pipeline.workers.local_pool import LocalPool
from tests.botkit import (
    attach,
    data_dir_for,
    emu,  # noqa: F401 - fixture
    error_reply,
    make_config,
    png_bytes,
    queued_job,
    result_images,
    running_sdbot,
    wait_result,
)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def control_sections(tiny_sd, tmp_path_factory) -> dict:
    from pipeline.models.tiny_control import write_tiny_controlnet, write_tiny_ip_adapter

    root = tmp_path_factory.mktemp("bot-control")
    write_tiny_controlnet(tiny_sd, root / "controlnet")
    write_tiny_ip_adapter(tiny_sd, root / "ip_adapter")
    net = str(root / "controlnet")
    return {
        "controlnets": {
            "canny": {"source": net, "preprocessor": "canny", "kind": "edges"},
            "pose": {"source": net, "preprocessor": "none", "kind": "pose"},
        },
        "ip_adapters": {"tiny": {"source": str(root / "ip_adapter")}},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def control_pool(tiny_sd, tmp_path_factory, control_sections):
    config = make_config(tiny_sd, tmp_path_factory.mktemp("cpool") / "data", **control_sections)
    pool = LocalPool(config)
    await pool.start()
    yield pool
    await pool.close()


@pytest.fixture
def config(emu, control_pool, tiny_sd, tmp_path, control_sections):  # noqa: F811
    return make_config(tiny_sd, data_dir_for(control_pool, tmp_path), emu, **control_sections)


def picture(name: str, size: int = 96) -> bytes:
    return png_bytes(Image.fromarray(getattr(photos, name)()).resize((size, size)))


async def test_img2img_with_a_photo_and_a_control_image(emu, control_pool, config):  # noqa: F811
    source = attach(emu, picture("astronaut"), "me.png")
    edges = attach(emu, picture("chelsea", 80), "edges.png")
    async with running_sdbot(config, control_pool):
        options = {
            "image": source,
            "prompt": "an astronaut in a red suit",
            "strength": 0.6,
            "control_image": edges,
            "control": "canny",
            "control_weight": 0.8,
        }
        record = await emu.send_command("img2img", options)
        job = await queued_job(record)
        message = await wait_result(emu, job)
        [(image, info)] = result_images(emu, message)
        assert image.size == (96, 96)
        unit = info["ControlNet 0"]
        assert unit.startswith("Module: canny, Model: canny [") and "Weight: 0.8," in unit
        # Reroll keeps the unit (same control image, new seed).
        again = await wait_result(
            emu, await queued_job(await emu.click(message, f"sdbot:reroll:{job}"))
        )
        [(_, rerolled)] = result_images(emu, again)
        assert rerolled["ControlNet 0"] == unit and rerolled["Seed"] != info["Seed"]

        # keep: pose — the pose unit with the photo itself as control — and a reference.
        reference = attach(emu, picture("chelsea"), "style.png")
        record = await emu.send_command(
            "img2img",
            {"image": source, "prompt": "a knight", "keep": "pose", "reference": reference},
        )
        [(_, posed)] = result_images(emu, await wait_result(emu, await queued_job(record)))
        assert posed["ControlNet 0"].startswith("Module: none, Model: pose [")
        assert posed["ControlNet 1"].startswith("Module: ip-adapter_clip_sd15, Model: tiny [")

        choices = await emu.send_autocomplete("imagine", {"prompt": "x", "control": "p"}, "control")
        assert [c["value"] for c in choices] == ["pose"]

        # Bad input: one ephemeral line each, nothing queued.
        text = attach(emu, b"just words", "notes.txt", "text/plain")
        cases = [
            ("img2img", {"image": source, "control": "nope"}, "unknown ControlNet unit 'nope'"),
            ("imagine", {"control": "canny"}, "needs a control_image"),
            ("imagine", {"reference": text}, "not an image"),
            ("imagine", {"control_weight": 1.5}, "control_weight needs a control"),
        ]
        for command, extra, expected in cases:
            record = await emu.send_command(command, {"prompt": "a cat", **extra})
            line = await error_reply(record)
            assert expected in line and "\n" not in line, line
