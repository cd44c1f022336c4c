"""Bad input through the emulator: each gets a short ephemeral error naming the problem
and the limit, nothing is queued or stored, and the bot serves the next command."""

from __future__ import annotations

import struct
import zlib

import pytest

from bot import store
from tests.botkit import *  # noqa: F403 - the end-to-end kit (botkit.__all__)

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(600)]
MB = 1024 * 1024


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes whose header claims width × height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 1000)  # far too little data: it must never be decoded
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def stored_files(config) -> set[str]:
    return {p.name for p in config.storage.blobs.glob("*/*")}


async def img2img_with(emu, attachment: dict):  # noqa: F811
    return await emu.send_command("img2img", {"image": attachment, "prompt": "x"})


async def test_bad_attachments_are_refused_before_anything_is_stored(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    config,
):
    before = stored_files(config)
    async with running_sdbot(config, shared_pool):
        text = await error_reply(
            await img2img_with(emu, attach(emu, b"just some notes\n", "notes.txt"))
        )
        assert text == (
            "The image (notes.txt) is text/plain, not an image "
            "(expected PNG, JPEG, WebP, GIF or BMP)"
        )

        corrupt = photo((64, 64))[:-40]  # the end of the pixel data is missing
        text = await error_reply(await img2img_with(emu, attach(emu, corrupt, "broken.png")))
        assert text == "The image could not be decoded: the file is corrupt or truncated"

        huge = attach(emu, photo((64, 64)), "huge.png", size=40 * MB)
        text = await error_reply(await img2img_with(emu, huge))
        assert text == "The image (huge.png) is 40.0 MB; the limit is 10 MB"

        text = await error_reply(await img2img_with(emu, attach(emu, bomb_png(), "bomb.png")))
        assert text == "The image is 20000×20000 (400.0 MP); the limit is 1.0 MP"

        mask = attach(emu, photo((32, 32)), "mask.png")
        text = await error_reply(
            await emu.send_command(
                "inpaint", {"image": attach(emu, photo((64, 64))), "mask": mask, "prompt": "x"}
            )
        )
        assert text.startswith("The mask is 32×32 but the image is 64×64")

        # The bot still serves the next command normally.
        job = await queued_job(await imagine(emu, "after all that"))
        await wait_result(emu, job)
    # The 40 MB file was never downloaded.
    assert not [r for r in emu.requests if "huge.png" in r.path]
    db = store.open_db(config.storage.database)
    assert [j["id"] for j in store.user_jobs(db, emu.alice.id)] == [job]
    assert len(stored_files(config) - before) <= 1  # only the result of the good job


async def test_out_of_range_options_sent_anyway(emu, shared_pool, config):  # noqa: F811
    """Discord's client enforces Range and choices; a hostile client doesn't."""
    async with running_sdbot(config, shared_pool):
        steps = await error_reply(await imagine(emu, "x", steps=0))
        cfg = await error_reply(await imagine(emu, "x", cfg=99.0))
        odd = await error_reply(await imagine(emu, "x", size="100x100"))
        big = await error_reply(await imagine(emu, "x", size="4096x4096"))
        junk = await error_reply(await imagine(emu, "x", size="huge"))
        model = await error_reply(await imagine(emu, "x", model="sdxl-turbo"))
        count = await error_reply(await imagine(emu, "x", count=9))
        long = await error_reply(await imagine(emu, "y" * 600))
        keep = await error_reply(
            await emu.send_command(
                "inpaint", {"image": attach(emu, photo()), "prompt": "x", "keep": "hands"}
            )
        )
        job = await queued_job(await imagine(emu, "still fine"))
        await wait_result(emu, job)
    assert steps == "Steps must be between 1 and 150, but is 0"
    assert cfg == "CFG scale must be between 0 and 30, but is 99"
    assert odd == "Width must be a multiple of 8, but is 100"
    assert big == "Width must be between 64 and 2048, but is 4096"
    assert junk == "Size must look like 768x512, not 'huge'"
    assert model == "Unknown model 'sdxl-turbo'; configured models: tiny"
    assert count == "Count must be between 1 and 4, but is 9"
    assert long == "The prompt is 600 characters; the limit is 500"
    assert keep.startswith("Keep must be one of face, background")


async def test_a_member_over_their_queue_cap(emu, shared_pool, tiny_sd, tmp_path):  # noqa: F811
    config = make_config(
        tiny_sd, data_dir_for(shared_pool, tmp_path), emu, queue={"max_queued_per_user": 1}
    )
    async with running_sdbot(config, shared_pool):
        first = await queued_job(await imagine(emu, "slow", steps=150, size="256x256"))
        text = await error_reply(await imagine(emu, "one too many"))
        photo_refused = await error_reply(await img2img_with(emu, attach(emu, photo())))
        others = await queued_job(await imagine(emu, "bob is fine", user=emu.bob))
        await emu.send_command("cancel", {"job": first})
        await wait_result(emu, others)
        after = await queued_job(await imagine(emu, "room again"))
        await wait_result(emu, after)
    assert text == (
        "You already have 1 jobs queued (the limit is 1); wait for one to finish or /cancel one"
    )
    assert photo_refused == text


async def test_unknown_lora_and_bad_lora_tags(emu, shared_pool, config):  # noqa: F811
    async with running_sdbot(config, shared_pool):
        missing = await error_reply(await imagine(emu, "a cat <lora:nope:0.8>"))
        weight = await error_reply(await imagine(emu, "a cat <lora:nope:heavy>"))
        job = await queued_job(await imagine(emu, "a cat"))
        await wait_result(emu, job)
    assert missing.startswith("LoRA 'nope' not found.")
    assert weight == "LoRA 'nope' weight must be a number, not 'heavy'"


async def test_a_bug_gets_an_error_id_and_the_bot_keeps_serving(
    emu,  # noqa: F811
    shared_pool,  # noqa: F811
    config,
):
    """An unexpected exception (here: a job row whose spec can't be read) is logged with
    an id, the member gets that id, and the next command works."""
    async with running_sdbot(config, shared_pool):
        job = await queued_job(await imagine(emu, "fine", seed=3))
        message = await wait_result(emu, job)
        db = store.open_db(config.storage.database)
        with db.conn:
            db.execute('UPDATE jobs SET spec = \'{"kind": "generate"}\' WHERE id = ?', [job])
        answer = await error_reply(await emu.click(message, f"sdbot:reroll:{job}"))
        next_job = await queued_job(await imagine(emu, "still serving"))
        await wait_result(emu, next_job)
    assert answer.startswith("Something went wrong on our side (error id `")
