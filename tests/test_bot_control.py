"""End to end: ControlNet and IP-Adapter options through the real bot, the loopback
Discord emulator and a real worker process running the tiny models. Nothing is mocked."""

from __future__ import annotations

import pytest
from PIL import Image
from skimage import data as photos

from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]


@pytest.fixture
def config(emu, shared_pool, tiny_sd, tmp_path, tiny_control):  # noqa: F811
    # Two more units whose preprocessor needs a model nobody configured: hidden, refused.
    net = tiny_control["controlnets"]["pose"]["source"]
    hidden = {"openpose": "openpose", "seg": "seg_ofade20k"}
    units = {name: {"source": net, "preprocessor": pre} for name, pre in hidden.items()}
    sections = {**tiny_control, "controlnets": {**tiny_control["controlnets"], **units}}
    return make_config(tiny_sd, data_dir_for(shared_pool, tmp_path), emu, **sections)


def picture(name: str, size: int = 96) -> bytes:
    return png_bytes(Image.fromarray(getattr(photos, name)()).resize((size, size)))


async def test_img2img_with_a_photo_and_a_control_image(emu, shared_pool, config):  # noqa: F811
    source = attach(emu, picture("astronaut"), "me.png")
    edges = attach(emu, picture("chelsea", 80), "edges.png")
    async with running_sdbot(config, shared_pool):
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
        assert image.size == (64, 64)  # the photo's shape in the 64² budget
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
        assert [c["value"] for c in choices] == ["pose"]  # not openpose: no pose_model

        # Bad input: one ephemeral line each, nothing queued.
        text = attach(emu, b"just words", "notes.txt", content_type="text/plain")
        cases = [
            ("img2img", {"image": source, "control": "nope"}, "unknown ControlNet unit 'nope'"),
            ("imagine", {"control": "canny"}, "needs a control_image"),
            ("imagine", {"reference": text}, "not an image"),
            ("imagine", {"control_weight": 1.5}, "control_weight needs a control"),
            (
                "imagine",
                {"control": "openpose", "control_image": edges},
                "preprocessor 'openpose' needs a model and none is configured ([control] "
                "pose_model)",
            ),
        ]
        for command, extra, expected in cases:
            record = await emu.send_command(command, {"prompt": "a cat", **extra})
            line = await error_reply(record)
            assert expected.lower() in line.lower() and "\n" not in line, line
