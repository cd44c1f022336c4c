"""The prompt language through the emulator: bad editing syntax refused before queueing,
and parameters pasted from Info (one line, as Discord sends them) re-run."""

from __future__ import annotations

import pytest

from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]

PASTED = (
    "a [red:blue:0.5] square AND a cat:0.5 Negative prompt: blurry, (bad hands:1.2) "
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
    "Size: 64x64, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1'
)


async def test_bad_editing_syntax_and_pasted_parameters(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    config = make_config(tiny_sd, data_dir_for(shared_pool, tmp_path), emu)
    async with running_sdbot(config, shared_pool):
        negative = await error_reply(await imagine(emu, "a [cat:dog:-1]"))
        parts = await error_reply(await imagine(emu, " AND ".join(["x"] * 50)))
        unclosed = await error_reply(await imagine(emu, "a [cat|dog"))
        record = await imagine(emu, PASTED, cfg=5.0)
        job = await queued_job(record)
        message = await wait_result(emu, job)
    assert negative.startswith("[cat:dog:-1] in the prompt: the switch point must be a step")
    assert parts == (
        "The prompt has 50 parts joined by AND; the limit is 8 "
        "(each part costs one more model pass per step)"
    )
    assert unclosed.startswith("The prompt has a '[' that is never closed: '[cat|dog'")
    [(image, info)] = result_images(emu, message)
    assert image.size == (64, 64)
    assert info["Prompt"] == "a [red:blue:0.5] square AND a cat:0.5"
    assert info["Negative prompt"] == "blurry, (bad hands:1.2)"
    assert (info["Steps"], info["Sampler"], info["Schedule type"]) == ("3", "DPM++ 2M", "Karras")
    assert (info["CFG scale"], info["Seed"]) == ("5", "42")  # the member's cfg option wins
    notice = [m["content"] for m in record.messages if m["content"].startswith("Used the")]
    assert notice == [
        "Used the pasted parameters (negative prompt, steps, sampler, seed, size). "
        "Not applied here: Clip skip: 2; TI hashes: easynegative: c74b4e810b03; "
        "model v1-5-pruned-emaonly (not on this server)."
    ]
